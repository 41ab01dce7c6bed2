"""Scaling-law fits.

`fit_power_law` fits L(X) = E + A * X^-alpha (irreducible loss E) by least
squares on log L, from a small grid of starting exponents, keeping the best.
Working in log L weighs every rung of the ladder equally, as Hoffmann et al.
(2022) do with their Huber objective.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares


def power_law(x, E: float, A: float, alpha: float):
    """E + A * x^-alpha."""
    return E + A * np.power(np.asarray(x, dtype=float), -alpha)


def fit_power_law(x, y) -> dict:
    """Fit y = E + A x^-alpha; returns {"E", "A", "alpha", "rmse_log", "n"}.

    x, y: positive 1-D arrays of the same length, at least 3 points.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of the same length")
    if len(x) < 3:
        raise ValueError(f"need at least 3 points to fit E, A, alpha; got {len(x)}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("x and y must be positive")
    order = np.argsort(x, kind="stable")  # the answer must not depend on row order
    x, y = x[order], y[order]
    log_x, log_y = np.log(x), np.log(y)

    # Parameters: E, log A, alpha. E stays in [0, min(y)) so the law stays positive.
    def residuals(p):
        E, log_a, alpha = p
        return np.log(E + np.exp(log_a - alpha * log_x)) - log_y

    best = None
    for alpha0 in (0.1, 0.3, 0.6, 1.0):
        for e_frac in (0.0, 0.5, 0.9):
            E0 = e_frac * y.min()
            log_a0 = np.log(max(np.median(y) - E0, 1e-9)) + alpha0 * np.median(log_x)
            res = least_squares(
                residuals, [E0, log_a0, alpha0],
                bounds=([0.0, -50.0, 0.0], [y.min() * (1 - 1e-9), 200.0, 5.0]),
            )
            if best is None or res.cost < best.cost:
                best = res
    E, log_a, alpha = best.x
    return {
        "E": float(E),
        "A": float(np.exp(log_a)),
        "alpha": float(alpha),
        "rmse_log": float(np.sqrt(np.mean(best.fun**2))),
        "n": int(len(x)),
    }
