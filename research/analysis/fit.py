"""Scaling-law fits.

`fit_power_law` fits L(X) = E + A * X^-alpha (irreducible loss E) by least
squares on log L, from a small grid of starting exponents, keeping the best;
X may be params, tokens or compute. Working in log L weighs every rung of the
ladder equally, as Hoffmann et al. (2022, arXiv:2203.15556) do with their
Huber objective. `fit_loglinear` fits Y = k X^a (a straight line in log-log),
the form of Chinchilla's N_opt(C) and D_opt(C).

Confidence intervals are percentile bootstraps over the data points: resample
the points with replacement, refit (from the full fit's optimum, which is
close), and take the 2.5% and 97.5% quantiles of each parameter. Points are
sorted before anything else, so the answer, bootstrap included, does not
depend on row order.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares


def power_law(x, E: float, A: float, alpha: float):
    """E + A * x^-alpha."""
    return E + A * np.power(np.asarray(x, dtype=float), -alpha)


def _check_xy(x, y, need: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of the same length")
    if len(x) < need:
        raise ValueError(f"need at least {need} points to fit {what}; got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("x and y must be positive")
    order = np.lexsort((y, x))  # the answer must not depend on row order
    return x[order], y[order]


def _ci(samples: list[dict], keys: tuple[str, ...], level: float) -> dict:
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    return {k: [float(np.percentile([s[k] for s in samples], lo)),
                float(np.percentile([s[k] for s in samples], hi))] for k in keys}


def _resamples(n: int, n_boot: int, seed: int, min_distinct: int, x: np.ndarray):
    """Index arrays of bootstrap resamples with at least `min_distinct` distinct x values."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        idx = np.sort(rng.integers(0, n, n))
        if len(np.unique(x[idx])) >= min_distinct:  # a degenerate resample cannot be fitted
            yield idx


def _least_squares_law(log_x, y, starts):
    """Best least-squares fit of log y = log(E + exp(log A - alpha log x)) over `starts`."""
    log_y = np.log(y)

    # Parameters: E, log A, alpha. E stays in [0, min(y)) so the law stays positive.
    def residuals(p):
        E, log_a, alpha = p
        return np.log(E + np.exp(log_a - alpha * log_x)) - log_y

    def jacobian(p):  # analytic: cheaper than finite differences, which the bootstrap repeats
        E, log_a, alpha = p
        term = np.exp(log_a - alpha * log_x)
        total = E + term
        return np.stack([1.0 / total, term / total, -log_x * term / total], axis=1)

    best = None
    for start in starts:
        E0, log_a0, alpha0 = start
        res = least_squares(
            residuals, [min(E0, y.min() * (1 - 1e-6)), log_a0, alpha0], jac=jacobian,
            bounds=([0.0, -50.0, 0.0], [y.min() * (1 - 1e-9), 200.0, 5.0]),
        )
        if best is None or res.cost < best.cost:
            best = res
    return best


def fit_power_law(x, y, n_boot: int = 0, seed: int = 0, level: float = 0.95) -> dict:
    """Fit y = E + A x^-alpha; returns {"E", "A", "alpha", "rmse_log", "n"} (+ "ci").

    x, y: positive 1-D arrays of the same length, at least 3 points.
    n_boot > 0 adds "ci": {"E", "A", "alpha"} -> [lo, hi], the `level` bootstrap interval.
    """
    x, y = _check_xy(x, y, 3, "E, A, alpha")
    log_x = np.log(x)
    starts = []
    for alpha0 in (0.1, 0.3, 0.6, 1.0):
        for e_frac in (0.0, 0.5, 0.9):
            E0 = e_frac * y.min()
            starts.append((E0, np.log(max(np.median(y) - E0, 1e-9)) + alpha0 * np.median(log_x), alpha0))
    best = _least_squares_law(log_x, y, starts)
    E, log_a, alpha = best.x
    result = {
        "E": float(E),
        "A": float(np.exp(log_a)),
        "alpha": float(alpha),
        "rmse_log": float(np.sqrt(np.mean(best.fun**2))),
        "n": int(len(x)),
    }
    if n_boot > 0:
        samples = []
        for idx in _resamples(len(x), n_boot, seed, 3, x):
            E_b, log_a_b, alpha_b = _least_squares_law(log_x[idx], y[idx], [best.x]).x
            samples.append({"E": E_b, "A": np.exp(log_a_b), "alpha": alpha_b})
        result["ci"] = _ci(samples, ("E", "A", "alpha"), level)
    return result


def fit_loglinear(x, y, n_boot: int = 0, seed: int = 0, level: float = 0.95) -> dict:
    """Fit y = k x^a (least squares on log y); returns {"k", "a", "n"} (+ "ci" for k, a).

    x, y: positive 1-D arrays of the same length with at least 2 distinct x.
    """
    x, y = _check_xy(x, y, 2, "k, a")
    if len(np.unique(x)) < 2:
        raise ValueError("need at least 2 distinct x values to fit y = k x^a")
    log_x, log_y = np.log(x), np.log(y)
    a, log_k = np.polyfit(log_x, log_y, 1)
    result = {"k": float(np.exp(log_k)), "a": float(a), "n": int(len(x))}
    if n_boot > 0:
        samples = []
        for idx in _resamples(len(x), n_boot, seed, 2, x):
            a_b, log_k_b = np.polyfit(log_x[idx], log_y[idx], 1)
            samples.append({"k": np.exp(log_k_b), "a": a_b})
        result["ci"] = _ci(samples, ("k", "a"), level)
    return result
