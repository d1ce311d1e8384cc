"""The training loop of any method: for each unit of its plan, its stages, a test evaluation and its saved subnetwork.

A unit (``methods.Unit``) starts from what ``context.RunContext`` and the
method's plug-in give it; this module owns the loop: units, stages, the
position, the checkpoint cadence and logging. Progress is checkpointed with its
position (unit, stage, epoch, batch, global step, results so far), and the data
streams' positions follow from it, so rerunning the same command continues
exactly where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import time
from typing import Any

import jax
import ml_collections

from vpns_jax import cli, config_checks, evaluation, methods
from vpns_jax.context import RunContext
from vpns_jax.core import health, optim, parallel, steps
from vpns_jax.data import pipeline
from vpns_jax.io import checkpoint, disk, metrics, workdir, workdir_guard


@dataclasses.dataclass
class Position:
    """Where a run is; saved as the checkpoint's metadata."""

    unit: int = 0  # index into the plan's units (one per density, LTH round or dense finetune)
    label_mapped: bool = False  # the unit's label mapping and masks are done (and in the checkpoint)
    stage: int = -1  # the stage being trained; -1 = the unit's first
    epoch: int = 0  # within the stage
    batch: int = 0  # the next batch within the epoch
    global_step: int = 0  # training iterations over the whole run
    elapsed: float = 0.0  # wall seconds spent on the current unit before this process started it
    train_seconds: float = 0.0  # of those, in training iterations of whole epochs (no evaluation, no saving)
    optimizer_steps: int = 0  # the unit's optimiser steps so far (one per batch: two per two-stream iteration)
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def enable_compilation_cache(setting: str) -> None:
    """Persistent XLA compilation cache: '' = ~/.cache/vpns_jax/xla, 'none' = off, else that folder."""
    if setting == "none":
        return
    path = pathlib.Path(setting or "~/.cache/vpns_jax/xla").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))


