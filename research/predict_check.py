"""Check a scaling law by what it predicts: fit a ladder, predict a larger rung, train it.

`check(cfg, ladder_dir, factor)` reads the completed runs (cooldown branches
included) below `ladder_dir`, fits Approach 3 (analysis/predict.py), takes the
budget C = `factor` x the largest run's 6ND, places its compute-optimal N_opt,
D_opt, picks the `model.d_model` whose params are nearest N_opt (the ladder's
depth and heads) and the steps that give D_opt tokens, trains that rung in
`<ladder_dir>/heldout/` with the ladder's config (no cooldowns), and compares
its final val loss with the prediction at the rung's actual (N, D). Rows at
the same (N, D), the seeds of one rung (`train.seed` swept), are averaged
before the fit. It writes `<ladder_dir>/prediction.json` and `prediction.png`, and also refits
on parts of the ladder (fewer rungs, fewer budgets) to show what the
prediction depends on.

`PredictCheck` is the Hydra callback that runs it at the end of the ladder's
multirun: `python -m research.train -m experiment=predict` (conf/experiment/predict.yaml).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from research import config as configlib
from research import data, flops

N_COL = "params"


def _rows(ladder_dir: Path):
    from research.analysis.runs import completed, load_runs

    df = load_runs(ladder_dir)
    df = df[~df["run_dir"].str.startswith(str(ladder_dir / "heldout"))]  # a re-run keeps its rung out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = completed(df, N_COL, "tokens", "final_val_loss")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return mean_over_seeds(ok)


def mean_over_seeds(rows):
    """One row per (N, D): the seeds of one rung averaged (`seeds` counts them), with the
    run dirs and branch fraction that prediction.json, the plot and the ablations report.
    The fit itself averages the same way (analysis/predict.py `mean_replicates`)."""
    extra = {"branch_fraction": ("branch_fraction", "first")} if "branch_fraction" in rows else {}
    out = rows.groupby([N_COL, "tokens"], as_index=False).agg(
        final_val_loss=("final_val_loss", "mean"), seeds=("final_val_loss", "size"),
        run_dir=("run_dir", lambda d: ",".join(sorted(d))), **extra)
    return out.sort_values([N_COL, "tokens"]).reset_index(drop=True)


def nearest_width(cfg: configlib.Config, vocab: int, n_target: float) -> tuple[int, int]:
    """(d_model, params) of the width, a multiple of 2 x model.n_heads (even rope head dims),
    whose params are nearest `n_target` in log, with the rest of `cfg.model` as it is."""
    step = 2 * cfg.model.n_heads
    best = None
    for d in range(step, 4097, step):
        n = flops.param_counts(dataclasses.replace(cfg.model, d_model=d), vocab, cfg.data.seq_len)["params"]
        score = abs(np.log(n / n_target))
        if best is None or score < best[0]:
            best = (score, d, n)
    return best[1], best[2]


def _predict(rows, **kwargs) -> dict:
    from research.analysis.predict import predict_loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = predict_loss(rows[N_COL], rows["tokens"], rows["final_val_loss"], **kwargs)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return out


def ablations(rows, target: tuple[float, float], actual: float, n_boot: int) -> list[dict]:
    """The held-out prediction refitted on parts of the ladder: without the largest rung, the
    main runs only (no branches), the last budget of every rung dropped."""
    sizes = sorted(rows[N_COL].unique())
    fracs = rows["branch_fraction"].fillna(1.0) if "branch_fraction" in rows else None
    parts = {"all rows": rows, "without the largest rung": rows[rows[N_COL] < sizes[-1]]}
    if fracs is not None:
        parts["main runs only (no branches)"] = rows[fracs == 1.0]
        parts["branches only (no full-length runs)"] = rows[fracs < 1.0]
    out = []
    for name, part in parts.items():
        entry = {"rows": name, "n": int(len(part)), "rungs": int(part[N_COL].nunique())}
        try:
            p = _predict(part, targets=[target], n_boot=n_boot)["predictions"][0]
            entry.update(loss=p["loss"], ci=p["ci"], rel_error=abs(p["loss"] - actual) / actual,
                         inside=p["ci"][0] <= actual <= p["ci"][1])
        except ValueError as err:  # e.g. fewer than 5 rows
            entry["error"] = str(err)
        out.append(entry)
    return out


def check(raw_cfg, ladder_dir: str | Path, factor: float = 8.0, n_boot: int = 200,
          ablate: bool = True) -> dict:
    """Fit the ladder, predict the rung of `factor` x its largest compute, train it, compare.

    raw_cfg: the ladder's config (DictConfig or dict; the held-out rung's base). Returns (and
    writes to prediction.json) the prediction, the actual loss, their relative error, whether
    the actual loss lies in the 95% interval, and the ablations.
    """
    from research import train

    ladder_dir = Path(ladder_dir)
    cfg = configlib.parse(raw_cfg)
    rows = _rows(ladder_dir)
    if len(rows) < 5:
        raise ValueError(f"{ladder_dir}: {len(rows)} completed rows; Approach 3 needs at least 5")
    largest = float((6 * rows[N_COL] * rows["tokens"]).max())
    target_c = factor * largest
    first = _predict(rows, flops=[target_c], n_boot=n_boot)
    opt = first["predictions"][0]
    vocab = data.load(cfg.data).vocab_size
    d_model, n_params = nearest_width(cfg, vocab, opt["params"])
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    steps = max(int(round(opt["tokens"] / tokens_per_step)), cfg.schedule.warmup + 1)
    print(f"predict: C = {target_c:.3g} ({factor:g}x the largest rung's {largest:.3g}); compute-optimal "
          f"N = {opt['params']:.4g}, D = {opt['tokens']:.4g}; training d_model={d_model} ({n_params:,} params) "
          f"for {steps} steps", file=sys.stderr)
    held = dataclasses.asdict(cfg)
    held["model"]["d_model"] = d_model
    held["train"].update(steps=steps, cooldowns=[], flops_budget=None)
    summary = train.run(held, ladder_dir / "heldout")
    if summary["status"] != "completed":
        raise RuntimeError(f"{ladder_dir / 'heldout'}: the held-out rung {summary['status']}")
    actual = float(summary["final_val_loss"])
    target = (float(summary[N_COL]), float(summary["tokens"]))
    at = _predict(rows, targets=[target], n_boot=n_boot)
    p = at["predictions"][0]
    result = {
        "factor": factor, "largest_flops": largest, "target_flops": target_c,
        "compute_optimal": {"params": opt["params"], "tokens": opt["tokens"], "loss": opt["loss"], "ci": opt["ci"]},
        "heldout": {"d_model": d_model, "params": target[0], "tokens": target[1], "steps": steps,
                    "flops": 6 * target[0] * target[1], "final_val_loss": actual,
                    "wall_s": summary["wall_s"], "run_dir": str(ladder_dir / "heldout")},
        "predicted": p["loss"], "ci": p["ci"], "beyond": p["beyond"],
        "rel_error": abs(p["loss"] - actual) / actual,
        "inside_ci": p["ci"][0] <= actual <= p["ci"][1],
        "fit": at["fit"],
        "rows": rows[["run_dir", N_COL, "tokens", "final_val_loss", "seeds"]].to_dict("records"),
        "ablations": ablations(rows, target, actual, n_boot) if ablate else [],
    }
    (ladder_dir / "prediction.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, result, ladder_dir / "prediction.png")
    print(f"predicted {p['loss']:.4f} [{p['ci'][0]:.4f}, {p['ci'][1]:.4f}], actual {actual:.4f}: "
          f"error {100 * result['rel_error']:.2f}%, {'inside' if result['inside_ci'] else 'outside'} the 95% "
          f"interval; wrote {ladder_dir / 'prediction.json'}, {ladder_dir / 'prediction.png'}")
    return result


def plot(rows, result: dict, out: Path) -> Path:
    """Loss against tokens: the ladder's rows, the fitted law per rung size, the held-out
    rung (its curve from the law, its interval and its actual loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from research.analysis.predict import law

    fit, held = result["fit"], result["heldout"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted(rows[N_COL].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(sizes) + 1))
    d_grid = np.geomspace(rows["tokens"].min() / 1.5, held["tokens"] * 1.5, 100)
    for color, n in zip(colors, sizes):
        part = rows[rows[N_COL] == n]
        ax.scatter(part["tokens"], part["final_val_loss"], color=color, s=18, label=f"N = {n:,.0f}")
        ax.plot(d_grid, law(fit, n, d_grid), color=color, lw=1, alpha=0.7)
    ax.plot(d_grid, law(fit, held["params"], d_grid), color=colors[-1], lw=1, ls="--")
    lo, hi = result["ci"]
    below, above = max(result["predicted"] - lo, 0.0), max(hi - result["predicted"], 0.0)  # float noise
    ax.errorbar([held["tokens"]], [result["predicted"]], yerr=[[below], [above]],
                fmt="o", color="red", capsize=4, label=f"predicted, N = {held['params']:,.0f} (95% CI)")
    ax.scatter([held["tokens"]], [held["final_val_loss"]], marker="*", s=140, color="black", zorder=5,
               label=f"held-out rung: {100 * result['rel_error']:.1f}% off")
    ax.set_xscale("log")
    ax.set_xlabel("tokens D")
    ax.set_ylabel("final val loss")
    ax.set_title(f"Approach 3 on {len(rows)} rows; rung at {result['factor']:g}x the largest compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class PredictCheck(Callback):
    """Hydra callback: at the end of the ladder's multirun, `check` it (see the module doc)."""

    def __init__(self, factor: float = 8.0, boot: int = 200):
        self.factor, self.boot = float(factor), int(boot)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        raw = OmegaConf.to_container(config, resolve=False)
        raw = {k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(configlib.Config)}}
        check(raw, Path(config.hydra.sweep.dir), self.factor, self.boot)
