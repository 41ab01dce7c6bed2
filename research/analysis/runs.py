"""Run and sweep directories -> a pandas DataFrame, one row per run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every run directory below `root` (a run dir has .hydra/ or summary.json)."""
    root = Path(root)
    marks = set(root.rglob("summary.json")) | {p / "summary.json" for p in root.rglob(".hydra")}
    found = {m.parent if m.name == "summary.json" else m for m in marks}
    found = {p.parent if p.name == ".hydra" else p for p in found}
    return sorted(found)


def load_runs(*roots: str | Path) -> pd.DataFrame:
    """One row per run below `roots`: status, counts, losses and the flattened config.

    A run without summary.json (still running, or killed) is kept with
    status "incomplete" so that nothing silently disappears from a sweep.
    """
    rows = []
    for root in roots:
        for run_dir in find_run_dirs(root):
            path = run_dir / "summary.json"
            if path.exists():
                summary = json.loads(path.read_text())
                config = summary.pop("config", {})
                summary.pop("corpus_info", None)
                summary.pop("mesh", None)
                row = {"run_dir": str(run_dir), **summary, **_flatten(config)}
            else:
                row = {"run_dir": str(run_dir), "status": "incomplete"}
            rows.append(row)
    return pd.DataFrame(rows)


def load_curves(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl of one run as a DataFrame (one row per logged step)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)
