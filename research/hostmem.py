"""Transparent huge pages for the host memory of XLA:CPU's steps (glibc's `hugetlb` tunable).

XLA:CPU allocates the temporaries of each execution as one block (861 MB for
the bench's reference step) and frees it when the step ends. glibc serves a
block that large with mmap and unmaps it on free, so every step faults it in
again, 4 KiB page by page: ~215k page faults and 0.5 s of kernel time in a
2.3 s step on a 2-core machine (experiments/perf.md). With glibc's tunable
`glibc.malloc.hugetlb=1`, malloc asks the kernel for transparent huge pages
(madvise), and the same block takes ~840 faults of 2 MiB each.

Keeping freed memory in the heap instead (mallopt: one arena, no mmap, no
trim) removed the faults entirely but fragmented the heap: small allocations
between steps split the freed block, and resident memory grew from 1.4 to
4.9 GB in 50 steps. Huge pages return every block to the kernel as before.

glibc reads its tunables once, when a process starts, so `reexec()` restarts
the process in place (same pid, argv and environment, plus the tunable)
before JAX is imported. The CLIs (`research.train`, `research.bench`) call it
first. It does nothing where it cannot help: not Linux with glibc >= 2.35,
the kernel's THP mode is not `madvise` (`always` already gives huge pages,
`never` forbids them), or `LADDER_MALLOC=system`.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENV = "LADDER_MALLOC"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise or never); None if unknown."""
    try:
        with open(THP_MODE_FILE) as f:
            words = f.read().split()
    except OSError:
        return None
    chosen = [w.strip("[]") for w in words if w.startswith("[")]
    return chosen[0] if chosen else None


def _tunables() -> list[str]:
    return [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]


def _tunable_set() -> bool:
    return TUNABLE in _tunables()


def unavailable() -> str | None:
    """Why the tunable would not help here (one line), or None when it would."""
    if os.environ.get(ENV, "thp") == "system":
        return f"{ENV}=system"
    own = [t for t in _tunables() if t.startswith("glibc.malloc.hugetlb=") and t != TUNABLE]
    if own:  # the user's choice stands
        return f"GLIBC_TUNABLES sets {own[-1]}"
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return f"not glibc ({sys.platform}, {libc or 'unknown libc'})"
    try:
        too_old = tuple(int(x) for x in version.split(".")[:2]) < (2, 35)
    except ValueError:
        return f"glibc version unknown ({version!r})"
    if too_old:
        return f"glibc {version} has no hugetlb tunable (2.35+)"
    mode = thp_mode()
    if mode != "madvise":
        return f"kernel THP mode is {mode or 'unknown'}, not madvise"
    return None


def status() -> str:
    """How this process's malloc is set: "thp" (the tunable is on), else "system (<why>)"."""
    if _tunable_set():
        return "thp"
    return f"system ({unavailable() or 'not re-executed: call hostmem.reexec() first'})"


def reexec() -> None:
    """Restart this process with glibc's hugetlb tunable where it helps; return where it
    does not or is already on. Call it first thing in a CLI's `__main__`, before
    heavy imports: everything done before it is done twice."""
    if _tunable_set() or unavailable() is not None:
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join([*_tunables(), TUNABLE])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
