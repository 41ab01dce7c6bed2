"""MKL-backed CPU kernels for the train step: 2-D matmul, causal attention, the norms' backward.

XLA:CPU's own dot kernels run the reference step's matmuls below MKL's SGEMM on
the same machine, XLA has no fused attention on CPU, and its autodiff of the
norms takes several passes (docs/performance-log.md). `kernels.cc` holds XLA
FFI handlers, most built on MKL's SGEMM (sequential MKL, parallelised on XLA's
own thread pool):

  ladder_matmul_group_fwd, ladder_matmul_group_bwd
                         y_i = x @ w_i for a group of weights (one, or a
                         layer's q, k, v), 2-D, fp32; the backward gives dx
                         (summed over the group) and every dw_i in one call
  ladder_attention_fwd   exact causal attention of (B, L, H, K) q, k, v, plus
                         the log-sum-exp of each query row (B, H, L)
  ladder_attention_bwd   dq, dk, dv from the saved log-sum-exp (the (L, L)
                         probabilities are recomputed, never stored)
  ladder_attention_fwd_probs, ladder_attention_bwd_probs
                         the same, saving the causal probabilities instead
                         (`saves_probs`: where they cost no more memory than
                         the q, k, v, o the backward keeps anyway)
  ladder_rms_norm_bwd    RMSNorm's backward, dx and the scale's gradient, in
                         one pass over the rows (the forward stays XLA's)
  ladder_layer_norm_bwd  LayerNorm's, the same with the bias's gradient

and, called through ctypes, `LadderKeepAwake` (awake.py).

`matmul_group` (and `matmul`, the group of one), `causal_attention`,
`rms_norm` and `layer_norm` below wrap them with their gradients
(`jax.custom_vjp`). The C++ is compiled on first use with the machine's C++
compiler (for this CPU: `-march=native`) against jaxlib's FFI headers and the
MKL of the `mkl` wheel (the `cpu` extra), then cached under
$LADDER_CACHE/kernels (default ~/.cache/ladder). `unavailable()` says why they
cannot be used here (no MKL, no compiler, not x86-64 Linux).

The kernels see whole arrays, so they only run on a single-device CPU mesh:
under a multi-device mesh XLA would gather their operands onto every device.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cc")
# libmkl_intel_lp64 (32-bit ints) + libmkl_sequential + libmkl_core: MKL without its OpenMP pool.
MKL_LIBS = ("mkl_intel_lp64", "mkl_sequential", "mkl_core")
ATTENTION_BLOCK = 64  # query rows per block of the attention kernels
TARGETS = {"ladder_matmul_group_fwd": "LadderMatmulGroupFwd",
           "ladder_matmul_group_bwd": "LadderMatmulGroupBwd",
           "ladder_attention_fwd": "LadderAttentionFwd",
           "ladder_attention_bwd": "LadderAttentionBwd",
           "ladder_attention_fwd_probs": "LadderAttentionFwdProbs",
           "ladder_attention_bwd_probs": "LadderAttentionBwdProbs",
           "ladder_rms_norm_bwd": "LadderRmsNormBwd",
           "ladder_layer_norm_bwd": "LadderLayerNormBwd"}


def _mkl_dir() -> tuple[Path, str] | None:
    """(directory, soname suffix) of an MKL runtime installed as a wheel or by conda."""
    roots = [sys.prefix, os.environ.get("CONDA_PREFIX"), os.environ.get("MKLROOT")]
    for root in filter(None, roots):
        for core in sorted(glob.glob(os.path.join(root, "lib", "libmkl_core.so.*"))):
            suffix = core.split("libmkl_core.so", 1)[1]  # ".3"
            lib = Path(core).parent
            if all((lib / f"lib{name}.so{suffix}").exists() for name in MKL_LIBS):
                return lib, suffix
    return None


def _cpu_id() -> str:
    """The CPU's model name and instruction-set flags (Linux), for the build cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
    except OSError:
        return platform.processor()
    return "".join(sorted(set(lines)))


def _cache_dir() -> Path:
    return Path(os.environ.get("LADDER_CACHE", Path.home() / ".cache" / "ladder")) / "kernels"


