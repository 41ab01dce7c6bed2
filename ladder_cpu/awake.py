"""Keep the CPU cores from halting while a run trains: idle-priority spinner threads.

On a VM an idle vCPU halts, and when the host is busy a halted vCPU is slow to
wake. XLA's pool threads sleep between ops many times a step (PyTorch's OpenMP
threads spin instead), so while a run trains one spinner per core takes up the
idle time at Linux's SCHED_IDLE priority, which any other thread preempts at
once (docs/performance-log.md, item 42). The spinners are `LadderKeepAwake`
in kernels.cc; they show as busy cores in `top` and take only time nothing
else wants.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from research.hooks import Hook

from ladder_cpu import kernels

log = logging.getLogger(__name__)

_state = {"depth": 0, "lock": threading.Lock()}  # spinners are per process: one count for all users


@contextlib.contextmanager
def keep_awake(required: bool = True):
    """Keep every core of this process busy while the block runs (one SCHED_IDLE spinner
    per core). Nested uses share the spinners; they stop when the outermost block ends.
    Where the kernels are unavailable or the system refuses SCHED_IDLE: RuntimeError, or
    with `required=False` a logged warning, and the block runs without spinners."""
    reason = kernels.unavailable()
    lock = _state["lock"]
    with lock:
        if reason is None and _state["depth"] == 0:
            lib, threads = kernels.library(), len(os.sched_getaffinity(0))
            if (idle := lib.LadderKeepAwake(threads)) < threads:
                lib.LadderKeepAwake(0)
                reason = f"only {idle} of {threads} threads could take SCHED_IDLE priority"
        if reason is None:
            _state["depth"] += 1
    if reason is not None:
        if required:
            raise RuntimeError(f"keep_awake: {reason}")
        log.warning("keep_awake: running without spinners: %s", reason)
        yield
        return
    try:
        yield
    finally:
        with lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                kernels.library().LadderKeepAwake(0)


class KeepAwakeHook(Hook):
    """The train loop's hook: spinners on from the loop's start to its end."""

    def __init__(self, required: bool):
        self.required, self._context = required, None

    def start(self, step: int) -> None:
        self._context = keep_awake(self.required)
        self._context.__enter__()

    def end(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
