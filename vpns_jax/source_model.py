"""The model VPNs starts from: pretrained weights from a file, or a dense model pretrained here and cached.

The paper prunes ImageNet-pretrained networks. Offline, a dense model trained
on another task (``config.source``) plays that part: it is trained once,
saved as ``<workdir>/source_model.npz`` and reused by every later run on that
workdir. Pretraining checkpoints as it goes, so a killed run resumes it.
"""

from __future__ import annotations

import pathlib
import zipfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from vpns_jax import cli, config_checks
from vpns_jax.core import dense, health, label_mapping, optim, parallel
from vpns_jax.io import array_files, checkpoint, metrics, pretrained
from vpns_jax.data import pipeline, registry, run_data, workers
from vpns_jax.models import functional

Params = dict[Any, Any]
SOURCE_FILE = "source_model.npz"


def load_weights(path: str | pathlib.Path, weights: Params, batch_stats: Params) -> tuple[Params, Params]:
    """Weights and BatchNorm statistics from a file, shaped like ``weights`` / ``batch_stats``.

    The file is a .npz of {'weights': ..., 'batch_stats': ...} trees (``array_files.save_arrays``,
    e.g. from ``python -m vpns_jax.convert``), or a torchvision state dict: ``.pth``/``.pt``
    (needs torch), ``.safetensors``, or an ``.npz`` keyed by torchvision names
    (``pretrained.from_torchvision`` maps it). Every tensor must be float and finite
    (``pretrained.check_tensors``) and match the model: a one-line error names the
    file, and lists the missing, extra and misshapen tensors.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model.init_from {path} does not exist: give a .npz of vpns_jax weights or a torchvision "
            ".pth/.pt/.safetensors/.npz state dict"
        )
    # Errors name the file, not model.init_from: pretrain() reads its cached source model here too.
    torchvision, loaded = _read_checked(path)
    if torchvision:
        try:
            loaded = dict(zip(("weights", "batch_stats"), pretrained.from_torchvision(loaded, weights, batch_stats)))
        except ValueError as error:
            raise ValueError(f"{path} (a torchvision state dict): {error}") from None
    else:
        problems = []
        for part, expected in (("weights", weights), ("batch_stats", batch_stats)):
            problems += _mismatches(part, expected, loaded.get(part, {}))
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            raise ValueError(
                f"{path} does not fit the model ({shown}): check model.name, width, stem and num_classes"
            )
    cast = lambda tree, like: jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), tree, like)  # noqa: E731
    return cast(loaded["weights"], weights), cast(loaded["batch_stats"], batch_stats)


def _read_checked(path: pathlib.Path) -> tuple[bool, dict]:
    """(whether ``path`` is a torchvision state dict, its tensors by state-dict name or as our trees), each
    tensor checked where it enters; unreadable files and bad tensors are one-line ValueErrors."""
    suffix = path.suffix.lower()
    if suffix in pretrained.SUFFIXES and (suffix != ".npz" or pretrained.is_torchvision_npz(path)):
        return True, pretrained.read_state_dict(path)
    pretrained.require_zip(path)
    try:
        loaded = array_files.load_arrays(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise pretrained.unreadable(path, pretrained.NPZ, error) from None
    # Dotted names, as the NaN/Inf message has always named them (weights.fc.bias).
    flat = traverse_util.flatten_dict(loaded)
    pretrained.check_tensors(path, {".".join(str(part) for part in key): leaf for key, leaf in flat.items()})
    return False, loaded


def _mismatches(part: str, expected: Params, got: Params) -> list[str]:
    want = traverse_util.flatten_dict(expected) if expected else {}
    have = traverse_util.flatten_dict(got) if got else {}
    name = lambda path: f"{part}/" + ".".join(str(p) for p in path)  # noqa: E731
    problems = [f"missing {name(p)}" for p in want if p not in have]
    problems += [f"extra {name(p)}" for p in have if p not in want]
    problems += [
        f"{name(p)} has shape {tuple(have[p].shape)}, the model needs {tuple(want[p].shape)}"
        for p in want if p in have and tuple(have[p].shape) != tuple(want[p].shape)
    ]
    return problems


def _source_stream(config: ml_collections.ConfigDict) -> tuple[pipeline.BatchStream, workers.WorkerPool | None]:
    """The source task's augmented training stream, and the worker pool behind it (None without workers)."""
    cfg = config.source
    train = pipeline.open_subset(cfg.dataset, registry.get_dataset_spec(cfg.dataset).train_split,
                                 config.data.data_dir or None, classes=cfg.classes, limit=cfg.train_limit)
    readable, pool = run_data.stream_sources({"train": train}, config.data.workers)
    stream = pipeline.BatchStream(
        readable["train"], global_batch_size=cfg.batch_size, image_size=config.prompt.input_size, view="augmented",
        seed=config.seed, stream=3, num_threads=config.data.num_threads,
    )
    return stream, pool


