"""experiment=predict's check (research/predict_check.py): the rung it trains is the
compute-optimal one of `factor` x the ladder's largest compute, and on a ladder whose seeds
average to a known law, the rung's loss is predicted to the fit's precision."""

from __future__ import annotations

import json

import numpy as np
import pytest

from research import config, flops, predict_check, train
from research.analysis.predict import law
from tests.conftest import compose

TRUE = {"E": 1.8, "A": 300.0, "B": 500.0, "alpha": 0.32, "beta": 0.30}
BASE = ("data=synthetic", "data.seq_len=32", "model.n_layers=2", "model.n_heads=4", "train.batch_size=16",
        "schedule=wsd", "schedule.warmup=5")


def test_nearest_width_is_nearest_in_params():
    cfg = config.parse(compose(*BASE))
    d, n = predict_check.nearest_width(cfg, 256, 1e6)
    assert d % 8 == 0
    around = [flops.param_counts(config.ModelConfig(**{**cfg.model.__dict__, "d_model": x}), 256, 32)["params"]
              for x in (d - 8, d + 8)]
    assert all(abs(np.log(n / 1e6)) <= abs(np.log(a / 1e6)) for a in around)


def test_check_on_a_ladder_on_a_known_law(tmp_path, monkeypatch):
    ladder = tmp_path / "ladder"
    sizes, budgets = [1e5, 2e5, 4e5, 8e5], [2e6, 4e6, 8e6]
    for n in sizes:
        for d in budgets:
            for seed, noise in ((0, 1.01), (1, 0.99)):  # two seeds per rung, 1% either side of the law
                run = ladder / f"n{n:g}-d{d:g}-s{seed}"
                run.mkdir(parents=True)
                (run / "summary.json").write_text(json.dumps({
                    "status": "completed", "params": n, "tokens": d,
                    "final_val_loss": noise * float(law(TRUE, n, d))}))
    trained = {}

    def fake_run(cfg, run_dir, **kwargs):  # "trains" the rung: its loss is the true law's
        c = config.parse(cfg)
        n = flops.param_counts(c.model, 256, c.data.seq_len)["params"]
        d = c.train.steps * c.train.batch_size * c.data.seq_len
        trained.update(d_model=c.model.d_model, steps=c.train.steps, cooldowns=c.train.cooldowns)
        return {"status": "completed", "params": n, "tokens": d, "final_val_loss": float(law(TRUE, n, d)),
                "wall_s": 0.0}

    monkeypatch.setattr(train, "run", fake_run)
    result = predict_check.check(compose(*BASE), ladder, factor=8, n_boot=20, ablate=False)
    assert result["target_flops"] == pytest.approx(8 * 6 * 8e5 * 8e6)
    opt = result["compute_optimal"]
    assert 6 * opt["params"] * opt["tokens"] == pytest.approx(result["target_flops"])
    assert trained["cooldowns"] == [] and trained["d_model"] == result["heldout"]["d_model"]
    # The trained rung's tokens are D_opt to within one step.
    assert abs(result["heldout"]["tokens"] - opt["tokens"]) <= 16 * 32 / 2
    # The seeds of a rung are averaged before the fit: their mean is the exact law, so the
    # rung's loss is predicted to the fit's precision (~1e-5 relative).
    assert len(result["rows"]) == 12 and {r["seeds"] for r in result["rows"]} == {2}
    assert result["rel_error"] < 1e-4
    assert json.loads((ladder / "prediction.json").read_text())["predicted"] == result["predicted"]
    assert (ladder / "prediction.png").stat().st_size > 0
