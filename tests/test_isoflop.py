"""Chinchilla Approach 2 (IsoFLOP parabolas) recovers a known law, whatever the row order."""

import numpy as np
import pytest

from research.analysis.isoflop import fit_approach2, profiles
from tests.test_frontier import A_TRUE, B_TRUE, LAW, law

G = (LAW["alpha"] * LAW["A"] / (LAW["beta"] * LAW["B"])) ** (1 / (LAW["alpha"] + LAW["beta"]))


def isoflop_sweep(budgets=(1e17, 1e18, 1e19, 1e20), noise=0.001, seed=0):
    """Per budget, 7 sizes spread 0.125x..8x around the true optimum; D = C / 6N."""
    rng = np.random.default_rng(seed)
    c, n = [], []
    for budget in budgets:
        n_opt = G * (budget / 6) ** A_TRUE
        for k in np.geomspace(1 / 8, 8, 7):
            c.append(budget)
            n.append(n_opt * k)
    c, n = np.array(c), np.array(n)
    d = c / (6 * n)
    return c, n, d, law(n, d) * np.exp(noise * rng.standard_normal(len(c)))


def test_approach2_recovers_known_exponents_whatever_the_row_order():
    c, n, d, loss = isoflop_sweep()
    fit = fit_approach2(c, n, d, loss, n_boot=100)
    assert fit["a"] == pytest.approx(A_TRUE, rel=0.03)
    assert fit["b"] == pytest.approx(B_TRUE, rel=0.03)
    assert [p["flops"] for p in fit["profiles"]] == [1e17, 1e18, 1e19, 1e20]
    assert all(p["inside"] and p["sizes"] == 7 for p in fit["profiles"])
    for p in fit["profiles"]:  # the minimum of each valley is close to the true optimum
        assert p["n_opt"] == pytest.approx(G * (p["flops"] / 6) ** A_TRUE, rel=0.25)
    lo, hi = fit["ci"]["a"]
    assert lo <= fit["a"] <= hi and hi - lo < 0.1
    perm = np.random.default_rng(5).permutation(len(c))
    again = fit_approach2(c[perm], n[perm], d[perm], loss[perm], n_boot=100)
    for key in ("a", "k_N", "b", "k_D", "ci"):
        assert again[key] == fit[key], key


def test_budget_without_a_valley_is_left_out_with_a_warning():
    c, n, d, loss = isoflop_sweep(budgets=(1e17, 1e18, 1e19))
    keep = (c != 1e19) | (n < np.sort(n[c == 1e19])[2])  # 1e19 keeps only its 2 smallest sizes
    with pytest.warns(UserWarning, match="fewer than 3 model sizes"):
        fit = fit_approach2(c[keep], n[keep], d[keep], loss[keep])
    assert [p["flops"] for p in fit["profiles"]] == [1e17, 1e18]
    # A budget whose loss falls ever faster with size has no minimum: skipped, not fitted.
    found, skipped = profiles([1e18] * 4, [1e6, 2e6, 4e6, 8e6], [1e9] * 4, [3.0, 2.95, 2.8, 2.5])
    assert not found and "no minimum" in skipped[0]


def test_approach2_rejects_bad_input():
    c, n, d, loss = isoflop_sweep(budgets=(1e17,))
    with pytest.raises(ValueError, match="at least 2 budgets"):
        fit_approach2(c, n, d, loss)
    c, n, d, loss = isoflop_sweep()
    with pytest.raises(ValueError, match="positive"):
        fit_approach2(c, np.where(n == n[0], 0.0, n), d, loss)
    with pytest.raises(ValueError, match="same length"):
        fit_approach2(c, n[:-1], d, loss)
