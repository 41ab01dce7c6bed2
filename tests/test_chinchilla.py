"""Chinchilla Approach 3: recovers a known law, ignores row order, CLI contract."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from research.analysis.chinchilla import compute_optimal, fit_approach3, init_grid

TRUE = {"E": 1.8, "A": 300.0, "B": 500.0, "alpha": 0.32, "beta": 0.30}


def _data(n=60, noise=0.002, seed=1):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e6), np.log(1e9), n))
    D = np.exp(rng.uniform(np.log(1e8), np.log(1e11), n))
    L = (TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"])
    return N, D, L * np.exp(rng.normal(0, noise, n))


def test_grid_is_hoffmanns():
    grid = init_grid()
    assert grid.shape == (4500, 5)
    assert sorted(set(grid[:, 3])) == [0.0, 0.5, 1.0, 1.5, 2.0]  # alpha
    assert sorted(set(grid[:, 0])) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]  # a


def test_recovers_known_law_whatever_the_row_order():
    N, D, L = _data()
    fit = fit_approach3(N, D, L, n_boot=20)
    for key in ("E", "alpha", "beta"):
        assert fit[key] == pytest.approx(TRUE[key], rel=0.05), key
    for key in ("A", "B"):
        assert fit[key] == pytest.approx(TRUE[key], rel=0.25), key
        lo, hi = fit["ci"][key]
        assert lo <= fit[key] <= hi
    assert fit["a"] + fit["b"] == pytest.approx(1.0)
    assert fit["n"] == 60
    perm = np.random.default_rng(7).permutation(len(N))
    again = fit_approach3(N[perm], D[perm], L[perm], n_boot=0)
    for key in ("E", "A", "B", "alpha", "beta"):
        assert again[key] == fit[key]
    # Compute-optimal allocation spends the budget: 6 N D = C.
    n_opt, d_opt = compute_optimal(fit, [1e20, 1e22])
    np.testing.assert_allclose(6 * n_opt * d_opt, [1e20, 1e22], rtol=1e-9)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 5"):
        fit_approach3([1, 2, 3], [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="positive"):
        fit_approach3([1, 2, 3, 4, -5, 6], [1] * 6, [1] * 6)


def _cli(repo, *args):
    return subprocess.run([sys.executable, "-m", "research.analyze", "fit", *args], cwd=repo,
                          capture_output=True, text=True, timeout=300)


def test_fit_cli_prints_json(repo, tmp_path):
    N, D, L = _data()
    path = tmp_path / "law.csv"
    pd.DataFrame({"params": N, "tokens": D, "loss": L, "note": "x"}).to_csv(path, index=False)
    proc = _cli(repo, "--csv", str(path), "--boot", "10")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "ci", "n"} <= out.keys()
    assert out["n"] == 60 and out["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05)


@pytest.mark.parametrize("frame, message", [
    ({"params": [1e6] * 6, "loss": [2.0] * 6}, "missing column"),
    ({"params": [1e6, 2e6, 3e6, 4e6, 5e6, 0], "tokens": [1e9] * 6, "loss": [2.0] * 6}, "positive"),
    ({"params": [1e6, 2e6], "tokens": [1e9, 2e9], "loss": [2.0, 1.9]}, "at least 5"),
])
def test_fit_cli_bad_input_exits_2(repo, tmp_path, frame, message):
    path = tmp_path / "bad.csv"
    pd.DataFrame(frame).to_csv(path, index=False)
    proc = _cli(repo, "--csv", str(path))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
