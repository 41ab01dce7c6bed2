"""The sweep index: `<sweep dir>/sweep.jsonl`, one JSON line per job of a multirun.

Each job appends its own records from whatever process or host runs it
(basic, joblib and SLURM launchers alike): "running" when it starts, then
its outcome ("completed", "failed" with the error, "diverged",
"preempted"). Appends are single `write` calls on an O_APPEND file, so
concurrent jobs do not interleave lines; the latest record of a run dir
wins. When the whole multirun ends, `SweepCallback` (registered in
conf/train.yaml) rewrites the file with one line per job and prints a
one-line tally; a sweep with failed jobs exits 1 after all jobs ran.

Re-running the same multirun command resumes the sweep: a job whose run dir
holds a completed summary.json for the same config is skipped, and an
interrupted one resumes from its checkpoints (train.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

INDEX = "sweep.jsonl"
MAX_DIRNAME = 200  # bytes; most filesystems refuse names over 255


def job_dirname(override_dirname: str) -> str:
    """A job's directory name: its overrides (`k=v,k=v`), shortened with a hash if too long.
    A `/` in a value (a path: data.path=data/web) is written `%2F`, so each job is one directory,
    and the glob metacharacters of a list or pattern (`[`, `]`, `*`, `?`) as `%5B`, `%5D`, `%2A`,
    `%3F`: Orbax cannot read back checkpoints below a `[` (checkpoint.check_directory).

    Used as `${ladder_dirname:${hydra:job.override_dirname}}` in conf/train.yaml.
    """
    name = (override_dirname or "default").replace("%", "%25")
    for char, code in (("/", "%2F"), ("[", "%5B"), ("]", "%5D"), ("*", "%2A"), ("?", "%3F")):
        name = name.replace(char, code)
    if len(name.encode()) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return name.encode()[: MAX_DIRNAME - 11].decode(errors="ignore") + "~" + digest


OmegaConf.register_new_resolver("ladder_dirname", job_dirname, replace=True)


def record(sweep_dir: str | Path, entry: dict) -> None:
    """Append one record (a dict with at least run_dir and status) to the index."""
    line = json.dumps({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(sweep_dir) / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_index(sweep_dir: str | Path) -> list[dict]:
    """The latest record per run dir, in job order; [] without an index.

    A line cut short (a job killed mid-write) is skipped.
    """
    path = Path(sweep_dir) / INDEX
    if not path.exists():
        return []
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "run_dir" in entry:
            latest[entry["run_dir"]] = entry
    return sorted(latest.values(), key=lambda e: (e.get("job", 0), e["run_dir"]))


def completed_summary(run_dir: str | Path, config: dict) -> dict | None:
    """The run's summary if it already completed with exactly `config`, else None."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if summary.get("status") == "completed" and summary.get("config") == config:
        return summary
    return None


def tally(entries: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    return counts


class SweepCallback(Callback):
    """At the end of a multirun: compact the index, print a tally, fail if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        entries = read_index(sweep_dir)
        if not entries:
            return
        tmp = sweep_dir / f".{INDEX}.tmp"
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.replace(tmp, sweep_dir / INDEX)
        counts = tally(entries)
        print(f"sweep: {len(entries)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
              + f"; index: {sweep_dir / INDEX}", file=sys.stderr)
        bad = {s: n for s, n in counts.items() if s in ("failed", "diverged")}
        if bad:
            raise SystemExit(1)
