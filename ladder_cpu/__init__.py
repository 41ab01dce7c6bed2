"""Ladder's optional CPU plugin: MKL kernels, keep-awake spinners, XLA:CPU options, malloc.

Speed-ups for one kind of machine (x86-64 Linux CPUs, measured on 2-core VMs,
docs/performance-log.md), kept out of the core, which never imports this
package. A run enables it with `plugins=[cpu]` (the `cpu` entry point of the
`ladder.plugins` group, pyproject.toml); `pip install -e '.[cpu]'` brings MKL.
What it adds to such a run:

  kernels            model.attention=mkl and model.matmul=mkl (kernels.py), which
                     `auto` picks on a one-device float32 CPU mesh where they build
  keep-awake         a loop hook (awake.py); plugin_options.cpu.keep_awake:
                     auto (on for a CPU backend where the kernels load) | on | off
  compiler options   XLA:CPU runs single dots on its own kernels rather than
                     YNNPACK (COMPILER_OPTIONS), where this XLA knows the option
  malloc             not through the config: the launcher
                     `python -m ladder_cpu.launch research.train ...` (hostmem.py)

summary.json records what ran under `plugins.cpu`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from research.config import ConfigError
from research.kernels import ATTENTION, MATMUL, Context, MatmulKernel
from research.plugins import Plugin

KEEP_AWAKE = ("auto", "on", "off")
# Single dots on XLA's own (Eigen) kernels rather than YNNPACK; reductions stay with
# YNNPACK. The same as XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_dot
# (docs/performance-log.md). Experimental: dropped where this XLA no longer knows it.
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=None)
def _options_supported() -> bool:
    import jax
    import jax.numpy as jnp

    try:
        probe = jax.device_put(jnp.zeros(()), jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1).lower(probe).compile(compiler_options=COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError:  # INVALID_ARGUMENT: not an option of this XLA
        return False
    return True


def compiler_options(platform: str) -> dict | None:
    """COMPILER_OPTIONS on a CPU backend whose XLA knows them, else None."""
    return dict(COMPILER_OPTIONS) if platform == "cpu" and _options_supported() else None


def kernels_unavailable(ctx: Context) -> str | None:
    """Why the MKL kernels cannot run in `ctx`, or None."""
    from ladder_cpu import kernels

    if ctx.platform != "cpu" or ctx.devices != 1:
        return f"needs a one-device CPU mesh, got {ctx.devices} {ctx.platform} device(s)"
    if ctx.dtype != "float32":
        return f"float32 only, got model.dtype={ctx.dtype}"
    return kernels.unavailable()


def _attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, scale=None):
    from ladder_cpu import kernels

    scale = q_BxLxHxK.shape[-1] ** -0.5 if scale is None else scale
    H, G = q_BxLxHxK.shape[2], k_BxLxGxK.shape[2]
    if G != H:  # grouped-query: the kernel wants a key/value head per query head
        k_BxLxGxK, v_BxLxGxK = (jnp.repeat(x, H // G, axis=2) for x in (k_BxLxGxK, v_BxLxGxK))
    return kernels.causal_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, scale)


def _norm(x_NxD, scale_D, bias_D, eps):
    from ladder_cpu import kernels

    if bias_D is None:
        return kernels.rms_norm(x_NxD, scale_D, eps)
    return kernels.layer_norm(x_NxD, scale_D, bias_D, eps)


def _matmul_group(x_NxD, ws):
    from ladder_cpu import kernels

    return kernels.matmul_group(x_NxD, ws)


def _keep_awake_choice(cfg) -> str:
    return (cfg.plugin_options.get(NAME) or {}).get("keep_awake", "auto")


def keeps_awake(cfg, mesh) -> bool:
    """Whether the run keeps the cores awake (`plugin_options.cpu.keep_awake`, auto
    resolved: on for a CPU backend where the kernels load)."""
    from ladder_cpu import kernels

    choice = _keep_awake_choice(cfg)
    platform = mesh.devices.flat[0].platform
    if choice == "on":
        reason = kernels.unavailable() if platform == "cpu" else f"needs a CPU backend, got {platform}"
        if reason is not None:
            raise ConfigError(f"plugin_options.{NAME}.keep_awake", f"on: {reason}; use auto or off")
        return True
    return choice == "auto" and platform == "cpu" and kernels.unavailable() is None


def _hooks(cfg, mesh) -> list:
    from ladder_cpu.awake import KeepAwakeHook

    return [KeepAwakeHook(required=_keep_awake_choice(cfg) == "on")] if keeps_awake(cfg, mesh) else []


def _validate(options: dict) -> None:
    for key, value in options.items():
        if key != "keep_awake":
            raise ConfigError(f"plugin_options.{NAME}.{key}", "unknown option; valid: keep_awake")
        if value not in KEEP_AWAKE:
            raise ConfigError(f"plugin_options.{NAME}.keep_awake",
                              f"unknown value {value!r}; valid: {', '.join(KEEP_AWAKE)}")


def _describe(cfg, mesh) -> dict:
    from ladder_cpu import hostmem, kernels

    return {"kernels_unavailable": kernels.unavailable(), "keep_awake": keeps_awake(cfg, mesh),
            "compiler_options": compiler_options(mesh.devices.flat[0].platform),
            "host_malloc": hostmem.status()}


NAME = "cpu"


def setup(name: str = NAME) -> Plugin:
    """Register the MKL kernels (source `name`) and return the plugin's hooks and options."""
    if name != NAME:
        raise ConfigError("plugins", f"ladder_cpu is the plugin {NAME!r}, enabled as plugins=[{NAME}], "
                          f"not {name!r}")
    ATTENTION.register("mkl", _attention, available=kernels_unavailable, source=NAME, rank=100,
                       doc="fused causal attention on MKL (CPU plugin): one CPU device, float32")
    MATMUL.register("mkl", MatmulKernel(_matmul_group, _norm), available=kernels_unavailable,
                    source=NAME, rank=100,
                    doc="MKL's SGEMM, q/k/v as one call, the norms' backward fused (CPU plugin)")
    return Plugin(NAME, hooks=_hooks, compiler_options=compiler_options, validate=_validate,
                  describe=_describe)
