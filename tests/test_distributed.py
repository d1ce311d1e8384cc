"""Lost peers in multi-process runs (vpns_jax/distributed.py): which errors say a peer is gone, the one line."""

import jax
import pytest

from vpns_jax import distributed

# Messages the runtime gave when the other process of a two-process CPU run was SIGKILLed (jax 0.10, gloo).
GLOO_READ = ("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
             "[127.0.0.1]:6562: Connection reset by peer")
GLOO_CLOSED = ("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed "
               "by peer [127.0.0.1]:4321")
HEARTBEAT = ("UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have "
             "crashed. Check the task logs for an earlier error.")


@pytest.mark.parametrize("error, lost", [
    (jax.errors.JaxRuntimeError(GLOO_READ), True),
    (jax.errors.JaxRuntimeError(GLOO_CLOSED), True),
    (RuntimeError(HEARTBEAT), True),
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 bytes"), False),
    # A host collective that failed once fails again as a ValueError (seen in CI, and with two bare processes
    # calling multihost_utils.sync_global_devices after process_allgather saw the peer gone).
    (ValueError(GLOO_CLOSED), True),
    (ValueError("connection closed by peer"), False),  # not the runtime's status: this process's own fault
    (ValueError("bad value"), False),
    (OSError(32, "Broken pipe"), False),
])
def test_peer_lost_knows_a_failed_collective_from_other_errors(error, lost):
    assert distributed.peer_lost(error) is lost


def test_a_lost_peer_behind_another_error_counts():
    try:
        try:
            raise jax.errors.JaxRuntimeError(GLOO_READ)
        except RuntimeError as inner:
            raise KeyError("checkpoint") from inner
    except KeyError as outer:
        assert distributed.peer_lost(outer)
    assert not distributed.peer_lost(KeyError("checkpoint"))


def test_the_peer_lost_line_names_the_process_the_cause_and_how_to_resume():
    line = distributed.peer_lost_message(0, 2, GLOO_READ)
    assert line == ("error: process 0 of 2 lost a peer process (" + GLOO_READ + "); see the other processes' "
                    "output, then restart all 2 processes with the same command to resume from the last checkpoint")
    long = "UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task died " + "x" * 300
    assert "(UNAVAILABLE: Failed to send RPC to coordination service); " in distributed.peer_lost_message(1, 2, long)
    assert distributed.peer_lost_message(None, None, "gone").startswith("error: this process lost a peer process")
    assert "\n" not in distributed.peer_lost_message(0, 2, HEARTBEAT)


def test_started_is_false_until_initialize():
    assert not distributed.started()  # the test process never starts the runtime
