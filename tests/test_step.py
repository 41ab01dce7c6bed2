"""The optimised train step computes what the plain one computes (docs/performance-log.md)."""

import jax.numpy as jnp
import numpy as np
import pytest

from research import model
from tests.bounds import U, assert_bound_catches, assert_close_to_bound
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
    # Not derived from an error bound, deliberately. The two differ in the order of attention's
    # sums and in the RoPE tables' last bits, but the fp32 worst case is useless here: on the
    # first loss test_model's chain bound (2 gamma_k |h| |W| per logit, k = 2128) gives 5.7e-3,
    # ~450x this tolerance and too loose to see a 1% error in RoPE's theta (8e-5) or bfloat16
    # weights (7e-5); the later losses follow AdamW's sign-like first step, where a gradient
    # entry within rounding of zero may move its weight by +-lr either way. Measured: the first
    # losses agree bitwise, the later ones to 1 ulp; 2e-6 relative (~30 u on a loss of ~6) is a
    # margin over that, on CPU arithmetic that is deterministic for a given machine and build.
    np.testing.assert_allclose(fast, plain, rtol=2e-6)


def test_rope_tables_are_host_constants_equal_to_the_formula():
    cos, sin = model.rope_tables(64, 16, 10000.0)
    assert isinstance(cos, np.ndarray) and cos.dtype == np.float32 and cos.shape == (64, 8)
    angles = np.arange(64)[:, None] * 10000.0 ** (-np.arange(0, 16, 2) / 16)[None, :]
    # The fp32 tables against the float64 formula: the exponent -i / 16 is exact, theta^e is
    # within 1 ulp (2 u; measured 1.7 u), the product with the position rounds (u), so the angle
    # is off by 3 u |angle|, which cos and sin pass on (|derivative| <= 1); NumPy's fp32 cos and
    # sin add 2 ulps of a value below 1, 2 u (measured: 1.2 u).
    bound = 3 * U * np.abs(angles) + 2 * U
    assert_close_to_bound(cos, np.cos(angles), bound)
    assert_close_to_bound(sin, np.sin(angles), bound)
    assert_bound_catches(cos[1:], np.cos(angles[:-1]), bound[:-1])  # one position late
