"""Which ladders predict well? Refit Approach 3 on every sub-ladder of a grid of runs and
score its predictions of the grid's larger-compute rows (experiments/prediction.md).

A grid is a sweep of widths, each one long WSD run with cooldown branches (every run is a
row per budget: `load_runs`). A sub-ladder is a contiguous range of at least `--min-sizes`
sizes and `--min-budgets` budgets of the grid. Each sub-ladder is fitted once; every row
of the grid (or of `--heldout` runs) whose compute 6ND is at least `--factor` times the
sub-ladder's largest compute, and whose N or D lies outside it, is predicted and compared.

    python experiments/prediction_designs.py runs/grid [--heldout runs/predict/heldout]
        [--factor 2] [--min-sizes 3] [--min-budgets 3] [--boot 0] [--csv designs.csv] [--plot designs.png]

Prints one line per (sub-ladder, target): sizes and budgets fitted, compute ratio,
predicted, actual, signed error; then the median |error| by number of sizes, number of
budgets and smallest budget fitted. `--boot N` adds each prediction's 95% interval;
`--plot` draws the error against the compute ratio, one colour per smallest budget fitted.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import pandas as pd

from research.analysis.chinchilla import fit_approach3
from research.analysis.predict import law, predict_loss
from research.analysis.runs import completed, load_runs


def grid_rows(dirs: list[str], n_col: str = "params") -> pd.DataFrame:
    """(params, tokens, loss) of every completed run and branch below `dirs`."""
    frames = [completed(load_runs(d), n_col, "tokens", "final_val_loss") for d in dirs]
    df = pd.concat(frames, ignore_index=True)[[n_col, "tokens", "final_val_loss"]].astype(float)
    df.columns = ["params", "tokens", "loss"]
    return df.drop_duplicates(["params", "tokens"]).sort_values(["params", "tokens"]).reset_index(drop=True)


def ranges(values, least: int) -> list[tuple]:
    """Every contiguous run of at least `least` of the sorted `values`."""
    values = sorted(values)
    return [tuple(values[i:j]) for i in range(len(values)) for j in range(i + least, len(values) + 1)]


def score(grid: pd.DataFrame, heldout: pd.DataFrame, factor: float, min_sizes: int, min_budgets: int,
          boot: int) -> pd.DataFrame:
    """One row per (sub-ladder, target) prediction."""
    pool = pd.concat([grid, heldout], ignore_index=True).drop_duplicates(["params", "tokens"])
    out = []
    for sizes in ranges(grid["params"].unique(), min_sizes):
        for budgets in ranges(grid["tokens"].unique(), min_budgets):
            rows = grid[grid["params"].isin(sizes) & grid["tokens"].isin(budgets)]
            if len(rows) < 5:
                continue
            largest = float((6 * rows["params"] * rows["tokens"]).max())
            outside = (pool["params"] > max(sizes)) | (pool["tokens"] > max(budgets))
            targets = pool[outside & (6 * pool["params"] * pool["tokens"] >= factor * largest)]
            if targets.empty:
                continue
            if boot:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # extrapolation warnings: the ratio is in the table
                    fit = predict_loss(rows["params"], rows["tokens"], rows["loss"],
                                       targets=targets[["params", "tokens"]].to_numpy(), n_boot=boot)
            else:  # the point predictions only: one fit, no bootstrap
                one = fit_approach3(rows["params"], rows["tokens"], rows["loss"], n_boot=0)
                fit = {"fit": one, "predictions": [{"loss": float(law(one, n, d))}
                                                   for n, d in zip(targets["params"], targets["tokens"])]}
            for (_, t), p in zip(targets.iterrows(), fit["predictions"]):
                entry = {"sizes": len(sizes), "budgets": len(budgets), "n_min": min(sizes), "n_max": max(sizes),
                         "d_min": min(budgets), "d_max": max(budgets), "target_n": t["params"],
                         "target_d": t["tokens"], "compute_ratio": 6 * t["params"] * t["tokens"] / largest,
                         "E": fit["fit"]["E"], "predicted": p["loss"], "actual": t["loss"],
                         "error": (p["loss"] - t["loss"]) / t["loss"]}
                if boot:
                    entry.update(ci_lo=p["ci"][0], ci_hi=p["ci"][1], inside=p["ci"][0] <= t["loss"] <= p["ci"][1])
                out.append(entry)
    return pd.DataFrame(out)


def plot(table: pd.DataFrame, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted(table["d_min"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    for color, d in zip(colors, budgets):
        part = table[table["d_min"] == d]
        ax.scatter(part["compute_ratio"], 100 * part["error"], s=14, color=color, alpha=0.8,
                   label=f"smallest budget {d:.3g} tokens")
    ax.axhspan(-2, 2, color="grey", alpha=0.15, lw=0, label="within 2%")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("target compute / sub-ladder's largest compute")
    ax.set_ylabel("(predicted - actual) / actual, %")
    ax.set_title(f"Approach 3 on {table.groupby(['n_min', 'n_max', 'd_min', 'd_max']).ngroups} sub-ladders")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="sweep or run directories of the grid")
    ap.add_argument("--heldout", nargs="*", default=[], help="run directories that are only predicted")
    ap.add_argument("--factor", type=float, default=2.0, help="least compute ratio of a target (default 2)")
    ap.add_argument("--min-sizes", type=int, default=3)
    ap.add_argument("--min-budgets", type=int, default=3)
    ap.add_argument("--boot", type=int, default=0, help="bootstrap resamples for intervals (0: none, else >= 10)")
    ap.add_argument("--n-col", default="params", help="params or non_embedding_params")
    ap.add_argument("--csv", help="also write every prediction here")
    ap.add_argument("--plot", help="also draw the errors here (a .png)")
    args = ap.parse_args(argv)
    try:
        grid = grid_rows(args.dirs, args.n_col)
        held = grid_rows(args.heldout, args.n_col) if args.heldout else grid.iloc[:0]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if grid["params"].nunique() < args.min_sizes or grid["tokens"].nunique() < args.min_budgets:
        print(f"error: {args.dirs}: the grid has {grid['params'].nunique()} sizes and {grid['tokens'].nunique()} "
              f"budgets; --min-sizes {args.min_sizes} and --min-budgets {args.min_budgets} need more",
              file=sys.stderr)
        return 2
    table = score(grid, held, args.factor, args.min_sizes, args.min_budgets, args.boot)
    if table.empty:
        print(f"error: no target has {args.factor:g}x a sub-ladder's compute; lower --factor or add --heldout",
              file=sys.stderr)
        return 2
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.plot:
        plot(table, args.plot)
    pd.set_option("display.width", 200)
    shown = table.assign(error=(100 * table["error"]).round(2))
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    abs_err = 100 * table["error"].abs()
    for key in ("sizes", "budgets", "d_min"):
        med = abs_err.groupby(table[key]).median()
        print(f"median |error| % by {key}: " + ", ".join(f"{k:g}: {v:.2f}" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
