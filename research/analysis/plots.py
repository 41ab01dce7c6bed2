"""Plots a person would rather look at than read: loss vs params, loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on a headless machine
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from research.analysis.fit import power_law


def loss_vs_params(df: pd.DataFrame, fit: dict | None, x_col: str, out: str | Path) -> Path:
    """Final val loss against `x_col` (log x), with the fitted law if given."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    depths = sorted(df["model.n_layers"].unique()) if "model.n_layers" in df else [None]
    for depth in depths:
        sub = df if depth is None else df[df["model.n_layers"] == depth]
        ax.scatter(sub[x_col], sub["final_val_loss"], label=f"{depth} layers" if depth else None, zorder=3)
    if fit:
        xs = np.geomspace(df[x_col].min() / 1.5, df[x_col].max() * 1.5, 200)
        label = f"L = {fit['E']:.3f} + {fit['A']:.3g} N^-{fit['alpha']:.3f}"
        ax.plot(xs, power_law(xs, fit["E"], fit["A"], fit["alpha"]), "k--", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(x_col.replace("_", " "))
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("Loss vs model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def loss_curves(curves: dict[str, pd.DataFrame], sizes: dict[str, float], out: str | Path) -> Path:
    """Validation loss against tokens, one line per run, coloured by size."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    lo, hi = np.log(min(sizes.values())), np.log(max(sizes.values()))
    cmap = plt.get_cmap("viridis")
    for name, df in sorted(curves.items(), key=lambda kv: sizes[kv[0]]):
        df = df.dropna(subset=["loss"]) if "loss" in df else df
        shade = (np.log(sizes[name]) - lo) / (hi - lo) if hi > lo else 0.5
        ax.plot(df["step"], df["loss"], color=cmap(shade), label=f"{name} ({sizes[name]:.3g})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title("Training curves (colour: non-embedding params)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
