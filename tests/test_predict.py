"""`analyze predict`: a known law is recovered at a held-out point, its interval covers the
truth, far targets warn, one fit serves many targets, bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from research import analyze
from research.analysis import load_runs, predict_loss, predict_runs
from research.analysis.predict import law

TRUE = {"E": 1.8, "A": 300.0, "B": 500.0, "alpha": 0.32, "beta": 0.30}


def _rows(n=40, noise=0.0, seed=1):  # one n and n_boot throughout: one compile of the fit
    """n rows on the true law: N in 1e6..1e8, D in 1e8..1e10, log-normal noise of sd `noise`."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e6), np.log(1e8), n))
    D = np.exp(rng.uniform(np.log(1e8), np.log(1e10), n))
    return N, D, law(TRUE, N, D) * np.exp(rng.normal(0, noise, n))


def test_exact_law_predicts_a_held_out_point_exactly():
    N, D, L = _rows()
    out = predict_loss(N, D, L, targets=[(3e8, 3e10)], n_boot=20, max_factor=20)
    p = out["predictions"][0]
    truth = float(law(TRUE, 3e8, 3e10))
    # The fit runs in float32: parameters good to ~1e-6 relative give the loss to ~1e-5.
    assert p["loss"] == pytest.approx(truth, rel=1e-4)
    assert p["ci"][0] == pytest.approx(truth, rel=1e-4) and p["ci"][1] == pytest.approx(truth, rel=1e-4)
    assert p["beyond"] == [] and p["flops"] == pytest.approx(6 * 3e8 * 3e10)
    assert out["fit"]["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-3)


def test_seeds_of_a_rung_are_averaged_before_the_fit():
    """Two seeds per (N, D), 1% either side of the law: the fit sees their mean, one row each
    (pooled, the near-L1 fit could settle anywhere between them)."""
    N, D, L = _rows()
    out = predict_loss(np.concatenate([N, N]), np.concatenate([D, D]), np.concatenate([1.01 * L, 0.99 * L]),
                       targets=[(3e8, 3e10)], n_boot=20, max_factor=20)
    assert out["fit"]["n"] == len(N)
    assert out["predictions"][0]["loss"] == pytest.approx(float(law(TRUE, 3e8, 3e10)), rel=1e-4)


def test_compute_optimal_target_spends_the_budget_and_sits_on_the_law():
    N, D, L = _rows()
    c = 6 * 3e8 * 3e9
    p = predict_loss(N, D, L, flops=[c], n_boot=20)["predictions"][0]
    assert 6 * p["params"] * p["tokens"] == pytest.approx(c, rel=1e-9)
    assert p["loss"] == pytest.approx(float(law(TRUE, p["params"], p["tokens"])), rel=1e-4)
    # Compute-optimal: a 10% shift of N at the same C (D the other way) costs loss under the law.
    for f in (0.9, 1.1):
        assert law(TRUE, p["params"] * f, p["tokens"] / f) > p["loss"]


def test_noisy_law_interval_covers_the_truth():
    # 0.5% noise on 40 rows; a target 3x past the largest N and D. With the noise known,
    # the interval must be wider than the noise-free one and hold the truth: the bootstrap
    # percentile interval is 95% by construction and this fixed draw is not a 1-in-20 miss
    # (its half-width is ~1%, the miss 0.1%; asserted below, so a change that narrows the
    # interval to nothing, or biases the point, fails).
    N, D, L = _rows(noise=0.005, seed=3)
    with pytest.warns(UserWarning, match="extrapolating: C"):  # C is 21x the largest fitted: past 20x
        p = predict_loss(N, D, L, targets=[(3e8, 3e10)], n_boot=200, max_factor=20)["predictions"][0]
    truth = float(law(TRUE, 3e8, 3e10))
    lo, hi = p["ci"]
    assert lo < truth < hi
    assert lo < p["loss"] < hi
    assert 1e-3 < (hi - lo) / truth < 0.1
    assert abs(p["loss"] - truth) / truth < 0.02


def test_far_target_warns():
    N, D, L = _rows()
    with pytest.warns(UserWarning, match="extrapolating: C = .* the largest fitted"):
        p = predict_loss(N, D, L, targets=[(5e8, 5e10)], n_boot=20, max_factor=10)["predictions"][0]
    assert [b[0] for b in p["beyond"]] == ["C"]  # N and D are 5x, C 25x


def _sweep(root: Path) -> Path:
    """Run dirs whose final val loss follows TRUE in (params, tokens), plus a diverged run."""
    N, D, L = _rows()
    for i, (n, d, l) in enumerate(zip(N, D, L)):
        run = root / f"r{i}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "status": "completed", "final_val_loss": l, "params": n, "non_embedding_params": 0.8 * n,
            "tokens": d, "config": {"train": {"steps": 100}}}))
    (root / "bad").mkdir()
    (root / "bad" / "summary.json").write_text(json.dumps({"status": "diverged", "final_val_loss": None,
                                                           "params": 1e6, "tokens": 1e9}))
    return root


