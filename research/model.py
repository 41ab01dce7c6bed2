"""Flax NNX decoder-only Transformer: pre-norm blocks of causal self-attention (multi-head
or grouped-query, optionally QK-normed) and a GELU or SwiGLU MLP.

Tensor names carry their shapes. Single-letter dimensions:
  B  batch (sequences)          L  sequence length
  N  B * L, flattened tokens    D  d_model (residual width)
  H  attention heads            K  head dim (D / H)
  G  key/value heads (G | H)    F  MLP hidden width
  V  vocabulary size

Matmuls are written on 2-D operands (N, D) @ (D, F): XLA's CPU dots are much
faster that way than on 3-D (B, L, D) operands, and GPUs do not mind. Who runs
them, and attention, is a kernel name (`model.matmul`, `model.attention`)
looked up in kernels.py's registries; `auto` is resolved before the model is
built (`build`), so the model holds concrete names.

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

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from research import kernels, param
from research.attention import attend, attention_probs, mean_abs_logits
from research.config import ModelConfig, ParamConfig, d_ff, d_head, kv_heads

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


NORM_EPS = 1e-6
_GELU_C = float(np.sqrt(2.0 / np.pi))


@jax.custom_vjp
def gelu(h: jax.Array) -> jax.Array:
    """`jax.nn.gelu` (the tanh approximation), whose backward recomputes the tanh from the
    input instead of saving it. Autodiff saved tanh(.) for the backward and the forward
    became two passes over the (N, F) hidden activations; here the forward is one and the
    backward one: 5 reads and writes of (N, F) instead of 8 (docs/performance-log.md,
    item 32). The forward is bitwise `jax.nn.gelu`'s."""
    return jax.nn.gelu(h, approximate=True)


def _gelu_fwd(h):
    return jax.nn.gelu(h, approximate=True), h


