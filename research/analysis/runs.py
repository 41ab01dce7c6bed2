"""Run and sweep directories -> a pandas DataFrame, one row per run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from research.sweep import read_index


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

    A run without summary.json is kept: with status "failed" and the error
    when the sweep index (sweep.jsonl) says so, else "incomplete" (still
    running, or killed), so that nothing silently disappears from a sweep.
    """
    rows = []
    for root in roots:
        index = {str(Path(e["run_dir"]).resolve()): e for e in read_index(root)}
        for run_dir in find_run_dirs(root):
            path = run_dir / "summary.json"
            entry = index.pop(str(run_dir.resolve()), {})
            if path.exists():
                summary = json.loads(path.read_text())
                config = summary.pop("config", {})
                summary.pop("corpus_info", None)
                summary.pop("mesh", None)
                row = {"run_dir": str(run_dir), **summary, **_flatten(config)}
            else:
                row = {"run_dir": str(run_dir), "status": _unfinished(entry)}
            if "error" in entry:
                row["error"] = entry["error"]
            rows.append(row)
        for entry in index.values():  # indexed jobs whose directory is gone
            rows.append({"run_dir": entry["run_dir"], "status": _unfinished(entry),
                         **({"error": entry["error"]} if "error" in entry else {})})
    return pd.DataFrame(rows)


def _unfinished(entry: dict) -> str:
    """Status of a run with no summary.json, from its sweep-index record (if any)."""
    return "failed" if entry.get("status") == "failed" else "incomplete"


def load_curves(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl of one run as a DataFrame (one row per logged step)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)
