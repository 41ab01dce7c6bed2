"""Predict a rung's loss from a ladder: one Approach 3 fit, a bootstrap interval, an extrapolation check.

`predict_loss(params, tokens, loss, targets)` fits L(N, D) = E + A/N^alpha + B/D^beta
(chinchilla.py) once and evaluates it at every target (N, D). Rows at the same (N, D), a
rung trained at several seeds, are averaged into one before the fit. The 95% interval
of a prediction is the percentile interval of the same prediction under each
bootstrap refit (resampled data points, chinchilla.py): it holds the
uncertainty of the parameters given the rows, not the error of the law's form,
which the held-out check of experiments/prediction.md measures.

A target farther than `max_factor` times the largest fitted N, D or compute
C = 6 N D is flagged (`beyond`) and warned about: the law was not checked there.
"""

from __future__ import annotations

import warnings

import numpy as np

from research.analysis.chinchilla import compute_optimal, fit_approach3

MAX_FACTOR = 10.0  # default: warn past 10x the largest fitted N, D or C
FIT_KEYS = ("E", "A", "B", "alpha", "beta", "a", "b", "G", "ci", "n", "objective")


def law(fit: dict, params, tokens) -> np.ndarray:
    """E + A / N^alpha + B / D^beta of an Approach 3 fit, elementwise over arrays N, D."""
    n, d = np.asarray(params, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def compute_optimal_target(fit: dict, flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) of budget `flops` (C = 6 N D) under the fit."""
    n_opt, d_opt = compute_optimal(fit, [flops])
    return float(n_opt[0]), float(d_opt[0])


def beyond(params: float, tokens: float, fitted_n, fitted_d, max_factor: float) -> list[str]:
    """Which of N, D, C = 6ND of the target lie past `max_factor` x the largest fitted; [] if none."""
    fitted_n, fitted_d = np.asarray(fitted_n, float), np.asarray(fitted_d, float)
    out = []
    for name, value, largest in (("N", params, fitted_n.max()), ("D", tokens, fitted_d.max()),
                                 ("C", 6 * params * tokens, (6 * fitted_n * fitted_d).max())):
        if value > max_factor * largest:
            out.append(f"{name} = {value:.4g} is {value / largest:.3g}x the largest fitted ({largest:.4g})")
    return out


def mean_replicates(params, tokens, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per distinct (N, D), its loss the mean of the rows there (the seeds of one rung).

    The fit's Huber loss (delta 1e-3 on log L) is close to L1: pooled replicates would pull it
    to their median, and a bootstrap would count each seed as an independent size or budget.
    Rows of unequal lengths are returned as they are, for fit_approach3 to refuse.
    """
    n, d, l = (np.asarray(x, dtype=np.float64).ravel() for x in (params, tokens, loss))
    if not (n.shape == d.shape == l.shape):
        return n, d, l
    pairs, inverse = np.unique(np.stack([n, d], axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    return pairs[:, 0], pairs[:, 1], np.bincount(inverse, weights=l) / np.bincount(inverse)


def predict_loss(params, tokens, loss, targets=None, flops=None, n_boot: int = 200, seed: int = 0,
            level: float = 0.95, max_factor: float = MAX_FACTOR) -> dict:
    """Fit Approach 3 to the rows (params, tokens, loss) once and predict each target.

    Give `targets`, a sequence of (N, D) pairs, or `flops`, a sequence of budgets C, each
    predicted at its compute-optimal (N, D) under the fit (C = 6ND). Rows at the same (N, D),
    the seeds of one rung, are averaged first (`mean_replicates`). Returns {"fit": the
    fit's parameters and CIs, "predictions": [{"params", "tokens", "flops" (6ND), "loss",
    "ci": [lo, hi] (`level` interval), "beyond"}]}, one per target in order; "beyond" lists
    the extrapolation warnings (also issued with `warnings.warn`). Raises ValueError (one
    line) for bad rows or targets, as fit_approach3 does.
    """
    if (targets is None) == (flops is None):
        raise ValueError("give exactly one of targets (params, tokens) and flops")
    wanted = np.asarray(targets if flops is None else flops, dtype=np.float64)
    wanted = wanted.reshape(-1, 2) if flops is None else wanted.ravel()
    if len(wanted) == 0:
        raise ValueError("no targets to predict")
    if not np.isfinite(wanted).all() or (wanted <= 0).any():
        raise ValueError(f"target {'params and tokens' if flops is None else 'flops'} must be positive and finite")
    if n_boot < 10:
        raise ValueError(f"need at least 10 bootstrap resamples for an interval; got {n_boot}")
    params, tokens, loss = mean_replicates(params, tokens, loss)
    fit = fit_approach3(params, tokens, loss, n_boot=n_boot, seed=seed, keep_boot=True)
    boot = fit.pop("boot")
    pairs = wanted if flops is None else [compute_optimal_target(fit, c) for c in wanted]
    lo_q, hi_q = 50 * (1 - level), 50 * (1 + level)
    fitted_n, fitted_d = np.asarray(params, float), np.asarray(tokens, float)
    predictions = []
    for n, d in pairs:
        # The interval is for the loss at this (N, D): the point does not move with each refit.
        samples = np.array([law(b, n, d) for b in boot])
        flags = beyond(n, d, fitted_n, fitted_d, max_factor)
        for flag in flags:
            warnings.warn(f"extrapolating: {flag} (over {max_factor:g}x)", stacklevel=2)
        predictions.append({
            "params": float(n), "tokens": float(d), "flops": float(6 * n * d),
            "loss": float(law(fit, n, d)),
            "ci": [float(np.nanpercentile(samples, lo_q)), float(np.nanpercentile(samples, hi_q))],
            "beyond": flags,
        })
    return {"fit": {k: fit[k] for k in FIT_KEYS if k in fit}, "predictions": predictions}


def predict_runs(df, targets=None, flops=None, n_col: str = "params", loss_col: str = "final_val_loss",
                 **kwargs) -> dict:
    """`predict_loss` on the completed rows of a `load_runs` DataFrame (cooldown-branch rows
    included); N is the column `n_col` (params or non_embedding_params)."""
    from research.analysis.runs import completed

    ok = completed(df, n_col, "tokens", loss_col)
    return predict_loss(ok[n_col], ok["tokens"], ok[loss_col], targets=targets, flops=flops, **kwargs)