class Run:
    """One ``run(config, workdir)``: its context, built once, and the loop over the plan's units."""

    def __init__(self, config: ml_collections.ConfigDict, workdir_path: pathlib.Path, *,
                 replace_workdir: bool = False):
        self.config, self.workdir, self.replace_workdir = config, workdir_path, replace_workdir
        self.mesh = parallel.make_mesh()
        enable_compilation_cache(config.compilation_cache_dir)
        self.context = RunContext(config, workdir_path, self.mesh)
        self.plan = self.context.plan
        self.position: Position | None = None  # where the run is, once units start (read by where())

    def run(self) -> list[dict[str, Any]]:
        """Trains every unit of the plan (resuming from the workdir's checkpoints); the results rows.

        Only here, after every check in ``__init__``, does the workdir get created, locked and tied to this
        config: a run that fails its checks leaves no config.json behind to refuse the corrected command.
        """
        with disk.disk_errors(f"cannot create the workdir {self.workdir}"):
            self.workdir.mkdir(parents=True, exist_ok=True)
        with workdir_guard.workdir_lock(self.workdir):
            workdir_guard.guard_workdir(self.workdir, config_checks.fingerprint(self.config),
                                     replace=self.replace_workdir)
            try:
                return self._run_units()
            except (KeyboardInterrupt, cli.Stopped) as stop:
                raise cli.Interrupted(cli.signal_number(stop), self.where()) from None
            finally:
                self.context.data.close()

    def where(self) -> str:
        """Where the run is, for the interrupted message: 'at density d, stage s, step n', or the phase."""
        position = self.position
        if position is None:
            return "during start-up (data, source model pretraining, resume)"
        if position.unit >= len(self.plan.units):
            return "while writing the results"
        unit = self.plan.units[position.unit]
        stage = position.stage if position.stage >= 0 else unit.stages[0]
        return f"at density {unit.density:.6g}, stage {stage}, step {position.global_step}"

    def _run_units(self) -> list[dict[str, Any]]:
        with metrics.MetricsWriter(self.workdir) as writer, checkpoint.Checkpointer(
            self.workdir / "checkpoints", max_to_keep=self.config.checkpoint.max_to_keep
        ) as ckpt:
            self.context.start(writer)
            position, self.resumed = self._resume_point(ckpt)
            # New saves go after every step on disk, an unreadable newest one included (orbax needs increasing steps).
            self.saves = max(ckpt.all_steps(), default=0)
            while position.unit < len(self.plan.units):
                cli.raise_if_stopped()
                self.position = position  # mutated in place as the unit trains; read by where()
                position = self._unit(position, ckpt, writer)
            self.position = position
        if jax.process_index() == 0:
            workdir.write_results(self.workdir, position.results)
        return position.results

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _restore(self, ckpt: checkpoint.Checkpointer, unit: methods.Unit, stage: int, step: int) -> steps.TrainState:
        like = self.context.template(unit, stage)
        replicated = parallel.replicated(self.mesh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), like)
        state, _ = ckpt.restore(abstract, step)
        return state

    def _resume_point(self, ckpt: checkpoint.Checkpointer) -> tuple[Position, steps.TrainState | None]:
        """(position, its saved state or None) from the newest checkpoint that reads back whole."""

        def read(step: int) -> tuple[Position, steps.TrainState | None]:
            position = Position(**ckpt.restore_meta(step))
            if not position.label_mapped:
                return position, None
            unit = self.plan.units[position.unit]
            stage = position.stage if position.stage >= 0 else unit.stages[0]
            return position, self._restore(ckpt, unit, stage, step)

        found = ckpt.newest_readable(read)
        return found if found is not None else (Position(), None)

    def _save(self, ckpt: checkpoint.Checkpointer, state, position: Position) -> None:
        self.saves += 1
        ckpt.save(self.saves, state, dataclasses.asdict(position))

    # -- one unit: its initial state, its stages, its evaluation --------------------------------------------------

    def _unit(self, position: Position, ckpt: checkpoint.Checkpointer, writer: metrics.MetricsWriter) -> Position:
        unit = self.plan.units[position.unit]
        started = time.perf_counter() - position.elapsed
        if position.stage < 0:
            position.stage = unit.stages[0]
        if position.label_mapped:
            state, self.resumed = self.resumed, None  # read by _resume_point; a unit resumes at most once
        else:
            state = self.context.start_unit(position.unit)
            position.label_mapped = True
            position.elapsed = time.perf_counter() - started
            self._save(ckpt, state, position)
        for i, stage in enumerate(unit.stages):
            if position.stage > stage:
                continue
            state = self._train_stage(state, position, unit, stage, started, ckpt, writer)
            if i + 1 < len(unit.stages):
                # New arrays (step, optimiser state) start on one device: place them like the rest.
                state = parallel.replicate(steps.start_stage(self.context.spec, state, unit.stages[i + 1]), self.mesh)
                position.stage, position.epoch, position.batch = unit.stages[i + 1], 0, 0
                position.elapsed = time.perf_counter() - started
                self._save(ckpt, state, position)
        result = self._finish_unit(state, unit, started, position.global_step, writer)
        next_position = Position(unit=position.unit + 1, global_step=position.global_step,
                                 results=position.results + [result])
        # Saved with this unit's state: the next unit builds its own at its start, the shapes may differ.
        self._save(ckpt, state, next_position)
        return next_position

    def _finish_unit(self, state: steps.TrainState, unit: methods.Unit, started: float, step: int,
                     writer: metrics.MetricsWriter) -> dict[str, Any]:
        """The unit's results row (test metrics, sparsity, MACs, wall time), logged, and its subnetwork saved."""
        context = self.context
        found = evaluation.found_subnetwork(context.spec, state)
        cost = evaluation.sparsity_and_cost(context.spec, state, found, input_size=self.config.prompt.input_size)
        result = {"method": self.plan.method.name, "density": unit.density, "sparsity": cost["sparsity"],
                  "model_sparsity": cost["model_sparsity"], **self._test(state), "macs": cost["macs"],
                  "speedup": cost["speedup"]}
        if unit.round is not None:
            result["round"] = unit.round
        if "channel_sparsity" in cost:
            result["channel_sparsity"] = cost["channel_sparsity"]
        result.update({field: cost[field] for field in evaluation.COLLAPSE_FIELDS})
        result["wall_time_s"] = round(time.perf_counter() - started, 2)
        logged = {k: v for k, v in result.items() if k not in ("density", "method", "collapsed_layer_names")}
        writer.write(step, logged, phase="result", density=unit.density)  # (TensorBoard takes no strings)
        if jax.process_index() == 0:
            # A dense unit (OMP's first) has all-ones masks whatever the pattern: they are not N:M.
            workdir.save_unit(workdir.unit_folder(self.workdir, unit.density), state, found,
                              model=self.config.model, prompt_spec=context.prompt_spec,
                              eval_with_prompt=self._eval_with_prompt, class_names=context.data.class_names,
                              nm_pattern=None if unit.dense else context.spec.nm)
        return result

    @property
    def _eval_with_prompt(self) -> bool:
        return self.config.eval.with_prompt and self.context.uses_prompt

    def _test(self, state: steps.TrainState) -> dict[str, float]:
        """Test accuracy and mean loss of ``state`` (through the masks in force, prompted if the config says so)."""
        return evaluation.test_metrics(self.context.spec, state, self.context.data.test, self.mesh,
                                       with_prompt=self._eval_with_prompt)

    # -- one stage: its iterations, epochs, logging and checkpoint cadence ----------------------------------------

    def _train_stage(self, state, position: Position, unit: methods.Unit, stage: int, started: float,
                     ckpt: checkpoint.Checkpointer, writer: metrics.MetricsWriter) -> steps.TrainState:
        config, epochs, spec = self.config, self.plan.epochs[stage], self.context.spec
        streams = self.context.data.streams
        # Streams keep counting epochs across a unit's stages.
        offset = sum(self.plan.epochs[s] for s in unit.stages[: unit.stages.index(stage)])
        for stream in streams.values():
            stream.set_state({"epoch": offset + position.epoch, "batch": position.batch})
        reads = spec.phases[stage].iteration.streams
        per_epoch = self.context.data.iterations_per_epoch
        bar = metrics.progress(epochs * per_epoch, f"{self.plan.method.name} density {unit.density:.6g} stage {stage}",
                               initial=position.epoch * per_epoch + position.batch)
        log = _StepLog(writer, unit.density, stage, len(reads) * config.data.batch_size)
        epoch_started = time.perf_counter()
        check = health.FiniteCheck(
            config.on_nonfinite, hint="lower this stage's learning rates",
            on_skip=lambda step: writer.write(step, {"skipped_batches": check.skipped}, density=unit.density,
                                              stage=stage))
        # The next iterations' batches are on the devices while this one runs.
        iterations = parallel.prefetch_to_device((tuple(next(streams[name]) for name in reads)
                                                  for _ in itertools.count()), self.mesh,
                                                 scale_pixels=pipeline.unit_pixels)
        while position.epoch < epochs:
            cli.raise_if_stopped()  # a stop lands here, between iterations, with every save before it complete
            batches = next(iterations)
            state, step_metrics = steps.train_iteration(state, batches, spec=spec, stage=stage)
            position.global_step += 1
            check.push(step_metrics[health.FINITE], position.global_step,
                       f"density {unit.density:.6g}, stage {stage}, step {position.global_step} "
                       f"(epoch {position.epoch}, batch {position.batch})")
            position.optimizer_steps += len(reads)
            position.batch += 1
            if position.batch == per_epoch:
                position.epoch, position.batch = position.epoch + 1, 0
                epoch_started = self._end_epoch(state, position, unit, stage, epoch_started, writer)
            bar.update(1)
            log.step(position.global_step, step_metrics, self._learning_rates(stage, position.epoch),
                     every=config.log_every_steps)
            if position.global_step % config.checkpoint.every_steps == 0 and position.epoch < epochs:
                check.flush()  # a stopped run keeps the checkpoint from before its bad step as the latest
                saving = time.perf_counter()
                position.elapsed = saving - started
                self._save(ckpt, state, position)
                epoch_started += time.perf_counter() - saving  # an epoch's seconds are training, not saving
        check.flush()
        bar.close()
        return state

    def _end_epoch(self, state: steps.TrainState, position: Position, unit: methods.Unit, stage: int,
                   epoch_started: float, writer: metrics.MetricsWriter) -> float:
        """Records the epoch's training time and, every ``eval.every_epochs``, the test metrics; returns the
        next epoch's start. A resumed epoch counts from the resume (its time before the kill is lost)."""
        jax.block_until_ready(state)  # the epoch's work, not just its dispatch
        seconds = time.perf_counter() - epoch_started
        position.train_seconds += seconds
        tags = {"density": unit.density, "stage": stage, "phase": "epoch"}
        record = {"epoch": position.epoch, "epoch_seconds": seconds, "train_seconds": position.train_seconds,
                  "optimizer_steps": position.optimizer_steps, "peak_memory_mb": metrics.peak_memory_mb()}
        every = self.config.eval.every_epochs
        if every and position.epoch % every == 0:
            record.update(self._test(state))
        writer.write(position.global_step, record, **tags)
        return time.perf_counter()

    def _learning_rates(self, stage: int, epoch: int) -> dict[str, float]:
        epochs = self.plan.epochs[stage]
        return {f"lr_{name}": float(optim.epoch_cosine_schedule(group.learning_rate, epochs, 1)(min(epoch, epochs - 1)))
                for name, group in self.plan.groups[stage].items()}