def _main(capsys, *args) -> tuple[int, list[dict], list[str]]:
    code = analyze.main(["predict", *args])
    out, err = capsys.readouterr()
    return code, [json.loads(x) for x in out.splitlines() if x.strip()], [x for x in err.splitlines() if x]


def test_cli_on_run_dirs_and_a_targets_file(tmp_path, capsys):
    sweep = _sweep(tmp_path / "sweep")
    targets = tmp_path / "targets.csv"
    pd.DataFrame({"params": [1e8, 3e8], "tokens": [1e10, 5e11]}).to_csv(targets, index=False)
    code, lines, err = _main(capsys, str(sweep), "--targets", str(targets), "--boot", "20")
    assert code == 0
    assert len(lines) == 2 and lines[0]["fit"] == lines[1]["fit"]  # one fit, one line per row
    assert lines[0]["fit"]["n"] == 40  # the diverged run is left out, with a warning
    for line, (n, d) in zip(lines, [(1e8, 1e10), (3e8, 5e11)]):
        assert line["loss"] == pytest.approx(float(law(TRUE, n, d)), rel=1e-4)
        assert {"loss", "ci", "params", "tokens", "flops", "beyond", "fit"} <= line.keys()
    assert any("left out of fits" in x and "bad" in x for x in err)
    assert any(x.startswith("warning: extrapolating: D = 5e+11") for x in err)  # 50x: past 10x
    df = load_runs(sweep)  # the notebook function agrees with the CLI
    with pytest.warns(UserWarning, match="left out of fits: .*bad"):
        again = predict_runs(df, targets=[(1e8, 1e10)], n_boot=20)["predictions"][0]
    assert again["loss"] == lines[0]["loss"] and again["ci"] == lines[0]["ci"]


@pytest.mark.parametrize("args, message", [
    (["--params", "1e8"], "--tokens is required"),
    (["--params", "1e8", "--tokens", "1e9", "--flops", "1e18"], "give one of"),
    ([], "give one of"),
    (["--flops", "-1"], "flops must be positive"),
    (["--flops", "1e18", "--max-extrapolation", "0.5"], "--max-extrapolation must be > 1"),
])
def test_cli_bad_arguments_exit_2(tmp_path, capsys, args, message):
    path = tmp_path / "law.csv"
    N, D, L = _rows()
    pd.DataFrame({"params": N, "tokens": D, "loss": L}).to_csv(path, index=False)
    code, lines, err = _main(capsys, "--csv", str(path), *args, "--boot", "20")
    assert code == 2 and lines == []
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("frame, message", [
    ({"params": [1e6] * 6, "loss": [2.0] * 6}, "missing column(s) tokens"),
    ({"params": [1e6, 2e6], "tokens": [1e9, 2e9], "loss": [2.0, 1.9]}, "at least 5"),
    ({"params": [1e6, 2e6, 3e6, 4e6, 5e6, 0], "tokens": [1e9] * 6, "loss": [2.0] * 6}, "positive"),
])
def test_cli_bad_rows_exit_2(tmp_path, capsys, frame, message):
    path = tmp_path / "bad.csv"
    pd.DataFrame(frame).to_csv(path, index=False)
    code, lines, err = _main(capsys, "--csv", str(path), "--flops", "1e18", "--boot", "20")
    assert code == 2 and lines == [] and len(err) == 1 and message in err[0], err


def test_cli_missing_inputs_exit_2(tmp_path, capsys):
    code, _, err = _main(capsys, "--csv", str(tmp_path / "none.csv"), "--flops", "1e18")
    assert code == 2 and "no such file" in err[0]
    code, _, err = _main(capsys, str(tmp_path / "nodir"), "--flops", "1e18")
    assert code == 2 and "not a directory" in err[0]