def _build(mkl: Path, suffix: str) -> Path:
    """Compile cpu_kernels.cc once per (source, jaxlib, MKL, compiler); return the .so path."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    include = jax.ffi.include_dir()
    libs = [f"-l:lib{name}.so{suffix}" for name in MKL_LIBS]
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC", "-w", f"-I{include}",
           str(SOURCE), f"-L{mkl}", *libs, f"-Wl,-rpath,{mkl}"]
    # -march=native: the key names the CPU too, so a cache shared between machines stays right.
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(cmd + [jax.__version__, _cpu_id()]).encode())
    out = _cache_dir() / f"ladder_cpu_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling CPU kernels (once per machine): %s", out)
    # Build to a private name, then rename: concurrent jobs of a sweep may race here.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([*cmd, "-o", str(tmp_out)], capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "error" in line]
            errors = errors or [proc.stderr.strip()]
            raise RuntimeError(f"{cxx} failed: {errors[0].strip()}")
        os.replace(tmp_out, out)
    return out


@functools.lru_cache(maxsize=None)
def unavailable() -> str | None:
    """None when the kernels are built, loaded and registered with XLA; else why not (one line)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"MKL kernels need x86-64 Linux, not {sys.platform}/{platform.machine()}"
    found = _mkl_dir()
    if found is None:
        return "MKL not found (pip install 'ladder[cpu]', or mkl into this environment)"
    try:
        lib = ctypes.CDLL(str(_build(*found)))
    except (OSError, RuntimeError) as err:
        log.warning("CPU kernels unavailable, XLA's kernels are used instead: %s", err)
        return f"CPU kernels could not be built: {err}"
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.LadderKeepAwake.argtypes, lib.LadderKeepAwake.restype = [ctypes.c_int], ctypes.c_int
    _library["lib"] = lib
    return None


_library: dict = {}  # the loaded shared library, once unavailable() has built it


def library() -> ctypes.CDLL:
    """The loaded kernels library (RuntimeError where `unavailable()`)."""
    _require()
    return _library["lib"]


def _require() -> None:
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)


def _check_f32(name: str, *arrays) -> None:
    _require()
    if any(a.dtype != jnp.float32 for a in arrays):
        raise TypeError(f"CPU {name} is float32 only, got {', '.join(str(a.dtype) for a in arrays)}")


# ------------------------------------------------------------------ matmul

def _group_fwd_call(x_NxD, ws):
    outs = tuple(jax.ShapeDtypeStruct((x_NxD.shape[0], w.shape[1]), jnp.float32) for w in ws)
    return jax.ffi.ffi_call("ladder_matmul_group_fwd", outs)(x_NxD, *ws)


@jax.custom_vjp
def _matmul_group(x_NxD, ws):
    return _group_fwd_call(x_NxD, ws)


def _matmul_group_fwd(x_NxD, ws):
    return _group_fwd_call(x_NxD, ws), (x_NxD, ws)


def _matmul_group_bwd(res, dys):
    x_NxD, ws = res
    outs = (jax.ShapeDtypeStruct(x_NxD.shape, jnp.float32),
            *(jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in ws))
    dx_NxD, *dws = jax.ffi.ffi_call("ladder_matmul_group_bwd", outs)(x_NxD, *ws, *dys)
    return dx_NxD, tuple(dws)


_matmul_group.defvjp(_matmul_group_fwd, _matmul_group_bwd)


