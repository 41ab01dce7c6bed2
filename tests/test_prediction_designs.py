"""experiments/prediction_designs.py: sub-ladders of a grid are refitted and score their
predictions of the grid's larger-compute rows; on a grid that follows a known law exactly,
every prediction is exact."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from research.analysis.predict import law
from tests.conftest import REPO

TRUE = {"E": 1.2, "A": 80.0, "B": 900.0, "alpha": 0.35, "beta": 0.45}
SCRIPT = REPO / "experiments" / "prediction_designs.py"


def _grid(root, sizes, budgets):
    for n in sizes:
        for d in budgets:
            run = root / f"n{n:g}-d{d:g}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps(
                {"status": "completed", "params": n, "tokens": d, "final_val_loss": float(law(TRUE, n, d))}))


def _script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_sub_ladders_of_an_exact_law_predict_exactly(tmp_path):
    sizes, budgets = [2e4, 4e4, 8e4, 1.6e5], [1e6, 2e6, 4e6, 8e6]
    _grid(tmp_path / "grid", sizes, budgets)
    out = tmp_path / "designs.csv"
    proc = _script(tmp_path / "grid", "--min-sizes", 3, "--min-budgets", 4, "--factor", 1, "--boot", 10,
                   "--csv", out, "--plot", tmp_path / "designs.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(out)
    # Sizes [2e4..8e4] with every budget: the rows outside it with at least its largest compute
    # (6 x 8e4 x 8e6) are 1.6e5 at 4e6 (1x) and 8e6 tokens (2x). Larger sub-ladders hold every row.
    table = table.sort_values("target_d")
    assert list(zip(table["target_n"], table["target_d"])) == [(1.6e5, 4e6), (1.6e5, 8e6)]
    assert table["compute_ratio"].tolist() == pytest.approx([1.0, 2.0]) and (table["n_max"] == 8e4).all()
    assert table["error"].abs().max() < 1e-4  # float64 fit of an exact law
    # Every resample of an exact law refits it: the interval closes on the actual loss.
    for end in ("ci_lo", "ci_hi"):
        assert ((table[end] - table["actual"]).abs() < 1e-4 * table["actual"]).all()
    assert "median |error| % by sizes: 3:" in proc.stdout
    assert (tmp_path / "designs.png").stat().st_size > 0


def test_too_small_a_grid_is_one_line_and_exit_2(tmp_path):
    _grid(tmp_path / "grid", [2e4, 4e4], [1e6, 2e6, 4e6])
    proc = _script(tmp_path / "grid")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: ['{tmp_path / 'grid'}']: the grid has 2 sizes and 3 budgets; --min-sizes 3 and "
        "--min-budgets 3 need more"]


def test_point_predictions_without_bootstrap(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import prediction_designs
    finally:
        sys.path.remove(str(SCRIPT.parent))
    _grid(tmp_path / "grid", [2e4, 4e4, 8e4, 1.6e5], [1e6, 2e6, 4e6])
    grid = prediction_designs.grid_rows([tmp_path / "grid"])
    table = prediction_designs.score(grid, grid.iloc[:0], factor=2, min_sizes=3, min_budgets=3, boot=0)
    # Sizes [2e4..8e4]: 1.6e5 at 4e6 tokens has 2x its largest compute (6 x 8e4 x 4e6).
    assert list(zip(table["target_n"], table["target_d"])) == [(1.6e5, 4e6)]
    assert "ci_lo" not in table and abs(table["error"].iloc[0]) < 1e-4
