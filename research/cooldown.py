"""Cooldown branches: several token budgets from one warmup-stable-decay run.

With `schedule.name=wsd`, `train.cooldowns` lists fractions f of `train.steps`.
For each f < 1 the run branches at the step where a WSD run of T = round(f *
steps) steps would start its decay, b = T - max(round(T * decay_frac), 1)
(optim._wsd's decay length), copies the state there, runs the branch's steps
b..T-1 with the WSD schedule *of a T-step run* on the batches a T-step run
would see, evaluates it, and writes `<run_dir>/branches/<f>/summary.json`:
a row of its own (N, T tokens, loss) for `load_runs`. The main run then goes
on from the stable-phase state it branched from. Until b the main run and a
T-step run are the same computation (same init, batches, lr), so a branch is
exactly the separate run it replaces (Hägele et al. 2024; OLMo-core's WSD-S
ladders), at the cost of its decay steps only. f = 1 is the main run itself.

The branches run inside the loop, one after the other, each to its end
before the main run takes its next step: nothing is in flight across main
steps, so exact resume needs only that (1) the main run saves a checkpoint at
every branch point, before the branch starts, (2) a branch saves its own
checkpoints under `branches/<f>/checkpoints/` (every `checkpoint.every` steps
and on a preemption signal), and (3) a branch whose summary.json exists is
never run again. A run killed anywhere resumes from its newest checkpoint,
reaches the branch point again (or is at it) and finishes the branch from
the branch's newest checkpoint, or from the branch point: either way the
same numbers as an uninterrupted run (the batch for step s is a function of
(seed, s)). A branch's checkpoints are deleted once its summary is written.

Each branch compiles its own train step (its schedule differs); it runs
with the main step's optimizer, shardings and kernels (steplib.plan of the
T-step config). Loop hooks (stats, profiler) see the main steps only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from research.config import Config, ConfigError, ScheduleConfig


@dataclasses.dataclass(frozen=True)
class Branch:
    """One cooldown branch: budget `steps` = round(fraction * train.steps), branched at `start`."""

    fraction: float
    steps: int
    start: int

    @property
    def name(self) -> str:
        """Its directory under <run_dir>/branches/ (the fraction as written, e.g. 0.25)."""
        return f"{self.fraction:g}"

    @property
    def decay_steps(self) -> int:
        return self.steps - self.start


def decay_steps(steps: int, decay_frac: float) -> int:
    """Steps in the final decay of a `steps`-step WSD run (as optim._wsd computes them)."""
    return max(int(round(steps * decay_frac)), 1)


def branches(fractions, steps: int, s: ScheduleConfig) -> list[Branch]:
    """The branches of `train.cooldowns` for a `steps`-step run, by budget (f = 1 is no branch).

    ConfigError (field train.cooldowns) when the schedule is not wsd, a fraction is outside
    (0, 1], two give the same budget, or a branch would start inside the warmup. A branch
    never starts after the main decay does: budget T < steps S gives round(T d) >=
    round(S d) - 1, so T - round(T d) <= S - round(S d).
    """
    if not fractions:
        return []
    if s.name != "wsd":
        raise ConfigError("train.cooldowns", f"needs schedule.name=wsd (a stable phase to branch from), "
                          f"got {s.name}")
    out, seen = [], {}
    for f in sorted(float(x) for x in fractions):
        if not 0 < f <= 1:
            raise ConfigError("train.cooldowns", f"fractions must be in (0, 1], got {f:g}")
        budget = int(round(f * steps))
        if budget in seen or (f == 1 and steps in seen):
            raise ConfigError("train.cooldowns", f"{seen.get(budget, f):g} and {f:g} give the same "
                              f"budget of {budget} steps (train.steps={steps})")
        seen[budget] = f
        if f == 1:
            continue
        start = budget - decay_steps(budget, s.decay_frac)
        if start < s.warmup:
            raise ConfigError("train.cooldowns", f"{f:g}: the branch would start at step {start}, inside "
                              f"the warmup (schedule.warmup={s.warmup}); use a larger fraction")
        out.append(Branch(f, budget, start))
    return out


def branch_config(cfg: Config, b: Branch) -> Config:
    """The config of the separate run a branch stands for: train.steps = its budget, no branches."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=b.steps, cooldowns=[],
                                                              flops_budget=None))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Cooldowns:
    """The run's branches: which are still to run, running one, and what they cost.

    `record` is the summary.json of a branch less the fields that only the
    loop knows; `evaluate(params)` -> (the primary val loss, {"val/<set>/loss", "val/<set>/bpb"}
    of every eval set); `batch_for(step)` the train batch.
    """

    def __init__(self, cfg: Config, run_dir: Path, vocab: int, mesh, batch_for, evaluate, record: dict,
                 start: int):
        self.cfg, self.run_dir, self.vocab, self.mesh = cfg, Path(run_dir), vocab, mesh
        self.batch_for, self.evaluate, self.record = batch_for, evaluate, record
        self.all = branches(cfg.train.cooldowns, cfg.train.steps, cfg.schedule)
        self.pending: dict[int, list[Branch]] = {}
        self.missed: list[Branch] = []
        for b in self.all:
            if self.result(b) is not None:
                continue
            if b.start < start:  # e.g. train.cooldowns added on resume: the branch point is gone
                self.missed.append(b)
                print(f"warning: cooldown branch {b.name} (from step {b.start}) cannot run: this run "
                      f"resumed at step {start}, past it", file=sys.stderr)
            else:
                self.pending.setdefault(b.start, []).append(b)

    def directory(self, b: Branch) -> Path:
        return self.run_dir / "branches" / b.name

    def result(self, b: Branch) -> dict | None:
        """The branch's summary.json, if it finished (completed or diverged)."""
        path = self.directory(b) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    def due(self, step: int) -> bool:
        """Whether branches start from the state after `step` steps (the main run saves there)."""
        return step in self.pending

    def run(self, step: int, state, stop) -> bool:
        """Run every branch that starts at `step` from `state` (left untouched). False if a
        preemption signal stopped one (its checkpoint is saved), else True."""
        for b in self.pending.pop(step, []):
            if not self._run_one(b, state, stop):
                self.pending.setdefault(step, []).insert(0, b)
                return False
        return True

    def _run_one(self, b: Branch, main_state, stop) -> bool:
        import jax  # noqa: PLC0415 (config validation imports this module without JAX)
        import jax.numpy as jnp
        import numpy as np

        from research import checkpoint as ckpt
        from research import step as steplib

        t0 = time.perf_counter()
        cfg = branch_config(self.cfg, b)
        plan = steplib.plan(cfg, self.vocab, self.mesh)
        out = self.directory(b)
        saver = ckpt.Checkpointer(out / "checkpoints", self.cfg.checkpoint.every, keep=1)
        at, state, _ = saver.restore_latest(plan.abstract_state())
        if at is None:
            state = jax.tree.map(jnp.copy, main_state)  # the branch step donates its state: not the main one
        first = int(jax.device_get(state["step"]))
        print(f"cooldown branch {b.name}: steps {first}..{b.steps} (decay from step {b.start})", file=sys.stderr)
        train_step = plan.train_step(self.mesh, cfg.optim.accum)
        meta = {"config": dataclasses.asdict(cfg), "vocab_size": self.vocab, "param_layout": ckpt.PARAM_LAYOUT,
                "branch_of": str(self.run_dir)}
        metrics = None
        for s in range(first, b.steps):
            state, metrics = train_step(state, self.batch_for(s))
            if s + 1 == b.steps:  # done: evaluated and recorded at once, never saved
                break
            if stop.requested():
                saver.maybe_save(s + 1, state, meta, force=True)
                saver.close()
                return False
            saver.maybe_save(s + 1, state, meta)
        saver.close()
        # A branch restored from its checkpoint has steps left (none is saved at its end).
        loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
        finite = bool(np.isfinite(loss) and np.isfinite(grad_norm))
        val, val_row = self.evaluate(state["params"]) if finite else (None, {})
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        summary = {
            **self.record,
            "status": "completed" if finite else "diverged",
            "final_train_loss": loss if finite else None,
            "final_val_loss": val,
            **val_row,
            "tokens": b.steps * tokens_per_step,
            "flops": self.record["flops_per_token"] * b.steps * tokens_per_step,
            "steps": b.steps,
            "branch_fraction": b.fraction,
            "branch_from_step": b.start,
            "branch_of": str(self.run_dir),
            # What the branch added to the main run's compute: its decay steps only.
            "branch_flops": self.record["flops_per_token"] * b.decay_steps * tokens_per_step,
            "wall_s": time.perf_counter() - t0,
            "config": dataclasses.asdict(cfg),
        }
        if jax.process_index() == 0:
            out.mkdir(parents=True, exist_ok=True)
            row = {"step": b.steps, "loss": summary["final_train_loss"], "val_loss": val, **val_row}
            _write_atomic(out / "metrics.jsonl", json.dumps(row) + "\n")
            _write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        print(f"cooldown branch {b.name}: {summary['status']}, val loss {val}", file=sys.stderr)
        return True

    def summary(self, main_flops: float) -> dict:
        """For the main run's summary.json: each branch's outcome, and the compute of the run
        with its branches against that of separate runs of every budget."""
        rows, extra, separate = [], 0.0, main_flops
        for b in self.all:
            r = self.result(b) or {}
            rows.append({"fraction": b.fraction, "steps": b.steps, "from_step": b.start,
                         "status": r.get("status", "missed" if b in self.missed else "pending"),
                         "final_val_loss": r.get("final_val_loss"), "dir": str(self.directory(b))})
            if r:
                extra += r["branch_flops"]
                separate += r["flops"]
        return {"cooldowns": rows,
                "cooldown_cost": {"flops_with_branches": main_flops + extra, "flops_separate_runs": separate,
                                  "ratio": (main_flops + extra) / separate if separate else None}}
