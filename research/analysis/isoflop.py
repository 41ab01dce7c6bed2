"""Chinchilla Approach 2: IsoFLOP profiles.

Hoffmann et al. (2022, arXiv:2203.15556, sec. 3.2): train several model
sizes N at each of a few fixed compute budgets C (an isoFLOP sweep: here,
runs with `train.flops_budget` set). At one budget, loss against log N is a
valley; a parabola fitted to it has its minimum at N_opt(C). Power laws
through the minima give N_opt(C) = k_N C^a and D_opt(C) = k_D C^b.

D_opt at a budget is read off the runs themselves: log D is linear in log N
at fixed C (D = C / FLOPs per token), so a line through the budget's (log N,
log D) points is evaluated at N_opt. That uses this code base's FLOP
accounting (attention included) rather than assuming C = 6 N D.

A budget needs 3 sizes for a parabola, and the parabola must open upwards;
budgets that fail are left out with a warning. Confidence intervals resample
the runs within each budget and redo every step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from research.analysis.fit import fit_loglinear


def _check(flops, params, tokens, loss):
    arrays = [np.asarray(a, dtype=float).ravel() for a in (flops, params, tokens, loss)]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("flops, params, tokens and loss must have the same length")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("flops, params, tokens and loss must be finite")
    if any((a <= 0).any() for a in arrays):
        raise ValueError("flops, params, tokens and loss must all be positive")
    c, n, d, l = arrays
    order = np.lexsort((l, d, n, c))  # the answer must not depend on row order
    return c[order], n[order], d[order], l[order]


def _valley(log_n, log_d, loss):
    """Parabola fit at one budget: (log N_opt, log D_opt, loss at the minimum, curvature), or None."""
    if len(np.unique(log_n)) < 3:
        return None
    p2, p1, p0 = np.polyfit(log_n, loss, 2)
    if p2 <= 0:
        return None
    x = -p1 / (2 * p2)
    slope, icpt = np.polyfit(log_n, log_d, 1)
    return x, icpt + slope * x, p0 + p1 * x + p2 * x * x, p2


def profiles(flops, params, tokens, loss) -> tuple[list[dict], list[str]]:
    """One isoFLOP profile per distinct budget: ([{flops, n_opt, d_opt, loss_opt, curvature, sizes,
    inside}], [reasons budgets were left out]). All inputs are positive 1-D arrays of one length.

    `inside` is False when the minimum lies outside the sizes tried (an extrapolation).
    """
    c, n, d, l = _check(flops, params, tokens, loss)
    out, skipped = [], []
    for budget in np.unique(c):
        at = c == budget
        valley = _valley(np.log(n[at]), np.log(d[at]), l[at])
        if valley is None:
            why = ("fewer than 3 model sizes" if len(np.unique(n[at])) < 3
                   else "loss does not curve upwards in log N (no minimum)")
            skipped.append(f"budget {budget:.3g} FLOPs: {why}")
            continue
        x, log_d_opt, loss_opt, curv = valley
        out.append({"flops": float(budget), "n_opt": float(np.exp(x)), "d_opt": float(np.exp(log_d_opt)),
                    "loss_opt": float(loss_opt), "curvature": float(curv), "sizes": int(at.sum()),
                    "inside": bool(np.log(n[at]).min() <= x <= np.log(n[at]).max())})
    return out, skipped


def fit_approach2(flops, params, tokens, loss, n_boot: int = 0, seed: int = 0) -> dict:
    """Approach 2 on an isoFLOP sweep: N_opt = k_N C^a, D_opt = k_D C^b through the parabolas' minima.

    flops: each run's budget C (runs of one budget share the value); params N, tokens D and final
    loss per run: positive 1-D arrays of one length. Returns {"a", "k_N", "b", "k_D", "profiles",
    "skipped"} (+ "ci" for a, b with n_boot > 0). ValueError with fewer than 2 usable budgets.
    """
    c, n, d, l = _check(flops, params, tokens, loss)
    found, skipped = profiles(c, n, d, l)
    for reason in skipped:
        warnings.warn(f"isoFLOP profile left out: {reason}", stacklevel=2)
    if len(found) < 2:
        raise ValueError(f"Approach 2 needs at least 2 budgets with a fitted minimum (3+ sizes each); "
                         f"got {len(found)} of {len(np.unique(c))}")
    prof = pd.DataFrame(found)
    n_law = fit_loglinear(prof["flops"], prof["n_opt"])
    d_law = fit_loglinear(prof["flops"], prof["d_opt"])
    result = {"a": n_law["a"], "k_N": n_law["k"], "b": d_law["a"], "k_D": d_law["k"],
              "profiles": found, "skipped": skipped}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        groups = [np.flatnonzero(c == budget) for budget in np.unique(c)]
        a_s, b_s = [], []
        for _ in range(n_boot):
            idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
            pts = [(c[i[0]], *v[:2]) for i in (idx[c[idx] == b] for b in np.unique(c))
                   if (v := _valley(np.log(n[i]), np.log(d[i]), l[i])) is not None]
            if len(pts) >= 2 and len({p[0] for p in pts}) >= 2:
                log_c = np.log([p[0] for p in pts])
                a_s.append(np.polyfit(log_c, [p[1] for p in pts], 1)[0])
                b_s.append(np.polyfit(log_c, [p[2] for p in pts], 1)[0])
        if a_s:
            result["ci"] = {"a": [float(np.percentile(a_s, 2.5)), float(np.percentile(a_s, 97.5))],
                            "b": [float(np.percentile(b_s, 2.5)), float(np.percentile(b_s, 97.5))]}
    return result