def matmul_group(x_NxD: jax.Array, ws: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """(x @ w for w in ws) for float32 (N, D) x and (D, F_i) ws, with their gradients, in one
    kernel call forward and one backward (the input gradient summed in place)."""
    _check_f32("matmul", x_NxD, *ws)
    return _matmul_group(x_NxD, tuple(ws))


def matmul(x_NxD: jax.Array, w_DxF: jax.Array) -> jax.Array:
    """x @ w for float32 (N, D) @ (D, F) -> (N, F), with its gradient, on MKL: the group of one."""
    return matmul_group(x_NxD, (w_DxF,))[0]


# --------------------------------------------------------------- attention

def _attn_attrs(scale: float) -> dict:
    # FFI attributes are typed: the handlers read an f32 scale and an i64 block.
    return {"scale": np.float32(scale), "block": np.int64(ATTENTION_BLOCK)}


def packed_probs(L: int) -> int:
    """Entries of one (batch, head) pair's saved probabilities: query block i keeps its
    (rows, end of block i) rectangle (the kernels' packed layout)."""
    ends = [min(L, r0 + ATTENTION_BLOCK) for r0 in range(0, L, ATTENTION_BLOCK)]
    return sum((end - r0) * end for r0, end in zip(range(0, L, ATTENTION_BLOCK), ends))


def saves_probs(L: int, K: int) -> bool:
    """Whether the forward saves the causal probabilities for the backward, which then skips
    recomputing scores and exponentials (docs/performance-log.md): when they take no more memory than q, k, v and o, which the
    backward keeps anyway. With L a multiple of the 64-row block, packed_probs(L) =
    L (L + 64) / 2 <= 4 L K means L <= 8 K - 64 (448 for K = 64). Longer sequences recompute
    them from the log-sum-exp."""
    return packed_probs(L) <= 4 * L * K


def _attn_fwd_call(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale: float, probs: bool = False):
    """(o_BxLxHxK, lse_BxHxL), or (o_BxLxHxK, probs_BxHxP) with `probs`: the output and each
    query row's log-sum-exp, or the packed causal probabilities."""
    B, L, H, _ = q_BxLxHxK.shape
    saved = (B, H, packed_probs(L)) if probs else (B, H, L)
    outs = (jax.ShapeDtypeStruct(q_BxLxHxK.shape, jnp.float32),
            jax.ShapeDtypeStruct(saved, jnp.float32))
    call = jax.ffi.ffi_call("ladder_attention_fwd_probs" if probs else "ladder_attention_fwd", outs)
    return call(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, **_attn_attrs(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale):
    return _attn_fwd_call(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale)[0]


def _attention_fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale):
    _, L, _, K = q_BxLxHxK.shape
    o_BxLxHxK, saved = _attn_fwd_call(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale, saves_probs(L, K))
    return o_BxLxHxK, (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, o_BxLxHxK, saved)


def _attention_bwd(scale, res, do_BxLxHxK):
    """(dq, dk, dv), each (B, L, H, K), from the saved probabilities or log-sum-exp."""
    _, L, _, K = do_BxLxHxK.shape
    target = "ladder_attention_bwd_probs" if saves_probs(L, K) else "ladder_attention_bwd"
    outs = tuple(jax.ShapeDtypeStruct(do_BxLxHxK.shape, jnp.float32) for _ in range(3))
    return jax.ffi.ffi_call(target, outs)(*res, do_BxLxHxK, **_attn_attrs(scale))


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
                     scale: float) -> jax.Array:
    """Exact causal softmax(scale * q k^T) v for float32 (B, L, H, K) inputs, with its gradient."""
    _require()
    if any(x.dtype != jnp.float32 for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)):
        raise TypeError(f"MKL attention is float32 only, got {q_BxLxHxK.dtype}")
    return _attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, float(scale))


# ------------------------------------------------------- RMSNorm, LayerNorm

def _norm_ref(x_NxD, w_D, b_D, eps):
    """The model's norms (model.Norm): RMSNorm where b_D is None, else LayerNorm."""
    if b_D is not None:
        x_NxD = x_NxD - x_NxD.mean(-1, keepdims=True)
    y_NxD = x_NxD * jax.lax.rsqrt((x_NxD * x_NxD).mean(-1, keepdims=True) + eps) * w_D
    return y_NxD if b_D is None else y_NxD + b_D


def _norm_bwd_call(x_NxD, w_D, dy_NxD, eps, center: bool):
    """(dx, dw) of RMSNorm, or (dx, dw, db) of LayerNorm (`center`), in one kernel call."""
    vec = jax.ShapeDtypeStruct(w_D.shape, jnp.float32)
    outs = (jax.ShapeDtypeStruct(x_NxD.shape, jnp.float32), vec, *((vec,) if center else ()))
    target = "ladder_layer_norm_bwd" if center else "ladder_rms_norm_bwd"
    return jax.ffi.ffi_call(target, outs)(x_NxD, w_D, dy_NxD, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x_NxD, w_D, eps):
    return _norm_ref(x_NxD, w_D, None, eps)


def _rms_norm_fwd(x_NxD, w_D, eps):
    return _norm_ref(x_NxD, w_D, None, eps), (x_NxD, w_D)


def _rms_norm_bwd(eps, res, dy_NxD):
    return _norm_bwd_call(*res, dy_NxD, eps, center=False)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x_NxD, w_D, b_D, eps):
    return _norm_ref(x_NxD, w_D, b_D, eps)


def _layer_norm_fwd(x_NxD, w_D, b_D, eps):
    return _norm_ref(x_NxD, w_D, b_D, eps), (x_NxD, w_D)


def _layer_norm_bwd(eps, res, dy_NxD):
    return _norm_bwd_call(*res, dy_NxD, eps, center=True)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def rms_norm(x_NxD: jax.Array, w_D: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2, -1) + eps) * w for float32 (N, D) x and (D,) w. The forward is
    XLA's; the backward is one pass of the CPU kernel."""
    _check_f32("RMSNorm", x_NxD, w_D)
    return _rms_norm(x_NxD, w_D, float(eps))


def layer_norm(x_NxD: jax.Array, w_D: jax.Array, b_D: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * w + b over the last dim, float32 (N, D) x and (D,) w, b.
    The forward is XLA's; the backward is one call of the CPU kernel, as for `rms_norm`."""
    _check_f32("LayerNorm", x_NxD, w_D, b_D)
    return _layer_norm(x_NxD, w_D, b_D, float(eps))
