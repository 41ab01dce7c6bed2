"""Optax optimizers and learning-rate schedules built from the config.

Weight decay is decoupled and scaled by the learning rate in every
optimizer (p -= lr * wd * p, as AdamW), and applies to matrices only
(ndim >= 2): norm scales and biases are left alone. Gradient accumulation is not an Optax wrapper here: step.py
averages microbatch gradients inside one jitted step, which gives the same
update as one large batch.

Every optimizer is one chain: [clip] -> its direction (Adam, Lion, ...) ->
decay -> x lr(step). Under muP and CompleteP the decay link becomes
`scale_and_decay`, which also multiplies each weight's update by its own lr
scale (param.py builds the scales from the param tree), so the per-parameter
rules work with every optimizer here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from research.config import OptimConfig, ScheduleConfig
from research.param import OptimScales
from research.registry import Registry

Schedule = Callable[[jax.Array], jax.Array]


def _warmup(step: jax.Array, warmup: int) -> jax.Array:
    return jnp.minimum(1.0, (step + 1) / max(warmup, 1)) if warmup else jnp.ones_like(step, jnp.float32)


SCHEDULES = Registry("schedule")  # name -> (ScheduleConfig, lr, steps) -> (step -> lr), before warmup


@SCHEDULES.register("cosine")
def _cosine(s: ScheduleConfig, lr: float, steps: int) -> Schedule:
    """Half-cosine from lr to lr * min_lr_ratio at the last step."""
    floor = lr * s.min_lr_ratio

    def cosine(step):
        t = jnp.clip((step - s.warmup) / max(steps - 1 - s.warmup, 1), 0.0, 1.0)
        return floor + (lr - floor) * 0.5 * (1 + jnp.cos(jnp.pi * t))

    return cosine


@SCHEDULES.register("wsd")
def _wsd(s: ScheduleConfig, lr: float, steps: int) -> Schedule:
    """Warmup-stable-decay: constant, then linear to lr * min_lr_ratio over the last decay_frac of the steps."""
    floor = lr * s.min_lr_ratio
    decay_steps = max(int(round(steps * s.decay_frac)), 1)

    def wsd(step):
        # Reaches the floor at the last step run, steps - 1.
        t = jnp.clip((step - (steps - decay_steps)) / max(decay_steps - 1, 1), 0.0, 1.0)
        return lr - (lr - floor) * t

    return wsd


@SCHEDULES.register("constant")
def _constant(s: ScheduleConfig, lr: float, steps: int) -> Schedule:
    """lr throughout (after warmup)."""
    return lambda step: jnp.full_like(step, lr, jnp.float32)


@SCHEDULES.register("rsqrt")
def _rsqrt(s: ScheduleConfig, lr: float, steps: int) -> Schedule:
    """lr * sqrt(warmup / step) after warmup."""
    return lambda step: lr * jnp.sqrt(max(s.warmup, 1) / jnp.maximum(step + 1, max(s.warmup, 1)))


def make_schedule(s: ScheduleConfig, lr: float, steps: int) -> Schedule:
    """step -> learning rate: linear warmup over `s.warmup` steps, times the schedule
    registered as `s.name` in SCHEDULES."""
    body = SCHEDULES.get(s.name).impl(s, lr, steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return _warmup(step, s.warmup) * body(step)

    return schedule


def decay_mask(params):
    """True for leaves that get weight decay: matrices, not norms or biases. Under
    `blocks` every weight carries a leading layers dim (model.Block), so a matrix there
    has 3 dims and a norm scale 2."""
    def decays(path, p):
        stacked = bool(path) and getattr(path[0], "key", None) == "blocks"
        return p.ndim >= (3 if stacked else 2)

    return jax.tree_util.tree_map_with_path(decays, params)


# Each optimizer's direction: the transforms before weight decay and the lr
# (optax.adamw and optax.lion are exactly these chained with
# add_decayed_weights and scale_by_learning_rate, so the state is the same).
@dataclasses.dataclass(frozen=True)
class Direction:
    """An optimizer's direction: OptimConfig -> Optax transforms, and its muP family
    ("adaptive": Adam-like, sign or RMS-normalised updates; "sgd"), which picks
    param.py's lr rules."""

    transforms: Callable[[OptimConfig], list[optax.GradientTransformation]]
    family: str = "adaptive"

    def __call__(self, o: OptimConfig) -> list[optax.GradientTransformation]:
        return self.transforms(o)


OPTIMIZERS = Registry("optimizer")  # name -> Direction


def _direction(name: str, family: str = "adaptive"):
    def register(fn):
        OPTIMIZERS.register(name, Direction(fn, family), doc=fn.__doc__.strip().splitlines()[0])
        return fn
    return register


@_direction("adamw")
def _adamw(o: OptimConfig) -> list[optax.GradientTransformation]:
    """Adam with decoupled weight decay (Loshchilov and Hutter 2019)."""
    return [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)]


@_direction("lion")
def _lion(o: OptimConfig) -> list[optax.GradientTransformation]:
    """Lion (Chen et al. 2023): sign updates."""
    return [optax.scale_by_lion(b1=o.b1, b2=o.b2)]


@_direction("adafactor")
def _adafactor(o: OptimConfig) -> list[optax.GradientTransformation]:
    """Adafactor (Shazeer and Stern 2018): factored second moments; b1 > 0 adds momentum."""
    # Optax's adafactor adds weight decay after the lr scaling (so it would
    # ignore lr and schedule); the chain here puts decay before it.
    return [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
            *([optax.ema(o.b1, debias=False)] if o.b1 else [])]


@_direction("sgd", family="sgd")
def _sgd(o: OptimConfig) -> list[optax.GradientTransformation]:
    """SGD with momentum b1 (0 = plain SGD)."""
    # Decay after momentum, so it is decoupled (not amplified by 1 / (1 - b1)).
    return [optax.trace(decay=o.b1)] if o.b1 else []


def scale_and_decay(lr_scales, decay_scales, weight_decay: float) -> optax.GradientTransformation:
    """u -> s * u + weight_decay * d * p, leaf by leaf, for the leaves `decay_mask` picks.

    `lr_scales` (s) and `decay_scales` (d) are pytrees of Python floats shaped
    like the params. Stateless: the optimizer state, and its sharding, are
    those of the direction alone.
    """
    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("scale_and_decay needs the params: pass them to update()")

        def one(u, p, s, d, decays):
            u = s * u
            return u + (weight_decay * d) * p if decays and weight_decay else u

        return jax.tree.map(one, updates, params, lr_scales, decay_scales, decay_mask(params)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(o: OptimConfig, schedule: Schedule,
                   scales: OptimScales | None = None) -> optax.GradientTransformation:
    """Clip (global norm) -> the named optimizer with masked, decoupled weight decay.

    `scales` (param.optim_scales; None under sp) multiplies each weight's
    update and decay, and optim.eps.
    """
    if scales is None:
        decay = optax.add_decayed_weights(o.weight_decay, decay_mask)
    else:
        o = dataclasses.replace(o, eps=o.eps * scales.eps)
        decay = scale_and_decay(scales.lr, scales.decay, o.weight_decay)
    core = optax.chain(*OPTIMIZERS.get(o.name).impl(o), decay, optax.scale_by_learning_rate(schedule))
    if o.clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.clip), core)
    return core
