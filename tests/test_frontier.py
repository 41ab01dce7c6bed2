"""Chinchilla Approach 1 (envelope of training curves) recovers a known law, whatever the row order."""

import numpy as np
import pandas as pd
import pytest

from research.analysis.frontier import envelope, fit_approach1

# Hoffmann et al.'s fitted law (their eq. 10); C = 6 N D in this synthetic world.
LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
A_TRUE = LAW["beta"] / (LAW["alpha"] + LAW["beta"])  # N_opt ~ C^a
B_TRUE = LAW["alpha"] / (LAW["alpha"] + LAW["beta"])  # D_opt ~ C^b


def law(n, d):
    return LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]


def synthetic_curves(noise=0.001, seed=0, sizes=21):
    """A ladder of 1e6..1e11 params, each trained from 5 to 200 tokens per param, 40 logged points."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, n in enumerate(np.geomspace(1e6, 1e11, sizes)):
        d = np.geomspace(5 * n, 200 * n, 40)
        loss = law(n, d) * np.exp(noise * rng.standard_normal(len(d)))
        frames.append(pd.DataFrame({"run_dir": f"run{i:02d}", "N": n, "flops": 6 * n * d,
                                    "tokens": d, "loss": loss}))
    return pd.concat(frames, ignore_index=True)


def test_envelope_is_the_lowest_curve():
    curves = synthetic_curves(noise=0.0, sizes=11)
    env = envelope(curves, points=50)
    assert len(env) > 10 and env["flops"].is_monotonic_increasing
    for row in env.itertuples():
        # No run reaching this FLOP count has a lower (interpolated) loss.
        for _, c in curves.groupby("run_dir"):
            if c["flops"].min() <= row.flops <= c["flops"].max():
                lc = np.exp(np.interp(np.log(row.flops), np.log(c["flops"]), np.log(c["loss"])))
                assert row.loss <= lc * (1 + 1e-9)
        assert row.tokens == pytest.approx(row.flops / (6 * row.N))
    # Losses fall with compute along the frontier.
    assert (np.diff(env["loss"]) <= 1e-12).all()


def test_approach1_recovers_known_exponents_whatever_the_row_order():
    curves = synthetic_curves()
    fit = fit_approach1(curves, n_boot=50)
    assert fit["a"] == pytest.approx(A_TRUE, rel=0.04)
    assert fit["b"] == pytest.approx(B_TRUE, rel=0.04)
    assert fit["sizes"] >= 15
    assert fit["ci"]["a"][0] <= fit["a"] <= fit["ci"]["a"][1]
    shuffled = curves.sample(frac=1.0, random_state=3)
    again = fit_approach1(shuffled, n_boot=50)
    for key in ("a", "k_N", "b", "k_D"):
        assert again[key] == fit[key], key
    assert again["ci"] == fit["ci"]


def test_approach1_rejects_bad_input():
    curves = synthetic_curves(sizes=3)
    with pytest.raises(ValueError, match="missing column"):
        fit_approach1(curves.drop(columns=["tokens"]))
    bad = curves.copy()
    bad.loc[5, "loss"] = -1.0
    with pytest.raises(ValueError, match="positive"):
        fit_approach1(bad)
    with pytest.raises(ValueError, match="no points"):
        fit_approach1(curves.iloc[:0])
    one_size = curves[curves["run_dir"] == "run00"]
    with pytest.raises(ValueError, match="at least 2"):
        fit_approach1(one_size, min_runs=1)
    with pytest.raises(ValueError, match="do not overlap"):
        fit_approach1(one_size)
