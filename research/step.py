"""Pure train and eval steps, each one `jax.jit` with explicit shardings.

The train state is a plain dict pytree, `{"params", "opt_state", "step", "rng"}`,
so jit, Optax and Orbax all see the same structure. `train_step(state,
batch) -> (state, metrics)` has no side effects; the state argument is
donated, so params and optimizer moments are updated in place.

Batches are int32 (B, L + 1): inputs are [:, :-1], targets [:, 1:].
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from research import kernels, model, optim, param, plugins
from research import sharding as shd
from research.config import Config

State = dict

def make_loss_fn(graphdef: nnx.GraphDef, mesh: Mesh, z_loss: float = 0.0) -> Callable:
    """(params, batch_BxL1) -> (objective, parts): `parts["loss"]` is the mean next-token
    cross-entropy (float32 scalar); with a `z_loss` coefficient, `parts["z_loss"]` is the
    mean log(Z)^2 of the output logits (PaLM, Chowdhery et al. 2022, sec. 5), and the
    objective is loss + z_loss x that; without, the objective is the loss."""
    pinned = {"act": NamedSharding(mesh, P(shd.BATCH_AXES, None, None)),
              "whole": shd.replicated(mesh)}

    def constrain(x, kind):
        return jax.lax.with_sharding_constraint(x, pinned[kind])

    def loss_fn(params, batch_BxL1):
        net = nnx.merge(graphdef, nnx.State(params))
        inputs_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
        logits_BxLxV = net(inputs_BxL, constrain=constrain)
        losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
        loss = losses_BxL.mean()
        if not z_loss:
            return loss, {"loss": loss}
        z_sq = jnp.square(jax.nn.logsumexp(logits_BxLxV, axis=-1)).mean()
        return loss + z_loss * z_sq, {"loss": loss, "z_loss": z_sq}

    return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    schedule: Callable, accum: int, state_shardings, mesh: Mesh,
                    compiler_options: dict | None = None) -> Callable:
    """Jitted `(state, batch) -> (state, metrics)` with `accum` microbatches per step;
    `compiler_options` are XLA's (a plugin's, `Plan.compiler_options`)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro = NamedSharding(mesh, P(None, shd.BATCH_AXES, None))

    def grads_of(params, batch_BxL1):
        """(the loss's parts, gradients of the objective), averaged over the microbatches."""
        if accum == 1:
            (_, parts), grads = grad_fn(params, batch_BxL1)
            return parts, grads
        B, L1 = batch_BxL1.shape
        # Microbatch i takes rows i, i+accum, ...: every device keeps its own rows.
        micro_AxMxL1 = batch_BxL1.reshape(B // accum, accum, L1).swapaxes(0, 1)
        micro_AxMxL1 = jax.lax.with_sharding_constraint(micro_AxMxL1, micro)

        def body(carry, mb_MxL1):
            (_, parts), grads = grad_fn(params, mb_MxL1)
            return jax.tree.map(jnp.add, carry, (parts, grads)), None

        parts_shape = jax.eval_shape(lambda: grad_fn(params, micro_AxMxL1[0])[0][1])
        zeros = (jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), parts_shape),
                 jax.tree.map(jnp.zeros_like, params))
        (parts, grads), _ = jax.lax.scan(body, zeros, micro_AxMxL1)
        return jax.tree.map(lambda x: x / accum, (parts, grads))

    def train_step(state: State, batch_BxL1: jax.Array):
        parts, grads = grads_of(state["params"], batch_BxL1)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            **parts,  # loss (the cross-entropy alone), and z_loss where it is on
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state["step"]),
        }
        return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    batch = shd.batch_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )


def make_eval_step(loss_fn: Callable, param_shardings, mesh: Mesh,
                   compiler_options: dict | None = None) -> Callable:
    """Jitted `(params, batch) -> mean loss` (the cross-entropy, without any z-loss)."""
    return jax.jit(
        lambda params, batch_BxL1: loss_fn(params, batch_BxL1)[1]["loss"],
        in_shardings=(param_shardings, shd.batch_sharding(mesh)),
        out_shardings=shd.replicated(mesh),
        compiler_options=compiler_options,
    )


def new_state(params, optimizer: optax.GradientTransformation, seed: int) -> State:
    """A train state at step 0. `rng` is the run's base PRNG key (raw uint32
    data): anything stochastic at step s uses fold_in(rng, s), so resume is exact."""
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def init_state(init_params: Callable, optimizer: optax.GradientTransformation,
               state_shardings, seed: int) -> State:
    """Create the state directly in its shards (no host copy of the full model)."""
    return jax.jit(lambda: new_state(init_params(), optimizer, seed), out_shardings=state_shardings)()


