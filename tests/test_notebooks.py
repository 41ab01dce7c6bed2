"""The notebooks in experiments/ run headless in the test suite, so they cannot rot.

The ladder notebook reads a hand-written sweep that follows a known law (no
training: fast); the interpretation notebook opens a tiny run trained here
with train.stats_every=10, which also checks that the loop logs those stats.
Both take their inputs from environment variables.
"""

import ast
import json
import re
import os
from pathlib import Path

import jax
import nbformat
import pytest
from nbclient import NotebookClient

from research import train
from tests.conftest import RUNS, TINY, TRUE_ALPHA, compose, write_law_sweep


def _execute(repo: Path, name: str, env_extra: dict) -> nbformat.NotebookNode:
    nb = nbformat.read(repo / "experiments" / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{name}.ipynb is committed with outputs"
    env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **env_extra}
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(repo / "experiments")}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, if a cell fails
    return nb


def _text(nb) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   for c in nb.cells for o in c.get("outputs", []))


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny_run")
    train.run(compose(*TINY, "train.stats_every=10", "mesh=single"), run_dir, devices=jax.devices()[:1])
    return run_dir


def test_training_logs_stats_every_n_steps(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in rows if "act_rms/resid0" in r]
    assert [r["step"] for r in stats] == [10, 20]  # train.stats_every=10, and nowhere else
    assert all(r["update_rms/block0"] > 0 and r["act_rms/resid2"] > 0 for r in stats)
    assert all("loss" in r for r in stats)  # merged into the step's row, not a second row
    assert len({r["step"] for r in rows}) == len(rows)


def test_ladder_notebook_fits_and_plots(repo, tmp_path):
    sweep = write_law_sweep(tmp_path / "sweep")
    for path in sweep.glob("*/summary.json"):  # two eval sets in bits per byte, per domain
        summary = json.loads(path.read_text())
        if summary["final_val_loss"]:
            n = summary["non_embedding_params"]
            summary.update({"val/code/bpb": 0.8 + 25 * n**-0.25, "val/prose/bpb": 1.2 + 9 * n**-0.2})
        path.write_text(json.dumps(summary))
    nb = _execute(repo, "ladder", {"LADDER_SWEEP": str(sweep)})
    text = _text(nb)
    assert f"research from {repo / 'research'}" in text  # the kernel ran this checkout's code
    assert f"{len(RUNS)} of {len(RUNS) + 1} runs completed" in text
    assert "left out of fits" in text and "r5_diverged" in text
    assert f"{TRUE_ALPHA:.3g}" in text  # the law's alpha, recovered in the fits table
    assert "sizes on the envelope" in text  # Approach 1 was fitted
    assert _images(nb) >= 4  # loss vs params, curves, per eval set, compute frontier
    laws = ast.literal_eval(re.search(r"per-set laws: (\{.*\})", text).group(1))
    # Exact data: recovered to the fit's tolerance (test_analysis: rel 1e-3), printed to 4 decimals.
    assert laws["code"] == pytest.approx({"E": 0.8, "A": 25.0, "alpha": 0.25}, rel=2e-3)
    assert laws["prose"] == pytest.approx({"E": 1.2, "A": 9.0, "alpha": 0.2}, rel=2e-3)
    assert {p.name for p in (sweep / "report").iterdir()} >= {"report.md", "fit.json", "compute_frontier.png"}


def test_interpret_notebook(repo, tiny_run):
    nb = _execute(repo, "interpret", {"LADDER_RUN": str(tiny_run), "LADDER_TEXT": "def f(x):\n    return x + 1\n"})
    text = _text(nb)
    assert str(tiny_run) in text and "gap" in text and "act_rms/resid2" in text
    assert _images(nb) >= 5  # attention, attribution, logit lens, activation and update RMS
