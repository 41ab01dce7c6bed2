"""Start-up cost against depth: a 1-step run of `python -m research.train` at several depths.

    python experiments/depth_cost.py [--layers 2 8 32] [OVERRIDES...]

Each depth runs in its own process, as a user's run does, on the default model
(d_model 128) with synthetic data, one step, no evaluation before the end.
Prints one JSON line per depth: the whole process's wall time, and from its
summary.json the state initialisation (`init_s`: the initialiser's compile and
run) and the train step's compile (`compile_s`); then the ratio of the deepest
run's wall time to the shallowest's. The blocks are one scanned layer
(model.py), so the compiled programs hold one block whatever the depth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = ("data=synthetic", "train.steps=1", "schedule.warmup=0", "train.eval_every=0",
        "train.eval_batches=1", "train.log_every=1", "train.batch_size=8", "mesh=single")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    args, overrides = parser.parse_known_args(argv)
    walls = {}
    with tempfile.TemporaryDirectory(prefix="ladder-depth-") as tmp:
        for n in args.layers:
            run_dir = Path(tmp) / f"layers{n}"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "research.train", *BASE, f"model.n_layers={n}",
                                   *overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return proc.returncode
            summary = json.loads((run_dir / "summary.json").read_text())
            walls[n] = wall
            print(json.dumps({"n_layers": n, "wall_s": round(wall, 2), "init_s": round(summary["init_s"], 2) if "init_s" in summary else None,
                              "compile_s": round(summary["compile_s"], 2),
                              "params": summary["params"]}), flush=True)
    lo, hi = min(walls), max(walls)
    print(json.dumps({"wall_ratio": round(walls[hi] / walls[lo], 2), "deep": hi, "shallow": lo}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
