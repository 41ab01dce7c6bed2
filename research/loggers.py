"""Run-directory loggers: metrics.jsonl and summary.json always; TensorBoard, W&B as backends.

`RunLogger` writes the two files analysis reads (it needs nothing else from
a run), drives the progress display, and hands every row to the backends
named in `cfg.logging.backends`. A backend is a class registered in
`BACKENDS`, built as `cls(run_dir, cfg, start_step, group)`, with the three
methods of `Backend`; adding one is one class and one registration.

Only process 0 writes; on the others every method is a no-op, so the train
loop calls them unconditionally.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging as pylogging
import math
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Protocol

import jax
import numpy as np

from research.config import Config, ConfigError, LoggingConfig
from research.registry import Registry

WANDB_MODES = ("online", "offline", "disabled")  # or None: $WANDB_MODE, else online

BACKENDS = Registry("logger backend")  # name -> class (run_dir, cfg, start_step, group) -> Backend


class Backend(Protocol):
    """Where the rows go besides metrics.jsonl.

    Rows arrive cleaned: Python scalars, no None, no "step" key.
    """

    def log(self, step: int, row: dict[str, float]) -> None: ...

    def summary(self, summary: dict) -> None: ...

    def close(self) -> None: ...


def check_backends(cfg: LoggingConfig) -> None:
    """ConfigError (one line) for a backend name that is unknown or cannot run here, or a bad W&B mode."""
    for name in cfg.backends:
        if name not in BACKENDS:
            raise ConfigError("logging.backends", f"unknown backend {name!r}; valid: {', '.join(BACKENDS.names())}")
        reason = BACKENDS.get(name).unavailable()
        if reason:
            raise ConfigError("logging.backends", f"{name}: {reason}")
    if cfg.wandb.mode is not None and cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError("logging.wandb.mode", f"unknown value {cfg.wandb.mode!r}; valid: "
                          f"{', '.join(WANDB_MODES)}, or null for $WANDB_MODE")


def _clean(value):
    """JSON-safe scalar: ints stay ints, NaN/inf become None, numpy becomes Python."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`; a kill mid-write leaves the old file, never half a new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@BACKENDS.register("tensorboard")
class TensorBoard:
    """TensorBoard event files under <run_dir>/tb (tensorboardX): train/<key>, eval/val_loss."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, group: str | None):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides what a killed attempt wrote past the restored step. It
        # reads a dir's event files in name order, and tensorboardX names them by the second
        # they were opened: the suffix keeps a restart within that second from overwriting
        # the killed attempt's file, and sorts it after.
        self.writer = SummaryWriter(logdir=str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None,
                                    filename_suffix=f".{time.time_ns()}")

    def log(self, step: int, row: dict[str, float]) -> None:
        for key, value in row.items():
            tag = "eval/val_loss" if key == "val_loss" else f"eval/{key[4:]}" if key.startswith("val/") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)

    def summary(self, summary: dict) -> None:
        pass  # TensorBoard has no run summary; summary.json holds it

    def close(self) -> None:
        self.writer.close()


def _wandb_missing() -> str | None:
    # find_spec, not import: checking a config must not pay for importing wandb.
    if importlib.util.find_spec("wandb") is None:
        return "the wandb package is not installed (pip install 'ladder[wandb]')"
    return None


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of `run_dir`: made on first use and kept in <run_dir>/wandb_id.

    A resumed or requeued run reads it back, so it continues the same W&B run.
    """
    path = run_dir / "wandb_id"
    if path.exists() and (run_id := path.read_text().strip()):
        return run_id
    # W&B ids may not contain / \ # ? % : ; base 36 as W&B's own generator.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(10))
    _write_atomic(path, run_id + "\n")
    return run_id


@BACKENDS.register("wandb", available=_wandb_missing)
class WandB:
    """Weights & Biases: one W&B run per run dir (id in <run_dir>/wandb_id), files under <run_dir>/wandb.

    Resuming uses resume="allow". W&B keeps steps increasing: after a restart
    from a checkpoint, the rows of steps a killed attempt had already sent
    (online) are dropped by W&B with a warning; metrics.jsonl has them all.
    """

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, group: str | None):
        import wandb

        w = cfg.logging.wandb
        self.run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or run_dir.name,
            group=w.group if w.group is not None else group, tags=list(w.tags),
            config=dataclasses.asdict(cfg), dir=str(run_dir), id=wandb_run_id(run_dir), resume="allow",
            mode=w.mode,  # None: W&B reads $WANDB_MODE itself, else online
            # Hydra's basic launcher runs a multirun's jobs in one process: never hand back
            # (and log into) a run an earlier job left unfinished.
            reinit="create_new",
            # quiet: a few lines at start (where the run lives), not a history table at the end;
            # console off: tqdm and our stderr lines stay out of W&B's capture.
            settings=wandb.Settings(quiet=True, console="off"),
        )

    def log(self, step: int, row: dict[str, float]) -> None:
        self.run.log(row, step=step)

    def summary(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if _is_scalar(v)})

    def close(self) -> None:
        self.run.finish()


def _is_scalar(value) -> bool:
    if isinstance(value, (bool, str, int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and math.isfinite(value)


class RunLogger:
    """Writes metrics.jsonl and summary.json, fans rows out to the backends, drives the progress bar.

    run_dir: the run directory. cfg: the run's config (logging.backends, logging.wandb).
    total_steps: the progress bar's length. start_step: the restored step (0 = fresh);
    rows past it, from an attempt that was killed, are dropped. group: the W&B group
    when logging.wandb.group is None (train.py passes the sweep's name in a multirun).
    """

    def __init__(self, run_dir: str | Path, cfg: Config, total_steps: int, start_step: int = 0,
                 group: str | None = None):
        check_backends(cfg.logging)  # on every process, so all fail alike
        # Orbax reports every save at INFO through absl; keep the console for our lines.
        pylogging.getLogger("absl").setLevel(pylogging.WARNING)
        self.enabled = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self.closed = False
        if not self.enabled:
            return
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._drop_rows_after(start_step)
        self.metrics = self.metrics_path.open("a")
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.interactive,
                        dynamic_ncols=True, unit="step")
        self.backends: list[Backend] = []
        try:
            for name in cfg.logging.backends:
                self.backends.append(BACKENDS.get(name).impl(self.run_dir, cfg, start_step, group))
        except BaseException:
            self.close()  # a W&B login failure must not leave the others' files open
            raise

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
        _write_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, row: dict) -> None:
        """One metrics row for `step`; values are scalars (Python or 0-d numpy)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in row.items()}}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        # Backends get numbers only: a diverged step's NaN is null in the jsonl, absent there.
        values = {k: v for k, v in row.items() if k != "step" and v is not None}
        for backend in self.backends:
            backend.log(step, values)
        if "val_loss" in row and not self.interactive:
            val = row["val_loss"]
            print(f"step {step}: val_loss {val:.4f}" if val is not None else f"step {step}: val_loss nan",
                  file=sys.stderr, flush=True)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Move the progress bar to `step` (on a terminal only; logs get the val_loss lines)."""
        if self.enabled and self.interactive:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.refresh()

    def summary(self, summary: dict) -> None:
        """Write summary.json (replacing it atomically) and give the backends its scalar fields."""
        if not self.enabled:
            return
        _write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        for backend in self.backends:
            backend.summary(summary)

    def close(self) -> None:
        """Flush and close everything; calling it again does nothing."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        for backend in self.backends:
            backend.close()
        self.bar.close()
        self.metrics.close()

