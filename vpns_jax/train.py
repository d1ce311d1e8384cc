"""A run of any method: for each unit of its plan, masks and label mapping, the stages, a test evaluation; resumable.

A unit is one trained network (``methods.Unit``): a density of VPNs, HYDRA,
BiP or a prune-at-init baseline, each from the same state (source weights, the
same initial scores, a zero prompt, the same seed); or OMP's and LTH's dense
finetune and LTH's rounds, which read the previous unit's saved weights and
masks. Progress is checkpointed with its position (unit, stage, epoch, batch,
global step, results so far); the data streams' positions are a function of
(stage, epoch, batch), so rerunning the same command continues exactly where a
killed run stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from vpns_jax import config_checks, methods, source_model
from vpns_jax.core import health, label_mapping, masking, optim, parallel, prompts, steps, structured
from vpns_jax.io import checkpoint, export, metrics
from vpns_jax.methods import oneshot
from vpns_jax.models import macs
from vpns_jax.data import pipeline, prepare, registry
from vpns_jax.models import create_model, functional

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULT_FIELDS = ("method", "density", "round", "sparsity", "channel_sparsity", "model_sparsity", "test_accuracy",
                 "test_loss", "macs", "speedup", "wall_time_s")
OFFLINE_PREPARABLE = ("fashion_mnist", "digits")
TRANSFERRED_FILES = ("masks.npz", "prompt.npz")  # what config.transfer.masks_from takes from each density


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


def _ensure_prepared(name: str, data_dir: str | None, auto_prepare: bool) -> None:
    """Prepares an offline dataset that is missing (process 0; the others wait), else leaves the error to open_split."""
    spec = registry.get_dataset_spec(name)
    try:
        registry.prepared_dir(spec, data_dir)
        return
    except registry.DataNotFoundError:
        if not (auto_prepare and name in OFFLINE_PREPARABLE):
            raise
    if jax.process_index() == 0:
        prepare.prepare(name, data_dir=data_dir)
    multihost_utils.sync_global_devices(f"prepared {name}")


def _nonempty(subset, config: ml_collections.ConfigDict, split: str):
    """``subset``, or a one-line error when the split holds no example of the configured classes."""
    if len(subset) == 0:
        raise ValueError(
            f"the {split} split of {config.data.name!r} has no examples of config.data.classes="
            f"{tuple(config.data.classes) or 'all'}: choose classes it has, or prepare the dataset again "
            "(python -m vpns_jax.data.prepare)")
    return subset


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def unit_folder(workdir: pathlib.Path, density: float) -> pathlib.Path:
    """Where a unit's subnetwork files go: ``subnetworks/density_<d>`` (6 significant digits)."""
    return workdir / "subnetworks" / f"density_{density:.6g}"


