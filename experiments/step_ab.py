"""Interleaved A/B of train-step variants in one process: the comparison the performance log trusts.

    python experiments/step_ab.py "plugins=[cpu]" "" [--rounds 8]
    python -m ladder_cpu.launch experiments.step_ab "plugins=[cpu]" ""   # with the plugin's malloc

Each argument is one variant: space-separated overrides on top of the bench's
reference config (`research.bench.REFERENCE`; "" is the default step). All
variants are compiled first, then their steps alternate, `--rounds` rounds of
2 steps each, so a machine whose speed drifts (a shared VM) slows every
variant alike. Each variant's turns run as the train loop runs them: on the
kernels its plan resolved, inside its enabled plugins' loop hooks (with
`plugins=[cpu]`, the keep-awake spinners; `"plugins=[cpu]"
"plugins=[cpu] +plugin_options.cpu.keep_awake=off"` compares them).
Prints the process's malloc, then each variant's kernels, median and best
step time, model FLOP/s and last loss. Runs on one device.

The malloc is the process's, one for every variant: it is not a variant's
override. This script runs with the system's unless started through
`python -m ladder_cpu.launch` (jemalloc or huge pages, ladder_cpu/hostmem.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from research import conf, config, data, flops, hooks
from research import sharding as shd
from research import step as steplib
from research.bench import REFERENCE, compiled_step

from ladder_cpu import hostmem  # only its account of the malloc: the core has none


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help='overrides of one variant, e.g. "model.matmul=xla"')
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    print(f"host malloc: {hostmem.status()}")
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    runs = {}
    for variant in args.variants:
        cfg = config.parse(conf.compose([*REFERENCE, *variant.split()]))
        corpus = data.load(cfg.data)
        plan = steplib.plan(cfg, corpus.vocab_size, mesh)
        step, state, batches, _ = compiled_step(cfg, corpus, mesh, plan)
        loop_hooks = hooks.plugin_hooks(plan.plugins, cfg, mesh)
        with hooks.running(loop_hooks, 0):
            state, metrics = step(state, batches[0])  # warm up
            jax.block_until_ready(metrics)
        tokens = cfg.train.batch_size * cfg.data.seq_len
        per_step = tokens * flops.flops_per_token(cfg.model, corpus.vocab_size, cfg.data.seq_len)
        runs[variant] = {"step": step, "state": state, "batch": batches[0], "flops": per_step,
                         "times": [], "loss": None, "hooks": loop_hooks, "kernels": plan.kernels}
    for _ in range(args.rounds):
        for run in runs.values():
            with hooks.running(run["hooks"], 0):  # as the train loop runs: the plugins' hooks
                for _ in range(2):
                    t0 = time.perf_counter()
                    run["state"], metrics = run["step"](run["state"], run["batch"])
                    jax.block_until_ready(metrics)
                    run["times"].append(time.perf_counter() - t0)
                    run["loss"] = float(metrics["loss"])
    for variant, run in runs.items():
        med, best = statistics.median(run["times"]), min(run["times"])
        kernels = f"{run['kernels']['attention']}/{run['kernels']['matmul']}"
        print(f"{variant or '(default)':50s} {kernels:13s} median {med:.3f} s "
              f"({run['flops'] / med / 1e9:.1f} GFLOP/s)  best {best:.3f} s "
              f"({run['flops'] / best / 1e9:.1f})  loss {run['loss']:.6f}")


if __name__ == "__main__":
    main()
