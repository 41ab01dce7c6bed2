"""Plots a person would rather look at than read.

Scaling: loss vs params, loss curves, the compute frontier (Approach 1),
IsoFLOP profiles (Approach 2). Interpretation: attention maps, the logit
lens, token attributions.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`),
not pyplot: no global state and no GUI backend, so the same code writes PNGs
on a headless machine and shows inline in a notebook. Each function saves
to `out` and returns its Path, or returns the Figure when `out` is None.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from research.analysis.fit import power_law


def _finish(fig: Figure, out: str | Path | None) -> Figure | Path:
    if out is None:
        return fig
    fig.savefig(out, dpi=110)
    return Path(out)


def _shades(values) -> dict:
    """value -> viridis colour on a log scale."""
    values = sorted(set(values))
    lo, hi = np.log(values[0]), np.log(values[-1])
    cmap = colormaps["viridis"]
    return {v: cmap(0.9 * (np.log(v) - lo) / (hi - lo) if hi > lo else 0.5) for v in values}


def _dress(ax, xlabel: str, ylabel: str, title: str, logx: bool = True, logy: bool = False,
           legend_size: int = 8) -> None:
    """Scales, labels, title, grid and legend: what every scaling plot sets the same way."""
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size)


# ---------------------------------------------------------------- scaling


def loss_vs_params(df: pd.DataFrame, fit: dict | None, x_col: str, out: str | Path | None,
                   y_col: str = "final_val_loss"):
    """`y_col` (default: final val loss) against `x_col` (log x), one colour per depth, with the fitted law if given."""
    fig = Figure(layout="constrained", figsize=(6, 4.2))
    ax = fig.add_subplot()
    depths = sorted(df["model.n_layers"].unique()) if "model.n_layers" in df else [None]
    for depth in depths:
        sub = df if depth is None else df[df["model.n_layers"] == depth]
        ax.scatter(sub[x_col], sub[y_col], label=f"{depth} layers" if depth else None, zorder=3)
    if fit:
        xs = np.geomspace(df[x_col].min() / 1.5, df[x_col].max() * 1.5, 200)
        label = f"L = {fit['E']:.3f} + {fit['A']:.3g} N^-{fit['alpha']:.3f}"
        if "ci" in fit:
            label += f"\nalpha 95% CI [{fit['ci']['alpha'][0]:.3f}, {fit['ci']['alpha'][1]:.3f}]"
        ax.plot(xs, power_law(xs, fit["E"], fit["A"], fit["alpha"]), "k--", label=label)
    ylabel = "final validation loss (nats/token)" if y_col == "final_val_loss" else \
        f"final {y_col}" + (" (bits/byte)" if y_col.endswith("/bpb") else "")
    _dress(ax, x_col.replace("_", " "), ylabel, "Loss vs model size")
    return _finish(fig, out)


def loss_curves(curves: dict[str, pd.DataFrame], sizes: dict[str, float], out: str | Path | None):
    """Train loss against step, one line per run (name -> metrics frame), coloured by size."""
    fig = Figure(layout="constrained", figsize=(6, 4.2))
    ax = fig.add_subplot()
    shade = _shades(sizes.values())
    for name, df in sorted(curves.items(), key=lambda kv: sizes[kv[0]]):
        df = df.dropna(subset=["loss"]) if "loss" in df else df
        ax.plot(df["step"], df["loss"], color=shade[sizes[name]], label=f"{name} ({sizes[name]:.3g})")
    _dress(ax, "step", "train loss", "Training curves (colour: non-embedding params)", logx=False,
           logy=True, legend_size=6)
    return _finish(fig, out)


def compute_frontier(curves: pd.DataFrame, approach1: dict, out: str | Path | None,
                     approach2: dict | None = None):
    """Left: every curve's loss against FLOPs with the envelope and its law L(C).
    Right: the envelope's N_opt(C) with the Approach 1 power law (and Approach 2's minima).

    curves: columns run_dir, N, flops, loss (`frontier.training_curves`); approach1: `fit_approach1`.
    """
    fig = Figure(layout="constrained", figsize=(11, 4.2))
    ax, ax_n = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    shade = _shades(curves["N"])
    for _, c in curves.groupby("run_dir", sort=False):
        ax.plot(c["flops"], c["loss"], color=shade[c["N"].iloc[0]], lw=1, alpha=0.8)
    env = pd.DataFrame(approach1["envelope"])
    ax.plot(env["flops"], env["loss"], "k-", lw=2.5, alpha=0.6, label="envelope (lowest loss)")
    law = approach1["loss_law"]
    cs = np.geomspace(env["flops"].min(), env["flops"].max() * 10, 100)
    ax.plot(cs, power_law(cs, law["E"], law["A"], law["alpha"]), "r--",
            label=f"L = {law['E']:.3f} + {law['A']:.3g} C^-{law['alpha']:.3f}")
    _dress(ax, "FLOPs", "train loss", "Compute frontier (colour: model size)", logy=True)
    ax_n.plot(env["flops"], env["N"], "k.", ms=4, label="envelope's best size")
    label = f"Approach 1: N_opt ~ C^{approach1['a']:.3f}"
    if "ci" in approach1:
        label += f" [{approach1['ci']['a'][0]:.2f}, {approach1['ci']['a'][1]:.2f}]"
    ax_n.plot(cs, approach1["k_N"] * cs ** approach1["a"], "k--", label=label)
    if approach2:
        prof = pd.DataFrame(approach2["profiles"])
        ax_n.plot(prof["flops"], prof["n_opt"], "rs", label="IsoFLOP minima")
        ax_n.plot(cs, approach2["k_N"] * cs ** approach2["a"], "r:",
                  label=f"Approach 2: N_opt ~ C^{approach2['a']:.3f}")
    _dress(ax_n, "FLOPs", "compute-optimal N", "Compute-optimal model size", logy=True)
    return _finish(fig, out)


def isoflop_curves(runs: pd.DataFrame, approach2: dict, out: str | Path | None, n_col: str = "params",
                   c_col: str = "train.flops_budget", loss_col: str = "final_val_loss"):
    """Left: loss against N per budget with each fitted parabola and its minimum.
    Right: the minima N_opt(C) with the fitted power law. approach2: `fit_approach2`'s dict.
    """
    fig = Figure(layout="constrained", figsize=(11, 4.2))
    ax, ax_n = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    budgets = sorted(runs[c_col].unique())
    shade = _shades(budgets)
    found = {p["flops"]: p for p in approach2["profiles"]}
    for budget in budgets:
        sub = runs[runs[c_col] == budget].sort_values(n_col)
        ax.plot(sub[n_col], sub[loss_col], "o", color=shade[budget], label=f"C = {budget:.2g}")
        if budget in found:
            log_n = np.log(sub[n_col].to_numpy(float))
            p2, p1, p0 = np.polyfit(log_n, sub[loss_col].to_numpy(float), 2)
            xs = np.linspace(log_n.min() - 0.3, log_n.max() + 0.3, 100)
            ax.plot(np.exp(xs), p0 + p1 * xs + p2 * xs**2, "-", color=shade[budget])
            ax.plot(found[budget]["n_opt"], found[budget]["loss_opt"], "k*", ms=10)
    _dress(ax, n_col.replace("_", " "), loss_col.replace("_", " "), "IsoFLOP profiles (star: fitted minimum)")
    prof = pd.DataFrame(approach2["profiles"])
    cs = np.geomspace(prof["flops"].min() / 2, prof["flops"].max() * 10, 100)
    ax_n.plot(prof["flops"], prof["n_opt"], "k*", ms=10, label="minima")
    label = f"N_opt = {approach2['k_N']:.3g} C^{approach2['a']:.3f}"
    if "ci" in approach2:
        label += f" [{approach2['ci']['a'][0]:.2f}, {approach2['ci']['a'][1]:.2f}]"
    ax_n.plot(cs, approach2["k_N"] * cs ** approach2["a"], "k--", label=label)
    _dress(ax_n, "FLOP budget C", "N_opt", "Approach 2: compute-optimal size", logy=True)
    return _finish(fig, out)


# ---------------------------------------------------------------- interpretation


def attention_maps(maps: np.ndarray, labels: list[str], out: str | Path | None = None):
    """Attention (n_layers, H, L, L) as a grid of heatmaps: rows layers, columns heads."""
    n_layers, heads, L, _ = maps.shape
    fig = Figure(layout="constrained", figsize=(2.2 * heads + 0.5, 2.2 * n_layers + 0.3))
    axes = fig.subplots(n_layers, heads, squeeze=False)
    ticks = range(L) if L <= 40 else range(0, L, max(1, L // 20))
    for layer in range(n_layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head], cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(list(ticks), [labels[i] for i in ticks], fontsize=5, rotation=90)
            ax.set_yticks(list(ticks), [labels[i] for i in ticks], fontsize=5)
    fig.supxlabel("key", fontsize=8)
    fig.supylabel("query", fontsize=8)
    return _finish(fig, out)


def logit_lens(next_logprob: np.ndarray, top1: list[list[str]], labels: list[str],
               out: str | Path | None = None):
    """Log-probability of the true next token per layer (rows) and position, with each layer's top guess.

    next_logprob: (n_layers + 1, L - 1); top1: per layer, the top token's label at each position.
    """
    n_rows, positions = next_logprob.shape
    fig = Figure(layout="constrained", figsize=(max(6, 0.35 * positions + 2), 0.5 * n_rows + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(next_logprob, aspect="auto", cmap="magma", vmax=0)
    if positions <= 48:
        for r in range(n_rows):
            for p in range(positions):
                ax.text(p, r, top1[r][p], ha="center", va="center", fontsize=6,
                        color="white" if next_logprob[r, p] < -2 else "black")
    ax.set_xticks(range(positions), [f"{labels[p]}→{labels[p + 1]}" for p in range(positions)],
                  fontsize=6, rotation=90)
    ax.set_yticks(range(n_rows), ["embed"] + [f"block {i}" for i in range(n_rows - 1)], fontsize=7)
    ax.set_title("Logit lens: log p(true next token) per layer; text = that layer's top guess")
    fig.colorbar(im, ax=ax, label="log p")
    return _finish(fig, out)


def attribution(per_token: np.ndarray, labels: list[str], title: str, out: str | Path | None = None):
    """Signed attribution per input token (L,), as bars."""
    fig = Figure(layout="constrained", figsize=(max(6, 0.3 * len(per_token)), 3))
    ax = fig.add_subplot()
    ax.bar(range(len(per_token)), per_token, color=np.where(per_token >= 0, "tab:blue", "tab:red"))
    ax.set_xticks(range(len(per_token)), labels, fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("attribution (nats)")
    ax.set_title(title, fontsize=9)
    return _finish(fig, out)


def rms_stats(metrics: pd.DataFrame, prefix: str, out: str | Path | None = None):
    """Logged per-layer statistics `prefix`* (e.g. "act_rms/") against step, one line per layer."""
    cols = sorted((c for c in metrics if c.startswith(prefix)), key=lambda c: (len(c), c))
    if not cols:
        raise ValueError(f"no {prefix}* columns in the metrics (train with train.stats_every > 0)")
    rows = metrics.dropna(subset=cols, how="all")
    fig = Figure(layout="constrained", figsize=(6, 3.5))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    for i, col in enumerate(cols):
        ax.plot(rows["step"], rows[col], "o-", color=cmap(i / max(1, len(cols) - 1)), label=col[len(prefix):])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(prefix.rstrip("/"))
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, alpha=0.3)
    return _finish(fig, out)
