"""Every attention kernel computes the same causal attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.attention import (causal_attention, chunked_attention, cudnn_unsupported, resolve,
                                xla_attention)


@pytest.mark.parametrize("length, chunk", [(32, 8), (40, 16), (16, 64)])  # ragged and single block
def test_chunked_matches_xla_values_and_gradients(length, chunk):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, length, 4, 8))

    def loss(fn, q, k, v):
        return (fn(q, k, v) ** 2).sum()

    np.testing.assert_allclose(chunked_attention(q, k, v, chunk), xla_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)
    g_chunked = jax.jit(jax.grad(lambda *a: loss(lambda *b: chunked_attention(*b, chunk), *a),
                                 (0, 1, 2)))(q, k, v)
    g_xla = jax.jit(jax.grad(lambda *a: loss(xla_attention, *a), (0, 1, 2)))(q, k, v)
    for a, b in zip(g_chunked, g_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_is_causal():
    q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 24, 2, 4))
    out = chunked_attention(q, k, v, 8)
    v2 = v.at[:, 20:].set(0.0)
    k2 = k.at[:, 20:].add(5.0)
    np.testing.assert_allclose(chunked_attention(q, k2, v2, 8)[:, :20], out[:, :20], rtol=1e-6)


def test_auto_dispatch_runs():
    q = jnp.ones((1, 8, 2, 4))
    assert causal_attention("auto", q, q, q).shape == (1, 8, 2, 4)


def test_cudnn_is_chosen_only_where_it_runs():
    assert cudnn_unsupported("gpu", jnp.bfloat16, 64) is None
    assert cudnn_unsupported("gpu", jnp.float16, 128) is None
    assert cudnn_unsupported("cpu", jnp.bfloat16, 64) == "needs an NVIDIA GPU, this is cpu"
    assert "model.dtype" in cudnn_unsupported("gpu", jnp.float32, 64)
    assert "head dim" in cudnn_unsupported("gpu", jnp.bfloat16, 60)
    assert "head dim" in cudnn_unsupported("gpu", jnp.bfloat16, 256)
    # On this CPU, auto never resolves to cudnn; explicit choices are kept.
    assert resolve("auto", jnp.bfloat16, 64) == "chunked"
    assert resolve("cudnn", jnp.bfloat16, 64) == "cudnn"
