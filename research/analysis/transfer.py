"""Learning-rate transfer: where is the best lr at each width (or depth), per parameterization?

Reads a sweep of runs that vary `optim.lr` and one size axis (`model.d_model`
or `model.n_layers`) under one or more parameterizations (`param.name`), and
finds, for each parameterization and size, the lr with the lowest final
validation loss. `max_shift` is the largest distance between those optima
in steps of the sweep's lr grid: 0 means every size prefers the same lr,
1 means the optima span two neighbouring grid points (a factor 2 on a 2^k grid).
A run that diverged or did not finish counts as no loss at its lr; an
optimum on the edge of the grid is reported as such (it may lie beyond it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

AXES = {"model.d_model": "width", "model.n_layers": "depth"}


def size_axis(df: pd.DataFrame) -> str:
    """The size column the sweep varies: model.d_model or model.n_layers (exactly one)."""
    varying = [c for c in AXES if c in df and df[c].nunique() > 1]
    if len(varying) != 1:
        raise ValueError(f"the sweep must vary exactly one of {', '.join(AXES)}; varies: {varying or 'none'}")
    return varying[0]


def optima(df: pd.DataFrame) -> dict:
    """{param: {'axis', 'optimal_lr': {size: lr}, 'max_shift', 'edge': [sizes], 'losses': {...}}}.

    `df` is `load_runs(...)` output: one row per run, with columns param.name
    (missing = sp), optim.lr, the size axis, status and final_val_loss.
    """
    df = df.copy()
    if "param.name" not in df:
        df["param.name"] = "sp"
    df["param.name"] = df["param.name"].fillna("sp")
    needed = [c for c in ("optim.lr", "status") if c not in df]
    if needed:
        raise ValueError(f"runs lack {', '.join(needed)}: not a sweep of research.train runs")
    axis = size_axis(df)
    grid = np.sort(df["optim.lr"].dropna().unique())
    if len(grid) < 3:
        raise ValueError(f"the sweep has {len(grid)} learning rate(s); a transfer plot needs at least 3")
    ok = df["status"].eq("completed") & df.get("final_val_loss", pd.Series(np.nan, df.index)).notna()
    df["loss"] = df.get("final_val_loss", pd.Series(np.nan, df.index)).where(ok)
    out = {}
    for name, sub in df.groupby("param.name", sort=True):
        table = sub.pivot_table(index=axis, columns="optim.lr", values="loss", aggfunc="mean")
        table = table.reindex(columns=grid)
        best, edge = {}, []
        for size, row in table.iterrows():
            if row.notna().any():
                best[int(size)] = float(row.idxmin())
                if row.idxmin() in (grid[0], grid[-1]):  # a diverged neighbour does bracket it
                    edge.append(int(size))
        positions = [int(np.searchsorted(grid, lr)) for lr in best.values()]
        out[str(name)] = {
            "axis": axis,
            "optimal_lr": {str(k): v for k, v in sorted(best.items())},
            "max_shift": (max(positions) - min(positions)) if positions else None,
            "edge": sorted(edge),
            "losses": {str(int(size)): [None if pd.isna(v) else float(v) for v in row]
                       for size, row in table.iterrows()},
            "lr_grid": [float(lr) for lr in grid],
        }
    return out


def plot(result: dict, out: str | Path) -> Path:
    """Final val loss against lr (log2), a curve per size, one panel per parameterization; stars mark optima."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    all_losses = [v for r in result.values() for row in r["losses"].values() for v in row if v is not None]
    lo, hi = min(all_losses), max(all_losses)
    for ax, name in zip(axes[0], names):
        r = result[name]
        sizes = list(r["losses"])
        for i, size in enumerate(sizes):
            color = cmap(i / max(len(sizes) - 1, 1))
            ys = np.array([np.nan if v is None else v for v in r["losses"][size]])
            ax.plot(r["lr_grid"], ys, marker="o", ms=3, color=color, label=f"{AXES[r['axis']]} {size}")
            if size in r["optimal_lr"]:
                lr = r["optimal_lr"][size]
                ax.plot([lr], [ys[r["lr_grid"].index(lr)]], marker="*", ms=12, color=color, mec="k", mew=0.5)
        ax.set_xscale("log", base=2)
        ax.set_ylim(lo - 0.05 * (hi - lo), min(hi, lo + 1.5) + 0.05)  # keep the basin readable
        ax.set_title(f"{name}: max shift {r['max_shift']} grid step(s)", fontsize=10)
        ax.set_xlabel("learning rate (optim.lr)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final validation loss")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)