def pretrain(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    model: nnx.Module,
    mesh: jax.sharding.Mesh,
    writer: metrics.MetricsWriter,
) -> tuple[Params, Params]:
    """The dense source model of ``config.source``, trained here once and cached in the workdir."""
    graphdef, weights, batch_stats = functional.split_model(model)
    cached = workdir / SOURCE_FILE
    if cached.is_file():
        return load_weights(cached, weights, batch_stats)
    cfg = config.source
    stream, pool = _source_stream(config)
    steps_per_epoch = stream.batches_per_epoch
    group = config_checks.group_optimizer(cfg.optimizer)
    tx = optim.group_transform(group, optim.epoch_cosine_schedule(group.learning_rate, cfg.epochs, steps_per_epoch))
    state = dense.init_dense_state(
        weights, batch_stats, tx, label_map=label_mapping.identity_mapping(config.model.num_classes),
        rng=jax.random.PRNGKey(config.seed),
    )
    state = parallel.replicate(state, mesh)
    total = cfg.epochs * steps_per_epoch
    with checkpoint.Checkpointer(workdir / "checkpoints_source", max_to_keep=config.checkpoint.max_to_keep) as ckpt:
        start = 0
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(jax.eval_shape(lambda: state))
            start = meta["step"]
        stream.set_state({"epoch": start // steps_per_epoch, "batch": start % steps_per_epoch})
        bar = metrics.progress(total, "source pretraining", initial=start)
        check = health.FiniteCheck(config.on_nonfinite, hint="lower config.source.optimizer.lr",
                                   on_skip=lambda step: writer.write(step, {"skipped_batches": check.skipped},
                                                                     phase="source"))
        batches = parallel.prefetch_to_device(stream, mesh, scale_pixels=pipeline.unit_pixels)
        for step in range(start, total):
            cli.raise_if_stopped()
            batch = next(batches)
            state, step_metrics = dense.dense_train_step(state, batch, graphdef=graphdef, tx=tx)
            check.push(step_metrics[health.FINITE], step + 1, f"source pretraining, step {step + 1} (epoch "
                       f"{step // steps_per_epoch}, batch {step % steps_per_epoch})")
            bar.update(1)
            done = step + 1
            if done % config.log_every_steps == 0 or done == total:
                writer.write(done, jax.device_get(step_metrics), phase="source")
            if done % config.checkpoint.every_steps == 0 and done < total:
                check.flush()
                ckpt.save(done, state, {"step": done})
        check.flush()
        bar.close()
    if pool is not None:
        pool.close()
    weights, batch_stats = jax.device_get((state.weights, state.batch_stats))
    if jax.process_index() == 0:
        array_files.save_arrays(cached, {"weights": weights, "batch_stats": batch_stats})
    return jax.tree.map(np.asarray, weights), jax.tree.map(np.asarray, batch_stats)
