"""`python -m research.bench [overrides]`: throughput of the full train step.

Prints one JSON line: the config, tokens/s, model FLOP/s (PaLM accounting,
see flops.py), the peak it is compared with and their ratio (MFU), step time
(median and best of the timed steps), first-step compile time and peak memory.

On CPU the step time is the median of steps timed one by one. On accelerators
it is the mean over steps queued back to back, as the training loop runs them
(the host dispatches the next step while the device runs this one);
`step_time_synced_s`, the median with a wait after every step, shows what a
host-device round trip per step would cost. `step_memory_bytes` is XLA's
account of the compiled step's device memory (`step_memory`).

On CPU the peak is the sustained fp32 matmul rate of the fastest GEMM the
step has (XLA's dot, and the step's matmul kernel where a plugin gave it one;
`kernels` says which kernels the step ran), measured for a few seconds just
before and just after the timed steps, inside the plugins' loop hooks as the
steps run; the larger of the two is used, so a machine that slows down mid-run
does not flatter the ratio. `cpu_steal` is the share of CPU time the
hypervisor took during the timed steps (Linux): when it is not near 0 the
figures are noisy. `page_faults_per_step` counts the host's minor page faults
per timed step. `plugins` records what each enabled plugin did
(`plugins=[cpu]`: docs/cpu-plugin.md).
On accelerators the peak is the datasheet's. Overrides use the same names as
`research.train`; the defaults are the reference config for a 2-core CPU:
n_layers=6, n_heads=6, d_model=384, seq_len=256, batch_size=16, vocab 256,
fp32, AdamW.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import jax
import numpy as np

from research import conf, config, data, flops, hooks, kernels
from research import sharding as shd
from research import step as steplib

REFERENCE = (
    "model=m",
    "data=synthetic",
    "data.seq_len=256",
    "train.batch_size=16",
    "optim=adamw",
)


def _peak_memory_bytes(device) -> tuple[int, str]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    # CPU: the process's peak resident set (ru_maxrss is KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS"


PEAK_SECONDS = 2.0  # per CPU peak measurement (two per bench)


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def compiled_step(cfg: config.Config, corpus: data.Corpus, mesh, plan: steplib.Plan | None = None) -> tuple:
    """(compiled train step, fresh state, 2 batches, compile seconds) for `cfg` on `mesh`."""
    t = cfg.train
    plan = plan or steplib.plan(cfg, corpus.vocab_size, mesh)
    state = plan.fresh_state()
    batch_sh = shd.batch_sharding(mesh)
    batches = [data.device_batch(corpus, data.TRAIN, t.seed, i, t.batch_size, cfg.data.seq_len, batch_sh)
               for i in range(2)]
    t0 = time.perf_counter()
    train_step = plan.train_step(mesh, cfg.optim.accum).lower(state, batches[0]).compile()
    return train_step, state, batches, time.perf_counter() - t0


def step_memory(compiled) -> dict[str, int]:
    """Device bytes a compiled train step needs, from XLA's buffer assignment:
    its arguments (the state and batch), outputs not written in place of a donated
    argument, and temporaries. `total` is what must fit in the device's memory."""
    m = compiled.memory_analysis()
    fields = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
              "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
    fields["total"] = fields["argument"] + fields["output"] - fields["alias"] + fields["temp"]
    return fields


def planned_memory(raw_cfg) -> dict[str, int]:
    """`step_memory` of the train step for `raw_cfg` on all devices, compiled from
    shapes alone: no array is allocated, so it answers for models too large to run."""
    cfg = config.parse(raw_cfg)
    devices = jax.devices()
    mesh = shd.make_mesh(shd.mesh_shape(cfg.mesh, len(devices)), devices)
    plan = steplib.plan(cfg, data.load(cfg.data).vocab_size, mesh)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), np.int32,
                                 sharding=shd.batch_sharding(mesh))
    compiled = plan.train_step(mesh, cfg.optim.accum).lower(plan.abstract_state(), batch).compile()
    return step_memory(compiled)


