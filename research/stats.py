"""Per-layer RMS statistics of a model: activations (the residual stream) and updates.

Two numbers a scaling study watches as width and depth grow: how large the
residual stream is after each layer, and how large one optimizer step's
change of each layer's weights is. A parameterization that transfers
hyperparameters across widths (muP, CompleteP) should keep both roughly
constant per layer.

Used by training (`train.stats_every`: one extra forward pass and a copy of
the params at those steps only) and by analysis on a loaded model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from research import sharding as shd


def _rms(leaves: list[jax.Array]) -> jax.Array:
    total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    return jnp.sqrt(total / sum(x.size for x in leaves))


def activation_rms(resid: list[jax.Array]) -> dict[str, jax.Array]:
    """Residual streams [(B, L, D)] x (n_layers + 1) -> {"act_rms/resid{i}": scalar}.

    resid{0} is the embedding output, resid{i} the stream after block i.
    """
    return {f"act_rms/resid{i}": _rms([x]) for i, x in enumerate(resid)}


def param_groups(params: dict) -> dict[str, list[jax.Array]]:
    """A params pure dict -> {layer name: its arrays}: embed, pos_embed, block{i}, final_norm,
    unembed. block{i} is slice i of the stacked block weights (one per distinct block)."""
    groups = {}
    for name, value in params.items():
        if name == "blocks":
            stacked = jax.tree.leaves(value)
            for i in range(stacked[0].shape[0]):
                groups[f"block{i}"] = [w[i] for w in stacked]
        else:
            groups[name] = jax.tree.leaves(value)
    return groups


def update_rms(before: dict, after: dict) -> dict[str, jax.Array]:
    """Two params pure dicts -> {"update_rms/{layer}": RMS of (after - before) over the layer's weights}."""
    old, new = param_groups(before), param_groups(after)
    return {f"update_rms/{name}": _rms([b - a for a, b in zip(old[name], new[name])]) for name in new}


def model_stats(graphdef: nnx.GraphDef, before: dict, after: dict, tokens_BxL: jax.Array) -> dict:
    """Activation RMS of the model `after` on `tokens_BxL`, and update RMS from `before` to `after`."""
    net = nnx.merge(graphdef, nnx.State(after))
    resid = net.inspect(tokens_BxL, probs=False).resid
    return {**activation_rms(resid), **update_rms(before, after)}


class StatsStep:
    """Per-layer stats for the train loop, compiled ahead like the train step.

    `snapshot(params)` copies the params before a step (the train step donates
    them); `stats(snapshot, params, batch_BxL1)` returns {name: scalar} after it.
    `params` and `batch_BxL1` given here are examples that fix shapes and shardings.
    """

    def __init__(self, graphdef: nnx.GraphDef, param_shardings, mesh: jax.sharding.Mesh,
                 params: dict, batch_BxL1: jax.Array):
        snapshot = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                           in_shardings=(param_shardings,), out_shardings=param_shardings)
        stats = jax.jit(
            lambda before, after, batch: model_stats(graphdef, before, after, batch[:, :-1]),
            in_shardings=(param_shardings, param_shardings, shd.batch_sharding(mesh)),
            out_shardings=shd.replicated(mesh))
        self.snapshot: Callable = snapshot.lower(params).compile()
        self.stats: Callable = stats.lower(params, params, batch_BxL1).compile()
