"""Parameter counts, model FLOPs per token, and the peak that MFU divides by.

FLOPs follow PaLM's accounting (Chowdhery et al. 2022, appendix B): a
training token costs 6 * N + 12 * L * H * Q * T, with L layers, H (query) heads,
Q head dim, T sequence length; grouped-query attention shrinks N (the k and v
projections), not the attention term, which every query head pays. N is the non-embedding params as applied per
token (a shared block counts at every layer it runs; norm scales included,
as in Kaplan et al.'s 6N) plus the output projection, which is a matmul
whether tied or not. Embedding lookups are free.
This matches how nanoGPT's MFU counts, so figures compare across codebases.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from research.config import Config, ConfigError, ModelConfig, d_ff, d_head, kv_heads

# Dense bf16 peak FLOP/s per device, from vendor datasheets (no sparsity).
# Matched as whole words against device_kind, most specific first.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def param_counts(cfg: ModelConfig, vocab_size: int, seq_len: int) -> dict[str, int]:
    """Total and non-embedding parameter counts, from the config (see model.py).

    `non_embedding_params` excludes the token and position tables and an
    untied unembedding (Kaplan et al. 2020's N); `matmul_params` is the N of
    the FLOP formula (see the module docstring).
    """
    D, V, H, G, K = cfg.d_model, vocab_size, cfg.n_heads, kv_heads(cfg), d_head(cfg)
    norm = D * (2 if cfg.norm == "layernorm" else 1)
    attn = 2 * D * H * K + 2 * D * G * K  # q and the output; k and v (G heads: grouped-query)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * D * d_ff(cfg)  # swiglu: gate, up and down
    qk_norm = 2 * K if cfg.qk_norm else 0
    block = attn + mlp + 2 * norm + qk_norm
    blocks = block * (cfg.share_layers or cfg.n_layers)
    embed = V * D + (seq_len * D if cfg.pos == "learned" else 0)
    unembed = 0 if cfg.tie_embeddings else D * V
    non_embedding = blocks + norm
    return {
        "params": non_embedding + embed + unembed,
        "non_embedding_params": non_embedding,
        # A shared block is applied n_layers times: compute scales with depth.
        "matmul_params": block * cfg.n_layers + D * V,
    }


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L H Q T."""
    n = param_counts(cfg, vocab_size, seq_len)["matmul_params"]
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * d_head(cfg) * seq_len


def apply_flops_budget(cfg: Config, vocab_size: int) -> Config:
    """`cfg` with `train.steps` derived from `train.flops_budget` C, if set.

    steps = round(C / (FLOPs per token * batch * seq_len)): the run spends C
    model FLOPs (about 6 N D, as in Hoffmann et al. 2022's IsoFLOP profiles),
    so runs of different sizes in one budget are compared at equal compute.
    """
    t = cfg.train
    if t.flops_budget is None:
        return cfg
    per_step = flops_per_token(cfg.model, vocab_size, cfg.data.seq_len) * t.batch_size * cfg.data.seq_len
    steps = int(round(t.flops_budget / per_step))
    if steps < 1:
        raise ConfigError("train.flops_budget", f"{t.flops_budget:.3g} FLOPs is less than one step of this "
                          f"model ({per_step:.3g} FLOPs at batch {t.batch_size} x seq {cfg.data.seq_len})")
    if cfg.schedule.warmup >= steps:
        raise ConfigError("schedule.warmup", f"{cfg.schedule.warmup} must be < the {steps} steps that "
                          f"train.flops_budget={t.flops_budget:.3g} buys for this model")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, steps=steps))


def measure_matmul_flops(n: int = 1024, dtype: str = "float32", seconds: float = 0.3,
                         matmul=None, compiler_options: dict | None = None) -> float:
    """Sustained FLOP/s of n x n x n matmuls on the default device: `matmul(x, y)` (default
    XLA's dot), jitted with `compiler_options` as the train step is.

    The median over back-to-back matmuls for `seconds`, not the best one: on a
    shared or turbo-boosting CPU single matmuls burst well above what the cores
    hold for a whole train step (docs/performance-log.md).
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    fn = matmul or (lambda x, y: x @ y)
    compiled = jax.jit(fn).lower(a, b).compile(compiler_options=compiler_options)
    compiled(a, b).block_until_ready()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        compiled(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))


def cpu_peak(seconds: float = 0.3, kernels: dict | None = None,
             compiler_options: dict | None = None) -> tuple[float, str]:
    """(sustained fp32 FLOP/s, kernel name) of the faster of XLA's dot and the matmul
    kernels in `kernels` ({name: fn(x, y)}, e.g. the one a plugin gave the step): the
    step's matmuls run on the fastest GEMM it has, so MFU divides by that one's rate."""
    rates = {"xla": measure_matmul_flops(seconds=seconds, compiler_options=compiler_options)}
    for name, fn in (kernels or {}).items():
        if name != "xla":
            rates[name] = measure_matmul_flops(seconds=seconds, matmul=fn, compiler_options=compiler_options)
    kernel = max(rates, key=rates.get)
    return rates[kernel], kernel


def peak_flops(device: jax.Device | None = None, kernels: dict | None = None,
               compiler_options: dict | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from): the datasheet's where
    PEAK_FLOPS knows the device, else measured (`cpu_peak` on CPU, with the step's
    matmul `kernels` and `compiler_options`), once per process and choice."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", kind, re.IGNORECASE):
            return flops, f"table:{name}"
    return _measured_peak(device.platform, tuple(sorted((kernels or {}).items())),
                          tuple(sorted((compiler_options or {}).items())))


@functools.lru_cache(maxsize=None)
def _measured_peak(platform: str, kernels: tuple, compiler_options: tuple) -> tuple[float, str]:
    # Once per process: every run's MFU divides by the same figure.
    options = dict(compiler_options) or None
    if platform == "cpu":
        rate, kernel = cpu_peak(kernels=dict(kernels), compiler_options=options)
        return rate, f"measured:cpu fp32 1024^3 matmul ({kernel})"
    return measure_matmul_flops(compiler_options=options), f"measured:{platform} fp32 1024^3 matmul"
