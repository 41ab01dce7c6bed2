"""Chinchilla Approach 1: the compute frontier, the envelope of training curves.

Hoffmann et al. (2022, arXiv:2203.15556, sec. 3.1): put every run's training
curve on a FLOP axis (C = FLOPs per token x tokens seen), and for each FLOP
count keep the run with the lowest loss. That envelope says which model size
N and token count D are best at each compute budget; power laws fitted to it
give N_opt(C) = k_N C^a and D_opt(C) = k_D C^b. Fitting E + A C^-alpha to the
envelope's losses gives the loss one can expect at a larger budget.

Curves are compared on a shared log-spaced FLOP grid: each run's loss is
interpolated linearly in (log C, log L) between its logged steps and never
extrapolated past them. Only FLOP counts that at least `min_runs` runs reach
are kept, so a point of the envelope is a choice among sizes, not the one
run that happens to be the only one there. Confidence intervals resample
whole runs (a curve's points are not independent) and recompute the envelope.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from research.analysis.fit import fit_loglinear, fit_power_law
from research.analysis.runs import load_curves

CURVE_COLUMNS = ("run_dir", "N", "flops", "tokens", "loss")


def training_curves(runs: pd.DataFrame, n_col: str = "non_embedding_params",
                    loss_col: str = "loss", smooth: int = 1) -> pd.DataFrame:
    """Runs (one row each, from `load_runs`) -> their curves, one row per logged step.

    Columns: run_dir, N (from `n_col`), flops (= flops_per_token x tokens), tokens, loss
    (metrics.jsonl's `loss_col`: "loss" is the train loss, "val_loss" the eval loss).
    smooth > 1: centred running mean over that many logged points, as Hoffmann et al.
    smooth theirs: a logged train loss is one batch's, and the envelope would chase its noise.
    """
    needed = [c for c in ("run_dir", n_col) if c not in runs]
    if needed or not ({"flops_per_token"} <= set(runs) or {"flops", "tokens"} <= set(runs)):
        missing = needed or ["flops_per_token"]
        raise ValueError(f"missing column(s) {', '.join(missing)} in the runs' summaries")
    frames = []
    for row in runs.to_dict("records"):
        per_token = row.get("flops_per_token")
        if per_token is None or not np.isfinite(per_token):
            per_token = row["flops"] / row["tokens"]
        curve = load_curves(row["run_dir"])
        for col in ("tokens", loss_col):
            if col not in curve:
                raise ValueError(f"{Path(row['run_dir']) / 'metrics.jsonl'}: no {col!r} column")
        curve = curve.dropna(subset=["tokens", loss_col])
        curve = curve[curve["tokens"] > 0].sort_values("tokens")
        if smooth > 1:
            curve = curve.assign(**{loss_col: curve[loss_col].rolling(smooth, center=True, min_periods=1).mean()})
        frames.append(pd.DataFrame({
            "run_dir": row["run_dir"], "N": float(row[n_col]),
            "flops": curve["tokens"].to_numpy(float) * float(per_token),
            "tokens": curve["tokens"].to_numpy(float), "loss": curve[loss_col].to_numpy(float)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CURVE_COLUMNS)


def _check(curves: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in CURVE_COLUMNS if c not in curves]
    if missing:
        raise ValueError(f"curves: missing column(s) {', '.join(missing)}")
    values = curves[["N", "flops", "tokens", "loss"]].to_numpy(float)
    if len(values) == 0:
        raise ValueError("curves: no points")
    if not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError("curves: N, flops, tokens and loss must be finite and positive")
    # The answer must not depend on row order: runs by (N, name), points by FLOPs.
    return curves.sort_values(["N", "run_dir", "flops", "loss"], kind="stable").reset_index(drop=True)


def _grid(curves: pd.DataFrame, points: int) -> tuple[np.ndarray, list, np.ndarray, np.ndarray]:
    """Log-FLOP grid and every run's log loss on it, NaN outside its logged range: (G,), runs, (R, G), (R,)."""
    runs = list(dict.fromkeys(curves["run_dir"]))
    lo, hi = np.log(curves["flops"].min()), np.log(curves["flops"].max())
    grid = np.linspace(lo, hi, points)
    loss_RxG = np.full((len(runs), points), np.nan)
    n_R = np.empty(len(runs))
    for r, (name, curve) in enumerate(curves.groupby("run_dir", sort=False)):
        # Several points at one FLOP count (a re-logged step): keep their mean.
        curve = curve.groupby("flops", as_index=False).agg(loss=("loss", "mean"), N=("N", "first"))
        log_c, log_l = np.log(curve["flops"].to_numpy()), np.log(curve["loss"].to_numpy())
        inside = (grid >= log_c[0]) & (grid <= log_c[-1])
        loss_RxG[r, inside] = np.interp(grid[inside], log_c, log_l)
        n_R[r] = curve["N"].iloc[0]
    return grid, runs, loss_RxG, n_R


def _frontier(grid, loss_RxG, rows, min_runs: int):
    """Grid indices reached by >= min_runs of `rows`, and the best row at each."""
    sub = loss_RxG[rows]
    reached = np.isfinite(sub).sum(0) >= min_runs
    cols = np.flatnonzero(reached)
    best = np.argmin(np.where(np.isfinite(sub[:, cols]), sub[:, cols], np.inf), axis=0)  # first of ties
    return cols, np.asarray(rows)[best]


def envelope(curves: pd.DataFrame, points: int = 100, min_runs: int = 2) -> pd.DataFrame:
    """The lowest loss at each FLOP count over all curves.

    curves: columns run_dir, N, flops, tokens, loss (see `training_curves`).
    Returns one row per grid FLOP count reached by >= `min_runs` runs, with columns
    flops, loss, N, tokens (= flops / the run's FLOPs per token), run_dir of the best run.
    """
    curves = _check(curves)
    grid, runs, loss_RxG, n_R = _grid(curves, points)
    cols, best = _frontier(grid, loss_RxG, np.arange(len(runs)), min_runs)
    if len(cols) == 0:
        raise ValueError(f"no FLOP count is reached by {min_runs} runs: the curves do not overlap")
    per_token = (curves["flops"] / curves["tokens"]).groupby(curves["run_dir"], sort=False).first()
    flops = np.exp(grid[cols])
    return pd.DataFrame({
        "flops": flops, "loss": np.exp(loss_RxG[best, cols]), "N": n_R[best],
        "tokens": flops / per_token.loc[[runs[b] for b in best]].to_numpy(),
        "run_dir": [runs[b] for b in best]})


def fit_approach1(curves: pd.DataFrame, points: int = 100, min_runs: int = 2, n_boot: int = 0,
                  seed: int = 0) -> dict:
    """Approach 1: N_opt = k_N C^a and D_opt = k_D C^b on the envelope, and L(C) = E + A C^-alpha.

    curves: as for `envelope`. Returns {"a", "k_N", "b", "k_D", "loss_law": fit_power_law's dict,
    "envelope": records of `envelope`, "sizes": distinct N on it} (+ "ci" for a, b with n_boot > 0,
    resampling whole runs).
    """
    env = envelope(curves, points, min_runs)
    if env["N"].nunique() < 2:
        raise ValueError(f"the envelope uses {env['N'].nunique()} model size(s); Approach 1 needs at least 2 "
                         "(runs of more sizes, or curves that overlap in FLOPs)")
    n_law = fit_loglinear(env["flops"], env["N"])
    d_law = fit_loglinear(env["flops"], env["tokens"])
    result = {"a": n_law["a"], "k_N": n_law["k"], "b": d_law["a"], "k_D": d_law["k"],
              "loss_law": fit_power_law(env["flops"], env["loss"]),
              "sizes": int(env["N"].nunique()), "envelope": env.to_dict("records")}
    if n_boot > 0:
        sorted_curves = _check(curves)
        grid, runs, loss_RxG, n_R = _grid(sorted_curves, points)
        rng = np.random.default_rng(seed)
        a_s, b_s = [], []
        per_token = (sorted_curves["flops"] / sorted_curves["tokens"]).groupby(
            sorted_curves["run_dir"], sort=False).first().loc[runs].to_numpy()
        for _ in range(n_boot):
            rows = np.unique(rng.integers(0, len(runs), len(runs)))  # a repeated run changes no minimum
            cols, best = _frontier(grid, loss_RxG, rows, min(min_runs, len(rows)))
            if len(np.unique(n_R[best])) < 2:
                continue
            flops = np.exp(grid[cols])
            a_s.append(np.polyfit(np.log(flops), np.log(n_R[best]), 1)[0])
            b_s.append(np.polyfit(np.log(flops), np.log(flops / per_token[best]), 1)[0])
        if a_s:
            result["ci"] = {"a": [float(np.percentile(a_s, 2.5)), float(np.percentile(a_s, 97.5))],
                            "b": [float(np.percentile(b_s, 2.5)), float(np.percentile(b_s, 97.5))]}
    return result
