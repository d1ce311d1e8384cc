"""The VPNs run: for each density, label mapping, stage 1, stage 2 and a test evaluation; resumable.

Every density starts from the same state (source weights, the same initial
scores, a zero prompt, the same seed). Progress is checkpointed with its
position (density index, stage, epoch, batch, global step, results so far); the
data streams' positions are a function of (stage, epoch, batch), so rerunning
the same command continues exactly where a killed run stopped.
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
from flax import nnx
from jax.experimental import multihost_utils

from vpns_jax import checkpoint, config_checks, export, label_mapping, masking, metrics, optim, parallel, prompts, source_model, steps
from vpns_jax.data import pipeline, prepare, registry
from vpns_jax.models import create_model, functional

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULT_FIELDS = ("density", "sparsity", "model_sparsity", "test_accuracy", "test_loss", "wall_time_s")
OFFLINE_PREPARABLE = ("fashion_mnist", "digits")


@dataclasses.dataclass
class Position:
    """Where a run is; saved as the checkpoint's metadata."""

    density_index: int = 0
    label_mapped: bool = False
    stage: int = 1
    epoch: int = 0  # within the stage
    batch: int = 0  # the next batch within the epoch
    global_step: int = 0  # training iterations over the whole run
    elapsed: float = 0.0  # wall seconds spent on the current density before this process started it
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


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class Run:
    """One ``run(config, workdir)``: the fixed ingredients, built once, and the density loop."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
        self.config = config
        self.workdir = workdir
        self.mesh = parallel.make_mesh()
        config_checks.validate(config, num_devices=self.mesh.devices.size)
        enable_compilation_cache(config.compilation_cache_dir)
        data_dir = config.data.data_dir or None
        names = [config.data.name] + ([config.source.dataset] if config.source.enabled else [])
        for name in dict.fromkeys(names):
            _ensure_prepared(name, data_dir, config.data.auto_prepare)
        data_spec = registry.get_dataset_spec(config.data.name)
        self.num_target = len(config.data.classes) or data_spec.num_classes  # validate() checked it fits the head
        train = pipeline.open_subset(config.data.name, data_spec.train_split, data_dir,
                                     classes=config.data.classes, limit=config.data.train_limit)
        test = pipeline.open_subset(config.data.name, data_spec.test_split, data_dir,
                                    classes=config.data.classes, limit=config.data.test_limit)
        size = config.prompt.input_size
        self.clean, self.augmented = pipeline.training_streams(
            train, global_batch_size=config.data.batch_size, image_size=size, seed=config.seed,
            num_threads=config.data.num_threads,
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
        self.prompt_spec = prompts.PromptSpec(**config.prompt.to_dict())
        self.iterations_per_epoch = self.clean.batches_per_epoch
        self.class_names = export.dataset_class_names(config.data.name, data_dir, config.data.classes, self.num_target)
        # Only now, with data and model in hand, does the workdir get tied to this config: a run that
        # fails its checks leaves no config.json behind to refuse the corrected command.
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint.guard_workdir(workdir, config_checks.fingerprint(config))

    def _initial_weights(self, writer: metrics.MetricsWriter):
        config = self.config
        _, weights, batch_stats = functional.split_model(self.model)
        if config.model.init_from:
            return source_model.load_weights(config.model.init_from, weights, batch_stats)
        if config.source.enabled:
            return source_model.pretrain(config, self.workdir, self.model, self.mesh, writer)
        raise config_checks.ConfigError(
            "model.init_from is empty and source.enabled is False: VPNs prunes a pretrained model; give "
            "--config.model.init_from=PATH (a torchvision .pth/.safetensors state dict or a vpns_jax .npz) or enable "
            "source pretraining"
        )

    def _spec(self, scores, prompt) -> steps.StepSpec:
        config = self.config
        group = config_checks.group_optimizer
        stage_groups = {
            1: {"scores": group(config.stage1.scores), "prompt": group(config.stage1.prompt)},
            2: {"weights": group(config.stage2.weights), "bn": group(config.stage2.bn), "prompt": group(config.stage2.prompt)},
        }
        return steps.make_step_spec(
            self.model, self.prompt_spec, prompt_params=prompt, scores=scores, stage_groups=stage_groups,
            epochs={1: config.stage1.epochs, 2: config.stage2.epochs},
            iterations_per_epoch=self.iterations_per_epoch, threshold_scope=config.mask.scope,
        )

    def run(self) -> list[dict[str, Any]]:
        config = self.config
        with metrics.MetricsWriter(self.workdir) as writer, checkpoint.Checkpointer(
            self.workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep
        ) as ckpt:
            weights, batch_stats = self._initial_weights(writer)
            scores = masking.init_scores(weights, functional.leaf_kinds(self.model))
            prompt = prompts.init_prompt(self.prompt_spec)
            self.spec = self._spec(scores, prompt)
            self.initial = (weights, batch_stats, scores, prompt)
            latest = ckpt.latest_step()
            position = Position(**ckpt.restore_meta(latest)) if latest is not None else Position()
            self.saves = (latest or 0)
            while position.density_index < len(config.densities):
                position = self._density(position, ckpt, writer)
        if jax.process_index() == 0:
            write_results(self.workdir, position.results)
        return position.results

    def _fresh_state(self, density: float) -> steps.TrainState:
        weights, batch_stats, scores, prompt = self.initial
        state = steps.init_state(
            self.spec, weights=_copy(weights), batch_stats=_copy(batch_stats), scores=_copy(scores),
            prompt=_copy(prompt), density=density, label_map=np.arange(self.num_target),
            rng=jax.random.PRNGKey(self.config.seed),
        )
        return parallel.replicate(state, self.mesh)

    def _save(self, ckpt: checkpoint.Checkpointer, state, position: Position) -> None:
        self.saves += 1
        ckpt.save(self.saves, state, dataclasses.asdict(position))

    def _restore(self, ckpt: checkpoint.Checkpointer, density: float, stage: int) -> steps.TrainState:
        fresh = self._fresh_state(density)
        like = fresh if stage == 1 else steps.start_stage(self.spec, fresh, 2)
        replicated = parallel.replicated(self.mesh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), like)
        state, _ = ckpt.restore(abstract)
        return state

    def _density(self, position: Position, ckpt: checkpoint.Checkpointer, writer: metrics.MetricsWriter) -> Position:
        config = self.config
        density = config.densities[position.density_index]
        started = time.perf_counter() - position.elapsed
        if position.label_mapped:
            state = self._restore(ckpt, density, position.stage)
        else:
            state = self._fresh_state(density)
            counts = sum(
                np.asarray(steps.source_prediction_counts(state, parallel.global_batch(batch, self.mesh),
                                                          spec=self.spec, num_target=self.num_target))
                for batch in self.mapping_stream.epoch_batches()
            )
            mapping = label_mapping.frequency_label_mapping(counts)
            state = state.replace(label_map=parallel.replicate(jnp.asarray(mapping), self.mesh))
            position.label_mapped = True
            position.elapsed = time.perf_counter() - started
            self._save(ckpt, state, position)
        for stage in (1, 2):
            if position.stage > stage:
                continue
            state = self._train_stage(state, position, stage, density, started, ckpt, writer)
            if stage == 1:
                # New arrays (step, optimiser state) start on one device: place them like the rest.
                state = parallel.replicate(steps.start_stage(self.spec, state, 2), self.mesh)
                position.stage, position.epoch, position.batch = 2, 0, 0
                position.elapsed = time.perf_counter() - started
                self._save(ckpt, state, position)
        result = self._evaluate(state, density)
        result["wall_time_s"] = round(time.perf_counter() - started, 2)
        writer.write(position.global_step, {k: v for k, v in result.items() if k != "density"},
                     phase="result", density=density)
        self._save_subnetwork(state, density)
        next_position = Position(density_index=position.density_index + 1, global_step=position.global_step,
                                 results=position.results + [result])
        if next_position.density_index < len(config.densities):
            # The next density starts from a fresh state; saved so the checkpoint shape stays uniform.
            self._save(ckpt, self._fresh_state(config.densities[next_position.density_index]), next_position)
        else:
            self._save(ckpt, state, next_position)
        return next_position

    def _train_stage(self, state, position: Position, stage: int, density: float, started: float,
                     ckpt: checkpoint.Checkpointer, writer: metrics.MetricsWriter) -> steps.TrainState:
        config = self.config
        epochs = config.stage1.epochs if stage == 1 else config.stage2.epochs
        offset = 0 if stage == 1 else config.stage1.epochs  # streams keep counting epochs across the stages
        per_epoch = self.iterations_per_epoch
        for stream in (self.clean, self.augmented):
            stream.set_state({"epoch": offset + position.epoch, "batch": position.batch})
        bar = metrics.progress(epochs * per_epoch, f"density {density} stage {stage}",
                               initial=position.epoch * per_epoch + position.batch)
        images, tick = 0, time.perf_counter()
        while position.epoch < epochs:
            prompted = parallel.global_batch(next(self.clean), self.mesh)
            plain = parallel.global_batch(next(self.augmented), self.mesh)
            state, step_metrics = steps.train_iteration(state, prompted, plain, spec=self.spec, stage=stage)
            images += 2 * config.data.batch_size
            position.global_step += 1
            position.batch += 1
            if position.batch == per_epoch:
                position.epoch, position.batch = position.epoch + 1, 0
            bar.update(1)
            if position.global_step % config.log_every_steps == 0:
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                values.update(self._learning_rates(stage, position.epoch))
                values["images_per_s"] = images / (time.perf_counter() - tick)
                writer.write(position.global_step, values, density=density, stage=stage)
                images, tick = 0, time.perf_counter()
            if position.global_step % config.checkpoint.every_steps == 0 and position.epoch < epochs:
                position.elapsed = time.perf_counter() - started
                self._save(ckpt, state, position)
        bar.close()
        return state

    def _learning_rates(self, stage: int, epoch: int) -> dict[str, float]:
        section = self.config.stage1 if stage == 1 else self.config.stage2
        epochs = section.epochs
        return {f"lr_{name}": float(optim.epoch_cosine_schedule(section[name].lr, epochs, 1)(min(epoch, epochs - 1)))
                for name in optim.reference_groups(stage)}

    def _evaluate(self, state: steps.TrainState, density: float) -> dict[str, Any]:
        totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
        for batch in self.test_stream.epoch_batches():
            out = jax.device_get(steps.eval_step(state, parallel.global_batch(batch, self.mesh), spec=self.spec,
                                                 with_prompt=self.config.eval.with_prompt))
            for key in totals:
                totals[key] += out[key].item()
        report = masking.sparsity_report(jax.device_get(state.weights), jax.device_get(state.masks))
        return {
            "density": density,
            "sparsity": round(report.prunable_sparsity, 6),
            "model_sparsity": round(report.model_sparsity, 6),
            "test_accuracy": round(totals["correct"] / totals["count"], 6),
            "test_loss": round(totals["loss_sum"] / totals["count"], 6),
        }

    def _save_subnetwork(self, state: steps.TrainState, density: float) -> None:
        if jax.process_index() != 0:
            return
        folder = self.workdir / "subnetworks" / f"density_{density}"
        folder.mkdir(parents=True, exist_ok=True)
        host = jax.device_get({"masks": state.masks, "weights": state.weights, "batch_stats": state.batch_stats,
                               "prompt": state.prompt, "label_map": {"label_map": state.label_map}})
        for name, tree in host.items():
            checkpoint.save_arrays(folder / f"{name}.npz", tree)
        config = self.config
        # overwrite: a run killed after this save but before its checkpoint redoes the density's save.
        export.export_subnetwork(
            folder / "subnetwork.npz", model_name=config.model.name, num_classes=config.model.num_classes,
            width=config.model.width, stem=config.model.stem, weights=host["weights"],
            batch_stats=host["batch_stats"], masks=host["masks"], prompt_spec=self.prompt_spec,
            prompt=host["prompt"], label_map=host["label_map"]["label_map"],
            eval_with_prompt=config.eval.with_prompt, class_names=self.class_names,
            rng=jax.device_get(state.rng), overwrite=True,
        )


def format_results(results: list[dict[str, Any]]) -> str:
    """The results table as aligned plain text."""
    header = f"{'density':>8} {'sparsity':>9} {'test acc':>9} {'test loss':>10} {'wall s':>8}"
    rows = [header] + [
        f"{r['density']:>8} {r['sparsity']:>9.4f} {r['test_accuracy']:>9.4f} {r['test_loss']:>10.4f} {r['wall_time_s']:>8.1f}"
        for r in results
    ]
    return "\n".join(rows)


def write_results(workdir: pathlib.Path, results: list[dict[str, Any]]) -> None:
    """results.json and results.csv in the workdir (each written whole, then renamed into place)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
    for name, content in ((RESULTS_JSON, json.dumps(results, indent=2)), (RESULTS_CSV, text.getvalue())):
        checkpoint.write_atomically(workdir / name, lambda file, content=content: file.write(content.encode()))


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Runs (or resumes) every density of ``config`` in ``workdir``; returns the results rows."""
    return Run(config, pathlib.Path(workdir)).run()
