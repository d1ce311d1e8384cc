"""Plain dense training: every weight trains, no mask, no prompt.

Used to pretrain a source model and as the reference cost that the VPNs steps
are measured against.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from vpns_jax.core import health, label_mapping, prompts
from vpns_jax.models import functional

Params = dict[Any, Any]


@struct.dataclass
class DenseState:
    """Dense training state; ``label_map`` is the identity when training on the model's own classes."""

    step: jax.Array
    weights: Params
    batch_stats: Params
    label_map: jax.Array
    rng: jax.Array  # a raw uint32 PRNG key (jax.random.PRNGKey), so checkpoints hold plain arrays
    opt_state: optax.OptState


def init_dense_state(
    weights: Params, batch_stats: Params, tx: optax.GradientTransformation, *, label_map: jax.Array, rng: jax.Array
) -> DenseState:
    """A fresh dense state with ``tx``'s initial optimiser state."""
    return DenseState(
        step=jnp.zeros((), jnp.int32),
        weights=weights,
        batch_stats=batch_stats,
        label_map=jnp.asarray(label_map, jnp.int32),
        rng=rng,
        opt_state=tx.init(weights),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=0)
def dense_train_step(
    state: DenseState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation
) -> tuple[DenseState, dict[str, jax.Array]]:
    """One SGD/Adam step on normalised images (already at the model's input size); a step whose loss or new
    weights are not finite leaves the state as it was but for ``step`` (``health.keep_if_finite``)."""
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(weights):
        x = prompts.normalize(batch["image"])
        logits, batch_stats = functional.apply_model(
            graphdef, weights, state.batch_stats, x, train=True, dropout_key=dropout_key
        )
        loss, accuracy = label_mapping.mapped_loss(logits, batch["label"], state.label_map)
        return loss, (accuracy, batch_stats)

    (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.weights)
    updates, opt_state = tx.update(grads, state.opt_state, state.weights)
    new = state.replace(weights=optax.apply_updates(state.weights, updates), batch_stats=batch_stats,
                        opt_state=opt_state)
    new, finite = health.keep_if_finite(new, state, {"loss": loss}, new.weights)
    return new.replace(step=state.step + 1), {"loss": loss, "accuracy": accuracy, health.FINITE: finite}
