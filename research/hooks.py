"""Loop hooks: what runs beside training, called by the train loop at fixed points.

A hook sees the loop, never the step's inside: `start` when the loop begins,
`before_step` and `after_step` around each train step, `end` when the loop
stops (also on an error). `after_step` may return metrics for that step (device
arrays are fine); the loop logs them with the step's row and keeps the time the
hooks take out of tokens/s.

The core's hooks: per-layer statistics (`train.stats_every`, stats.py) and the
profiler (`profile.*`). A plugin adds its own through `Plugin.hooks`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import jax
from jax.sharding import Mesh

from research.config import Config
from research.stats import StatsStep


class Hook:
    """Base class: every method does nothing."""

    def start(self, step: int) -> None:
        """The loop begins; its first step has index `step` (after a resume, > 0)."""

    def before_step(self, step: int, state) -> None:
        """Step `step` (0-based) is about to run on `state`, which it will donate."""

    def after_step(self, done: int, state, batch_BxL1) -> dict:
        """`done` steps have run; `state` is the new state, `batch_BxL1` the batch just
        trained on. Returns metrics to log at `done` ({} for none)."""
        return {}

    def end(self) -> None:
        """The loop stopped (finished, diverged, preempted or failed)."""


class StatsHook(Hook):
    """Per-layer activation and update RMS every `every` steps (stats.py): copies the params
    before those steps (the step donates them) and runs one extra forward pass after."""

    def __init__(self, every: int, stats_step: StatsStep):
        self.every, self.stats_step, self.snapshot = every, stats_step, None

    def before_step(self, step: int, state) -> None:
        if (step + 1) % self.every == 0:
            self.snapshot = self.stats_step.snapshot(state["params"])

    def after_step(self, done: int, state, batch_BxL1) -> dict:
        if self.snapshot is None:
            return {}
        row = self.stats_step.stats(self.snapshot, state["params"], batch_BxL1)
        self.snapshot = None
        return row


class ProfilerHook(Hook):
    """A `jax.profiler` trace of steps [first, first + count) under `out`: TensorBoard's
    profile plugin reads the .xplane.pb, Perfetto (ui.perfetto.dev) the .trace.json.gz."""

    def __init__(self, out: Path, first: int, count: int):
        self.out, self.first, self.last = Path(out), first, first + count - 1
        self.tracing, self.annotation = False, None

    def before_step(self, step: int, state) -> None:
        if step == self.first:
            self.out.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.out), create_perfetto_trace=True)
            self.tracing = True
        if self.tracing:
            self.annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self.annotation.__enter__()

    def after_step(self, done: int, state, batch_BxL1) -> dict:
        if not self.tracing:
            return {}
        jax.block_until_ready(state)  # the trace holds the step's device work, not just its dispatch
        self.annotation.__exit__(None, None, None)
        if done - 1 == self.last:
            self._stop()
        return {}

    def end(self) -> None:
        if self.tracing:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.tracing = False
        print(f"profile: steps {self.first}..{self.last} traced in {self.out} "
              f"(tensorboard --logdir {self.out}, or the .trace.json.gz in ui.perfetto.dev)",
              file=sys.stderr)


def core_hooks(cfg: Config, run_dir: Path, stats_step: StatsStep | None, start: int) -> list[Hook]:
    """The core's hooks for this run: stats (train.stats_every) and the profiler (profile.*;
    only on process 0, and only when the traced steps are still ahead after a resume)."""
    hooks: list[Hook] = []
    if cfg.train.stats_every and stats_step is not None:
        hooks.append(StatsHook(cfg.train.stats_every, stats_step))
    p = cfg.profile
    if p.num_steps and start <= p.start_step and jax.process_index() == 0:
        hooks.append(ProfilerHook(Path(run_dir) / "profile", p.start_step, p.num_steps))
    return hooks


@contextlib.contextmanager
def running(hooks: list[Hook], start: int):
    """Calls every hook's `start` on entry and `end` on exit (in reverse order, errors too)."""
    started = []
    try:
        for hook in hooks:
            hook.start(start)
            started.append(hook)
        yield hooks
    finally:
        for hook in reversed(started):
            hook.end()


def plugin_hooks(enabled, cfg: Config, mesh: Mesh) -> list[Hook]:
    """The hooks the enabled plugins (plugins.Plugin) add to this run."""
    return [hook for plugin in enabled for hook in plugin.hooks(cfg, mesh)]
