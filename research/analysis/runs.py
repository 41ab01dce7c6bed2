"""Run and sweep directories -> a pandas DataFrame, one row per run."""

from __future__ import annotations

import json
import math
import warnings
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

    Columns: run_dir, status, params, non_embedding_params, tokens, flops, final_val_loss,
    best_val_loss (lowest val_loss in metrics.jsonl), ... and every config field as
    "group.field" (e.g. model.d_model). Curves on demand: `load_curves(row.run_dir)`.
    A run without summary.json is kept: with status "failed" and its `error`
    when the sweep index (sweep.jsonl) says so, else "incomplete" (still
    running, or killed), so that nothing silently disappears from a sweep;
    `completed` picks the rows a fit may use.
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
    df = pd.DataFrame(rows)
    if not df.empty:
        df["best_val_loss"] = [best_val_loss(d) for d in df["run_dir"]]
    return df


def best_val_loss(run_dir: str | Path, key: str = "val_loss") -> float:
    """The lowest `key` (default val_loss; e.g. val/code/bpb) logged in a run's metrics.jsonl (NaN if none)."""
    path = Path(run_dir) / "metrics.jsonl"
    best = math.nan
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                value = json.loads(line).get(key)
            except (json.JSONDecodeError, AttributeError):
                continue  # a half-written last line of a killed run
            if isinstance(value, (int, float)) and math.isfinite(value) and (math.isnan(best) or value < best):
                best = float(value)
    return best


def completed(df: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The rows a fit may use: status "completed" and every named column finite.

    Every other row is left out with a warning naming its run_dir and why.
    """
    keep = df.get("status", pd.Series("incomplete", index=df.index)) == "completed"
    for col in columns:
        values = pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(math.nan, index=df.index)
        keep &= values.notna() & values.abs().ne(math.inf)
    for _, row in df[~keep].iterrows():
        error = f": {row['error']}" if isinstance(row.get("error"), str) else ""
        why = f"status {row.get('status')}{error}" if row.get("status") != "completed" else \
            f"no value for {', '.join(c for c in columns if pd.isna(row.get(c)))}"
        warnings.warn(f"left out of fits: {row['run_dir']} ({why})", stacklevel=2)
    return df[keep]


def load_dirs(dirs: list[str]) -> pd.DataFrame:
    """`load_runs(*dirs)` for a command line: ValueError (one line) for a missing dir or no runs."""
    for d in dirs:
        if not Path(d).is_dir():
            raise ValueError(f"{d}: not a directory")
    df = load_runs(*dirs)
    if df.empty:
        raise ValueError(f"{', '.join(dirs)}: no run directories (summary.json or .hydra/) found")
    return df


def _unfinished(entry: dict) -> str:
    """Status of a run with no summary.json, from its sweep-index record (if any)."""
    return "failed" if entry.get("status") == "failed" else "incomplete"


def load_curves(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl of one run as a DataFrame (one row per logged step; columns step, loss, ...)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # blank, or the half-written last line of a killed run
    return pd.DataFrame(rows)
