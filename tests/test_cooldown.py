"""Cooldown branches (train.cooldowns): a branch is exactly the separate run of its budget,
leaves the main run untouched, is a row of load_runs, and a run preempted or killed in a
branch resumes to bitwise the same result."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from research import config, cooldown, train
from research.analysis import load_runs
from research.config import ConfigError, ScheduleConfig
from tests.conftest import TINY, compose

STEPS = 30
# Budget 15 steps: decay round(15 * 0.2) = 3 steps, so the branch starts at step 12.
ARGS = (*TINY, "schedule=wsd", f"train.steps={STEPS}", "train.log_every=1", "checkpoint.every=7",
        "logging.backends=[]", "mesh=single")
COOL = "train.cooldowns=[0.5,1.0]"
TIMING = {"tokens_per_s", "mfu"}


def _run(run_dir: Path, *extra: str) -> dict:
    return train.run(compose(*ARGS, *extra), run_dir, devices=jax.devices()[:1])


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def _params(run_dir: Path, step: int = STEPS):
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
    return jax.tree.leaves(jax.tree.map(np.asarray, state["params"]))


def _branch(run_dir: Path) -> dict:
    return json.loads((run_dir / "branches" / "0.5" / "summary.json").read_text())


def test_branch_points_follow_the_wsd_arithmetic():
    s = ScheduleConfig(name="wsd", warmup=10, decay_frac=0.2)
    got = cooldown.branches([1.0, 0.25, 0.5], 1000, s)
    # Budget T = f * steps; decay round(0.2 T); the branch starts where that decay would.
    assert [(b.fraction, b.steps, b.start, b.decay_steps) for b in got] == [(0.25, 250, 200, 50),
                                                                          (0.5, 500, 400, 100)]
    assert cooldown.branches([], 1000, ScheduleConfig()) == []
    # Every branch starts in the main run's stable phase (at or before its decay begins).
    for steps in range(2, 60):
        for d in (0.1, 0.25, 0.5, 0.9, 1.0):
            fracs = sorted({round(k / steps, 6) for k in range(1, steps)})
            ok = []
            for f in fracs:
                try:
                    ok += cooldown.branches([f], steps, ScheduleConfig(name="wsd", warmup=0, decay_frac=d))
                except ConfigError:
                    pass  # a budget of 1 step starts at 0 with warmup 0: fine; others are duplicates
            assert all(b.start <= steps - cooldown.decay_steps(steps, d) for b in ok)


@pytest.mark.parametrize("overrides, message", [
    (("schedule=cosine", "train.cooldowns=[0.5]"), "needs schedule.name=wsd"),
    (("schedule=wsd", "train.cooldowns=[0.5,1.5]"), "must be in (0, 1], got 1.5"),
    (("schedule=wsd", "train.cooldowns=[0.5,0.51]"), "give the same budget"),
    (("schedule=wsd", "schedule.warmup=9", "train.cooldowns=[0.5]"), "inside the warmup"),
])
def test_bad_cooldowns_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match="train.cooldowns") as err:
        config.parse(compose(*TINY, "train.steps=20", *overrides))
    assert message in str(err.value)


def _check_branch_rows(root: Path, with_branch: dict, separate: dict, plain: dict) -> None:
    b = _branch(root / "with")
    # Same init, batches and lr up to step 12, then the 15-step run's decay: the same numbers.
    assert b["status"] == "completed"
    assert b["final_val_loss"] == separate["final_val_loss"]
    assert b["final_train_loss"] == separate["final_train_loss"]
    assert (b["steps"], b["tokens"], b["flops"]) == (15, separate["tokens"], separate["flops"])
    assert (b["branch_fraction"], b["branch_from_step"]) == (0.5, 12)
    # The branch copied the state: the main run ends where a run without branches does.
    assert with_branch["final_val_loss"] == plain["final_val_loss"]
    assert _rows(root / "with") == _rows(root / "plain")
    for x, y in zip(_params(root / "with"), _params(root / "plain"), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not (root / "with" / "branches" / "0.5" / "checkpoints").exists()  # removed once recorded
    # Cost: the 3 decay steps on top of 30, against 30 + 15 for separate runs.
    assert with_branch["cooldown_cost"]["ratio"] == pytest.approx(33 / 45)
    assert [c["status"] for c in with_branch["cooldowns"]] == ["completed"]
    # load_runs: the branch is a row with its own steps, tokens and loss.
    df = load_runs(root / "with").set_index("steps")
    assert sorted(df.index) == [15, 30]
    assert df.loc[15, "tokens"] * 2 == df.loc[30, "tokens"]
    assert df.loc[15, "branch_fraction"] == 0.5 and df.loc[15, "status"] == "completed"
    assert df.loc[15, "final_val_loss"] == b["final_val_loss"]


def _assert_same(run_dir: Path, reference: Path) -> None:
    assert _branch(run_dir)["final_val_loss"] == _branch(reference)["final_val_loss"]
    assert _branch(run_dir)["final_train_loss"] == _branch(reference)["final_train_loss"]
    assert _rows(run_dir) == _rows(reference)
    for x, y in zip(_params(run_dir), _params(reference), strict=True):
        np.testing.assert_array_equal(x, y)  # bitwise


def test_branches_end_to_end(tmp_path, monkeypatch):
    """One test, so the reference runs are trained once: a branch equals the separate run of
    its budget and leaves the main run as it was; preempted in the branch, then killed in it
    (after it saved a checkpoint), the run resumes twice to bitwise the same result."""
    with_branch = _run(tmp_path / "with", COOL)
    separate = _run(tmp_path / "separate", "train.steps=15")
    plain = _run(tmp_path / "plain")
    _check_branch_rows(tmp_path, with_branch, separate, plain)

    run_dir = tmp_path / "interrupted"
    run_one, init = cooldown.Cooldowns._run_one, cooldown.Cooldowns.__init__

    def signalled(self, b, state, stop):  # SIGTERM arrives as the branch starts
        stop.signum = signal.SIGTERM
        return run_one(self, b, state, stop)

    monkeypatch.setattr(cooldown.Cooldowns, "_run_one", signalled)
    first = _run(run_dir, COOL)
    assert first["status"] == "preempted" and first["steps"] == 12
    assert (run_dir / "checkpoints" / "12").is_dir()  # saved at the branch point
    assert (run_dir / "branches" / "0.5" / "checkpoints" / "13").is_dir()  # and in the branch
    monkeypatch.setattr(cooldown.Cooldowns, "_run_one", run_one)

    def crashing(self, *args, **kwargs):  # killed after the branch saved step 14, before its record
        init(self, *args, **kwargs)
        self.evaluate = lambda params: (_ for _ in ()).throw(KeyboardInterrupt("killed"))

    monkeypatch.setattr(cooldown.Cooldowns, "__init__", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(run_dir, COOL)
    assert (run_dir / "branches" / "0.5" / "checkpoints" / "14").is_dir()  # checkpoint.every=7
    assert not (run_dir / "branches" / "0.5" / "summary.json").exists()
    monkeypatch.setattr(cooldown.Cooldowns, "__init__", init)

    again = _run(run_dir, COOL)
    assert again["status"] == "completed" and again["resumed_from"] == 12
    _assert_same(run_dir, tmp_path / "with")
