"""`python -m research.analyze report SWEEP_DIR... [--out DIR] [--metric M]`, `... fit --csv FILE [--metric M]`,
`... predict`, `... transfer SWEEP_DIR...`.

`report` reads finished runs, prints a table and the fitted laws, and writes
report.md, fit.json and PNG plots (research/analysis/report.py says which);
`--metric` fits another summary.json value than final_val_loss (e.g.
val/code/bpb). `fit --csv FILE` fits Chinchilla's Approach 3 to columns
params,tokens,loss (or the column `--metric`) and prints one JSON object.
`predict (SWEEP_DIR... | --csv FILE) (--params N --tokens D | --flops C | --targets FILE)`
fits Approach 3 once and prints one JSON line per target: the predicted loss, its
bootstrap 95% interval and the fit (analysis/predict.py); a target past
--max-extrapolation x the largest fitted N, D or C warns on stderr.
`transfer SWEEP_DIR` finds the best lr per width
(or depth) per parameterization (analysis/transfer.py), plots loss vs lr and
prints one JSON object. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from research.analysis.runs import load_dirs


class InputError(ValueError):
    """Bad command-line input; reported as one line with exit code 2."""


def report(dirs: list[str], out: str | None, metric: str = "final_val_loss") -> dict:
    """`report DIR... [--out DIR] [--metric M]`: see research/analysis/report.py."""
    from research.analysis.report import write_report

    return write_report(dirs, out, metric)


def _read_csv(path: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """The numeric `columns` of CSV `path`; InputError (one line) if it cannot be had."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        df = pd.read_csv(path)
    except Exception as err:  # empty or not CSV
        raise InputError(f"{path}: cannot read as CSV ({type(err).__name__})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; need {','.join(columns)}")
    try:
        return df[list(columns)].astype(float)
    except ValueError:
        raise InputError(f"{path}: {', '.join(columns)} must be numbers") from None


def fit_csv(path: str, n_boot: int, metric: str = "loss") -> dict:
    """`fit --csv FILE [--metric M]`: Chinchilla Approach 3 on columns params, tokens and `metric` (loss)."""
    from research.analysis.chinchilla import fit_approach3

    values = _read_csv(path, ("params", "tokens", metric))
    try:
        result = fit_approach3(values["params"], values["tokens"], values[metric], n_boot=n_boot)
    except ValueError as err:
        raise InputError(f"{path}: {err}") from None
    print(json.dumps(result))
    return result


def predict(args: argparse.Namespace) -> list[dict]:
    """`predict`: one JSON line per target (loss, ci, the target, beyond, fit); warnings on stderr."""
    import warnings

    from research.analysis import predict as pr
    from research.analysis.runs import completed

    point = args.params is not None or args.tokens is not None
    if sum((point, args.flops is not None, args.targets is not None)) != 1:
        raise InputError("give one of --params N --tokens D, --flops C, --targets FILE")
    if point and (args.params is None or args.tokens is None):
        raise InputError(f"--{'tokens' if args.tokens is None else 'params'} is required with "
                         f"--{'params' if args.tokens is None else 'tokens'}")
    if bool(args.dirs) == bool(args.csv):
        raise InputError("give either SWEEP_DIR... or --csv FILE (not both)")
    if args.max_extrapolation <= 1:
        raise InputError(f"--max-extrapolation must be > 1, got {args.max_extrapolation}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.csv:
            rows = _read_csv(args.csv, ("params", "tokens", "loss"))
            where = args.csv
        else:
            df = load_dirs(args.dirs)
            if args.n_col not in df:
                raise InputError(f"{', '.join(args.dirs)}: no column {args.n_col} in the runs' summary.json")
            ok = completed(df, args.n_col, "tokens", "final_val_loss")
            rows = pd.DataFrame({"params": ok[args.n_col], "tokens": ok["tokens"], "loss": ok["final_val_loss"]})
            where = ", ".join(args.dirs)
        targets = flops = None
        if args.targets:
            targets = _read_csv(args.targets, ("params", "tokens")).to_numpy()
        elif args.flops is not None:
            flops = [args.flops]
        else:
            targets = [(args.params, args.tokens)]
        try:
            result = pr.predict_loss(rows["params"], rows["tokens"], rows["loss"], targets=targets, flops=flops,
                                n_boot=args.boot, max_factor=args.max_extrapolation)
        except ValueError as err:
            raise InputError(f"{where}: {err}") from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr, flush=True)
    lines = [{**p, "fit": result["fit"]} for p in result["predictions"]]
    for line in lines:
        print(json.dumps(line))
    return lines


def transfer(dirs: list[str], out: str | None) -> dict:
    """`transfer DIR...`: optimal lr per size and parameterization; transfer.png; JSON as the last line."""
    from research.analysis import transfer as tr

    df = load_dirs(dirs)
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
    rep.add_argument("--metric", default="final_val_loss",
                     help="the summary.json value to fit (default final_val_loss; e.g. val/code/bpb)")
    fit = sub.add_parser("fit", help="Chinchilla Approach 3 fit of L(N, D) from a CSV; prints JSON")
    fit.add_argument("--csv", required=True, help="CSV with columns params,tokens,loss (others ignored)")
    fit.add_argument("--boot", type=int, default=100, help="bootstrap resamples for the CIs (default 100)")
    fit.add_argument("--metric", default="loss", help="the column to fit (default loss; e.g. val/code/bpb)")
    pre = sub.add_parser("predict", help="predicted loss at (N, D) or a budget C, with a bootstrap 95%% "
                         "interval, from one Approach 3 fit; prints one JSON line per target")
    pre.add_argument("dirs", nargs="*", help="sweep or run directories (their completed runs and "
                     "cooldown branches are the rows)")
    pre.add_argument("--csv", help="CSV with columns params,tokens,loss instead of run directories")
    pre.add_argument("--params", type=float, help="the target's N (with --tokens)")
    pre.add_argument("--tokens", type=float, help="the target's D (with --params)")
    pre.add_argument("--flops", type=float, help="a budget C: predict at its compute-optimal N, D (C = 6ND)")
    pre.add_argument("--targets", help="CSV with columns params,tokens: one JSON line per row, one fit")
    pre.add_argument("--boot", type=int, default=200, help="bootstrap resamples for the interval (default 200)")
    pre.add_argument("--max-extrapolation", type=float, default=10.0,
                     help="warn when the target's N, D or C exceeds this factor x the largest fitted (default 10)")
    pre.add_argument("--n-col", default="params", choices=("params", "non_embedding_params"),
                     help="run directories: the summary.json count used as N (default params)")
    tra = sub.add_parser("transfer", help="best lr per width/depth per parameterization; plot; prints JSON")
    tra.add_argument("dirs", nargs="+", help="sweep directories (e.g. experiment=lr_transfer)")
    tra.add_argument("--out", help="where to write transfer.png and transfer.json (default: first dir)")
    args = parser.parse_args(argv)
    try:
        if args.command == "transfer":
            transfer(args.dirs, args.out)
        elif args.command == "fit":
            fit_csv(args.csv, args.boot, args.metric)
        elif args.command == "predict":
            predict(args)
        else:
            report(args.dirs, args.out, args.metric)
    except (InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
