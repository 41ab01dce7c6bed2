"""`python -m research.analyze report SWEEP_DIR... [--out DIR]`, `... fit --csv FILE`, `... transfer SWEEP_DIR...`.

Reads finished runs, prints a table of (params, final val loss) per run and
the fitted law L(N) = E + A * N^-alpha over non-embedding params N (Kaplan
et al. 2020's choice: embeddings distort small-model laws), and writes
report.md, fit.json and PNG plots. `fit --csv FILE` fits Chinchilla's
Approach 3 to columns params,tokens,loss and prints one JSON object.
`transfer SWEEP_DIR` finds the best lr per width (or depth) per
parameterization (analysis/transfer.py), plots loss vs lr and prints one JSON
object. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from research.analysis import fit_power_law, load_curves, load_runs
from research.analysis import plots

X_COL = "non_embedding_params"


class InputError(ValueError):
    """Bad command-line input; reported as one line with exit code 2."""


def _table(df: pd.DataFrame) -> str:
    cols = ["model.d_model", "model.n_layers", "params", X_COL, "final_val_loss", "status"]
    cols = [c for c in cols if c in df]
    view = df[cols].rename(columns={"model.d_model": "d_model", "model.n_layers": "n_layers",
                                    X_COL: "non_emb_params", "final_val_loss": "val_loss"})
    return view.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def report(dirs: list[str], out: str | None) -> dict:
    for d in dirs:
        if not Path(d).is_dir():
            raise InputError(f"{d}: not a directory")
    df = load_runs(*dirs)
    if df.empty:
        raise InputError(f"{', '.join(dirs)}: no run directories (summary.json or .hydra/) found")
    ok = df[(df["status"] == "completed") & df.get("final_val_loss", pd.Series(dtype=float)).notna()]
    skipped = df[~df.index.isin(ok.index)]
    if ok.empty:
        raise InputError(f"{', '.join(dirs)}: none of the {len(df)} runs completed; nothing to report")
    for _, row in skipped.iterrows():
        print(f"warning: skipping {row['run_dir']}: status {row['status']}", file=sys.stderr)
    ok = ok.sort_values([X_COL, "run_dir"]).reset_index(drop=True)
    out_dir = Path(out) if out else Path(dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)

    print(_table(ok))
    fit = None
    if len(ok) >= 3:
        fit = fit_power_law(ok[X_COL], ok["final_val_loss"])
        print(f"\nL(N) = E + A * N^-alpha over N = non-embedding params ({fit['n']} runs):")
        print(f"  E = {fit['E']:.4f}   A = {fit['A']:.4g}   alpha = {fit['alpha']:.4f}   "
              f"rmse(log L) = {fit['rmse_log']:.4f}")
    else:
        print(f"\n{len(ok)} completed runs: a law needs at least 3; no fit.")

    size_plot = plots.loss_vs_params(ok, fit, X_COL, out_dir / "loss_vs_params.png")
    names = {r.run_dir: Path(r.run_dir).name for r in ok.itertuples()}
    curves = {names[r]: load_curves(r) for r in ok["run_dir"]}
    sizes = {names[r.run_dir]: getattr(r, X_COL) for r in ok.itertuples()}
    curve_plot = plots.loss_curves(curves, sizes, out_dir / "loss_curves.png")

    result = {"law": "L(N) = E + A * N^-alpha", "x": X_COL, "fit": fit,
              "runs": ok[["run_dir", "params", X_COL, "final_val_loss"]].to_dict("records"),
              "skipped": skipped["run_dir"].tolist()}
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Ladder report", "", "```", _table(ok), "```", ""]
    if fit:
        md += [f"Fit over {fit['n']} runs: L(N) = {fit['E']:.4f} + {fit['A']:.4g} N^-{fit['alpha']:.4f}", ""]
    md += [f"![loss vs params]({size_plot.name})", "", f"![loss curves]({curve_plot.name})", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    print(f"\nwrote {out_dir / 'report.md'}, {out_dir / 'fit.json'}, {size_plot}, {curve_plot}")
    return result


def fit_csv(path: str, n_boot: int) -> dict:
    """`fit --csv FILE`: Chinchilla Approach 3 on columns params, tokens, loss."""
    from research.analysis.chinchilla import fit_approach3

    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        df = pd.read_csv(path)
    except Exception as err:  # empty or not CSV
        raise InputError(f"{path}: cannot read as CSV ({type(err).__name__})") from None
    missing = [c for c in ("params", "tokens", "loss") if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; need params,tokens,loss")
    try:
        values = df[["params", "tokens", "loss"]].astype(float)
    except ValueError:
        raise InputError(f"{path}: params, tokens and loss must be numbers") from None
    try:
        result = fit_approach3(values["params"], values["tokens"], values["loss"], n_boot=n_boot)
    except ValueError as err:
        raise InputError(f"{path}: {err}") from None
    print(json.dumps(result))
    return result


def transfer(dirs: list[str], out: str | None) -> dict:
    """`transfer DIR...`: optimal lr per size and parameterization; transfer.png; JSON as the last line."""
    from research.analysis import transfer as tr

    for d in dirs:
        if not Path(d).is_dir():
            raise InputError(f"{d}: not a directory")
    df = load_runs(*dirs)
    if df.empty:
        raise InputError(f"{', '.join(dirs)}: no run directories (summary.json or .hydra/) found")
    result = tr.optima(df)
    for name, r in result.items():
        axis = tr.AXES[r["axis"]]
        print(f"{name}: best lr per {axis}: " + ", ".join(f"{k}: {v:g}" for k, v in r["optimal_lr"].items())
              + f"; max shift {r['max_shift']} grid step(s)")
        if r["edge"]:
            print(f"warning: {name}: the best lr at {axis} {', '.join(map(str, r['edge']))} is on the edge "
                  "of the lr grid; the optimum may lie beyond it", file=sys.stderr)
    out_dir = Path(out) if out else Path(dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"wrote {tr.plot(result, out_dir / 'transfer.png')}", file=sys.stderr)
    summary = {name: {"axis": r["axis"], "optimal_lr": r["optimal_lr"], "max_shift": r["max_shift"],
                      "edge": r["edge"]} for name, r in result.items()}
    (out_dir / "transfer.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.analyze", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="table, fitted law and plots for sweep/run dirs")
    rep.add_argument("dirs", nargs="+", help="sweep or run directories")
    rep.add_argument("--out", help="where to write report.md, fit.json, *.png (default: first dir)")
    fit = sub.add_parser("fit", help="Chinchilla Approach 3 fit of L(N, D) from a CSV; prints JSON")
    fit.add_argument("--csv", required=True, help="CSV with columns params,tokens,loss (others ignored)")
    fit.add_argument("--boot", type=int, default=100, help="bootstrap resamples for the CIs (default 100)")
    tra = sub.add_parser("transfer", help="best lr per width/depth per parameterization; plot; prints JSON")
    tra.add_argument("dirs", nargs="+", help="sweep directories (e.g. experiment=lr_transfer)")
    tra.add_argument("--out", help="where to write transfer.png and transfer.json (default: first dir)")
    args = parser.parse_args(argv)
    try:
        if args.command == "transfer":
            transfer(args.dirs, args.out)
        elif args.command == "fit":
            fit_csv(args.csv, args.boot)
        else:
            report(args.dirs, args.out)
    except (InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
