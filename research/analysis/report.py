"""The sweep report: table, fitted laws and plots, written to one directory.

`write_report(dirs, out)` is what `python -m research.analyze report` runs:

- every run in a table; runs that did not complete are listed and left out of fits;
- the loss fitted is `final_val_loss` (the primary eval set's), or any other
  summary.json value named by `metric` (e.g. `val/code/bpb`: one eval set in bits per byte);
- a sweep of sizes: L(N) = E + A N^-alpha over non-embedding params N (Kaplan
  et al. 2020's choice: embeddings distort small-model laws), with bootstrap CIs;
- an isoFLOP sweep (runs with `train.flops_budget` set): Chinchilla Approach 2
  (`isoflop.py`) instead, since runs of one budget differ in tokens as well as size;
- always: the compute frontier, Approach 1 on the runs' training curves
  (`frontier.py`), when the curves overlap in FLOPs (else a warning).

Files: report.md, fit.json, loss_vs_params.png, loss_curves.png,
compute_frontier.png, and isoflop.png for an isoFLOP sweep. Bad input raises
ValueError with a one-line message.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pandas as pd

from research.analysis import plots
from research.analysis.fit import fit_power_law
from research.analysis.frontier import fit_approach1, training_curves
from research.analysis.isoflop import fit_approach2
from research.analysis.runs import best_val_loss, completed, load_curves, load_dirs

X_COL = "non_embedding_params"
BUDGET_COL = "train.flops_budget"
N_BOOT = 200
SMOOTH = 3  # logged train-loss points averaged for the compute frontier


def _table(df: pd.DataFrame, metric: str) -> str:
    cols = ["model.d_model", "model.n_layers", BUDGET_COL, "params", X_COL, metric,
            "best_val_loss", "status"]
    cols = [c for c in cols if c in df and not (c == BUDGET_COL and df[c].isna().all())]
    view = df[cols].rename(columns={"model.d_model": "d_model", "model.n_layers": "n_layers",
                                    BUDGET_COL: "flops_budget", X_COL: "non_emb_params",
                                    "final_val_loss": "val_loss", "best_val_loss": "best_val"})
    return view.to_string(index=False, float_format=lambda v: f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.4f}")


def _ci(fit: dict, key: str) -> str:
    return f" [{fit['ci'][key][0]:.4g}, {fit['ci'][key][1]:.4g}]" if "ci" in fit else ""


def _select(df: pd.DataFrame, where: str, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """Completed runs with a final `metric`, and a warning line for each run left out."""
    if metric != "final_val_loss" and metric not in df:
        known = sorted(c for c in df.columns if c.startswith("val/") or c == "final_val_loss")
        raise ValueError(f"--metric: no run has {metric!r} in summary.json; known: {', '.join(known)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = completed(df, metric)
    if ok.empty:
        raise ValueError(f"{where}: none of the {len(df)} runs completed; nothing to report")
    missing = [c for c in ("params", X_COL) if c not in ok or ok[c].isna().any()]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)} in summary.json of completed runs")
    for col in ("params", X_COL, metric):
        bad = ok[pd.to_numeric(ok[col], errors="coerce").fillna(0) <= 0]
        if len(bad):
            raise ValueError(f"{where}: {col} must be positive; {bad['run_dir'].iloc[0]} has {bad[col].iloc[0]}")
    return ok, [f"warning: {w.message}" for w in caught]


def _approach2(ok: pd.DataFrame, where: str, lines: list[str], metric: str) -> dict:
    iso = ok[ok[BUDGET_COL].notna()]
    if "tokens" not in iso:
        raise ValueError(f"{where}: missing column tokens in summary.json of completed runs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_approach2(iso[BUDGET_COL], iso[X_COL], iso["tokens"], iso[metric], n_boot=N_BOOT)
    lines += [f"warning: {w.message}" for w in caught]
    prof = pd.DataFrame(fit["profiles"])
    if len(prof) >= 3:
        fit["loss_law"] = fit_power_law(prof["flops"], prof["loss_opt"])
    return fit


def write_report(dirs: list[str], out: str | None = None, metric: str = "final_val_loss") -> dict:
    """Analyse the runs below `dirs`, fitting `metric`; write the report into `out` (default dirs[0]);
    return fit.json's dict."""
    where = ", ".join(dirs)
    df = load_dirs(dirs)
    ok, warn_lines = _select(df, where, metric)
    if metric != "final_val_loss":  # best_val_loss: the lowest value of the same metric
        ok = ok.assign(best_val_loss=[best_val_loss(r, metric) for r in ok["run_dir"]])
    skipped = df[~df.index.isin(ok.index)]
    ok = ok.sort_values([X_COL, "run_dir"]).reset_index(drop=True)
    isoflop = BUDGET_COL in ok and ok[BUDGET_COL].notna().any()
    if not isoflop and len(ok) < 3:
        raise ValueError(f"{where}: need at least 3 completed runs to fit E, A, alpha; got {len(ok)}")

    text = [_table(ok, metric), ""]
    result = {"law": "L(N) = E + A * N^-alpha", "x": X_COL, "metric": metric, "fit": None}
    if isoflop:
        a2 = result["approach2"] = _approach2(ok, where, warn_lines, metric)
        text += [f"Approach 2 (IsoFLOP profiles, {len(a2['profiles'])} budgets): "
                 f"N_opt = {a2['k_N']:.4g} C^{a2['a']:.4f}{_ci(a2, 'a')}, "
                 f"D_opt = {a2['k_D']:.4g} C^{a2['b']:.4f}{_ci(a2, 'b')}"]
        text += [f"  C = {p['flops']:.3g}: N_opt = {p['n_opt']:.4g}, D_opt = {p['d_opt']:.4g}, "
                 f"loss {p['loss_opt']:.4f}{'' if p['inside'] else ' (outside the sizes tried)'}"
                 for p in a2["profiles"]]
    else:
        fit = result["fit"] = fit_power_law(ok[X_COL], ok[metric], n_boot=N_BOOT)
        text += [f"L(N) = E + A * N^-alpha of {metric} over N = non-embedding params ({fit['n']} runs, 95% CI):",
                 f"  E = {fit['E']:.4f}{_ci(fit, 'E')}   A = {fit['A']:.4g}{_ci(fit, 'A')}   "
                 f"alpha = {fit['alpha']:.4f}{_ci(fit, 'alpha')}   rmse(log L) = {fit['rmse_log']:.4f}"]

    curves = training_curves(ok, X_COL, smooth=SMOOTH)
    try:
        a1 = result["approach1"] = fit_approach1(curves, n_boot=N_BOOT)
        law = a1["loss_law"]
        text += [f"Approach 1 (compute frontier, {a1['sizes']} sizes on the envelope): "
                 f"N_opt = {a1['k_N']:.4g} C^{a1['a']:.4f}{_ci(a1, 'a')}, "
                 f"D_opt = {a1['k_D']:.4g} C^{a1['b']:.4f}{_ci(a1, 'b')}; "
                 f"L(C) = {law['E']:.4f} + {law['A']:.4g} C^-{law['alpha']:.4f}"]
    except ValueError as err:
        a1 = None
        result["approach1"] = {"error": str(err)}
        warn_lines.append(f"warning: no compute-frontier fit (Approach 1): {err}")

    out_dir = Path(out) if out else Path(dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {r: Path(r).name for r in ok["run_dir"]}
    written = [
        plots.loss_vs_params(ok, result["fit"], X_COL, out_dir / "loss_vs_params.png", metric),
        plots.loss_curves({names[r]: load_curves(r) for r in ok["run_dir"]},
                          dict(zip(map(names.get, ok["run_dir"]), ok[X_COL])), out_dir / "loss_curves.png"),
    ]
    if a1:
        written.append(plots.compute_frontier(curves, a1, out_dir / "compute_frontier.png", result.get("approach2")))
    if isoflop:
        written.append(plots.isoflop_curves(ok[ok[BUDGET_COL].notna()], result["approach2"],
                                            out_dir / "isoflop.png", n_col=X_COL, loss_col=metric))
    result["runs"] = ok[["run_dir", "params", X_COL, *dict.fromkeys(["final_val_loss", metric]),
                         "best_val_loss"]].to_dict("records")
    result["skipped"] = [{"run_dir": r.run_dir, "status": r.status} for r in skipped.itertuples()]
    (out_dir / "fit.json").write_text(json.dumps(_plain(result), indent=2) + "\n")
    md = ["# Ladder report", "", f"Runs: {where}", "", "```", *text, "```", ""]
    if len(skipped):
        md += ["Left out (did not complete):", ""]
        md += [f"- `{r.run_dir}`: {r.status}" for r in skipped.itertuples()] + [""]
    md += [f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in written]
    (out_dir / "report.md").write_text("\n".join(md))
    for line in warn_lines:
        print(line, file=sys.stderr, flush=True)
    print("\n".join(text))
    print(f"\nwrote {', '.join(str(p) for p in [out_dir / 'report.md', out_dir / 'fit.json', *written])}")
    return result


def _plain(value):
    """JSON-safe copy: NaN and inf become null, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