def _gelu_bwd(h, da):
    # d/dh of 0.5 h (1 + tanh(u)), u = c (h + 0.044715 h^3); computed in float32.
    x = h.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
    dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return ((da.astype(jnp.float32) * dgelu).astype(h.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last dim; statistics in float32. A matmul kernel
    that brings its own norm (kernels.MatmulKernel.norm) runs it instead."""

    def __init__(self, dim: int, kind: str, matmul: str = "xla", stack: int | None = None):
        """`stack`: the params get a leading layers dim of this size (inside `Blocks`)."""
        self.kind, self.matmul = kind, matmul
        shape, axes = ((stack, dim), ("layers", None)) if stack else ((dim,), (None,))
        self.scale = nnx.Param(jnp.ones(shape, jnp.float32), axes=axes)
        if kind == "layernorm":
            self.bias = nnx.Param(jnp.zeros(shape, jnp.float32), axes=axes)

    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        bias_D = self.bias[...] if self.kind == "layernorm" else None
        fused = kernels.matmul(self.matmul).norm
        if fused is not None:
            return fused(x_NxD, self.scale[...], bias_D, NORM_EPS)
        x = x_NxD.astype(jnp.float32)
        if bias_D is not None:
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + NORM_EPS)
        x = x * self.scale[...]
        if bias_D is not None:
            x = x + bias_D
        return x.astype(x_NxD.dtype)


def rope_tables(length: int, k: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (L, K/2) float32 for rotary position embeddings.

    Computed with NumPy on purpose, so they enter a jitted step as constants:
    built from jnp ops inside the step, XLA fuses the cos/sin into every
    consumer and recomputes them per element of q and k (docs/performance-log.md).
    """
    inv_freq_K2 = theta ** (-np.arange(0, k, 2, dtype=np.float32) / k)
    angles_LxK2 = np.arange(length, dtype=np.float32)[:, None] * inv_freq_K2[None, :]
    return np.cos(angles_LxK2), np.sin(angles_LxK2)


def apply_rope(x_BxLxHxK: jax.Array, cos_LxK2: jax.Array, sin_LxK2: jax.Array) -> jax.Array:
    """Rotate (first half, second half) pairs of each head by the position angle."""
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_LxK2[None, :, None, :], sin_LxK2[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Block(nnx.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + MLP(Norm(x)).

    Built with `stack=S`, every weight has a leading layers dim of size S (S blocks drawn
    at once); `Blocks` scans over that dim and calls the block on one layer's slice.
    """

    def __init__(self, cfg: ModelConfig, mult: param.Multipliers, rngs: nnx.Rngs, stack: int):
        D, H, G, K, F, S = cfg.d_model, cfg.n_heads, kv_heads(cfg), d_head(cfg), d_ff(cfg), stack
        std, out_std = mult.hidden_std, mult.out_std
        self.n_heads, self.dtype, self.attention = H, jnp.dtype(cfg.dtype), cfg.attention
        self.matmul, self.mlp, self.qk_norm = cfg.matmul, cfg.mlp, cfg.qk_norm
        self.residual, self.attn_scale = mult.residual, mult.attn_scale
        self.attn_norm = Norm(D, cfg.norm, cfg.matmul, stack=S)
        self.wq = _param(rngs, (S, D, H * K), ("layers", "embed", "heads"), std)
        self.wk = _param(rngs, (S, D, G * K), ("layers", "embed", "kv_heads"), std)
        self.wv = _param(rngs, (S, D, G * K), ("layers", "embed", "kv_heads"), std)
        self.wo = _param(rngs, (S, H * K, D), ("layers", "heads", "embed"), out_std)
        self.mlp_norm = Norm(D, cfg.norm, cfg.matmul, stack=S)
        self.w_in = _param(rngs, (S, D, F), ("layers", "embed", "mlp"), std)  # swiglu: the up projection
        self.w_out = _param(rngs, (S, F, D), ("layers", "mlp", "embed"), out_std)
        # Drawn after the weights every block has, so those keep their values when these are off.
        if cfg.mlp == "swiglu":
            self.w_gate = _param(rngs, (S, D, F), ("layers", "embed", "mlp"), std)
        if cfg.qk_norm:  # per-head RMSNorm gains, in XLA whatever the matmul kernel
            self.q_norm = Norm(K, "rmsnorm", "xla", stack=S)
            self.k_norm = Norm(K, "rmsnorm", "xla", stack=S)

    def _mm(self, x_NxD: jax.Array, p: nnx.Param) -> jax.Array:
        return checkpoint_name(kernels.matmul(self.matmul)(x_NxD, p[...].astype(self.dtype)), "matmul")

    def _mms(self, x_NxD: jax.Array, *ps: nnx.Param) -> tuple[jax.Array, ...]:
        """x @ p for each p, in one call of the matmul kernel's group."""
        ws = tuple(p[...].astype(self.dtype) for p in ps)
        return tuple(checkpoint_name(y, "matmul") for y in kernels.matmul(self.matmul).group(x_NxD, ws))

    def _qkv(self, x_BxLxD: jax.Array, rope: tuple | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q (B, L, H, K); k and v (B, L, G, K)."""
        B, L, D = x_BxLxD.shape
        h_NxD = self.attn_norm(x_BxLxD.reshape(B * L, D))
        q_NxHK, k_NxGK, v_NxGK = self._mms(h_NxD, self.wq, self.wk, self.wv)
        K = D // self.n_heads
        if self.qk_norm:
            q_NxHK = self.q_norm(q_NxHK.reshape(-1, K)).reshape(q_NxHK.shape)
            k_NxGK = self.k_norm(k_NxGK.reshape(-1, K)).reshape(k_NxGK.shape)
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = (y.reshape(B, L, -1, K) for y in (q_NxHK, k_NxGK, v_NxGK))
        if rope is not None:
            q_BxLxHxK = apply_rope(q_BxLxHxK, *rope)
            k_BxLxGxK = apply_rope(k_BxLxGxK, *rope)
        return q_BxLxHxK, k_BxLxGxK, v_BxLxGxK

    def _rest(self, x_BxLxD: jax.Array, o_BxLxHxK: jax.Array, taps: Taps | None = None,
              name: str = "block") -> jax.Array:
        """Everything after attention: output projection, residual, MLP."""
        B, L, D = x_BxLxD.shape
        # CompleteP scales each branch by m_L^-alpha (1 under sp and mup).
        attn_NxD = self.residual * self._mm(o_BxLxHxK.reshape(B * L, -1), self.wo)
        x_NxD = x_BxLxD.reshape(B * L, D) + attn_NxD
        h_NxD = self.mlp_norm(x_NxD)
        if self.mlp == "swiglu":
            gate_NxF, up_NxF = self._mms(h_NxD, self.w_gate, self.w_in)
            h_NxF = jax.nn.silu(gate_NxF) * up_NxF
        else:
            h_NxF = gelu(self._mm(h_NxD, self.w_in))
        mlp_NxD = self.residual * self._mm(h_NxF, self.w_out)
        x_NxD = x_NxD + mlp_NxD
        _tap(taps, f"{name}.attn", attn_NxD)
        _tap(taps, f"{name}.mlp", mlp_NxD)
        _tap(taps, name, x_NxD)
        return x_NxD.reshape(B, L, D)

    def __call__(self, x_BxLxD: jax.Array, rope: tuple | None, taps: Taps | None = None,
                 name: str = "block") -> jax.Array:
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._qkv(x_BxLxD, rope)
        if taps is not None:
            taps[f"{name}.attn_logits"] = mean_abs_logits(q_BxLxHxK, k_BxLxGxK, self.attn_scale)
        o_BxLxHxK = kernels.attention(self.attention)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                                      scale=self.attn_scale)
        o_BxLxHxK = checkpoint_name(o_BxLxHxK, "attention")
        return self._rest(x_BxLxD, o_BxLxHxK, taps, name)

    def inspect(self, x_BxLxD: jax.Array, rope: tuple | None) -> tuple[jax.Array, jax.Array]:
        """`__call__` with the attention probabilities materialised: (x_BxLxD, p_BxHxLxL float32).

        For interpretation only: the (L, L) matrices cost memory the training kernels avoid.
        """
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._qkv(x_BxLxD, rope)
        p_BxHxLxL = attention_probs(q_BxLxHxK, k_BxLxGxK, self.attn_scale)
        return self._rest(x_BxLxD, attend(p_BxHxLxL, v_BxLxGxK)), p_BxHxLxL


class Inspection(NamedTuple):
    """What `Transformer.inspect` returns.

    logits_BxLxV: next-token logits (float32), equal to `Transformer.__call__`'s up to kernel rounding.
    resid: n_layers + 1 residual streams (B, L, D): [0] after the embeddings (and learned
      positions), [i] after block i.
    attn: n_layers attention probabilities (B, H, L, L) float32, query x key, rows sum to 1.
    """

    logits_BxLxV: jax.Array
    resid: list[jax.Array]
    attn: list[jax.Array]


class Transformer(nnx.Module):
    """Token ids (B, L) -> next-token logits (B, L, V) in float32."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_len: int, rngs: nnx.Rngs,
                 mult: param.Multipliers | None = None):
        """`cfg.attention` and `cfg.matmul` name registered kernels; `auto` (left there by
        a caller that did not resolve it) becomes the core's choice for the default device."""
        if "auto" in (cfg.attention, cfg.matmul):
            cfg = kernels.resolved(cfg)
        D, V = cfg.d_model, vocab_size
        mult = mult or param.multipliers(cfg, ParamConfig())
        self.cfg, self.dtype, self.logit_mult = cfg, jnp.dtype(cfg.dtype), mult.logits
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), cfg.init_std)
        if cfg.pos == "learned":
            self.pos_embed = _param(rngs, (max_len, D), (None, "embed"), cfg.init_std / 2)
        # ALBERT-style sharing: share_layers distinct blocks, layer i runs block i mod share_layers.
        self.blocks = Block(cfg, mult, rngs, stack=cfg.share_layers or cfg.n_layers)
        self.final_norm = Norm(D, cfg.norm, cfg.matmul)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (D, V), ("embed", "vocab"), cfg.init_std)

    def _embed(self, tokens_BxL: jax.Array, constrain: Constrain) -> jax.Array:
        # A gather cannot read a sharded table efficiently: gather the table first.
        table_VxD = constrain(self.embed[...], "whole")
        return constrain(jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype), "act")

    def _positions(self, x_BxLxD: jax.Array) -> tuple[jax.Array, tuple | None]:
        """Add learned positions, or return the RoPE tables the blocks apply."""
        L = x_BxLxD.shape[1]
        if self.cfg.pos == "learned":
            return x_BxLxD + self.pos_embed[:L].astype(self.dtype)[None], None
        return x_BxLxD, rope_tables(L, d_head(self.cfg), self.cfg.rope_theta)

    def decode(self, x_BxLxD: jax.Array) -> jax.Array:
        """Final norm and unembedding: residual stream (B, L, D) -> logits (B, L, V) float32.

        Applied to an intermediate layer's residual stream it is the logit lens.
        """
        B, L, _ = x_BxLxD.shape
        # muP's readout multiplier (1 / m_N; 1 under sp), on the (N, D) side: cheaper than on (N, V).
        h_NxD = self.final_norm(x_BxLxD.reshape(B * L, -1)) * self.logit_mult
        if self.cfg.tie_embeddings:
            w_DxV = self.embed[...].astype(self.dtype).T
        else:
            w_DxV = self.unembed[...].astype(self.dtype)
        logits_NxV = kernels.matmul(self.cfg.matmul)(h_NxD, w_DxV)
        return logits_NxV.astype(jnp.float32).reshape(B, L, -1)

    def __call__(self, tokens_BxL: jax.Array, constrain: Constrain | None = None,
                 taps: Taps | None = None) -> jax.Array:
        """`constrain` (optional, see `Constrain`) pins shardings under a mesh; `taps`
        (optional dict) receives 'embed', 'block{i}[.attn|.mlp|.attn_logits]', 'logits':
        mean |output| of each layer as float32 scalars."""
        constrain = constrain or (lambda x, kind: x)
        x_BxLxD, rope = self._positions(self._embed(tokens_BxL, constrain))
        _tap(taps, "embed", x_BxLxD)

        if taps is None:
            x_BxLxD, _ = self._scan(x_BxLxD, rope, constrain, remat=self.cfg.remat)
        else:  # no remat: taps would leak out of its trace
            x_BxLxD, layer_taps = self._scan(x_BxLxD, rope, constrain, taps=True)
            for key, per_layer in layer_taps.items():
                for layer in range(self.cfg.n_layers):
                    taps[key.replace("block", f"block{layer}", 1)] = per_layer[layer]
        logits_BxLxV = self.decode(x_BxLxD)
        _tap(taps, "logits", logits_BxLxV)
        return logits_BxLxV

    def inspect(self, tokens_BxL: jax.Array, token_embeds_BxLxD: jax.Array | None = None,
                probs: bool = True) -> Inspection:
        """The forward pass with its intermediates (see `Inspection`), for interpretation.

        `token_embeds_BxLxD`, if given, replaces the token-embedding lookup (positions are
        still added): integrated gradients moves along a path in that space.
        `probs=False` keeps the training attention kernel and returns `attn=[]`: the
        residual streams without the (L, L) probability matrices' memory.
        """
        if token_embeds_BxLxD is None:
            token_embeds_BxLxD = self._embed(tokens_BxL, lambda x, kind: x)
        x_BxLxD, rope = self._positions(token_embeds_BxLxD.astype(self.dtype))
        x0_BxLxD = x_BxLxD
        x_BxLxD, (resid_Y, attn_Y) = self._scan(x_BxLxD, rope, lambda x, kind: x,
                                                 probs=probs, resid=True)
        resid = [x0_BxLxD, *(resid_Y[i] for i in range(self.cfg.n_layers))]
        attn = [attn_Y[i] for i in range(self.cfg.n_layers)] if probs else []
        return Inspection(self.decode(x_BxLxD), resid, attn)

    def _scan(self, x_BxLxD: jax.Array, rope: tuple | None, constrain: Constrain,
              remat: str = "none", taps: bool = False, probs: bool = False, resid: bool = False):
        """Run the n_layers blocks as one `jax.lax.scan` over the stacked block weights: the
        compiled program holds one block whatever the depth. Layer i runs block i mod S.

        Returns (x_BxLxD after the last block, per-layer outputs stacked on a leading
        n_layers dim): {"block.attn", ...: (Y,)} with `taps`; (resid_YxBxLxD, attn_YxBxHxLxL
        or None) with `resid` (and `probs`); else None.
        """
        graphdef, stacked = nnx.split(self.blocks)
        S, Y = self.cfg.share_layers or self.cfg.n_layers, self.cfg.n_layers

        def layer(x_BxLxD, block_state):
            block = nnx.merge(graphdef, block_state)  # one layer's slice of every weight
            if taps:
                layer_taps: Taps = {}
                x_BxLxD = block(x_BxLxD, rope, layer_taps, "block")
                return constrain(x_BxLxD, "act"), layer_taps
            if probs:
                x_BxLxD, p_BxHxLxL = block.inspect(x_BxLxD, rope)
                return x_BxLxD, (x_BxLxD, p_BxHxLxL)
            x_BxLxD = constrain(block(x_BxLxD, rope), "act")
            return x_BxLxD, ((x_BxLxD, None) if resid else None)

        if remat == "block":  # save each block's input only; recompute the rest in the backward
            layer = jax.checkpoint(layer, prevent_cse=False)
        elif remat == "dots":  # save the projections' and attention's outputs, whichever kernel
            # made them; recompute the elementwise work (norms, GELU, RoPE) in the backward
            layer = jax.checkpoint(layer, prevent_cse=False,
                                   policy=jax.checkpoint_policies.save_only_these_names("matmul", "attention"))
        unroll = min(self.cfg.scan_unroll, Y)
        if S == Y:  # every layer its own block: scan over the weights themselves
            return jax.lax.scan(layer, x_BxLxD, stacked, unroll=unroll)

        def shared_layer(x_BxLxD, i):  # i mod S picks the block; its gradient sums over uses
            return layer(x_BxLxD, jax.tree.map(lambda w: w[i % S], stacked))

        return jax.lax.scan(shared_layer, x_BxLxD, jnp.arange(Y), unroll=unroll)


def build(cfg: ModelConfig, vocab_size: int, max_len: int, seed: int,
          p: ParamConfig | None = None) -> Transformer:
    """A concrete model with freshly initialised params (single device), parameterized by `p`
    (default sp). Resolve `cfg`'s kernels first (kernels.resolved) for a mesh of your own."""
    mult = param.multipliers(cfg, p or ParamConfig())
    return Transformer(cfg, vocab_size, max_len, nnx.Rngs(params=seed), mult)
