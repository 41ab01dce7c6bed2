"""Kernel registries: who runs attention and the 2-D matmuls, chosen by name.

  ATTENTION  name -> fn(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, scale=None) -> o_BxLxHxK
             (causal; `scale`, a keyword, multiplies q.k; None = 1/sqrt(K); k and v
             may have G < H heads, G dividing H: query head h reads kv head h // (H/G))
  MATMUL     name -> MatmulKernel: `group(x_NxD, ws) -> tuple of x @ w`, and
             optionally the norms (`norm`), which a matmul kernel may fuse

The core registers what is pure JAX or part of JAX:

  attention  xla      `jax.nn.dot_product_attention`, XLA's implementation; runs everywhere
             cudnn    the same call on cuDNN's fused (flash) kernel: NVIDIA GPU,
                      bfloat16/float16, head dim a multiple of 8 up to 128
             chunked  query blocks that skip the masked upper triangle (attention.py);
                      `auto` picks it on CPU, where nothing fuses the masked softmax
  matmul     xla      XLA's dot

A plugin registers more under its own source name (e.g. the CPU plugin's `mkl`).
`model.attention` / `model.matmul` = `auto` is resolved once, by `resolve`,
from the mesh the run uses: the highest-ranked entry, among the core's and the
run's enabled plugins', whose `auto` rule holds and that can run there. The
model then calls `attention(name)` / `matmul(name)` and never branches on a name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from research import attention as attn
from research.config import ConfigError, ModelConfig, d_head
from research.registry import Registry


@dataclasses.dataclass(frozen=True)
class Context:
    """What a kernel's availability depends on: the mesh's platform and size, the
    compute dtype and the head dim."""

    platform: str
    devices: int
    dtype: str
    head_dim: int


@dataclasses.dataclass(frozen=True)
class MatmulKernel:
    """group(x_NxD, ws) -> (x @ w for w in ws), with their gradients.
    norm(x_NxD, scale_D, bias_D or None, eps) -> RMSNorm (bias None) or LayerNorm of x,
    or None: the model's own norm (XLA)."""

    group: Callable[[jax.Array, tuple], tuple]
    norm: Callable | None = None

    def __call__(self, x_NxD: jax.Array, w_DxF: jax.Array) -> jax.Array:
        return self.group(x_NxD, (w_DxF,))[0]


ATTENTION = Registry("attention kernel")
MATMUL = Registry("matmul kernel")
OPS = {"attention": ATTENTION, "matmul": MATMUL}


def _xla_group(x_NxD: jax.Array, ws: tuple) -> tuple:
    """XLA's dot, one per weight."""
    return tuple(x_NxD @ w for w in ws)


def _cudnn_unavailable(ctx: Context) -> str | None:
    return attn.cudnn_unsupported(ctx.platform, ctx.dtype, ctx.head_dim)


ATTENTION.register("xla", functools.partial(attn.xla_attention, implementation="xla"),
                   doc="XLA's dot_product_attention: the (L, L) scores in memory; runs everywhere",
                   rank=0, auto=lambda ctx: True)
ATTENTION.register("cudnn", functools.partial(attn.xla_attention, implementation="cudnn"),
                   available=_cudnn_unavailable,
                   doc="cuDNN's fused flash attention (NVIDIA GPU, bf16/fp16, head dim % 8 == 0, <= 128)",
                   rank=20, auto=lambda ctx: True)
ATTENTION.register("chunked", attn.chunked_attention,
                   doc="query blocks over the lower triangle only (about half the FLOPs); auto on CPU",
                   rank=10, auto=lambda ctx: ctx.platform == "cpu")
MATMUL.register("xla", MatmulKernel(_xla_group), doc="XLA's dot", rank=0, auto=lambda ctx: True)


def context(m: ModelConfig, mesh: Mesh | None = None) -> Context:
    """The Context of model `m` on `mesh` (default: one device of the default backend)."""
    if mesh is None:
        platform, devices = jax.devices()[0].platform, 1
    else:
        platform, devices = mesh.devices.flat[0].platform, mesh.size
    return Context(platform, devices, jnp.dtype(m.dtype).name, d_head(m))


def _pick(op: str, choice: str, ctx: Context, sources) -> str:
    registry = OPS[op]
    if choice != "auto":
        if choice not in registry.names(sources):
            raise ConfigError(f"model.{op}", f"unknown value {choice!r}; valid: auto, "
                              f"{', '.join(registry.names(sources))}")
        reason = registry.get(choice).unavailable(ctx)
        if reason is not None:
            raise ConfigError(f"model.{op}", f"{choice}: {reason}; use auto or xla")
        return choice
    ranked = sorted(registry.entries(sources), key=lambda e: -e.rank)
    for entry in ranked:
        if (entry.auto is None or entry.auto(ctx)) and entry.unavailable(ctx) is None:
            return entry.name
    raise ConfigError(f"model.{op}", f"auto: no registered kernel runs on {ctx}")


def resolve(m: ModelConfig, mesh: Mesh | None = None, sources=("core",)) -> dict[str, str]:
    """{"attention": name, "matmul": name}: the kernels model `m` runs on `mesh`, `auto`
    resolved among the registry entries of `sources` (the core and the enabled plugins).
    ConfigError naming the field when an explicit choice cannot run there."""
    ctx = context(m, mesh)
    return {op: _pick(op, getattr(m, op), ctx, sources) for op in OPS}


def resolved(m: ModelConfig, mesh: Mesh | None = None, sources=("core",)) -> ModelConfig:
    """`m` with `attention` and `matmul` replaced by the names `resolve` gives."""
    return dataclasses.replace(m, **resolve(m, mesh, sources))


def attention(name: str) -> Callable:
    """The attention function registered as `name` (see the module docstring)."""
    return ATTENTION.get(name).impl


def matmul(name: str) -> MatmulKernel:
    """The MatmulKernel registered as `name`."""
    return MATMUL.get(name).impl
