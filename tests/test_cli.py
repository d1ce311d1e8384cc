"""Stopping on SIGINT / SIGTERM (vpns_jax/cli.py): a request, raised at the next safe point; a second signal at once."""

import os
import signal

import pytest

from vpns_jax import cli


@pytest.mark.parametrize("signum, immediate", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, cli.Stopped)])
def test_a_signal_requests_a_stop_and_a_second_one_stops_at_once(signum, immediate):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with cli.stop_requests():
        cli.raise_if_stopped()  # nothing requested yet
        os.kill(os.getpid(), signum)  # handled before the next bytecode: only recorded
        with pytest.raises(cli.Stopped) as stop:
            cli.raise_if_stopped()
        assert cli.signal_number(stop.value) == signum
        with pytest.raises(immediate):
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # the handler runs at a bytecode boundary
                pass
    assert {s: signal.getsignal(s) for s in before} == before  # the caller's handlers are back
    cli.raise_if_stopped()  # and no request outlives the block


def test_an_interrupt_is_one_line_with_exit_128_plus_the_signal(capsys):
    assert cli.report_interrupt(cli.Interrupted(signal.SIGTERM, "at density 0.5, stage 1, step 7")) == 143
    assert cli.report_interrupt(KeyboardInterrupt()) == 130
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["interrupted at density 0.5, stage 1, step 7; rerun the same command to resume",
                     "interrupted while starting; rerun the same command to resume"]


def test_the_stop_requested_in_a_block_is_known_after_it_closes():
    with cli.stop_requests():
        assert cli.requested_stop() is None
        os.kill(os.getpid(), signal.SIGTERM)
    assert cli.requested_stop() == signal.SIGTERM
    with cli.stop_requests():  # a new block starts afresh
        assert cli.requested_stop() is None
    assert cli.requested_stop() is None


def test_watch_parent_calls_back_once_the_parent_is_gone():
    import threading

    called = threading.Event()
    cli.watch_parent(os.getppid() + 10**6, called.set)  # a parent this process never had: gone already
    assert called.wait(timeout=5)
