"""Interleaved A/B of train-step variants in one process: the comparison perf.md trusts.

    python experiments/step_ab.py "model.matmul=xla model.attention=chunked" "" [--rounds 8]

Each argument is one variant: space-separated overrides on top of the bench's
reference config (`research.bench.REFERENCE`; "" is the default step). All
variants are compiled first, then their steps alternate, `--rounds` rounds of
2 steps each, so a machine whose speed drifts (a shared VM) slows every
variant alike. Each variant's turns run as the train loop does, with its own
`train.keep_awake` (so `"" "train.keep_awake=off"` compares the spinners).
Prints each variant's median and best step time, model FLOP/s and last loss.
Runs on one device.
"""

from __future__ import annotations

if __name__ == "__main__":  # as the CLIs: jemalloc or huge pages for XLA's step buffers (research/hostmem.py)
    from research import hostmem

    hostmem.reexec()

import argparse
import statistics
import time

import jax

from research import config, data, flops, hostmem
from research import sharding as shd
from research import step as steplib
from research.bench import REFERENCE, compiled_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help='overrides of one variant, e.g. "model.matmul=xla"')
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    print(f"host malloc: {hostmem.status()}")
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    runs = {}
    for variant in args.variants:
        cfg = config.parse(config.compose([*REFERENCE, *variant.split()]))
        corpus = data.load(cfg.data)
        step, state, batches, _ = compiled_step(cfg, corpus, mesh)
        state, metrics = step(state, batches[0])  # warm up
        jax.block_until_ready(metrics)
        tokens = cfg.train.batch_size * cfg.data.seq_len
        per_step = tokens * flops.flops_per_token(cfg.model, corpus.vocab_size, cfg.data.seq_len)
        runs[variant] = {"step": step, "state": state, "batch": batches[0], "flops": per_step,
                         "times": [], "loss": None, "cfg": cfg}
    for _ in range(args.rounds):
        for run in runs.values():
            with steplib.awake(run["cfg"], mesh):  # as the train loop runs (train.keep_awake)
                for _ in range(2):
                    t0 = time.perf_counter()
                    run["state"], metrics = run["step"](run["state"], run["batch"])
                    jax.block_until_ready(metrics)
                    run["times"].append(time.perf_counter() - t0)
                    run["loss"] = float(metrics["loss"])
    for variant, run in runs.items():
        med, best = statistics.median(run["times"]), min(run["times"])
        print(f"{variant or '(default)':50s} median {med:.3f} s ({run['flops'] / med / 1e9:.1f} GFLOP/s)"
              f"  best {best:.3f} s ({run['flops'] / best / 1e9:.1f})  loss {run['loss']:.6f}")


if __name__ == "__main__":
    main()
