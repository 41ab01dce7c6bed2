"""Every core attention kernel computes the same causal attention; the registry resolves `auto`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config, kernels
from research import sharding as shd
from research.attention import chunked_attention, cudnn_unsupported, xla_attention

U = 2.0**-24  # fp32 unit roundoff


def _bound(k: int, magnitude) -> np.ndarray:
    """Elementwise bound on two fp32 evaluations of the same sums differing: each is within
    gamma_k * magnitude of the exact value (gamma_k = k u / (1 - k u), Higham 2002, 3.1),
    where `magnitude` is the sum of |terms| and k the number of rounded operations."""
    gamma = k * U / (1 - k * U)
    return 2 * gamma * np.asarray(magnitude, np.float64)


@pytest.mark.parametrize("length, chunk", [(32, 8), (40, 16), (16, 64)])  # ragged and single block
def test_chunked_matches_xla_values_and_gradients(length, chunk):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, length, 4, 8))
    K = q.shape[-1]

    def loss(fn, q, k, v):
        return (fn(q, k, v) ** 2).sum()

    out = np.asarray(jax.jit(chunked_attention, static_argnums=3)(q, k, v, chunk), np.float64)
    ref = np.asarray(jax.jit(xla_attention)(q, k, v), np.float64)
    # Output o = sum_s p_s v_s with sum p = 1: |o| <= max |v|. The scores q.k (K terms),
    # the softmax over L keys and the weighted sum over L values each add rounding;
    # k = K + 3 L operations bound the chain, on the scale of max |v| per row.
    scale = np.abs(np.asarray(v)).max()
    assert np.all(np.abs(out - ref) <= _bound(K + 3 * length, scale))
    g_chunked = jax.jit(jax.grad(lambda *a: loss(lambda *b: chunked_attention(*b, chunk), *a),
                                 (0, 1, 2)))(q, k, v)
    g_xla = jax.jit(jax.grad(lambda *a: loss(xla_attention, *a), (0, 1, 2)))(q, k, v)
    for a, b in zip(g_chunked, g_xla):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # The backward sums over the batch (B = 3) and the L positions, products of terms
        # bounded by the largest gradient entry: 2 (K + 3 L) operations deep.
        assert np.all(np.abs(a - b) <= _bound(2 * (K + 3 * length), np.abs(b).max() * length))


def test_the_bound_catches_a_wrong_kernel():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 32, 4, 8))
    ref = np.asarray(xla_attention(q, k, v), np.float64)
    off_by_one_key = np.asarray(xla_attention(q, jnp.roll(k, 1, axis=1), v), np.float64)
    bound = _bound(8 + 3 * 32, np.abs(np.asarray(v)).max())
    assert np.any(np.abs(off_by_one_key - ref) > bound)


def test_chunked_is_causal():
    q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 24, 2, 4))
    chunked = jax.jit(chunked_attention, static_argnums=3)
    out = chunked(q, k, v, 8)
    v2 = v.at[:, 20:].set(0.0)
    k2 = k.at[:, 20:].add(5.0)
    # Later keys never enter rows < 20: the same operations on the same values, bit for bit.
    np.testing.assert_array_equal(chunked(q, k2, v2, 8)[:, :20], out[:, :20])


def _mesh(n: int = 1):
    return shd.make_mesh((n, 1, 1), jax.devices()[:n])


def test_auto_resolves_from_the_mesh_and_explicit_choices_are_checked():
    bf16 = config.ModelConfig(d_model=256, n_heads=4, dtype="bfloat16")
    assert kernels.resolve(bf16, _mesh()) == {"attention": "chunked", "matmul": "xla"}  # CPU
    assert kernels.resolve(config.ModelConfig(attention="xla"), _mesh(8))["attention"] == "xla"
    with pytest.raises(config.ConfigError, match="model.attention: cudnn: needs an NVIDIA GPU"):
        kernels.resolve(config.ModelConfig(attention="cudnn", dtype="bfloat16"), _mesh())
    with pytest.raises(config.ConfigError, match="model.attention: unknown value 'mkl'"):
        kernels.resolve(config.ModelConfig(attention="mkl"), _mesh())  # a plugin's, not enabled


def test_cudnn_is_ranked_first_where_it_runs():
    gpu = kernels.Context("gpu", 1, "bfloat16", 64)
    names = [e.name for e in kernels.ATTENTION.entries(("core",))
             if e.auto(gpu) and e.unavailable(gpu) is None]
    assert max(names, key=lambda n: kernels.ATTENTION.get(n).rank) == "cudnn"
    assert kernels.ATTENTION.get("cudnn").unavailable(kernels.Context("gpu", 1, "float32", 64))


def test_cudnn_unsupported_reasons():
    assert cudnn_unsupported("gpu", jnp.bfloat16, 64) is None
    assert cudnn_unsupported("gpu", jnp.float16, 128) is None
    assert cudnn_unsupported("cpu", jnp.bfloat16, 64) == "needs an NVIDIA GPU, this is cpu"
    assert "model.dtype" in cudnn_unsupported("gpu", jnp.float32, 64)
    assert "head dim" in cudnn_unsupported("gpu", jnp.bfloat16, 60)
    assert "head dim" in cudnn_unsupported("gpu", jnp.bfloat16, 256)
