"""Worker processes: the same bytes as in-process loading, resumable, per-process shares, clean failures."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from vpns_jax.data import pipeline, run_data, workers


def _source(n, size=7):
    """Examples with random pixels of an odd size (so resizing and cropping do real work) and their index as label."""
    return [{"image": np.random.default_rng(i).integers(0, 256, (size, size + 2, 1), dtype=np.uint8), "label": i}
            for i in range(n)]


@pytest.fixture(scope="module")
def pool():
    train, test = _source(23), _source(9)
    workers_pool = workers.WorkerPool({"train": train, "test": test}, 2)
    yield workers_pool, train, test
    workers_pool.close()


def _stream(source, **kwargs):
    defaults = dict(global_batch_size=6, image_size=8, seed=4, stream=1, process_index=0, process_count=1)
    return pipeline.BatchStream(source, **{**defaults, **kwargs})


def _same(a, b):
    assert a["image"].dtype == b["image"].dtype == np.uint8
    assert a["image"].tobytes() == b["image"].tobytes() and a["label"].tolist() == b["label"].tolist()


@pytest.mark.parametrize("view", pipeline.VIEWS)
def test_worker_batches_are_the_bytes_of_in_process_batches_across_epochs_and_resumes(pool, view):
    workers_pool, train, _ = pool
    here = _stream(train, view=view, num_threads=3)
    remote = _stream(workers_pool.source("train"), view=view)
    expected = [next(here) for _ in range(8)]  # 3 batches per epoch: crosses two epoch ends
    for batch in expected:
        _same(next(remote), batch)
    resumed = _stream(workers_pool.source("train"), view=view, prefetch=0)
    resumed.set_state({"epoch": 1, "batch": 2})
    for batch in expected[5:]:
        _same(next(resumed), batch)


def test_each_process_reads_its_share_and_eval_batches_are_padded(pool):
    workers_pool, _, test = pool
    for process in range(2):
        here = pipeline.eval_stream(test, global_batch_size=4, image_size=8, process_index=process, process_count=2)
        remote = pipeline.eval_stream(workers_pool.source("test"), global_batch_size=4, image_size=8,
                                      process_index=process, process_count=2)
        got = list(remote.epoch_batches())
        assert len(got) == 3 and all(len(batch["label"]) == 2 for batch in got)
        for a, b in zip(got, here.epoch_batches()):
            _same(a, b)
        labels = [label for batch in got for label in batch["label"].tolist()]
        assert labels == [label for b in range(3) for label in (remote.local_indices(0, b).tolist())]
    assert labels.count(pipeline.PAD_LABEL) == 2  # 9 examples in 3 batches of 4: process 1 holds the 3 pads


def test_bad_pools_are_one_line_errors(pool):
    with pytest.raises(ValueError, match="at least one worker"):
        workers.WorkerPool({}, 0)
    with pytest.raises(KeyError, match="no source 'valid'"):
        pool[0].source("valid")


def test_a_killed_worker_is_a_one_line_error_naming_the_fix():
    lone = workers.WorkerPool({"train": _source(8)}, 1)
    try:
        (pid,) = {future.result() for future in lone._warming}
        os.kill(pid, signal.SIGKILL)
        stream = _stream(lone.source("train"), global_batch_size=4, view="clean")
        with pytest.raises(RuntimeError, match="a data worker process died.*config.data.workers"):
            for _ in range(3):
                next(stream)
    finally:
        lone.close()


ORPHAN = textwrap.dedent("""
    import sys, numpy as np
    from vpns_jax.data import workers
    if __name__ == "__main__":
        pool = workers.WorkerPool({"a": [{"image": np.zeros((2, 2), np.uint8), "label": 0}]}, 2)
        pool.wait_ready()
        print(*sorted(f.result() for f in pool._warming), flush=True)
        sys.stdin.read()  # until killed
""")


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN)
    parent = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_auto_workers_are_none_on_cpu_and_one_per_core_but_one_elsewhere(monkeypatch):
    assert [run_data.worker_count(n) for n in (0, 1, 5)] == [0, 1, 5]
    assert run_data.worker_count(-1) == 0  # this suite runs on the CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for cores, expected in ((16, 15), (2, 1), (1, 1), (None, 1), (96, run_data.AUTO_WORKERS_CAP)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert run_data.worker_count(-1) == expected


def test_stream_sources_without_workers_are_the_sources_themselves():
    sources = {"train": _source(4)}
    readable, pool = run_data.stream_sources(sources, 0)
    assert pool is None and readable["train"] is sources["train"]
