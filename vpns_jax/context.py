"""A run's fixed ingredients, built once: plan, data, model, source weights, scores, step spec; and unit states.

``RunContext`` is what the trainer (``vpns_jax.train``) loops with and what a
method reads (it implements ``methods.MethodContext``): states for a unit, the
label mapping through given masks, a finished unit's saved arrays, training
batches for a saliency, a transfer source's masks and prompt. Everything that
can be checked without the workdir is checked in the constructor, so a bad
config or weights file leaves no workdir behind; ``start`` then reads or
pretrains the source weights.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from vpns_jax import config_checks, evaluation, methods, source_model
from vpns_jax.core import masking, parallel, prompts, steps, structured
from vpns_jax.data import pipeline, run_data
from vpns_jax.io import array_files, metrics, workdir
from vpns_jax.models import create_model, functional

Params = dict[Any, Any]
TRANSFERRED_FILES = ("masks.npz", "prompt.npz")  # what config.transfer.masks_from takes from each density


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def check_transfer_sources(config: Any) -> None:
    """A one-line error when ``config.transfer.masks_from`` lacks a finished subnetwork of one of
    ``config.densities`` (nothing to check without a transfer)."""
    if not config.transfer.masks_from:
        return
    source = pathlib.Path(config.transfer.masks_from)
    missing = [d for d in config.densities
               if not all((workdir.unit_folder(source, d) / name).is_file() for name in TRANSFERRED_FILES)]
    if missing:
        raise config_checks.ConfigError(
            f"config.transfer.masks_from={config.transfer.masks_from!r} has no finished subnetwork for densities "
            f"{missing} (no {' or '.join(TRANSFERRED_FILES)} in {workdir.unit_folder(source, missing[0])}): run "
            "them there first, or list only the densities it has")


class RunContext:
    """The ingredients of one run of ``config`` in ``workdir`` (see the module docstring)."""

    def __init__(self, config: Any, workdir_path: pathlib.Path, mesh: jax.sharding.Mesh):
        self.config, self.workdir, self.mesh = config, workdir_path, mesh
        config_checks.validate(config, num_devices=mesh.devices.size)
        self.plan = methods.make_plan(config)
        check_transfer_sources(config)
        self.data = run_data.open_run_data(config)
        self.model = create_model(config.model.name, rngs=nnx.Rngs(config.seed),
                                  **config_checks.model_arguments(config))
        self.kinds = functional.leaf_kinds(self.model)
        self.pretrained = self._pretrained_weights()  # read (and checked) now: a bad file leaves no workdir
        self.prompt_spec = config_checks.prompt_spec(config)
        # (granularity, N:M or None): the one reading of config.mask.granularity.
        self.granularity, self.nm = config_checks.mask_pattern(config)
        self.uses_prompt = any("prompt" in phase.trains for phase in self.plan.phases.values())
        self.channel_groups = self._channel_groups()

    def _pretrained_weights(self) -> tuple[Params, Params] | None:
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

    def _channel_groups(self) -> tuple:
        """The channel groups of channel masks (checked against every density), else ()."""
        config = self.config
        if self.granularity != "channel":
            return ()
        _, weights, _ = functional.split_model(self.model)
        groups = structured.channel_groups(config.model.name, weights, num_heads=getattr(self.model, "num_heads", None))
        for density in config.densities:
            try:
                structured.channel_prune_counts(groups, density, config.structured.channel_max)
            except ValueError as error:
                raise config_checks.ConfigError(
                    f"config.densities holds {density}: {error}; raise the density or "
                    "config.structured.channel_max") from None
        return tuple(groups)

    def start(self, writer: metrics.MetricsWriter) -> None:
        """The source weights (read, or pretrained here and cached in the workdir), initial scores, zero prompt
        and the step spec."""
        self.source = self.pretrained or source_model.pretrain(self.config, self.workdir, self.model, self.mesh,
                                                               writer)
        self.zero_prompt = prompts.init_prompt(self.prompt_spec)
        self.scores = methods.initial_scores(self.plan, self)
        config, plan = self.config, self.plan
        self.spec = steps.make_step_spec(
            self.model, self.prompt_spec, prompt_params=self.zero_prompt, scores=self.scores,
            stage_groups=plan.groups, epochs=plan.epochs, iterations_per_epoch=self.data.iterations_per_epoch,
            threshold_scope=config.mask.scope, phases=plan.phases, granularity=self.granularity,
            channel_groups=self.channel_groups, channel_max=config.structured.channel_max,
            min_layer_density=config.mask.min_layer_density, nm_pattern=self.nm,
        )

    # -- what methods read (methods.MethodContext) -------------------------------------------------------------

    def ones_masks(self) -> Params:
        """All-ones masks shaped like the method's (host arrays)."""
        if self.granularity == "channel":
            return {g.name: np.ones((g.num_channels,), np.float32) for g in self.channel_groups}
        flat = traverse_util.flatten_dict(self.source[0])
        return traverse_util.unflatten_dict(
            {path: np.ones(np.shape(flat[path]), np.float32) for path in masking.prunable_paths(self.kinds)})

    def state(self, unit: methods.Unit, stage: int, masks: Params | None = None,
              prompt: Params | None = None) -> steps.TrainState:
        """A state for ``unit`` ready for ``stage``: the source weights, the initial scores, a zero prompt
        (or ``prompt``) and the given masks; replicated over the mesh."""
        weights, batch_stats = self.source
        state = steps.init_state(
            self.spec, weights=_copy(weights), batch_stats=_copy(batch_stats), scores=_copy(self.scores),
            prompt=_copy(self.zero_prompt if prompt is None else prompt), density=unit.density,
            label_map=np.arange(self.data.num_target), rng=jax.random.PRNGKey(self.config.seed), masks=masks,
            stage=stage,
        )
        return parallel.replicate(state, self.mesh)

    def label_mapped(self, state: steps.TrainState) -> steps.TrainState:
        """Frequency label mapping through the state's masks (and prompt, if the method has one)."""
        return evaluation.label_mapped(self.spec, state, self.data.mapping, self.mesh,
                                       num_target=self.data.num_target, with_prompt=self.uses_prompt)

    def mapped_state(self, unit: methods.Unit, masks: Params | None = None,
                     prompt: Params | None = None) -> steps.TrainState:
        """A state of ``unit`` at its first stage with these masks, label-mapped through them."""
        return self.label_mapped(self.state(unit, unit.stages[0], masks=masks, prompt=prompt))

    def finished_unit(self, index: int) -> tuple[Params, Params]:
        """(final weights, masks) of unit ``index``, as saved when it finished."""
        return workdir.finished_unit(self.workdir, self.plan.units[index].density)

    def training_batches(self, count: int) -> list[dict]:
        """The first ``count`` full batches (no padding rows) of the label-mapping stream, on the mesh."""
        full = (b for b in self.data.mapping.epoch_batches() if (b["label"] >= 0).all())
        return [parallel.global_batch(b, self.mesh, scale_pixels=pipeline.unit_pixels)
                for b, _ in zip(full, range(count))]

    def transfer_arrays(self, density: float) -> tuple[Params, Params]:
        """(masks, prompt) that the run in ``config.transfer.masks_from`` saved for ``density`` (host arrays;
        ``check_transfer_sources`` ran in the constructor)."""
        folder = workdir.unit_folder(pathlib.Path(self.config.transfer.masks_from), density)
        masks, prompt = (array_files.load_arrays(folder / name) for name in TRANSFERRED_FILES)
        return masks, prompt

    # -- what the trainer reads --------------------------------------------------------------------------------

    def start_unit(self, index: int) -> steps.TrainState:
        """Unit ``index``'s initial state: its masks (or scores) and prompt, label-mapped through them."""
        unit = self.plan.units[index]
        masks, prompt = methods.unit_start(self.plan, self, unit, index)
        return self.mapped_state(unit, masks=masks, prompt=prompt)

    def template(self, unit: methods.Unit, stage: int) -> steps.TrainState:
        """A state shaped like the checkpoint of ``unit`` in ``stage`` (values do not matter): it holds masks
        unless the stage trains scores."""
        fixed = "scores" not in self.plan.phases[stage].trains
        return self.state(unit, stage, masks=self.ones_masks() if fixed else None)
