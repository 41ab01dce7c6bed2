"""Scaling-law fits, the runs table and the `python -m research.analyze report` CLI on hand-made sweeps.

Sweeps here are written to disk directly (summary.json + metrics.jsonl that
follow a known law): no training, so these tests take seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research import analyze
from research.analysis import best_val_loss, completed, fit_loglinear, fit_power_law, load_runs, power_law
from tests.conftest import RUNS, TOKENS_PER_STEP, TRUE_A, TRUE_ALPHA, TRUE_E, write_law_sweep, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- fit_power_law


def _noisy_law(E=1.7, A=400.0, alpha=0.35, n=12, noise=0.002, seed=0):
    x = np.geomspace(1e4, 1e8, n)
    rng = np.random.default_rng(seed)
    y = power_law(x, E, A, alpha) * (1 + noise * rng.standard_normal(n))
    return x, y


def test_power_law_formula():
    np.testing.assert_allclose(power_law([1.0, 100.0], 1.0, 2.0, 0.5), [3.0, 1.2])


def test_fit_recovers_known_law():
    E, A, alpha = 1.7, 400.0, 0.35
    x, y = _noisy_law(E, A, alpha)
    fit = fit_power_law(x, y)
    assert fit["E"] == pytest.approx(E, rel=0.05)
    assert fit["A"] == pytest.approx(A, rel=0.05)
    assert fit["alpha"] == pytest.approx(alpha, rel=0.05)
    assert fit["n"] == 12
    # The residual is of the order of the noise (0.2% in y is ~0.002 in log y).
    assert 0 < fit["rmse_log"] < 0.005


def test_fit_exact_data_is_exact():
    E, A, alpha = 2.0, 60.0, 0.3
    x = np.geomspace(1e3, 1e7, 8)
    fit = fit_power_law(x, power_law(x, E, A, alpha))
    assert fit["E"] == pytest.approx(E, rel=1e-3)
    assert fit["A"] == pytest.approx(A, rel=1e-3)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert fit["rmse_log"] < 1e-6


def test_fit_independent_of_row_order():
    x, y = _noisy_law()
    fit = fit_power_law(x, y)
    perm = np.random.default_rng(1).permutation(len(x))
    assert not np.array_equal(perm, np.arange(len(x)))
    fit_perm = fit_power_law(x[perm], y[perm])
    for key in ("E", "A", "alpha", "rmse_log"):
        assert fit_perm[key] == pytest.approx(fit[key], rel=1e-9, abs=1e-12), key
    # Lists work as well as arrays.
    fit_list = fit_power_law(list(x[::-1]), list(y[::-1]))
    assert fit_list["alpha"] == pytest.approx(fit["alpha"], rel=1e-9)


def test_fit_bootstrap_ci_covers_truth_and_ignores_row_order():
    E, A, alpha = 1.7, 400.0, 0.35
    x, y = _noisy_law(E, A, alpha, n=20, noise=0.01)
    fit = fit_power_law(x, y, n_boot=100)
    for key, true in (("E", E), ("A", A), ("alpha", alpha)):
        lo, hi = fit["ci"][key]
        assert lo <= fit[key] <= hi, key
        assert lo <= true <= hi, key
    assert fit["ci"]["alpha"][1] - fit["ci"]["alpha"][0] < 0.3  # informative, not [0, 5]
    perm = np.random.default_rng(2).permutation(len(x))
    assert fit_power_law(x[perm], y[perm], n_boot=100)["ci"] == fit["ci"]
    assert "ci" not in fit_power_law(x, y)


def test_loglinear_recovers_exponent():
    x = np.geomspace(1e15, 1e20, 9)
    y = 0.3 * x**0.49 * np.exp(0.01 * np.random.default_rng(0).standard_normal(9))
    fit = fit_loglinear(x, y, n_boot=50)
    assert fit["a"] == pytest.approx(0.49, abs=0.01)
    assert fit["ci"]["a"][0] < 0.49 < fit["ci"]["a"][1]
    assert fit_loglinear(x[::-1], y[::-1]) == fit_loglinear(x, y)
    with pytest.raises(ValueError, match="2 distinct"):
        fit_loglinear([1e3, 1e3], [1.0, 2.0])


@pytest.mark.parametrize(
    "x, y",
    [
        ([1e4, 1e5], [3.0, 2.5]),  # fewer than 3 points
        ([], []),
        ([1e4, 0.0, 1e6], [3.0, 2.5, 2.2]),  # non-positive x
        ([1e4, -1e5, 1e6], [3.0, 2.5, 2.2]),
        ([1e4, 1e5, 1e6], [3.0, 0.0, 2.2]),  # non-positive y
        ([1e4, 1e5, 1e6], [3.0, -2.5, 2.2]),
        ([1e4, 1e5, 1e6], [3.0, 2.5]),  # length mismatch
    ],
)
def test_fit_rejects_bad_input(x, y):
    with pytest.raises(ValueError):
        fit_power_law(x, y)


# ---------------------------------------------------------------- CLI


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return write_law_sweep(tmp_path / "sweep")


def _cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "research.analyze", *args],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )


def _stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    # A first matplotlib import on a fresh machine may log that it is building its
    # font cache; that is matplotlib's line, not the CLI's.
    return [ln for ln in proc.stderr.splitlines()
            if ln.strip() and not ln.startswith("Matplotlib is building the font cache")]


def test_report_cli(repo: Path, sweep: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = _cli(repo, "report", str(sweep), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    stdout = proc.stdout

    # The table: a header and one row per completed run, none for the diverged one.
    assert "non_emb_params" in stdout and "val_loss" in stdout
    for name, d_model, n_layers, n in RUNS:
        assert str(n) in stdout, n
    assert "8000000" not in stdout
    assert "alpha =" in stdout

    for name in ("report.md", "fit.json", "loss_vs_params.png", "loss_curves.png", "compute_frontier.png"):
        assert (out / name).is_file(), name
    for png in ("loss_vs_params.png", "loss_curves.png", "compute_frontier.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert not (out / "isoflop.png").exists()  # not an isoFLOP sweep
    assert f"wrote {out / 'report.md'}" in stdout
    assert not (sweep / "report.md").exists()  # --out was honoured

    result = json.loads((out / "fit.json").read_text())
    fit = result["fit"]
    assert fit["n"] == len(RUNS)
    assert fit["alpha"] == pytest.approx(TRUE_ALPHA, rel=0.02)
    assert fit["E"] == pytest.approx(TRUE_E, rel=0.02)
    assert fit["A"] == pytest.approx(TRUE_A, rel=0.05)
    assert fit["ci"]["alpha"][0] <= fit["alpha"] <= fit["ci"]["alpha"][1]
    # The alpha printed is the one saved.
    assert f"alpha = {fit['alpha']:.4f}" in stdout
    assert "Approach 1" in stdout and "approach1" in result and "a" in result["approach1"]
    assert "Approach 2" not in stdout and "approach2" not in result

    run_names = [Path(r["run_dir"]).name for r in result["runs"]]
    assert run_names == [name for name, *_ in RUNS]  # sorted by size
    assert [r["non_embedding_params"] for r in result["runs"]] == [n for *_, n in RUNS]
    skipped = [Path(p["run_dir"]).name for p in result["skipped"]]
    assert skipped == ["r5_diverged"]
    assert result["skipped"][0]["status"] == "diverged"
    assert "r5_diverged" in proc.stderr  # said, not silently dropped
    assert "r5_diverged" not in run_names

    report = (out / "report.md").read_text()
    for png in ("loss_vs_params.png", "loss_curves.png", "compute_frontier.png"):
        assert f"({png})" in report
    assert f"{fit['alpha']:.4f}" in report and "r5_diverged" in report


def test_report_cli_defaults_out_to_first_dir(repo: Path, sweep: Path):
    proc = _cli(repo, "report", str(sweep))
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "report.md").is_file()
    assert (sweep / "fit.json").is_file()


def test_report_cli_empty_dir(repo: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli(repo, "report", str(empty))
    assert proc.returncode == 2
    lines = _stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert str(empty) in lines[0]
    assert not (empty / "report.md").exists()


def test_report_cli_missing_dir(repo: Path, tmp_path: Path):
    missing = tmp_path / "does-not-exist"
    proc = _cli(repo, "report", str(missing))
    assert proc.returncode == 2
    lines = _stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert str(missing) in lines[0]
    assert not missing.exists()


def test_report_cli_no_completed_run(repo: Path, tmp_path: Path):
    root = tmp_path / "sweep"
    write_run(root, "only_diverged", 64, 2, 100_000, "diverged", None)
    proc = _cli(repo, "report", str(root))
    assert proc.returncode == 2
    lines = _stderr_lines(proc)
    assert len(lines) == 1 and "completed" in lines[0], proc.stderr
    assert not (root / "report.md").exists()


# ---------------------------------------------------------------- runs table


def test_runs_table_keeps_every_run_and_best_val_loss(sweep: Path):
    df = load_runs(sweep)
    assert len(df) == len(RUNS) + 1  # the diverged run is a row too
    row = df[df["run_dir"].str.endswith("r0")].iloc[0]
    final = power_law(20_000, TRUE_E, TRUE_A, TRUE_ALPHA)
    assert row["best_val_loss"] == pytest.approx(final)  # min over the two logged val losses
    for col in ("params", "non_embedding_params", "tokens", "flops", "final_val_loss", "status",
                "model.d_model", "train.steps"):
        assert col in df, col
    assert best_val_loss(sweep / "r5_diverged") == pytest.approx(5.0)
    with pytest.warns(UserWarning, match="r5_diverged.*diverged"):
        ok = completed(df, "final_val_loss")
    assert len(ok) == len(RUNS)


# ---------------------------------------------------------------- report: isoFLOP sweeps, bad input
# In process (`analyze.main`): the same code path as the CLI, without a second interpreter.

# Law in (N, D) whose isoFLOP valleys are known; C = 6 N D as in the fixture's accounting.
ISO = {"E": 1.8, "A": 300.0, "B": 500.0, "alpha": 0.32, "beta": 0.30}
ISO_A = ISO["beta"] / (ISO["alpha"] + ISO["beta"])


def _iso_sweep(root: Path, budgets=(1e14, 1e15, 1e16)) -> Path:
    g = (ISO["alpha"] * ISO["A"] / (ISO["beta"] * ISO["B"])) ** (1 / (ISO["alpha"] + ISO["beta"]))
    for budget in budgets:
        for k in np.geomspace(0.2, 5.0, 5):
            n = g * (budget / 6) ** ISO_A * k
            steps = max(10, round(budget / (6 * n) / TOKENS_PER_STEP))
            n = budget / (6 * steps * TOKENS_PER_STEP)  # whole steps: the budget is spent exactly
            loss = ISO["E"] + ISO["A"] / n ** ISO["alpha"] + ISO["B"] / (steps * TOKENS_PER_STEP) ** ISO["beta"]
            write_run(root, f"c{budget:.0e}_n{n:.3g}", 64, 2, n, "completed", float(loss), steps=steps,
                       budget=budget)
    return root


def _main(capsys, *args) -> tuple[int, str, list[str]]:
    code = analyze.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, [ln for ln in captured.err.splitlines() if ln.strip()]


def test_report_isoflop_sweep(tmp_path: Path, capsys):
    sweep = _iso_sweep(tmp_path / "iso")
    code, stdout, _ = _main(capsys, "report", str(sweep))
    assert code == 0
    result = json.loads((sweep / "fit.json").read_text())
    a2 = result["approach2"]
    assert a2["a"] == pytest.approx(ISO_A, rel=0.05)
    assert [p["flops"] for p in a2["profiles"]] == [1e14, 1e15, 1e16]
    assert result["fit"] is None  # L(N) across budgets would mix compute levels: not fitted
    assert "Approach 2" in stdout and f"C^{a2['a']:.4f}" in stdout
    assert (sweep / "isoflop.png").read_bytes()[:8] == PNG_MAGIC
    assert (sweep / "compute_frontier.png").read_bytes()[:8] == PNG_MAGIC  # with Approach 2's minima
    assert "(isoflop.png)" in (sweep / "report.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("empty", "no run directories"),
    ("two_runs", "at least 3 completed runs"),
    ("missing_column", "missing column(s) non_embedding_params"),
    ("non_positive", "params must be positive"),
    ("missing_metric", "no 'tokens' column"),
    ("one_budget", "at least 2 budgets"),
])
def test_report_bad_input_is_one_line_exit_2(tmp_path: Path, capsys, case, message):
    root = tmp_path / case
    root.mkdir()
    if case == "two_runs":
        for name, d, layers, n in RUNS[:2]:
            write_run(root, name, d, layers, n, "completed", 3.0)
    elif case == "missing_column":
        for name, d, layers, n in RUNS[:3]:
            summary = json.loads((write_run(root, name, d, layers, n, "completed", 3.0) / "summary.json").read_text())
            del summary["non_embedding_params"]
            (root / name / "summary.json").write_text(json.dumps(summary))
    elif case == "non_positive":
        for name, d, layers, n in RUNS[:3]:
            write_run(root, name, d, layers, n, "completed", 3.0)
        summary = json.loads((root / "r1" / "summary.json").read_text())
        summary["params"] = 0
        (root / "r1" / "summary.json").write_text(json.dumps(summary))
    elif case == "missing_metric":
        for name, d, layers, n in RUNS[:3]:
            run = write_run(root, name, d, layers, n, "completed", 3.0)
        (run / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n')
    elif case == "one_budget":
        _iso_sweep(root, budgets=(1e15,))
    code, _, err = _main(capsys, "report", str(root))
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (root / "report.md").exists()


# ---------------------------------------------------------------- --metric: a law per eval set


def test_report_metric_fits_another_eval_set(tmp_path: Path, capsys):
    """`--metric val/code/bpb` fits that summary value (here on a law of its own), not final_val_loss."""
    e, a, alpha = 0.8, 25.0, 0.25
    for name, d_model, n_layers, n in RUNS:
        bpb = float(e + a * n**-alpha)
        write_run(tmp_path, name, d_model, n_layers, n, "completed", float(TRUE_E + TRUE_A * n**-TRUE_ALPHA),
                  **{"val/code/bpb": bpb, "val/code/loss": bpb * 0.5})
        with (tmp_path / name / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 300, "val/code/bpb": bpb + 0.1}) + "\n")
            f.write(json.dumps({"step": 400, "val/code/bpb": bpb}) + "\n")
    code, stdout, _ = _main(capsys, "report", str(tmp_path), "--metric", "val/code/bpb")
    assert code == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["metric"] == "val/code/bpb"
    # Exact data: the least-squares fit on log L recovers the law to the optimiser's tolerance.
    assert fit["fit"]["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert fit["fit"]["E"] == pytest.approx(e, rel=1e-3)
    assert [r["best_val_loss"] for r in fit["runs"]] == pytest.approx([e + a * n**-alpha for *_, n in RUNS])
    assert "of val/code/bpb over N" in stdout

    code, _, err = _main(capsys, "report", str(tmp_path), "--metric", "val/web/bpb")
    assert code == 2 and len(err) == 1
    assert "--metric: no run has 'val/web/bpb'" in err[0] and "val/code/bpb" in err[0]


def test_fit_csv_metric_names_the_column(tmp_path: Path, capsys):
    (tmp_path / "runs.csv").write_text("params,tokens,val/code/bpb\n1,2,3\n")
    code, _, err = _main(capsys, "fit", "--csv", str(tmp_path / "runs.csv"))
    assert code == 2 and "missing column(s) loss" in err[0]
    code, _, err = _main(capsys, "fit", "--csv", str(tmp_path / "runs.csv"), "--metric", "val/code/bpb")
    assert code == 2 and "missing column" not in err[0]  # the column is found; 1 row is too few to fit
