"""Run-directory writers: metrics.jsonl, TensorBoard events, summary.json, progress.

Only process 0 writes; on the others every method is a no-op, so the train
loop calls them unconditionally.
"""

from __future__ import annotations

import json
import logging as pylogging
import math
import sys
from pathlib import Path

import jax
import numpy as np


def _clean(value):
    """JSON-safe scalar: ints stay ints, NaN/inf become None, numpy becomes Python."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


class RunLogger:
    """Appends metric rows to metrics.jsonl and TensorBoard, and drives the progress bar."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0):
        # Orbax reports every save at INFO through absl; keep the console for our lines.
        pylogging.getLogger("absl").setLevel(pylogging.WARNING)
        self.enabled = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._drop_rows_after(start_step)
        self.metrics = self.metrics_path.open("a")
        # purge_step: TensorBoard hides what a killed attempt wrote past the restored step.
        self.tb = SummaryWriter(logdir=str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.interactive,
                        dynamic_ncols=True, unit="step")

    def _drop_rows_after(self, step: int) -> None:
        """On resume, forget rows a killed attempt logged past the restored step.

        A kill can also leave half a line at the end; it is dropped too. The
        file is replaced atomically, so a kill now cannot lose the kept rows.
        """
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)

    def log(self, step: int, row: dict) -> None:
        """One metrics row for `step` (values are scalars)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in row.items()}}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        for key, value in row.items():
            if key != "step" and value is not None:
                self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "eval/val_loss", value, step)
        if "val_loss" in row and not self.interactive:
            print(f"step {step}: val_loss {row['val_loss']:.4f}", file=sys.stderr, flush=True)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.enabled and self.interactive:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.refresh()

    def summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        tmp.replace(self.run_dir / "summary.json")

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.metrics.close()
        self.tb.close()
