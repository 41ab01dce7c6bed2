"""Parameterizations: sp/mup/completep agree at base size; the rules scale as the papers say."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config, model, optim, param
from research import sharding as shd
from research import step as steplib
from research.attention import chunked_attention, xla_attention
from research.config import Config, ConfigError, ModelConfig, OptimConfig, ParamConfig, ScheduleConfig
from research.checkpoint import PARAM_LAYOUT
from research.checkpoint import check_compatible
from tests.conftest import TINY, compose, train_steps

BASE = ("param.base_width=32", "param.base_depth=1")  # TINY is d_model 32; one layer below
# Weight decay on, no warmup (the first step moves), untied readout, learned positions and
# LayerNorm (biases): every role and every link of the optimizer chain is exercised.
COMMON = ("model.n_layers=1", "optim=adamw", "optim.weight_decay=0.1", "schedule.warmup=0",
          "model.tie_embeddings=false", "model.pos=learned", "model.norm=layernorm")


@pytest.fixture(scope="module")
def sp_run():
    return train_steps("param=sp", "mesh=single", *COMMON)


@pytest.mark.parametrize("name", ["mup", "completep"])
def test_mup_and_completep_reproduce_sp_exactly_at_base_size(sp_run, name):
    sp_losses, sp_params = sp_run
    assert sp_losses[-1] < sp_losses[0]
    losses, params = train_steps(f"param={name}", *BASE, "mesh=single", *COMMON)
    np.testing.assert_array_equal(losses, sp_losses)
    jax.tree.map(np.testing.assert_array_equal, params, sp_params)


def test_scales_lower_on_a_sharded_mesh():
    # The per-parameter scales are a tree built from the abstract params: the sharded train
    # step (2x2x2 mesh) must accept them. Lowering checks every shape and sharding without
    # paying for a compile.
    cfg = config.parse(compose(*TINY, "param=completep", "param.base_width=16", *COMMON,
                               "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    mesh = shd.make_mesh(shd.mesh_shape(cfg.mesh, len(jax.devices())))
    plan = steplib.plan(cfg, 256, mesh)
    step = steplib.make_train_step(steplib.make_loss_fn(plan.graphdef, mesh), plan.optimizer,
                                   plan.schedule, 1, plan.state_shardings, mesh)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32,
                                 sharding=shd.batch_sharding(mesh))
    assert "wq" in step.lower(plan.abstract_state(), batch).as_text()


def _cfg(name: str, d_model=128, n_layers=8, alpha=1.0, optim_name="adamw", **model_kw) -> Config:
    return Config(model=ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=4, **model_kw),
                  optim=OptimConfig(name=optim_name),
                  param=ParamConfig(name=name, base_width=32, base_depth=2, alpha=alpha))


def _abstract_params(cfg: Config) -> dict:
    return nnx.split(nnx.eval_shape(lambda: model.build(cfg.model, 64, 16, 0, cfg.param)))[1].to_pure_dict()


def _scales(cfg: Config) -> dict:
    return dataclasses.asdict(param.optim_scales(cfg, _abstract_params(cfg)))


def test_rules_at_4x_width_and_depth():
    # m_N = 128/32 = 4, m_L = 8/2 = 4, head dim 32 vs 8 at base.
    mup = param.multipliers(_cfg("mup").model, _cfg("mup").param)
    assert mup.hidden_std == pytest.approx(0.02 / 2)  # variance 1/fan_in
    assert mup.out_std == pytest.approx(0.02 / np.sqrt(16) / 2)  # sp's depth rule kept
    assert mup.logits == 0.25 and mup.residual == 1.0
    assert mup.attn_scale == pytest.approx(8**-0.5 / 4)  # 1/K, equal to 1/sqrt(K) at base
    cp = param.multipliers(_cfg("completep").model, _cfg("completep").param)
    assert cp.residual == 0.25 and cp.out_std == pytest.approx(0.02 / 2 / 2)
    half = _cfg("completep", alpha=0.5)
    assert param.multipliers(half.model, half.param).residual == pytest.approx(0.5)  # depth-muP

    # One scale per stacked block weight: it applies to that weight in all 8 layers.
    s = _scales(_cfg("mup"))
    assert s["lr"]["blocks"]["wq"] == 0.25 and s["lr"]["blocks"]["w_out"] == 0.25
    assert s["lr"]["embed"] == 1.0 and s["lr"]["final_norm"]["scale"] == 1.0
    assert s["lr"]["blocks"]["attn_norm"]["scale"] == 1.0  # a stacked vector, (8, D): no width factor
    assert s["decay"]["blocks"]["wq"] == 1.0 and s["eps"] == 1.0  # lr * wd independent of width
    s = _scales(half)
    assert s["lr"]["blocks"]["wq"] == pytest.approx(0.25 * 4**-0.5)
    assert s["lr"]["blocks"]["mlp_norm"]["scale"] == pytest.approx(4**-0.5)
    assert s["decay"]["blocks"]["wq"] == pytest.approx(4**-0.5) and s["lr"]["embed"] == 1.0
    assert s["eps"] == pytest.approx(0.25 * 4**-0.5)
    assert _scales(_cfg("completep"))["lr"]["blocks"]["wv"] == 0.25  # alpha = 1: no depth lr factor
    s = _scales(_cfg("mup", optim_name="sgd", tie_embeddings=False))
    assert s["lr"]["blocks"]["wq"] == 1.0 and s["lr"]["embed"] == 4.0 and s["lr"]["unembed"] == 4.0
    assert param.optim_scales(_cfg("sp"), {"embed": jnp.zeros((2, 2))}) is None


def test_init_follows_the_rule():
    cfg = _cfg("mup", d_model=128, n_layers=1)  # 4x base width: std / 2
    build = lambda: nnx.split(model.build(cfg.model, 64, 16, 0, cfg.param))[1].to_pure_dict()  # noqa: E731
    stds = jax.jit(lambda: jax.tree.map(jnp.std, build()))()
    # The stacked block weights (one layer here: shape (1, ...)) follow the hidden rule.
    assert float(stds["blocks"]["w_in"]) == pytest.approx(0.02 / 2, rel=0.05)
    assert float(stds["blocks"]["wo"]) == pytest.approx(0.02 / np.sqrt(2) / 2, rel=0.05)
    assert float(stds["embed"]) == pytest.approx(0.02, rel=0.05)  # embeddings do not scale


def test_lr_and_decay_scales_reach_the_update():
    # One Adam step: every entry moves by lr * scale (|m / sqrt(v)| = 1 at step 1);
    # with a zero gradient only decay moves the weights, by lr * wd * decay scale.
    cfg = _cfg("completep", alpha=0.5, n_layers=8)
    # Block weights as the model stores them: stacked over the layers (here 2 distinct blocks).
    params = {"embed": jnp.ones((64, 128)),
              "blocks": {"wq": jnp.ones((2, 128, 128)), "attn_norm": {"scale": jnp.ones((2, 128))}}}
    o = OptimConfig(lr=1e-2, weight_decay=0.5, eps=1e-12, clip=0)
    schedule = optim.make_schedule(ScheduleConfig(name="constant", warmup=0), 1e-2, 10)
    opt = optim.make_optimizer(o, schedule, param.optim_scales(cfg, params))
    update = jax.jit(lambda g: opt.update(g, opt.init(params), params)[0])
    upd = update(jax.tree.map(lambda p: -jnp.ones_like(p), params))
    lr_wq = 1e-2 * 0.25 * 0.5  # lr m_N^-1 m_L^(alpha-1), m_N = m_L = 4
    wd_wq = 1e-2 * 0.5 * 0.5  # lr wd m_L^(alpha-1): no width factor
    np.testing.assert_allclose(upd["blocks"]["wq"], lr_wq - wd_wq, rtol=1e-4)  # every layer's slice
    assert float(upd["embed"][0, 0]) == pytest.approx(1e-2 - 1e-2 * 0.5, rel=1e-4)
    np.testing.assert_allclose(upd["blocks"]["attn_norm"]["scale"], 1e-2 * 0.5, rtol=1e-4)  # no decay
    zero = update(jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_allclose(zero["blocks"]["wq"], -wd_wq, rtol=1e-4)
    assert np.all(np.asarray(zero["blocks"]["attn_norm"]["scale"]) == 0)  # stacked vectors: no decay


def test_attention_scale_reaches_every_kernel():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 24, 2, 8))
    run = jax.jit(lambda q, k, v: (xla_attention(q, k, v, 0.05), chunked_attention(q, k, v, 8, 0.05),
                                   xla_attention(q, k, v), chunked_attention(q, k, v, 8, 8**-0.5)))
    xla, chunked, default, explicit = run(q, k, v)
    np.testing.assert_allclose(chunked, xla, rtol=1e-5, atol=1e-6)
    assert not np.allclose(xla, default)
    np.testing.assert_allclose(explicit, default, rtol=1e-5, atol=1e-6)  # None means 1/sqrt(K)


def test_param_config_errors():
    config.parse(compose(*TINY, "param=mup"))
    for override, field in [("param.name=mupp", "param.name"), ("param.alpha=0.2", "param.alpha"),
                            ("param.base_width=0", "param.base_width")]:
        with pytest.raises(ConfigError) as err:
            config.parse(compose(*TINY, override))
        assert err.value.field == field
    with pytest.raises(ConfigError, match="param.base_width"):
        config.parse(compose(*TINY, "param=mup", "param.base_width=30"))  # not divisible by 4 heads


def test_resume_refuses_another_parameterization():
    cfg = config.parse(compose(*TINY, "param=mup"))
    old = dataclasses.asdict(config.parse(compose(*TINY)))
    del old["param"]  # a checkpoint written before the param group existed reads as sp
    meta = {"config": old, "vocab_size": 64, "param_layout": PARAM_LAYOUT}
    check_compatible(meta, config.parse(compose(*TINY)), 64, "ckpt", "checkpoint.resume")
    with pytest.raises(ConfigError, match="param.name"):
        check_compatible(meta, cfg, 64, "ckpt", "checkpoint.resume")
    check_compatible(meta, cfg, 64, "ckpt", "checkpoint.init_from")  # same shapes: a warm start is fine


def test_describe_lists_every_weight_once():
    cfg = _cfg("mup")
    text = param.describe(cfg, _abstract_params(cfg))
    # One row per stacked block weight, its shape with the leading layers dim.
    assert text.count("blocks.wq ") == 1
    row = next(line for line in text.splitlines() if "blocks.wq " in line)
    assert "(8, 128, 128)" in row and "hidden" in row and "0.25" in row
    row = next(line for line in text.splitlines() if "blocks.attn_norm.scale " in line)
    assert "(8, 128)" in row and "block_vector" in row and row.rstrip().endswith("-")  # no decay
    assert "output logits x 0.25" in text
    assert param.describe(_cfg("sp"), _abstract_params(cfg)).startswith("param sp")
