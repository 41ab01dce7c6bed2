"""The optimised train step computes what the plain one computes (docs/performance-log.md)."""

import jax.numpy as jnp
import numpy as np
import pytest

from research import model
from tests.conftest import train_steps

# RoPE on, attention far from uniform (init_std), and at 128 tokens the chunked
# kernel runs 2 query blocks (attention.CHUNK = 64).
OVERRIDES = ("model.pos=rope", "data.seq_len=128", "model.init_std=0.2", "mesh=single")
STEPS = 4


def _jnp_rope_tables(length, k, theta):
    """The tables as the step built them before: jnp ops traced into the step."""
    inv_freq = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _plain_losses(monkeypatch) -> np.ndarray:
    """The path before the performance work: XLA's attention and dots, jnp RoPE tables."""
    with monkeypatch.context() as m:
        m.setattr(model, "rope_tables", _jnp_rope_tables)
        return train_steps(*OVERRIDES, "model.attention=xla", "model.matmul=xla", steps=STEPS)[0]


# The core's kernels; the CPU plugin's are checked in test_ladder_cpu_plugin.py.
KERNELS = [("chunked", "xla"), ("xla", "xla")]


@pytest.mark.parametrize("attention, matmul", KERNELS)
def test_optimised_step_matches_the_plain_step(attention, matmul, monkeypatch):
    fast = train_steps(*OVERRIDES, f"model.attention={attention}", f"model.matmul={matmul}",
                       steps=STEPS)[0]
    plain = _plain_losses(monkeypatch)
    assert fast[-1] < fast[0]  # it trains
    # Within fp32 rounding of the reference path: the two differ only in the order of the
    # sums in attention's softmax and dots (u = 6e-8 per operation), and 4 steps of AdamW
    # from the same init amplify that little; 2e-6 relative is ~30 u on a loss of ~5.
    np.testing.assert_allclose(fast, plain, rtol=2e-6)


def test_rope_tables_are_host_constants_equal_to_the_formula():
    cos, sin = model.rope_tables(64, 16, 10000.0)
    assert isinstance(cos, np.ndarray) and cos.dtype == np.float32 and cos.shape == (64, 8)
    angles = np.arange(64)[:, None] * 10000.0 ** (-np.arange(0, 16, 2) / 16)[None, :]
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)