class Run:
    """One ``run(config, workdir)``: the fixed ingredients, built once, and the loop over the plan's units."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, replace_workdir: bool = False):
        self.config = config
        self.workdir = workdir
        self.replace_workdir = replace_workdir
        self.mesh = parallel.make_mesh()
        config_checks.validate(config, num_devices=self.mesh.devices.size)
        self.plan = methods.make_plan(config)
        if config.transfer.masks_from:
            source = pathlib.Path(config.transfer.masks_from)
            missing = [d for d in config.densities if not all(
                (unit_folder(source, d) / name).is_file() for name in TRANSFERRED_FILES)]
            if missing:
                raise config_checks.ConfigError(
                    f"config.transfer.masks_from={config.transfer.masks_from!r} has no finished subnetwork for "
                    f"densities {missing} (no {' or '.join(TRANSFERRED_FILES)} in {unit_folder(source, missing[0])}):"
                    " run them there first, or list only the densities it has")
        enable_compilation_cache(config.compilation_cache_dir)
        data_dir = config.data.data_dir or None
        names = [config.data.name] + ([config.source.dataset] if config.source.enabled else [])
        for name in dict.fromkeys(names):
            _ensure_prepared(name, data_dir, config.data.auto_prepare)
        data_spec = registry.get_dataset_spec(config.data.name)
        self.num_target = len(config.data.classes) or data_spec.num_classes  # validate() checked it fits the head
        train, test = (_nonempty(pipeline.open_subset(config.data.name, split, data_dir, classes=config.data.classes,
                                                      limit=limit), config, split)
                       for split, limit in ((data_spec.train_split, config.data.train_limit),
                                            (data_spec.test_split, config.data.test_limit)))
        size = config.prompt.input_size
        self.clean, self.augmented = pipeline.training_streams(
            train, global_batch_size=config.data.batch_size, image_size=size, seed=config.seed,
            num_threads=config.data.num_threads,
        )
        # BiP's score step reads a second, independently shuffled augmented stream.
        self.second = pipeline.BatchStream(
            train, global_batch_size=config.data.batch_size, image_size=size, view="augmented", seed=config.seed,
            stream=4, num_threads=config.data.num_threads,
        )
        # The reference computes the label mapping over the augmented training loader, every example once.
        self.mapping_stream = pipeline.BatchStream(
            train, global_batch_size=config.data.eval_batch_size, image_size=size, view="augmented",
            seed=config.seed, stream=2, training=False, num_threads=config.data.num_threads,
        )
        self.test_stream = pipeline.eval_stream(test, global_batch_size=config.data.eval_batch_size, image_size=size,
                                                num_threads=config.data.num_threads)
        self.model = create_model(config.model.name, num_classes=config.model.num_classes, width=config.model.width,
                                  stem=config.model.stem, rngs=nnx.Rngs(config.seed))
        self.kinds = functional.leaf_kinds(self.model)
        # Read (and checked) now, so that a bad weights file leaves no workdir behind.
        self.pretrained = self._pretrained_weights()
        self.prompt_spec = prompts.PromptSpec(**config.prompt.to_dict())
        self.uses_prompt = any("prompt" in phase.trains for phase in self.plan.phases.values())
        self.iterations_per_epoch = self.clean.batches_per_epoch
        self.class_names = export.dataset_class_names(config.data.name, data_dir, config.data.classes, self.num_target)
        self.channel_groups = ()
        if config.mask.granularity == "channel":
            _, weights, _ = functional.split_model(self.model)
            self.channel_groups = structured.channel_groups(config.model.name, weights)
            for density in config.densities:
                try:
                    structured.channel_prune_counts(self.channel_groups, density, config.structured.channel_max)
                except ValueError as error:
                    raise config_checks.ConfigError(
                        f"config.densities holds {density}: {error}; raise the density or "
                        "config.structured.channel_max") from None

    def _pretrained_weights(self) -> tuple[dict, dict] | None:
        """(weights, batch_stats) of ``model.init_from``; None when the source model is pretrained here."""
        config = self.config
        if config.model.init_from:
            _, weights, batch_stats = functional.split_model(self.model)
            return source_model.load_weights(config.model.init_from, weights, batch_stats)
        if config.source.enabled:
            return None
        raise config_checks.ConfigError(
            "model.init_from is empty and source.enabled is False: VPNs prunes a pretrained model; give "
            "--config.model.init_from=PATH (a torchvision .pth/.safetensors state dict or a vpns_jax .npz) or enable "
            "source pretraining"
        )

    def _initial_weights(self, writer: metrics.MetricsWriter):
        if self.pretrained is not None:
            return self.pretrained
        return source_model.pretrain(self.config, self.workdir, self.model, self.mesh, writer)

    def _initial_scores(self, weights) -> dict:
        if self.plan.method.masks != methods.LEARNED or self.config.transfer.masks_from:
            return {}
        if self.config.mask.granularity == "channel":
            return structured.init_channel_scores(self.channel_groups, jax.random.PRNGKey(self.config.seed))
        return masking.init_scores(weights, self.kinds)

    def _spec(self, scores, prompt) -> steps.StepSpec:
        config, plan = self.config, self.plan
        return steps.make_step_spec(
            self.model, self.prompt_spec, prompt_params=prompt, scores=scores, stage_groups=plan.groups,
            epochs=plan.epochs, iterations_per_epoch=self.iterations_per_epoch, threshold_scope=config.mask.scope,
            phases=plan.phases, granularity=config.mask.granularity, channel_groups=self.channel_groups,
            channel_max=config.structured.channel_max, bilevel_lr=config.bip.bilevel_lr,
        )

    def run(self) -> list[dict[str, Any]]:
        """Trains every unit of the plan (resuming from the workdir's checkpoints); the results rows.

        Only here, after every check in ``__init__``, does the workdir get created, locked and tied to this
        config: a run that fails its checks leaves no config.json behind to refuse the corrected command.
        """
        config = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        with checkpoint.workdir_lock(self.workdir):
            checkpoint.guard_workdir(self.workdir, config_checks.fingerprint(config), replace=self.replace_workdir)
            return self._run_units()

    def _run_units(self) -> list[dict[str, Any]]:
        config = self.config
        with metrics.MetricsWriter(self.workdir) as writer, checkpoint.Checkpointer(
            self.workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep
        ) as ckpt:
            weights, batch_stats = self._initial_weights(writer)
            scores = self._initial_scores(weights)
            prompt = prompts.init_prompt(self.prompt_spec)
            self.spec = self._spec(scores, prompt)
            self.initial = (weights, batch_stats, scores, prompt)
            position, self.resumed = self._resume_point(ckpt)
            # New saves go after every step on disk, an unreadable newest one included (orbax needs increasing steps).
            self.saves = max(ckpt.all_steps(), default=0)
            while position.unit < len(self.plan.units):
                position = self._unit(position, ckpt, writer)
        if jax.process_index() == 0:
            write_results(self.workdir, position.results)
        return position.results

    # -- one unit: its initial state (masks, label mapping), its stages, its evaluation -------------------------

    def _ones_masks(self):
        """All-ones masks shaped like the method's (host arrays)."""
        if self.config.mask.granularity == "channel":
            return {g.name: np.ones((g.num_channels,), np.float32) for g in self.channel_groups}
        flat = traverse_util.flatten_dict(self.initial[0])
        return traverse_util.unflatten_dict(
            {path: np.ones(np.shape(flat[path]), np.float32) for path in masking.prunable_paths(self.kinds)})

    def _state(self, unit: methods.Unit, stage: int, masks=None, prompt=None) -> steps.TrainState:
        """A state for ``unit`` ready for ``stage``: the source weights, the initial scores, a zero prompt
        (or ``prompt``) and the given masks; replicated over the mesh."""
        source_weights, batch_stats, scores, zero_prompt = self.initial
        state = steps.init_state(
            self.spec, weights=_copy(source_weights), batch_stats=_copy(batch_stats),
            scores=_copy(scores), prompt=_copy(zero_prompt if prompt is None else prompt), density=unit.density,
            label_map=np.arange(self.num_target), rng=jax.random.PRNGKey(self.config.seed),
            masks=masks, stage=stage,
        )
        return parallel.replicate(state, self.mesh)

    def _template(self, unit: methods.Unit, stage: int) -> steps.TrainState:
        """A state shaped like the checkpoint of ``unit`` in ``stage`` (values do not matter): it holds masks
        unless the stage trains scores."""
        fixed = "scores" not in self.plan.phases[stage].trains
        return self._state(unit, stage, masks=self._ones_masks() if fixed else None)

    def _restore(self, ckpt: checkpoint.Checkpointer, unit: methods.Unit, stage: int, step: int) -> steps.TrainState:
        like = self._template(unit, stage)
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

    def _label_map(self, state: steps.TrainState) -> steps.TrainState:
        """Frequency label mapping through the state's masks (and zero or transferred prompt, if the method has one)."""
        counts = sum(
            np.asarray(steps.source_prediction_counts(state, parallel.global_batch(batch, self.mesh), spec=self.spec,
                                                      num_target=self.num_target, with_prompt=self.uses_prompt))
            for batch in self.mapping_stream.epoch_batches()
        )
        mapping = label_mapping.frequency_label_mapping(counts)
        return state.replace(label_map=parallel.replicate(jnp.asarray(mapping), self.mesh))

    def _start_unit(self, index: int) -> steps.TrainState:
        """The unit's initial state with its masks, label-mapped through them."""
        unit = self.plan.units[index]
        first = unit.stages[0]
        method = self.plan.method
        if self.config.transfer.masks_from:
            masks, prompt = self._transferred(unit.density)
            return self._label_map(self._state(unit, first, masks=masks, prompt=prompt))
        if method.masks == methods.LEARNED:
            # The scores give the masks; a dense warm-up (structured VPNs' stage 0) trains unmasked.
            masks = None if "scores" in self.plan.phases[first].trains else self._ones_masks()
            return self._label_map(self._state(unit, first, masks=masks))
        if unit.dense:
            return self._label_map(self._state(unit, first, masks=self._ones_masks()))
        masks = self._one_shot_masks(unit, index)
        return self._label_map(self._state(unit, first, masks=masks))

    def _previous(self, index: int) -> tuple[dict, dict]:
        """Final weights and masks of unit ``index`` (saved with its subnetwork)."""
        folder = unit_folder(self.workdir, self.plan.units[index].density)
        return checkpoint.load_arrays(folder / "weights.npz"), checkpoint.load_arrays(folder / "masks.npz")

    def _one_shot_masks(self, unit: methods.Unit, index: int):
        config, kinds, method = self.config, self.kinds, self.plan.method
        weights, batch_stats = self.initial[0], self.initial[1]
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), index)
        if method.masks == "magnitude":
            trained, _ = self._previous(0)
            importance = oneshot.magnitude_importance(trained, kinds)
            return oneshot.keep_largest(importance, oneshot.keep_counts(importance, unit.density))
        if method.masks == "lth":
            trained, masks = self._previous(index - 1)
            return oneshot.lth_round(trained, None if index == 1 else masks, kinds, config.finetune.lth_fraction)
        if method.masks == "random":
            importance = oneshot.random_importance(weights, key, kinds=kinds)
            return oneshot.keep_largest(importance, oneshot.keep_counts(importance, unit.density, "layer"), "layer")
        if method.masks == "slim":
            trained, _ = self._previous(0)
            importance = structured.bn_scale_importance(trained, self.channel_groups)
            k = structured.channel_prune_counts(self.channel_groups, unit.density, config.structured.channel_max)
            return jax.device_get(structured.channel_masks(importance, self.channel_groups, k,
                                                          config.structured.channel_max))
        graphdef = self.spec.graphdef
        if method.masks == "synflow":
            apply_fn = lambda w, stats, x: functional.apply_model(graphdef, w, stats, x, train=False)[0]  # noqa: E731
            size = config.prompt.input_size
            return oneshot.synflow_masks(apply_fn, weights, batch_stats, kinds, (size, size, 3), unit.density,
                                         iterations=config.oneshot.synflow_iterations)
        # SNIP and GraSP score the loss through the dense network's label mapping.
        label_map = self._label_map(self._state(unit, unit.stages[0], masks=self._ones_masks())).label_map

        def loss_fn(w, batch, temperature):
            logits, _ = functional.apply_model(graphdef, w, batch_stats, prompts.normalize(batch["image"]), train=True)
            return label_mapping.mapped_loss(logits / temperature, batch["label"], label_map)[0]

        full = (b for b in self.mapping_stream.epoch_batches() if (b["label"] >= 0).all())  # no padding rows
        batches = [parallel.global_batch(b, self.mesh) for b, _ in zip(full, range(config.oneshot.batches))]
        if method.masks == "snip":
            importance = oneshot.snip_importance(loss_fn, weights, kinds, batches)
        else:
            importance = oneshot.grasp_importance(loss_fn, weights, kinds, batches,
                                                  temperature=config.oneshot.grasp_temperature)
        importance = jax.device_get(importance)
        return oneshot.keep_largest(importance, oneshot.keep_counts(importance, unit.density))

    def _transferred(self, density: float):
        """Masks and prompt of ``density`` from the run in ``config.transfer.masks_from``."""
        folder = unit_folder(pathlib.Path(self.config.transfer.masks_from), density)
        masks, prompt = (checkpoint.load_arrays(folder / name) for name in TRANSFERRED_FILES)  # checked in __init__
        expected = self._ones_masks()
        if jax.tree.structure(expected) != jax.tree.structure(masks) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(masks))):
            raise config_checks.ConfigError(
                f"config.transfer.masks_from: the masks in {folder} do not fit {self.config.model.name} at width "
                f"{self.config.model.width}: transfer between runs of the same model")
        if prompt["program"].shape != self.initial[3]["program"].shape:
            prompt = self.initial[3]  # another prompt geometry: only the mask transfers
        return masks, prompt

    def _unit(self, position: Position, ckpt: checkpoint.Checkpointer, writer: metrics.MetricsWriter) -> Position:
        unit = self.plan.units[position.unit]
        started = time.perf_counter() - position.elapsed
        if position.stage < 0:
            position.stage = unit.stages[0]
        if position.label_mapped:
            state, self.resumed = self.resumed, None  # read by _resume_point; a unit resumes at most once
        else:
            state = self._start_unit(position.unit)
            position.label_mapped = True
            position.elapsed = time.perf_counter() - started
            self._save(ckpt, state, position)
        for i, stage in enumerate(unit.stages):
            if position.stage > stage:
                continue
            state = self._train_stage(state, position, unit, stage, started, ckpt, writer)
            if i + 1 < len(unit.stages):
                # New arrays (step, optimiser state) start on one device: place them like the rest.
                state = parallel.replicate(steps.start_stage(self.spec, state, unit.stages[i + 1]), self.mesh)
                position.stage, position.epoch, position.batch = unit.stages[i + 1], 0, 0
                position.elapsed = time.perf_counter() - started
                self._save(ckpt, state, position)
        found = self._found(state)
        result = self._evaluate(state, unit, found)
        result["wall_time_s"] = round(time.perf_counter() - started, 2)
        writer.write(position.global_step, {k: v for k, v in result.items() if k not in ("density", "method")},
                     phase="result", density=unit.density)
        self._save_subnetwork(state, unit.density, found)
        next_position = Position(unit=position.unit + 1, global_step=position.global_step,
                                 results=position.results + [result])
        # Saved with this unit's state: the next unit builds its own at its start, the shapes may differ.
        self._save(ckpt, state, next_position)
        return next_position

    def _batches(self, stage: int) -> tuple:
        streams = self.plan.phases[stage].streams
        if streams == "two":
            return (next(self.clean), next(self.augmented))
        if streams == "one":
            return (next(self.augmented),)
        if streams == "clean":
            return (next(self.clean),)
        return (next(self.augmented), next(self.second))

    def _train_stage(self, state, position: Position, unit: methods.Unit, stage: int, started: float,
                     ckpt: checkpoint.Checkpointer, writer: metrics.MetricsWriter) -> steps.TrainState:
        config = self.config
        epochs = self.plan.epochs[stage]
        # Streams keep counting epochs across a unit's stages.
        offset = sum(self.plan.epochs[s] for s in unit.stages[: unit.stages.index(stage)])
        per_epoch = self.iterations_per_epoch
        for stream in (self.clean, self.augmented, self.second):
            stream.set_state({"epoch": offset + position.epoch, "batch": position.batch})
        bar = metrics.progress(epochs * per_epoch, f"{self.plan.method.name} density {unit.density:.6g} stage {stage}",
                               initial=position.epoch * per_epoch + position.batch)
        images, tick = 0, time.perf_counter()
        epoch_started = time.perf_counter()
        num_batches = self.plan.phases[stage].num_batches
        check = health.FiniteCheck(
            config.on_nonfinite, hint="lower this stage's learning rates",
            on_skip=lambda step: writer.write(step, {"skipped_batches": check.skipped}, density=unit.density,
                                              stage=stage))
        while position.epoch < epochs:
            batches = tuple(parallel.global_batch(b, self.mesh) for b in self._batches(stage))
            state, step_metrics = steps.train_iteration(state, batches, spec=self.spec, stage=stage)
            step = position.global_step + 1
            check.push(step_metrics[health.FINITE], step, f"density {unit.density:.6g}, stage {stage}, step {step} "
                       f"(epoch {position.epoch}, batch {position.batch})")
            images += num_batches * config.data.batch_size
            position.global_step += 1
            position.optimizer_steps += num_batches
            position.batch += 1
            if position.batch == per_epoch:
                position.epoch, position.batch = position.epoch + 1, 0
                epoch_started = self._end_epoch(state, position, unit, stage, epoch_started, writer)
            bar.update(1)
            if position.global_step % config.log_every_steps == 0:
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                values.update(self._learning_rates(stage, position.epoch))
                values["images_per_s"] = images / (time.perf_counter() - tick)
                writer.write(position.global_step, values, density=unit.density, stage=stage)
                images, tick = 0, time.perf_counter()
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

    def _found(self, state: steps.TrainState) -> dict[str, Any]:
        """The trained subnetwork on the host: its masks, effective (masked) weights and 0/1 masks of every
        prunable kernel (channel masks spread over the kernels they gate)."""
        masks = jax.device_get(steps.current_masks(self.spec, state))
        effective, pattern = jax.device_get(steps.effective_weights(self.spec, state))
        flat = traverse_util.flatten_dict(pattern)
        kernel_masks = traverse_util.unflatten_dict({path: flat[path] for path in masking.prunable_paths(self.kinds)})
        return {"masks": masks, "effective": effective, "kernel_masks": kernel_masks}

    def _test(self, state: steps.TrainState) -> dict[str, float]:
        """Test accuracy and mean loss of ``state`` (through the masks in force, prompted if the config says so)."""
        with_prompt = self.config.eval.with_prompt and self.uses_prompt
        totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
        for batch in self.test_stream.epoch_batches():
            out = jax.device_get(steps.eval_step(state, parallel.global_batch(batch, self.mesh), spec=self.spec,
                                                 with_prompt=with_prompt))
            for key in totals:
                totals[key] += out[key].item()
        return {"test_accuracy": round(totals["correct"] / totals["count"], 6),
                "test_loss": round(totals["loss_sum"] / totals["count"], 6)}

    def _evaluate(self, state: steps.TrainState, unit: methods.Unit, found: dict[str, Any]) -> dict[str, Any]:
        tested = self._test(state)
        report = masking.sparsity_report(found["effective"], found["kernel_masks"])
        size = self.config.prompt.input_size
        counted = macs.count_macs(self.spec.graphdef, found["effective"], jax.device_get(state.batch_stats), size)
        result = {
            "method": self.plan.method.name,
            "density": unit.density,
            "sparsity": round(report.prunable_sparsity, 6),
            "model_sparsity": round(report.model_sparsity, 6),
            **tested,
            "macs": counted.total,
            "speedup": round(counted.speedup, 4),
        }
        if self.plan.method.masks == "lth":
            result["round"] = unit.round
        if self.config.mask.granularity == "channel":
            result["channel_sparsity"] = round(structured.channel_sparsity(found["masks"]), 6)
        return result

    def _save_subnetwork(self, state: steps.TrainState, density: float, found: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        folder = unit_folder(self.workdir, density)
        folder.mkdir(parents=True, exist_ok=True)
        host = {"masks": found["masks"], **jax.device_get({
            "weights": state.weights, "batch_stats": state.batch_stats, "prompt": state.prompt,
            "label_map": {"label_map": state.label_map}})}
        for name, tree in host.items():
            checkpoint.save_arrays(folder / f"{name}.npz", tree)
        config = self.config
        # Channel masks also zero BatchNorm outputs: the export holds the gated weights, so it needs no channel logic.
        # overwrite: a run killed after this save but before its checkpoint redoes the unit's save.
        export.export_subnetwork(
            folder / "subnetwork.npz", model_name=config.model.name, num_classes=config.model.num_classes,
            width=config.model.width, stem=config.model.stem, weights=found["effective"],
            batch_stats=host["batch_stats"], masks=found["kernel_masks"], prompt_spec=self.prompt_spec,
            prompt=host["prompt"], label_map=host["label_map"]["label_map"],
            eval_with_prompt=config.eval.with_prompt and self.uses_prompt, class_names=self.class_names,
            rng=jax.device_get(state.rng), overwrite=True,
        )


def format_results(results: list[dict[str, Any]]) -> str:
    """The results table as aligned plain text."""
    header = f"{'method':>9} {'density':>8} {'sparsity':>9} {'test acc':>9} {'test loss':>10} {'speedup':>8} {'wall s':>8}"
    rows = [header] + [
        f"{r.get('method', ''):>9} {r['density']:>8.4g} {r['sparsity']:>9.4f} {r['test_accuracy']:>9.4f} "
        f"{r['test_loss']:>10.4f} {r.get('speedup', 1.0):>8.3f} {r['wall_time_s']:>8.1f}"
        for r in results
    ]
    return "\n".join(rows)


def write_results(workdir: pathlib.Path, results: list[dict[str, Any]]) -> None:
    """results.json and results.csv in the workdir (each written whole, then renamed into place)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=RESULT_FIELDS, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(results)
    for name, content in ((RESULTS_JSON, json.dumps(results, indent=2)), (RESULTS_CSV, text.getvalue())):
        checkpoint.write_atomically(workdir / name, lambda file, content=content: file.write(content.encode()))


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        replace_workdir: bool = False) -> list[dict[str, Any]]:
    """Runs (or resumes) every density of ``config`` in ``workdir``; returns the results rows.

    A second run on the same workdir while this one is alive is refused (``checkpoint.workdir_lock``). A
    workdir holding a run of another config is refused too, unless ``replace_workdir``: then that run is moved
    into ``workdir/replaced/`` and this one starts afresh (``checkpoint.guard_workdir``).
    """
    return Run(config, pathlib.Path(workdir), replace_workdir=replace_workdir).run()
