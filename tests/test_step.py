"""The optimised CPU train step computes what the plain one computes (experiments/perf.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config, data, model
from research import sharding as shd
from research import step as steplib
from tests.conftest import TINY, compose

# RoPE on, and attention far from uniform (init_std); at 128 tokens the chunked kernel runs 2 query blocks (attention.CHUNK = 64).
OVERRIDES = (*TINY, "model.pos=rope", "data.seq_len=128", "model.init_std=0.2")


def _losses(*overrides: str, plain: bool, monkeypatch, steps: int = 4) -> np.ndarray:
    """Losses of `steps` train steps; `plain` drops the CPU compiler options and builds the
    RoPE tables with jnp inside the step (the path before the performance work)."""
    if plain:
        monkeypatch.setattr(steplib, "compiler_options", lambda mesh: None)

        def jnp_rope_tables(length, k, theta):
            inv_freq = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
            angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
            return jnp.cos(angles), jnp.sin(angles)

        monkeypatch.setattr(model, "rope_tables", jnp_rope_tables)
    cfg = config.parse(compose(*OVERRIDES, *overrides))
    corpus = data.load(cfg.data)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    plan = steplib.plan(cfg, corpus.vocab_size, mesh)
    train_step = steplib.make_train_step(steplib.make_loss_fn(plan.graphdef, mesh), plan.optimizer,
                                         plan.schedule, 1, plan.state_shardings, mesh)
    state, losses = plan.fresh_state(), []
    for s in range(steps):
        batch = data.device_batch(corpus, data.TRAIN, 0, s, cfg.train.batch_size, cfg.data.seq_len,
                                  shd.batch_sharding(mesh))
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    monkeypatch.undo()
    return np.array(losses)


def test_cpu_steps_use_the_compiler_options():
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    assert steplib.compiler_options(mesh) == steplib.CPU_COMPILER_OPTIONS


@pytest.mark.parametrize("attention", ["chunked", "xla"])
def test_optimised_step_matches_the_plain_step(attention, monkeypatch):
    fast = _losses(f"model.attention={attention}", plain=False, monkeypatch=monkeypatch)
    plain = _losses("model.attention=xla", plain=True, monkeypatch=monkeypatch)
    assert fast[-1] < fast[0]  # it trains
    # Within fp32 rounding of the reference path (xla attention, default XLA options).
    np.testing.assert_allclose(fast, plain, rtol=2e-6)


def test_rope_tables_are_host_constants_equal_to_the_formula():
    cos, sin = model.rope_tables(64, 16, 10000.0)
    assert isinstance(cos, np.ndarray) and cos.dtype == np.float32 and cos.shape == (64, 8)
    angles = np.arange(64)[:, None] * 10000.0 ** (-np.arange(0, 16, 2) / 16)[None, :]
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)
