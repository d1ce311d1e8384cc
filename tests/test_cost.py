"""The cost of joint optimisation from hand-written epoch records: per-epoch time, memory, time-to-accuracy."""

import json

import pytest

from experiments import cost


def _epoch(density, stage, epoch, seconds, total, steps, accuracy=None, peak=100.0):
    record = {"step": steps, "time": 0.0, "density": density, "stage": stage, "phase": "epoch", "epoch": epoch,
              "epoch_seconds": seconds, "train_seconds": total, "optimizer_steps": steps, "peak_memory_mb": peak}
    if accuracy is not None:
        record["test_accuracy"] = accuracy
    return record


def _write(root, method, seed, records):
    workdir = root / method / f"seed_{seed}"
    workdir.mkdir(parents=True)
    lines = [json.dumps({"step": 1, "time": 0.0, "density": 0.1, "stage": 1, "loss_plain": 0.3})]  # not an epoch
    (workdir / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(r) for r in records]) + "\n")
    return workdir


# One seed of a two-stage run at density 0.1: 2 epochs of stage 1 (10 s each), 1 of stage 2 (12 s); tested
# every epoch at 0.80, 0.91, 0.93; two-stream iterations, 50 per epoch: 100 optimiser steps per epoch.
RUN = [_epoch(0.1, 1, 1, 10.0, 10.0, 100, 0.80, peak=120.0), _epoch(0.1, 1, 2, 10.0, 20.0, 200, 0.91),
       _epoch(0.1, 2, 1, 12.0, 32.0, 300, 0.93, peak=150.0)]


def test_time_and_steps_to_accuracy_and_accuracy_within_a_budget(tmp_path):
    records = cost.epoch_records(_write(tmp_path, "vpns", 7, RUN))
    assert len(records) == 3
    assert cost.seconds_per_epoch(records, 0.1, 1) == 10.0 and cost.seconds_per_epoch(records, 0.1, 2) == 12.0
    assert cost.peak_memory(records, 0.1) == 150.0
    assert cost.to_accuracy(records, 0.1, 0.9) == 20.0  # the first evaluation at or above 90 %
    assert cost.to_accuracy(records, 0.1, 0.9, by="optimizer_steps") == 200
    assert cost.to_accuracy(records, 0.1, 0.95) is None
    assert cost.accuracy_within(records, 0.1, 250) == 0.91  # equal optimiser steps: the last test within them
    assert cost.accuracy_within(records, 0.1, 35.0, by="train_seconds") == 0.93
    assert cost.accuracy_within(records, 0.1, 50) is None and cost.seconds_per_epoch(records, 0.5, 1) is None
    with pytest.raises(ValueError, match="budget 'epochs' is unknown"):
        cost.to_accuracy(records, 0.1, 0.9, by="epochs")


def test_seconds_per_epoch_is_the_median_so_a_first_epoch_that_compiles_does_not_count(tmp_path):
    compiling = [dict(RUN[0], epoch_seconds=30.0), RUN[1], dict(RUN[1], epoch=3, epoch_seconds=12.0)]
    records = cost.epoch_records(_write(tmp_path, "vpns", 7, compiling))
    assert cost.seconds_per_epoch(records, 0.1, 1) == 12.0  # of 30, 10 and 12 s


def test_an_epoch_recorded_twice_by_a_resumed_run_counts_once(tmp_path):
    again = dict(RUN[1], epoch_seconds=11.0, train_seconds=21.0)
    records = cost.epoch_records(_write(tmp_path, "vpns", 7, RUN[:2] + [again] + RUN[2:]))
    assert [r["epoch_seconds"] for r in records] == [10.0, 11.0, 12.0]


def test_the_cost_table_over_seeds(tmp_path, capsys):
    _write(tmp_path, "vpns", 7, RUN)
    slower = [dict(r, epoch_seconds=r["epoch_seconds"] * 2, train_seconds=r["train_seconds"] * 2) for r in RUN]
    _write(tmp_path, "vpns", 9, slower)
    never = [dict(r, test_accuracy=0.5, optimizer_steps=r["optimizer_steps"] // 2) for r in RUN]  # one stream
    _write(tmp_path, "hydra", 7, never)
    runs = cost.collect(tmp_path)
    assert sorted(runs) == ["hydra", "vpns"] and len(runs["vpns"]) == 2
    cell = cost.cost_cell(runs["vpns"], 0.1, 0.9)
    # Stage 1: 10 and 20 s per epoch -> 15 -+ 12.706 * 7.071 / 1.414 = 15 -+ 63.53; 20 and 40 s to 90 %.
    assert cell.seconds_per_epoch[1].mean == 15.0
    assert cell.seconds_per_epoch[1].half_width == pytest.approx(63.531, 1e-4)
    assert (cell.seconds_to_level.mean, cell.steps_to_level.mean, cell.reached) == (30.0, 200.0, 2)
    assert cost.cost_cell(runs["hydra"], 0.1, 0.9).reached == 0
    assert cost.main([f"--root={tmp_path}", "--level=0.9", "--densities=0.1"]) == 0
    table = (tmp_path / "cost.md").read_text()
    assert table == capsys.readouterr().out
    assert "| hydra | 0.1 | 1: 10.00; 2: 12.00 | 150 | n/a | n/a | 0/1 |" in table
    assert "| vpns | 0.1 | 1: 15.00 ± 63.53; 2: 18.00 ± 76.24 | 150 ± 0 | 30.0 ± 127.1 | 200 ± 0 | 2/2 |" in table
    # Equal budgets: every run spent 150 steps (hydra's total) and 32 s (vpns seed 7's and hydra's). Within
    # them: vpns 0.80 at 100 steps on both seeds; 0.93 at 32 s (seed 7) and 0.80 at 20 s (seed 9, twice as
    # slow) -> 86.5 -+ 12.706 * 9.192 / 1.414 = 86.5 -+ 82.59.
    assert cost.common_budget(runs, 0.1, "optimizer_steps") == 150
    assert cost.common_budget(runs, 0.1, "train_seconds") == 32.0
    assert cost.common_budget(runs, 0.5, "train_seconds") is None
    assert ("| vpns | 0.1 | 80.00 ± 0.00 (N=150 steps, 2/2 seeds) | 86.50 ± 82.59 (T=32.0 s, 2/2 seeds) |"
            in table)
    assert "| hydra | 0.1 | 50.00 (N=150 steps, 1/1 seeds) | 50.00 (T=32.0 s, 1/1 seeds) |" in table


def test_no_records_is_a_one_line_error(tmp_path, capsys):
    assert cost.main([f"--root={tmp_path}", "--level=0.9", "--densities=0.1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
