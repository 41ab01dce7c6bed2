"""Causal self-attention in pure JAX: the core's kernels and the interpretation views.

Shapes: q and the output are (B, L, H, K), k and v (B, L, G, K); see model.py for
the letters. G = H is multi-head attention; G < H (dividing it) is grouped-query
attention (G = 1: multi-query), where query head h reads key/value head
h // (H / G), as `jax.nn.dot_product_attention` does. No kernel here repeats k
and v to H heads: each folds a group's H / G query heads into one matmul.
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


def xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, scale: float | None = None,
                  implementation: str = "xla"):
    # Grouped-query attention is native to it (G dividing H), on XLA and cuDNN alike.
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=True,
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


def chunked_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, chunk: int = CHUNK, scale: float | None = None):
    """Exact causal attention, computed block by block over the lower triangle.

    Query block i attends only to keys of blocks <= i: the upper triangle of the
    scores, which the causal mask would throw away, is never computed (about half
    the FLOPs and softmax work for long sequences). Under grouped-query attention the
    R = H / G query heads of a group are stacked along the block's query rows, so each
    group's keys are read once per block, by one matmul."""
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    R = H // G
    scale = _scale(K, scale)
    # Head-major once, up front: every block's dots then read contiguous (L, K)
    # rows per head. Slicing the (B, L, H, K) inputs per block instead makes XLA
    # transpose each key prefix again.
    q_BxGxRxLxK = q_BxLxHxK.transpose(0, 2, 1, 3).reshape(B, G, R, L, K)
    k_BxGxLxK, v_BxGxLxK = (x.transpose(0, 2, 1, 3) for x in (k_BxLxGxK, v_BxLxGxK))
    outs = []
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        C = stop - start
        q_BxGxQxK = q_BxGxRxLxK[:, :, :, start:stop].reshape(B, G, R * C, K)  # Q = R * C rows
        k_BxGxSxK, v_BxGxSxK = k_BxGxLxK[:, :, :stop], v_BxGxLxK[:, :, :stop]
        s_BxGxQxS = jnp.einsum("bgqk,bgsk->bgqs", q_BxGxQxK, k_BxGxSxK).astype(jnp.float32) * scale
        visible_CxS = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
        s_BxGxQxS = jnp.where(jnp.tile(visible_CxS, (R, 1)), s_BxGxQxS, -jnp.inf)
        p_BxGxQxS = jax.nn.softmax(s_BxGxQxS, axis=-1).astype(v_BxLxGxK.dtype)
        o_BxGxQxK = jnp.einsum("bgqs,bgsk->bgqk", p_BxGxQxS, v_BxGxSxK)
        outs.append(o_BxGxQxK.reshape(B, H, C, K))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def _causal_scores(q_BxLxHxK, k_BxLxGxK, scale: float | None):
    """scale * q.k as float32 (B, H, L, L), query x key, and the causal mask (L, L)."""
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(B, L, G, H // G, K)
    s_BxGxRxLxL = jnp.einsum("bqgrk,bsgk->bgrqs", q_BxLxGxRxK, k_BxLxGxK).astype(jnp.float32)
    return s_BxGxRxLxL.reshape(B, H, L, L) * _scale(K, scale), jnp.tril(jnp.ones((L, L), bool))


def attention_probs(q_BxLxHxK, k_BxLxGxK, scale: float | None = None):
    """Causal softmax(scale * q k^T) as float32 (B, H, L, L), query x key.

    Materialised on purpose: interpretation reads it; training never calls it.
    """
    s_BxHxLxL, visible_LxL = _causal_scores(q_BxLxHxK, k_BxLxGxK, scale)
    return jax.nn.softmax(jnp.where(visible_LxL, s_BxHxLxL, -jnp.inf), axis=-1)


def mean_abs_logits(q_BxLxHxK, k_BxLxGxK, scale: float | None = None) -> jax.Array:
    """Mean |scale * q.k| over the causally visible (query, key) pairs: a diagnostic
    for the coordinate check (materialises the (B, H, L, L) scores; small L only)."""
    s_BxHxLxL, visible_LxL = _causal_scores(q_BxLxHxK, k_BxLxGxK, scale)
    B, H = s_BxHxLxL.shape[:2]
    return jnp.abs(jnp.where(visible_LxL, s_BxHxLxL, 0.0)).sum() / (visible_LxL.sum() * B * H)


def attend(p_BxHxLxL, v_BxLxGxK):
    """Attention probabilities applied to the values: (B, L, H, K), each query head on
    its group's value head (the interpretation path, beside `attention_probs`)."""
    B, H, L, _ = p_BxHxLxL.shape
    G, K = v_BxLxGxK.shape[2:]
    p_BxGxRxLxL = p_BxHxLxL.reshape(B, G, H // G, L, L).astype(v_BxLxGxK.dtype)
    return jnp.einsum("bgrqs,bsgk->bqgrk", p_BxGxRxLxL, v_BxLxGxK).reshape(B, L, H, K)
