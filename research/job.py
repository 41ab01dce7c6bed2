"""One Hydra job around `train.run`: the sweep index, exit codes, failures and preemption.

`run_job(cfg, run)` is what `python -m research.train` does with a composed config. Alone,
a job exits with the codes of docs/runs.md. In a multirun, a job that fails is recorded in
the sweep index (sweep.py) and the sweep goes on; the job's return value (final val loss,
None if it failed) is what sweepers such as Optuna minimise.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from research import checkpoint as ckpt
from research import cluster, config, preemption, sweep
from research.config import ConfigError

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3
EXIT_CHECKPOINT_FAILED = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; a restart continues exactly


def run_job(cfg: DictConfig, run: Callable[..., dict]) -> float | None:
    """Run one job with `run(cfg, run_dir, skip_completed=, sweep_group=)` (train.run)."""
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    writer = multirun and _process_hint(cfg) == 0

    def index(status: str, **extra) -> None:
        if writer:
            entry = {"job": hc.job.num, "overrides": list(hc.overrides.task), "run_dir": run_dir}
            sweep.record(hc.sweep.dir, {**entry, "status": status, **extra})

    slots = cluster.local_parallel_slots(hc.launcher) if multirun else None
    if slots:
        cluster.pin_local_job(Path(hc.sweep.dir) / ".slots", slots)
    index("running")
    try:
        summary = run(cfg, run_dir, skip_completed=multirun,
                      sweep_group=Path(hc.sweep.dir).name if multirun else None)
    except (ConfigError, ckpt.CheckpointError) as err:
        prefix = "config error" if isinstance(err, ConfigError) else "error"
        index("failed", error=f"{prefix}: {err}")
        if multirun or isinstance(err, ConfigError):
            print(f"{prefix}: {err}", file=sys.stderr)
            if multirun:
                return None
            sys.exit(EXIT_CONFIG_ERROR)
        # Orbax's writer threads of the failed save print "Event loop is closed" tracebacks
        # (through logging handlers too), at teardown and sometimes just as the error is
        # printed. Point file descriptor 2 at /dev/null for them, write the error to the real
        # stderr on a fresh line, and leave at once (run closed the logs): it stays last.
        sys.stdout.flush()
        sys.stderr.flush()
        stderr_fd = os.dup(2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        os.write(stderr_fd, f"\n{prefix}: {err}\n".encode())
        os._exit(EXIT_CHECKPOINT_FAILED)
    except Exception as err:  # anything else (e.g. out of memory): record it, keep the sweep going
        index("failed", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if not multirun:
            raise
        traceback.print_exc()
        return None
    index(summary["status"], final_val_loss=summary["final_val_loss"], skipped=summary.get("skipped", False))
    if summary["status"] == "preempted":
        preemption.forward(summary["stop_signal"])  # e.g. submitit requeues the job here
        sys.exit(EXIT_PREEMPTED)  # stops a multirun too: the machine is going away
    if summary["status"] == "diverged" and not multirun:
        sys.exit(EXIT_DIVERGED)
    return summary["final_val_loss"]



def _process_hint(cfg: DictConfig) -> int:
    """This process's index, known before JAX starts (config or cluster environment, as
    cluster.init_args reads them): only process 0 writes the sweep index."""
    try:
        return cluster.process_id_hint(config.parse(cfg).distributed)
    except ConfigError:
        return cluster.process_id_hint(config.DistributedConfig())
