"""Multi-process runs: starting JAX's distributed runtime, and ending cleanly when a peer process is lost.

A lost peer makes the next collective fail, then the runtime's shutdown barrier or its own thread abort the process
with a C++ stack trace after the heartbeat timeout, which no Python handler can intercept. So a collective's failure
is reported as a lost peer (:func:`peer_lost`) and the process ends with :func:`exit_now`, skipping the barrier;
``vpns_jax.supervisor`` covers the runtime's own abort (docs/reliability.md, "Several processes, and a lost host").
"""

from __future__ import annotations

import os
import re
import sys

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the run can be restarted as it was
# What a collective or the runtime says when the process on the other end is gone.
_PEER_LOST_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "heartbeat",
                    "coordinationservice", "coordination service", "tasks are unhealthy", "socket closed")

_GLOO_FAILED = re.compile(r"\bgloo [\w-]+ failed: ")

_STARTED: list[bool] = []


def started() -> bool:
    """Whether this process started the distributed runtime (:func:`initialize`)."""
    return bool(_STARTED)


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None, *,
               heartbeat_timeout_s: int) -> None:
    """Starts JAX's distributed runtime: at ``coordinator_address`` when given (CPU collectives over gloo),
    else from the cluster's own settings (TPU pods, SLURM). A process that stops sending heartbeats for
    ``heartbeat_timeout_s`` seconds is taken for lost."""
    import jax

    if coordinator_address:
        # Only CPU collectives read this; set before any backend starts, as initialize() requires.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    _STARTED.append(True)


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` (raised in a multi-process run) says another process of the run is gone: a failed
    collective or coordination-service call, rather than a fault of this process. Its causes count too."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).lower()
        # JAX's runtime errors (JaxRuntimeError) are RuntimeErrors; a host collective that failed once is
        # raised again as a ValueError carrying the transport's status ("UNKNOWN: Gloo AllGather failed: ...").
        runtime = isinstance(error, RuntimeError) or (isinstance(error, ValueError) and _GLOO_FAILED.search(text))
        if runtime and any(sign in text for sign in _PEER_LOST_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


def peer_lost_message(process_id: int | None, num_processes: int | None, detail: str) -> str:
    """The one line a process prints when a peer was lost, naming what the runtime said and how to resume."""
    who = f"process {process_id} of {num_processes}" if process_id is not None else "this process"
    count = f"all {num_processes}" if num_processes else "all the"
    detail = " ".join(detail.split())
    detail = detail.split(". ")[0] if len(detail) > 200 else detail  # the runtime's first sentence says it
    return (f"error: {who} lost a peer process ({detail[:300].rstrip('.')}); see the other processes' output, then restart "
            f"{count} processes with the same command to resume from the last checkpoint")


def exit_now(status: int) -> None:
    """Ends this process with ``status`` at once, after flushing its output: a failed multi-process run must not
    wait at the runtime's shutdown barrier for peers that may be gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
