"""Causal self-attention in pure JAX: the core's kernels and the interpretation views.

Shapes: q, k, v and the output are (B, L, H, K); see model.py for the letters.
Which kernel a run uses is `model.attention`, resolved by kernels.py, where
these functions are registered (xla, cudnn, chunked).

Every kernel takes `scale`, the factor on q.k: None means 1/sqrt(K); muP
(param.py) passes one proportional to 1/K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 64  # query block length for `chunked` (docs/performance-log.md: chosen on CPU at L = 128..256)


def _scale(k: int, scale: float | None) -> float:
    # One definition for every kernel, so they agree to the last bit on the scale.
    return k**-0.5 if scale is None else scale


def xla_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale: float | None = None,
                  implementation: str = "xla"):
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True,
                                        scale=_scale(q_BxLxHxK.shape[-1], scale),
                                        implementation=implementation)


CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


def cudnn_unsupported(platform: str, dtype, head_dim: int) -> str | None:
    """Why cuDNN's fused attention cannot run here, or None where it can."""
    if platform != "gpu":
        return f"needs an NVIDIA GPU, this is {platform}"
    if jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return f"needs model.dtype in {CUDNN_DTYPES}, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"needs a head dim that is a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    return None


def chunked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, chunk: int = CHUNK, scale: float | None = None):
    """Exact causal attention, computed block by block over the lower triangle.

    Query block i attends only to keys of blocks <= i: the upper triangle of the
    scores, which the causal mask would throw away, is never computed (about half
    the FLOPs and softmax work for long sequences)."""
    B, L, H, K = q_BxLxHxK.shape
    scale = _scale(K, scale)
    # Head-major once, up front: every block's dots then read contiguous (L, K)
    # rows per head. Slicing the (B, L, H, K) inputs per block instead makes XLA
    # transpose each key prefix again.
    q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = (x.transpose(0, 2, 1, 3) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
    outs = []
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        q_BxHxCxK = q_BxHxLxK[:, :, start:stop]
        k_BxHxSxK, v_BxHxSxK = k_BxHxLxK[:, :, :stop], v_BxHxLxK[:, :, :stop]
        s_BxHxCxS = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxCxK, k_BxHxSxK).astype(jnp.float32) * scale
        visible_CxS = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
        s_BxHxCxS = jnp.where(visible_CxS, s_BxHxCxS, -jnp.inf)
        p_BxHxCxS = jax.nn.softmax(s_BxHxCxS, axis=-1).astype(v_BxLxHxK.dtype)
        outs.append(jnp.einsum("bhqs,bhsk->bhqk", p_BxHxCxS, v_BxHxSxK))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def _causal_scores(q_BxLxHxK, k_BxLxHxK, scale: float | None):
    """scale * q.k as float32 (B, H, L, L), query x key, and the causal mask (L, L)."""
    L, K = q_BxLxHxK.shape[1], q_BxLxHxK.shape[-1]
    s_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK).astype(jnp.float32) * _scale(K, scale)
    return s_BxHxLxL, jnp.tril(jnp.ones((L, L), bool))


def attention_probs(q_BxLxHxK, k_BxLxHxK, scale: float | None = None):
    """Causal softmax(scale * q k^T) as float32 (B, H, L, L), query x key.

    Materialised on purpose: interpretation reads it; training never calls it.
    """
    s_BxHxLxL, visible_LxL = _causal_scores(q_BxLxHxK, k_BxLxHxK, scale)
    return jax.nn.softmax(jnp.where(visible_LxL, s_BxHxLxL, -jnp.inf), axis=-1)


def mean_abs_logits(q_BxLxHxK, k_BxLxHxK, scale: float | None = None) -> jax.Array:
    """Mean |scale * q.k| over the causally visible (query, key) pairs: a diagnostic
    for the coordinate check (materialises the (B, H, L, L) scores; small L only)."""
    s_BxHxLxL, visible_LxL = _causal_scores(q_BxLxHxK, k_BxLxHxK, scale)
    B, H = s_BxHxLxL.shape[:2]
    return jnp.abs(jnp.where(visible_LxL, s_BxHxLxL, 0.0)).sum() / (visible_LxL.sum() * B * H)
