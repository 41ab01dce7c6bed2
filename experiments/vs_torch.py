"""Our train step against PyTorch's, paired step by step: the side by side without the VM's drift.

    python experiments/vs_torch.py --torch-python PATH [--ours "OVERRIDES"] [--rounds 12] [--steps 2] [--settle 0.5]

PATH is the path, or a name on PATH, of a Python that has `torch` (CPU build); this project's environment
needs none. Two long-lived workers are started, each in its own process and
environment, as they run alone:
- ours: the reference config of `python -m research.bench`, plus `--ours`
  (space-separated overrides, e.g. "model.pos=learned model.norm=layernorm"
  for nanoGPT's positions and norm, "plugins=[cpu]" for the CPU plugin),
  compiled and warmed up; its turns run as the train loop runs them, on the
  kernels its plan resolved and inside its enabled plugins' loop hooks. With
  `plugins=[cpu]` that is MKL's kernels and the keep-awake spinners
  (`--ours "plugins=[cpu] +plugin_options.cpu.keep_awake=off"` for none), and
  the worker restarts itself with the plugin's malloc (jemalloc or huge pages,
  ladder_cpu/hostmem.py), as `python -m ladder_cpu.launch` would start it;
- PyTorch: `experiments/torch_baseline.py`'s nanoGPT step (eager), warmed up.
They then take turns: each round runs `--steps` timed steps of one, then of
the other (who goes first alternates), with `--settle` seconds of quiet
before each turn so that neither's idle threads still spin in the other's.
This machine's speed drifts by a third within minutes (docs/performance-log.md),
and two runs minutes apart differ by more than the gap being measured; here
both sides see the same minutes.

Prints a line per round (each side's median step, the ratio PyTorch / ours:
above 1 means ours is faster), then one JSON line: both medians over all
steps, model GFLOP/s (PaLM accounting on each side's own model, as
`research.bench` and `torch_baseline.py` report them), the median ratio of
the rounds, how many rounds ours won, each side's last loss, and our side's
kernels and plugins (what `research.bench` reports under those names).
"""

from __future__ import annotations

import sys


def _enables_cpu_plugin(argv: list[str]) -> bool:
    """Whether `--ours OVERRIDES` in `argv` lists the CPU plugin (plugins=[...cpu...])."""
    ours = argv[argv.index("--ours") + 1] if "--ours" in argv[:-1] else ""
    return any(o.startswith("plugins=") and "cpu" in o.split("=", 1)[1].strip("[]").split(",")
               for o in ours.split())


if __name__ == "__main__" and sys.argv[1:3] == ["--serve", "ours"] and _enables_cpu_plugin(sys.argv):
    from ladder_cpu import hostmem  # first, before JAX is imported: the malloc is chosen at start

    hostmem.reexec()

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def serve_ours(overrides: list[str]):
    """(step(i) -> loss, model FLOPs per step, description, context the steps run in) for
    the bench's reference config plus `overrides`."""
    import jax

    from research import conf, config, data, flops, hooks
    from research import sharding as shd
    from research import step as steplib
    from research.bench import REFERENCE, compiled_step

    try:  # compose checks the overrides themselves, in one line each
        cfg = config.parse(conf.compose([*REFERENCE, *overrides]))
    except config.ConfigError as err:  # before any compile, as the CLIs
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    corpus = data.load(cfg.data)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    try:
        plan = steplib.plan(cfg, corpus.vocab_size, mesh)
        loop_hooks = hooks.plugin_hooks(plan.plugins, cfg, mesh)
    except config.ConfigError as err:  # a kernel or plugin option that cannot run here
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    train_step, state, batches, _ = compiled_step(cfg, corpus, mesh, plan)
    holder = {"state": state}

    def step(i: int) -> float:
        holder["state"], metrics = train_step(holder["state"], batches[i % 2])
        return float(metrics["loss"])  # waits for the step

    seq_len = cfg.data.seq_len
    per_step = cfg.train.batch_size * seq_len * flops.flops_per_token(cfg.model, corpus.vocab_size, seq_len)
    about = {"about": f"jax {jax.__version__}, kernels {plan.kernels}, overrides {overrides}",
             "kernels": plan.kernels, "plugins": {p.name: p.describe(cfg, mesh) for p in plan.plugins}}
    return step, per_step, about, lambda: hooks.running(loop_hooks, 0)


