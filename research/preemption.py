"""Graceful stop on SIGTERM / SIGUSR1 / SIGUSR2, the signals clusters send.

SLURM and TPU maintenance send SIGTERM (or a configured SIGUSR1); submitit
sends SIGUSR2 before a job's time limit. The handler only sets a flag; the
train loop checks it after each step, writes a checkpoint, waits for it,
and exits with `EXIT_PREEMPTED`. With several processes the flag is OR-ed
across them, so every process stops at the same step and takes part in the
same save. Once the checkpoint is on disk, `forward` hands the signal to the
handler that was installed before ours, if it is Python code: under
hydra-submitit that handler requeues the job, which then resumes from the
checkpoint just written.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Context manager: installs the handlers, restores the old ones on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        # Python only delivers signals to the main thread; elsewhere (a notebook
        # worker thread, say) keep the default behaviour.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self) -> bool:
        """True on every process once any process has been signalled."""
        flag = self.signum is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"


def forward(name: str | None) -> None:
    """Call the current Python handler of signal `name` (e.g. submitit's requeue), if any.

    Meant for after `StopRequest` has exited and restored the earlier handlers.
    The default actions (terminate) are not re-run: the caller exits itself.
    """
    if not name:
        return
    signum = signal.Signals[name]
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
