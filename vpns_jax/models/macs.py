"""Multiply-accumulate counts of a (masked) network, as the authors' calculate_flops.py counts them.

Per conv nnz(kernel) * H_out * W_out, per dense layer nnz(kernel) per output position (1, or a ViT's tokens); the
reference's 2 * nnz * H * W FLOPs, halved. A product of two activations (ViT attention) counts one ``matmul`` row,
unmasked, so torchvision's published ViT GFLOPS come out. BatchNorm, ReLU, pooling and bias adds are not counted, as
in the reference (whose hooks for them are commented out). nnz is taken on the weights as given, so pass masked
weights. Output sizes come from tracing the forward pass to a jaxpr (nothing is computed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vpns_jax.models import functional

Params = dict[Any, Any]
Path = tuple[Any, ...]

_COUNTED = ("conv_general_dilated", "dot_general")
# Ops through which a kernel stays that kernel: im2col's reshape, bfloat16 compute's cast.
_SAME_KERNEL = ("reshape", "convert_element_type")


@dataclasses.dataclass(frozen=True)
class LayerMacs:
    """MACs of one conv or dense layer for one image."""

    name: str
    kind: str  # 'conv', 'dense' or 'matmul' (two activations)
    output_positions: int  # H_out * W_out for a conv, tokens (or 1) for a dense layer, outputs for a matmul
    nnz: int  # of the kernel; a matmul's contraction length
    size: int

    @property
    def macs(self) -> int:
        return self.nnz * self.output_positions

    @property
    def dense_macs(self) -> int:
        return self.size * self.output_positions


@dataclasses.dataclass(frozen=True)
class MacsReport:
    """Per-layer and total MACs for one image; ``dense_total`` counts every kernel entry."""

    layers: tuple[LayerMacs, ...]
    input_size: int

    @property
    def total(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def dense_total(self) -> int:
        return sum(layer.dense_macs for layer in self.layers)

    @property
    def speedup(self) -> float:
        """dense_total / total (the reference's "speedup", against the same network unpruned)."""
        return self.dense_total / self.total if self.total else math.inf

    def format(self) -> str:
        """A plain-text table, one row per layer, then the totals in MMACs."""
        width = max([len(layer.name) for layer in self.layers] + [len("layer")])
        rows = [f"{'layer':<{width}}  {'kind':<5}  {'H*W':>6}  {'nnz':>12}  {'MACs':>15}  {'dense MACs':>15}"]
        for layer in self.layers:
            rows.append(
                f"{layer.name:<{width}}  {layer.kind:<5}  {layer.output_positions:>6}  {layer.nnz:>12,}  "
                f"{layer.macs:>15,}  {layer.dense_macs:>15,}"
            )
        rows.append(
            f"total at {self.input_size}x{self.input_size}: {self.total / 1e6:,.2f} MMACs "
            f"(dense {self.dense_total / 1e6:,.2f} MMACs, speedup {self.speedup:.3f}x)"
        )
        return "\n".join(rows)


def _abstract(tree: Params) -> Params:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def _kernel_uses(jaxpr: jax.extend.core.Jaxpr, var_paths: dict[Any, Path], found: list) -> None:
    """Appends (path, output shape, None) for each counted op whose kernel operand is a weights leaf, and
    (None, output shape, contraction length) for each dot of two activations; recurses into sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _COUNTED:
            rhs = eqn.invars[1]
            shape = eqn.outvars[0].aval.shape
            if not isinstance(rhs, jax.extend.core.Literal) and rhs in var_paths:
                found.append((var_paths[rhs], shape, None))
            elif eqn.primitive.name == "dot_general" and not any(v in var_paths for v in eqn.invars
                                                                 if not isinstance(v, jax.extend.core.Literal)):
                (contracting, _), _ = eqn.params["dimension_numbers"]
                lhs_shape = eqn.invars[0].aval.shape
                found.append((None, shape, math.prod(lhs_shape[d] for d in contracting)))
            continue
        if eqn.primitive.name in _SAME_KERNEL and eqn.invars[0] in var_paths:
            var_paths[eqn.outvars[0]] = var_paths[eqn.invars[0]]
            continue
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if isinstance(sub, jax.extend.core.Jaxpr):
                inner = {
                    iv: var_paths[ov]
                    for ov, iv in zip(eqn.invars, sub.invars)
                    if not isinstance(ov, jax.extend.core.Literal) and ov in var_paths
                }
                _kernel_uses(sub, inner, found)


def _rows(found: list, leaves: dict[Path, Any]) -> list[LayerMacs]:
    """One LayerMacs per use; a matmul is named after the module holding the kernel used last before it."""
    rows, scope, matmuls = [], "", 0
    for path, shape, contraction in found:
        if path is None:
            name = f"{scope}.matmul{matmuls}" if scope else f"matmul{matmuls}"
            rows.append(LayerMacs(name, "matmul", math.prod(shape[1:]), contraction, contraction))
            matmuls += 1
            continue
        kernel = leaves[path]
        module = path[:-1] if path[-1] == "kernel" else path
        scope, matmuls = ".".join(str(p) for p in module[:-1]), 0
        # Output positions per image: everything but the batch and the output-channel axes.
        rows.append(LayerMacs(name=".".join(str(p) for p in module), kind="conv" if np.ndim(kernel) == 4 else "dense",
                              output_positions=math.prod(shape[1:-1]),
                              nnz=int(np.count_nonzero(np.asarray(kernel))), size=int(np.size(kernel))))
    return rows


def count_macs(
    graphdef: nnx.GraphDef,
    weights: Params,
    batch_stats: Params,
    input_size: int,
    *,
    in_channels: int = 3,
) -> MacsReport:
    """MACs of the model for one ``input_size`` x ``input_size`` image, with nnz taken on ``weights`` (masked weights
    count a pruned network); every kernel must be the kernel operand of a conv or dot in the traced forward pass."""
    flat = jax.tree_util.tree_flatten_with_path(weights)[0]
    paths = [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path) for key_path, _ in flat]

    def forward(w: Params, stats: Params) -> jax.Array:
        return functional.apply_model(graphdef, w, stats, jnp.zeros((1, input_size, input_size, in_channels)),
                                      train=False)[0]

    closed = jax.make_jaxpr(forward)(_abstract(weights), _abstract(batch_stats))
    var_paths = dict(zip(closed.jaxpr.invars[: len(paths)], paths))
    found: list = []
    _kernel_uses(closed.jaxpr, var_paths, found)

    leaves = dict(zip(paths, (leaf for _, leaf in flat)))
    layers = _rows(found, leaves)
    counted = {path for path, _, _ in found if path is not None}
    missing = [p for p in paths if p[-1] == "kernel" and p not in counted]
    if missing:
        raise ValueError(f"kernels not used directly by a conv or dot in the traced model, cannot count: {missing}")
    return MacsReport(layers=tuple(layers), input_size=input_size)


__all__ = ["LayerMacs", "MacsReport", "count_macs"]