def serve_torch():
    """(step(i) -> loss, model FLOPs per step, description, context) for torch_baseline.py's
    eager step."""
    sys.path.insert(0, str(HERE))
    import torch
    import torch_baseline as tb

    return (tb.make_step(), tb.BATCH * tb.SEQ * tb.flops_per_token(),
            {"about": f"torch {torch.__version__}"}, contextlib.nullcontext)


def serve(side: str, overrides: list[str]) -> None:
    """Worker: build and warm up, print one JSON line, then for each line N on stdin,
    run N steps timed one by one and print their times and the last loss."""
    step, per_step, about, context = serve_ours(overrides) if side == "ours" else serve_torch()
    done = 0
    with context():
        for _ in range(2):  # warm-up (ours has compiled already)
            step(done)
            done += 1
    print(json.dumps({"flops_per_step": per_step, **about}), flush=True)
    for line in sys.stdin:
        times, loss = [], None
        with context():  # as the train loop runs (ours: the plugins' hooks), only for its turn
            for _ in range(int(line)):
                t0 = time.perf_counter()
                loss = step(done)
                times.append(time.perf_counter() - t0)
                done += 1
        print(json.dumps({"times": times, "loss": loss}), flush=True)


class Worker:
    """A serving process and its replies (one JSON line per request)."""

    def __init__(self, name: str, python: str, *args: str):
        self.name, self.times, self.loss = name, [], None
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--serve", name, *args],
                                     cwd=HERE.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"vs_torch: the {self.name} worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> list[float]:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        reply = self._reply()
        self.times += reply["times"]
        self.loss = reply["loss"]
        return reply["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-python", help="a Python interpreter that has torch (required)")
    ap.add_argument("--ours", default="", help="overrides of our config, space-separated")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds of quiet before each turn")
    ap.add_argument("--serve", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.ours.split())
        return 0
    if args.torch_python is None:
        raise SystemExit("vs_torch: --torch-python PATH is required (a Python that has torch)")
    for name, value in (("--rounds", args.rounds), ("--steps", args.steps)):
        if value < 1:
            raise SystemExit(f"vs_torch: {name} must be at least 1, got {value}")
    if args.settle < 0:
        raise SystemExit(f"vs_torch: --settle must be >= 0 seconds, got {args.settle}")
    python = shutil.which(args.torch_python)
    if python is None:
        raise SystemExit(f"vs_torch: --torch-python {args.torch_python}: no such executable")
    # One at a time, so that neither's set-up (our compile) overlaps the other's.
    ours = Worker("ours", sys.executable, "--ours", args.ours)
    theirs = Worker("torch", python)
    ratios = []
    try:
        for r in range(args.rounds):
            med = {}
            for w in (ours, theirs) if r % 2 == 0 else (theirs, ours):
                time.sleep(args.settle)
                med[w.name] = statistics.median(w.run(args.steps))
            ratios.append(med["torch"] / med["ours"])
            print(f"round {r + 1:2d}: ours {med['ours']:.3f} s  torch {med['torch']:.3f} s  "
                  f"torch/ours {ratios[-1]:.3f}", flush=True)
    finally:
        ours.close()
        theirs.close()
    summary = {"rounds": args.rounds, "steps_per_round": args.steps,
               "ours": ours.info["about"], "torch": theirs.info["about"],
               "ours_kernels": ours.info["kernels"], "ours_plugins": ours.info["plugins"],
               "ratio_torch_over_ours_median": statistics.median(ratios),
               "ratio_min_max": [min(ratios), max(ratios)],
               "rounds_ours_faster": sum(x > 1 for x in ratios)}
    for w in (ours, theirs):
        step_s = statistics.median(w.times)
        summary[f"{w.name}_step_s"] = step_s
        summary[f"{w.name}_gflops"] = w.info["flops_per_step"] / step_s / 1e9
        summary[f"{w.name}_last_loss"] = w.loss
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