class _StepLog:
    """Every ``every`` iterations: the step's metrics, the learning rates and the images/s since the last record."""

    def __init__(self, writer: metrics.MetricsWriter, density: float, stage: int, images_per_iteration: int):
        self.writer, self.density, self.stage, self.per_iteration = writer, density, stage, images_per_iteration
        self.images, self.tick = 0, time.perf_counter()

    def step(self, global_step: int, step_metrics: dict, learning_rates: dict[str, float], *, every: int) -> None:
        self.images += self.per_iteration
        if global_step % every:
            return
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        values.update(learning_rates)
        values["images_per_s"] = self.images / (time.perf_counter() - self.tick)
        self.writer.write(global_step, values, density=self.density, stage=self.stage)
        self.images, self.tick = 0, time.perf_counter()


def run(config: ml_collections.ConfigDict, workdir_path: str | pathlib.Path, *,
        replace_workdir: bool = False) -> list[dict[str, Any]]:
    """Runs (or resumes) every density of ``config`` in ``workdir_path``; returns the results rows.

    A second run on the same workdir while this one is alive is refused (``workdir_guard.workdir_lock``). A
    workdir holding a run of another config is refused too, unless ``replace_workdir``: then that run is moved
    into ``workdir/replaced/`` and this one starts afresh (``workdir_guard.guard_workdir``).
    """
    return Run(config, pathlib.Path(workdir_path), replace_workdir=replace_workdir).run()
