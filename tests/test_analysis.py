"""Scaling-law fit and the `python -m research.analyze report` CLI on a hand-made sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research.analysis import fit_power_law, power_law

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


TRUE_E, TRUE_A, TRUE_ALPHA = 2.0, 60.0, 0.3
# (name, d_model, n_layers, non-embedding params)
RUNS = [
    ("r0", 32, 2, 20_000),
    ("r1", 64, 2, 80_000),
    ("r2", 96, 3, 300_000),
    ("r3", 128, 4, 1_000_000),
    ("r4", 192, 4, 4_000_000),
]


def _write_run(root: Path, name: str, d_model: int, n_layers: int, n: int, status: str,
               final: float | None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "status": status,
        "final_val_loss": final,
        "params": n + 256 * d_model,
        "non_embedding_params": n,
        "config": {"model": {"d_model": d_model, "n_layers": n_layers}},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    end = final if final is not None else 5.0
    rows = [{"step": s, "loss": end + 3.0 / s} for s in (1, 10, 50, 100, 200)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for name, d_model, n_layers, n in RUNS:
        _write_run(root, name, d_model, n_layers, n, "completed",
                   float(power_law(n, TRUE_E, TRUE_A, TRUE_ALPHA)))
    _write_run(root, "r5_diverged", 256, 4, 8_000_000, "diverged", None)
    return root


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

    for name in ("report.md", "fit.json", "loss_vs_params.png", "loss_curves.png"):
        assert (out / name).is_file(), name
    for png in ("loss_vs_params.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert not (sweep / "report.md").exists()  # --out was honoured

    result = json.loads((out / "fit.json").read_text())
    fit = result["fit"]
    assert fit["n"] == len(RUNS)
    assert fit["alpha"] == pytest.approx(TRUE_ALPHA, rel=0.02)
    assert fit["E"] == pytest.approx(TRUE_E, rel=0.02)
    assert fit["A"] == pytest.approx(TRUE_A, rel=0.05)
    # The alpha printed is the one saved.
    assert f"alpha = {fit['alpha']:.4f}" in stdout

    run_names = [Path(r["run_dir"]).name for r in result["runs"]]
    assert run_names == [name for name, *_ in RUNS]  # sorted by size
    assert [r["non_embedding_params"] for r in result["runs"]] == [n for *_, n in RUNS]
    skipped = [Path(p).name for p in result["skipped"]]
    assert skipped == ["r5_diverged"]
    assert "r5_diverged" not in run_names

    report = (out / "report.md").read_text()
    assert "loss_vs_params.png" in report and "loss_curves.png" in report
    assert f"{fit['alpha']:.4f}" in report


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
    _write_run(root, "only_diverged", 64, 2, 100_000, "diverged", None)
    proc = _cli(repo, "report", str(root))
    assert proc.returncode == 2
    lines = _stderr_lines(proc)
    assert len(lines) == 1 and "completed" in lines[0], proc.stderr
    assert not (root / "report.md").exists()
