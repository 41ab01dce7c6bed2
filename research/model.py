"""Flax NNX decoder-only Transformer (pre-norm, causal self-attention, GELU MLP).

Tensor names carry their shapes. Single-letter dimensions:
  B  batch (sequences)          L  sequence length
  N  B * L, flattened tokens    D  d_model (residual width)
  H  attention heads            K  head dim (D / H)
  F  MLP hidden width           V  vocabulary size

Matmuls are written on 2-D operands (N, D) @ (D, F): XLA's CPU dots are much
faster that way than on 3-D (B, L, D) operands, and GPUs do not mind.

Every weight carries `axes`, its logical dimension names ('vocab', 'embed',
'heads', 'mlp'); sharding.py maps those names onto mesh axes, so data, FSDP
and tensor parallelism are configuration, not model code. Params are stored
in float32 and cast to `model.dtype` where they are used.

Init stds and forward multipliers (residual branches, attention and output
logits) come from the parameterization, `param.Multipliers` (sp, muP,
CompleteP; see param.py). Passing `taps={}` to the model fills it with the
mean |activation| of every layer's output, for the coordinate check.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from research import param
from research.attention import causal_attention, mean_abs_logits
from research.config import ModelConfig, ParamConfig, d_ff, d_head

# constrain(x, kind) pins a sharding: kind "act" for the (B, L, D) residual
# stream, "whole" for a weight that must be gathered before use.
Constrain = Callable[[jax.Array, str], jax.Array]
Taps = dict[str, jax.Array]


def _tap(taps: Taps | None, name: str, x: jax.Array) -> None:
    if taps is not None:
        taps[name] = jnp.abs(x.astype(jnp.float32)).mean()


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, std: float) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, axes=axes)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last dim; statistics in float32."""

    def __init__(self, dim: int, kind: str):
        self.kind = kind
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(None,))
        if kind == "layernorm":
            self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=(None,))

    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        x = x_NxD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)
        x = x * self.scale[...]
        if self.kind == "layernorm":
            x = x + self.bias[...]
        return x.astype(x_NxD.dtype)


