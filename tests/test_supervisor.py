"""The parent of a multi-process run (vpns_jax/supervisor.py): what of the child's stderr it holds back, and
the one line that replaces the distributed runtime's abort."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from vpns_jax import distributed, supervisor

# A survivor's stderr when process 0 of two was SIGKILLed (jax 0.10, shortened): absl warnings and progress
# bars, the runtime's warning and errors, the fatal line and the C++ stack trace.
ABORT = (
    b"W1201 11:41:10.975431 140522223679168 image_feature.py:339] OpenCV is not installed.\n"
    b"\rvpns density 0.1 stage 1:   0%|          | 0/8 [00:00<?, ?it/s]"
    b"\rvpns density 0.1 stage 1:  12%|#         | 1/8 [00:04<00:31,  4.49s/it]"
    b"W1201 11:41:58.573376    5936 preemption_sync_manager.cc:147] Failed to retrieve preemption notice\n"
    b"Additional GRPC error information from remote target coordination_service\n"
    b"\rvpns density 0.1 stage 1:  25%|##        | 2/8 [00:05<00:20,  3.00s/it]"
    b"E1201 11:41:58.57 5936 coordination_service_agent.cc:289] Polled an error from coordination service\n"
    b"F1201 11:41:58.58 5936 client.h:80] Terminating process because the JAX distributed service detected "
    b"fatal errors. This most likely indicates that another task died. absl::Status: UNAVAILABLE: Failed to "
    b"send RPC to coordination service. Either the leader task was preempted\n"
    b"*** Check failure stack trace: ***\n"
    b"    @     0x7fa328c40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()\n"
)
SHOWN = ABORT[:ABORT.index(b"W1201 11:41:58")]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, len(ABORT)])
def test_the_filter_shows_progress_and_holds_the_runtimes_logs_whatever_the_chunks(chunk):
    stream = supervisor.StderrFilter()
    shown = b"".join(stream.feed(ABORT[i:i + chunk]) for i in range(0, len(ABORT), chunk)) + stream.flush()
    assert shown == SHOWN
    assert bytes(stream.held) == ABORT[len(SHOWN):]


def test_the_programs_own_lines_pass_while_holding_and_other_warnings_pass_always():
    stream = supervisor.StderrFilter()
    data = (b"W1201 11:00:00.1 1 checkpoint_manager.py:9] slow disk\n" b"E1201 11:00:01.1 2 gloo.cc:3] bad\n"
            b"progress\r" b"error: process 0 of 2 lost a peer process (x); restart\n"
            b"interrupted at density 0.1, stage 1, step 2; rerun the same command to resume\n" b"tail")
    shown = stream.feed(data) + stream.flush()
    assert shown == (b"W1201 11:00:00.1 1 checkpoint_manager.py:9] slow disk\n"
                     b"error: process 0 of 2 lost a peer process (x); restart\n"
                     b"interrupted at density 0.1, stage 1, step 2; rerun the same command to resume\n")
    assert bytes(stream.held) == b"E1201 11:00:01.1 2 gloo.cc:3] bad\nprogress\rtail"


def _child(script: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(script)]


def test_a_runtime_abort_becomes_one_line_and_exit_75(capfd):
    script = f"""
        import os, sys
        sys.stderr.buffer.write({ABORT!r}); sys.stderr.flush()
        os.abort()
    """
    status = supervisor.supervise(["main"], 1, 2, child_command=_child(script))
    assert status == distributed.EXIT_PEER_LOST
    err = capfd.readouterr().err
    assert err.encode() == SHOWN + b"\n" + (  # a new line after the progress bar
        b"error: process 1 of 2 lost a peer process (the distributed runtime reported UNAVAILABLE: Failed to send "
        b"RPC to coordination service); see the other processes' output, then restart all 2 processes with the "
        b"same command to resume from the last checkpoint\n")


def test_other_endings_keep_the_childs_status_and_show_what_was_held(capfd):
    script = """
        import sys
        print("results table")
        sys.stderr.write("E1201 11:00:01.1 2 orbax.py:3] a logged error\\nmore\\nerror: disk full\\n")
        sys.exit(2)
    """
    assert supervisor.supervise(["main"], 0, 2, child_command=_child(script)) == 2
    captured = capfd.readouterr()
    assert captured.out == "results table\n"
    assert captured.err == "error: disk full\nE1201 11:00:01.1 2 orbax.py:3] a logged error\nmore\n"
    assert supervisor.supervise(["main"], 0, 2, child_command=_child("import os; os.kill(os.getpid(), 9)")) == 137


def test_sigterm_is_forwarded_once_and_the_child_stops_cleanly(capfd):
    script = """
        import signal, sys, time
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        print("ready", flush=True)
        while not got:
            time.sleep(0.01)
        time.sleep(0.3)  # a second forwarded signal would land here
        sys.stderr.write(f"interrupted after {len(got)} signal(s)\\n")
        sys.exit(128 + got[0])
    """
    def send() -> None:
        time.sleep(1.5)  # the child has started and installed its handler
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=send, daemon=True).start()
    assert supervisor.supervise(["main"], 0, 2, child_command=_child(script)) == 143
    assert capfd.readouterr().err == "interrupted after 1 signal(s)\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_supervised_child_dies_with_its_parent(tmp_path):
    script = f"""
        import os, subprocess, sys, time
        env = {{**os.environ, {supervisor.SUPERVISED_ENV!r}: str(os.getpid())}}
        child = subprocess.Popen([sys.executable, "-c", "from vpns_jax import supervisor; import time; "
                                  "supervisor.watch_parent(); time.sleep(60)"], env=env)
        open({str(tmp_path / 'pid')!r}, "w").write(str(child.pid))
        time.sleep(60)
    """
    parent = subprocess.Popen(_child(script), cwd=os.getcwd())
    pid_file = tmp_path / "pid"
    deadline = time.monotonic() + 30
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # the child's watch has started
    parent.kill()
    parent.wait()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the supervised child outlived its parent"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