def bench(raw_cfg, steps: int = 10, warmup: int = 2) -> dict:
    """Compile, run `warmup` steps, then time `steps` steps. Returns the figures."""
    cfg = config.parse(raw_cfg)
    devices = jax.devices()
    mesh = shd.make_mesh(shd.mesh_shape(cfg.mesh, len(devices)), devices)
    corpus = data.load(cfg.data)
    vocab, seq_len, t = corpus.vocab_size, cfg.data.seq_len, cfg.train
    on_cpu = devices[0].platform == "cpu"
    plan = steplib.plan(cfg, vocab, mesh)
    loop_hooks = hooks.plugin_hooks(plan.plugins, cfg, mesh)  # as the train loop runs

    def measured_peak() -> tuple[float, str]:
        matmul = plan.kernels["matmul"]
        with hooks.running(loop_hooks, 0):
            return flops.cpu_peak(PEAK_SECONDS, {matmul: kernels.matmul(matmul)}, plan.compiler_options)

    if on_cpu:  # before any other work; again after the timed steps
        peak_before, kernel = measured_peak()
    else:
        peak, peak_source = flops.peak_flops(devices[0])
        peak *= len(devices)

    train_step, state, batches, compile_s = compiled_step(cfg, corpus, mesh, plan)

    with hooks.running(loop_hooks, 0):
        for i in range(warmup):
            state, metrics = train_step(state, batches[i % 2])
        jax.block_until_ready(metrics)
        pipelined = None
        if not on_cpu:  # steps queued back to back, as the training loop runs them
            t0 = time.perf_counter()
            for i in range(steps):
                state, metrics = train_step(state, batches[i % 2])
            jax.block_until_ready((state, metrics))
            pipelined = (time.perf_counter() - t0) / steps
        ticks0 = _cpu_ticks()
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, metrics = train_step(state, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        ticks1 = _cpu_ticks()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    steal = (None if ticks0 is None or ticks1 is None or ticks1[1] == ticks0[1]
             else (ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1]))
    if on_cpu:
        peak_after, kernel_after = measured_peak()
        peak = max(peak_before, peak_after)
        kernel = kernel if peak_before >= peak_after else kernel_after
        peak_source = f"measured:cpu fp32 1024^3 matmul ({kernel}), sustained"
    step_time = float(np.median(times)) if pipelined is None else pipelined
    tokens_per_s = t.batch_size * seq_len / step_time
    model_flops = tokens_per_s * flops.flops_per_token(cfg.model, vocab, seq_len)
    mem, mem_source = _peak_memory_bytes(devices[0])
    m = cfg.model
    return {
        "config": {"n_layers": m.n_layers, "n_heads": m.n_heads, "d_model": m.d_model,
                   "seq_len": seq_len, "batch_size": t.batch_size, "vocab": vocab,
                   "dtype": m.dtype, "optim": cfg.optim.name, "accum": cfg.optim.accum,
                   "remat": m.remat, "mesh": dict(zip(shd.AXES, mesh.devices.shape))},
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "tokens_per_s": tokens_per_s,
        "model_flops_per_s": model_flops,
        "peak_flops_per_s": peak,
        "peak_source": peak_source,
        **({"peak_before_after": [peak_before, peak_after]} if on_cpu else {}),
        "mfu": model_flops / peak,
        "step_time_s": step_time,
        "step_time_synced_s": float(np.median(times)),
        "step_time_min_s": float(np.min(times)),
        "compile_s": compile_s,
        "peak_memory_bytes": mem,
        "peak_memory_source": mem_source,
        "step_memory_bytes": step_memory(train_step),
        "timed_steps": steps,
        "cpu_steal": steal,
        "page_faults_per_step": faults / steps,
        "compiler_options": plan.compiler_options,
        "kernels": plan.kernels,
        "plugins": {p.name: p.describe(cfg, mesh) for p in plan.plugins},
        "final_loss": float(metrics["loss"]),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    steps = 10
    rest = []
    for arg in argv:
        if arg.startswith("--steps="):
            steps = int(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    try:
        conf.check_overrides(rest)
        result = bench(conf.compose([*REFERENCE, *rest]), steps=steps)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