def rope_tables(length: int, k: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (L, K/2) for rotary position embeddings."""
    inv_freq_K2 = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
    angles_LxK2 = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_K2[None, :]
    return jnp.cos(angles_LxK2), jnp.sin(angles_LxK2)


def apply_rope(x_BxLxHxK: jax.Array, cos_LxK2: jax.Array, sin_LxK2: jax.Array) -> jax.Array:
    """Rotate (first half, second half) pairs of each head by the position angle."""
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_LxK2[None, :, None, :], sin_LxK2[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Block(nnx.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + MLP(Norm(x))."""

    def __init__(self, cfg: ModelConfig, mult: param.Multipliers, rngs: nnx.Rngs):
        D, H, K, F = cfg.d_model, cfg.n_heads, d_head(cfg), d_ff(cfg)
        std, out_std = mult.hidden_std, mult.out_std
        self.n_heads, self.dtype, self.attention = H, jnp.dtype(cfg.dtype), cfg.attention
        self.residual, self.attn_scale = mult.residual, mult.attn_scale
        self.attn_norm = Norm(D, cfg.norm)
        self.wq = _param(rngs, (D, H * K), ("embed", "heads"), std)
        self.wk = _param(rngs, (D, H * K), ("embed", "heads"), std)
        self.wv = _param(rngs, (D, H * K), ("embed", "heads"), std)
        self.wo = _param(rngs, (H * K, D), ("heads", "embed"), out_std)
        self.mlp_norm = Norm(D, cfg.norm)
        self.w_in = _param(rngs, (D, F), ("embed", "mlp"), std)
        self.w_out = _param(rngs, (F, D), ("mlp", "embed"), out_std)

    def _w(self, p: nnx.Param) -> jax.Array:
        return p[...].astype(self.dtype)

    def __call__(self, x_BxLxD: jax.Array, rope: tuple | None, taps: Taps | None = None,
                 name: str = "block") -> jax.Array:
        B, L, D = x_BxLxD.shape
        H = self.n_heads
        h_NxD = self.attn_norm(x_BxLxD.reshape(B * L, D))
        q_BxLxHxK = (h_NxD @ self._w(self.wq)).reshape(B, L, H, -1)
        k_BxLxHxK = (h_NxD @ self._w(self.wk)).reshape(B, L, H, -1)
        v_BxLxHxK = (h_NxD @ self._w(self.wv)).reshape(B, L, H, -1)
        if rope is not None:
            q_BxLxHxK = apply_rope(q_BxLxHxK, *rope)
            k_BxLxHxK = apply_rope(k_BxLxHxK, *rope)
        if taps is not None:
            taps[f"{name}.attn_logits"] = mean_abs_logits(q_BxLxHxK, k_BxLxHxK, self.attn_scale)
        o_BxLxHxK = causal_attention(self.attention, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, self.attn_scale)
        # CompleteP scales each branch by m_L^-alpha (1 under sp and mup).
        attn_NxD = self.residual * (o_BxLxHxK.reshape(B * L, -1) @ self._w(self.wo))
        x_NxD = x_BxLxD.reshape(B * L, D) + attn_NxD
        h_NxF = jax.nn.gelu(self.mlp_norm(x_NxD) @ self._w(self.w_in))
        mlp_NxD = self.residual * (h_NxF @ self._w(self.w_out))
        x_NxD = x_NxD + mlp_NxD
        _tap(taps, f"{name}.attn", attn_NxD)
        _tap(taps, f"{name}.mlp", mlp_NxD)
        _tap(taps, name, x_NxD)
        return x_NxD.reshape(B, L, D)


class Transformer(nnx.Module):
    """Token ids (B, L) -> next-token logits (B, L, V) in float32."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_len: int, rngs: nnx.Rngs,
                 mult: param.Multipliers | None = None):
        D, V = cfg.d_model, vocab_size
        mult = mult or param.multipliers(cfg, ParamConfig())
        self.cfg, self.dtype, self.logit_mult = cfg, jnp.dtype(cfg.dtype), mult.logits
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), cfg.init_std)
        if cfg.pos == "learned":
            self.pos_embed = _param(rngs, (max_len, D), (None, "embed"), cfg.init_std / 2)
        n_distinct = cfg.share_layers or cfg.n_layers
        self.blocks = nnx.List([Block(cfg, mult, rngs) for _ in range(n_distinct)])
        self.final_norm = Norm(D, cfg.norm)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (D, V), ("embed", "vocab"), cfg.init_std)

    def __call__(self, tokens_BxL: jax.Array, constrain: Constrain | None = None,
                 taps: Taps | None = None) -> jax.Array:
        """`constrain` (optional, see `Constrain`) pins shardings under a mesh; `taps`
        (optional dict) receives 'embed', 'block{i}[.attn|.mlp|.attn_logits]', 'logits':
        mean |output| of each layer as float32 scalars."""
        constrain = constrain or (lambda x, kind: x)
        B, L = tokens_BxL.shape
        cfg = self.cfg
        # A gather cannot read a sharded table efficiently: gather the table first.
        table_VxD = constrain(self.embed[...], "whole")
        x_BxLxD = constrain(jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype), "act")
        rope = None
        if cfg.pos == "learned":
            x_BxLxD = x_BxLxD + self.pos_embed[:L].astype(self.dtype)[None]
        else:
            rope = rope_tables(L, d_head(cfg), cfg.rope_theta)

        _tap(taps, "embed", x_BxLxD)

        def run_block(block: Block, x: jax.Array) -> jax.Array:
            return block(x, rope)

        if cfg.remat == "block" and taps is None:  # taps would leak out of the remat trace
            run_block = nnx.remat(run_block)
        for layer in range(cfg.n_layers):
            # ALBERT-style sharing: layer i reuses block i mod share_layers.
            block = self.blocks[layer % len(self.blocks)]
            x_BxLxD = run_block(block, x_BxLxD) if taps is None else block(x_BxLxD, rope, taps, f"block{layer}")
            x_BxLxD = constrain(x_BxLxD, "act")
        # muP's readout multiplier (1 / m_N; 1 under sp), on the (N, D) side: cheaper than on (N, V).
        h_NxD = self.final_norm(x_BxLxD.reshape(B * L, -1)) * self.logit_mult
        if cfg.tie_embeddings:
            logits_NxV = h_NxD @ self.embed[...].astype(self.dtype).T
        else:
            logits_NxV = h_NxD @ self.unembed[...].astype(self.dtype)
        _tap(taps, "logits", logits_NxV)
        return logits_NxV.astype(jnp.float32).reshape(B, L, -1)


def build(cfg: ModelConfig, vocab_size: int, max_len: int, seed: int,
          p: ParamConfig | None = None) -> Transformer:
    """A concrete model with freshly initialised params (single device), parameterized by `p` (default sp)."""
    mult = param.multipliers(cfg, p or ParamConfig())
    return Transformer(cfg, vocab_size, max_len, nnx.Rngs(params=seed), mult)