def state_from_params(params, optimizer: optax.GradientTransformation, state_shardings, seed: int) -> State:
    """A step-0 state around existing (sharded) params: a warm start with a fresh optimizer."""
    return jax.jit(lambda p: new_state(p, optimizer, seed), out_shardings=state_shardings)(params)


def state_shardings(abstract_params, param_shardings, optimizer: optax.GradientTransformation,
                    mesh: Mesh):
    """Shardings for the whole state: optimizer moments follow their params."""
    rep = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)

    def like_param(state_leaf, param_leaf, sharding):
        # Factored moments (Adafactor) have other shapes than their param: replicate.
        return sharding if state_leaf.shape == param_leaf.shape else rep

    opt = optax.tree_map_params(
        optimizer, like_param, abstract_opt, abstract_params, param_shardings,
        transform_non_params=lambda _: rep,
    )
    return {"params": param_shardings, "opt_state": opt, "step": rep, "rng": rep}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The train state as known before any array exists: structure, shardings, optimizer,
    and the run's choices resolved on its mesh: kernels, plugins, compiler options."""

    graphdef: nnx.GraphDef
    abstract_params: dict
    param_shardings: dict
    state_shardings: dict
    optimizer: optax.GradientTransformation
    schedule: Callable
    build_model: Callable[[], nnx.Module]
    seed: int
    kernels: dict[str, str]  # {"attention": name, "matmul": name}, auto resolved
    plugins: tuple[plugins.Plugin, ...] = ()
    compiler_options: dict | None = None
    z_loss: float = 0.0  # optim.z_loss: the train step's objective adds z_loss x log(Z)^2

    def fresh_state(self) -> State:
        """Newly initialised params and optimizer state, created in their shards."""
        return init_state(lambda: nnx.split(self.build_model())[1].to_pure_dict(),
                          self.optimizer, self.state_shardings, self.seed)

    def abstract_state(self):
        """ShapeDtypeStructs with the current shardings: the target of a restore."""
        shapes = jax.eval_shape(lambda: new_state(self.abstract_params, self.optimizer, self.seed))
        return shd.abstract_with_shardings(shapes, self.state_shardings)

    def train_step(self, mesh: Mesh, accum: int) -> Callable:
        """The jitted train step of this plan (not yet compiled)."""
        return make_train_step(make_loss_fn(self.graphdef, mesh, self.z_loss), self.optimizer, self.schedule,
                               accum, self.state_shardings, mesh, self.compiler_options)

    def eval_step(self, mesh: Mesh) -> Callable:
        """The jitted eval step of this plan: (params, batch) -> mean loss."""
        return make_eval_step(make_loss_fn(self.graphdef, mesh), self.param_shardings, mesh,
                              self.compiler_options)


def compiler_options(enabled: list[plugins.Plugin], mesh: Mesh) -> dict | None:
    """XLA options for the steps on `mesh`: the enabled plugins' for its platform, merged
    (None: XLA's defaults)."""
    platform = mesh.devices.flat[0].platform
    merged = {}
    for plugin in enabled:
        merged.update(plugin.compiler_options(platform) or {})
    return merged or None


def plan(cfg: Config, vocab: int, mesh: Mesh) -> Plan:
    """Model structure, optimizer, schedule, kernels and state shardings for `cfg` on `mesh`.
    ConfigError (naming the field) when a chosen kernel or plugin cannot run here."""
    enabled = plugins.load_all(cfg.plugins, cfg.plugin_options)
    model_cfg = kernels.resolved(cfg.model, mesh, plugins.sources(cfg.plugins))

    def build_model():
        return model.build(model_cfg, vocab, cfg.data.seq_len, cfg.train.seed, cfg.param)

    graphdef, abstract = nnx.split(nnx.eval_shape(build_model))
    param_shardings = shd.param_shardings(abstract, mesh, shd.rules_for(model_cfg, mesh))
    abstract_params = abstract.to_pure_dict()
    schedule = optim.make_schedule(cfg.schedule, cfg.optim.lr, cfg.train.steps)
    # Per-parameter lr scales: a tree of floats built from the (abstract) param tree.
    optimizer = optim.make_optimizer(cfg.optim, schedule, param.optim_scales(cfg, abstract_params))
    return Plan(graphdef, abstract_params, param_shardings,
                state_shardings(abstract_params, param_shardings, optimizer, mesh),
                optimizer, schedule, build_model, cfg.train.seed,
                {"attention": model_cfg.attention, "matmul": model_cfg.matmul},
                tuple(enabled), compiler_options(enabled, mesh), cfg.optim.z_loss)
