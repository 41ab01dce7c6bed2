"""Host memory for XLA:CPU's steps: jemalloc where installed, else glibc with huge pages.

XLA:CPU allocates the temporaries of each execution as one block and frees it
when the step ends. glibc serves a block that large with mmap and unmaps it on
free, so every step faults it in again, 4 KiB page by page, in kernel time
(docs/performance-log.md). Two ways out, best first:

  jemalloc  the system's libjemalloc.so.2 (Debian/Ubuntu: `apt install
            libjemalloc2`), preloaded with MALLOC_CONF=`JEMALLOC_CONF`: large
            blocks live in the ordinary arenas (`oversize_threshold:0`), freed
            pages are kept, not handed back (`dirty_decay_ms:-1`), and all
            threads share one arena (`narenas:1`: with one per thread, a block
            freed by one of XLA's workers was not reused when another asked,
            and some bench runs kept faulting pages every step). The next
            step reuses the block: no faults, no kernel zeroing. Resident
            memory stays at the peak's, flat over a run.
  thp       glibc's tunable `glibc.malloc.hugetlb=1`: malloc asks the kernel
            for transparent huge pages (madvise), and the same block takes
            faults of 2 MiB each; the kernel still zeroes it every step.

Keeping freed memory in glibc's own heap instead (mallopt: one arena, no mmap,
no trim) removed the faults but fragmented the heap: resident memory grew
step by step (docs/performance-log.md).

Both are read once, when a process starts, so they are set by the process that
starts it: `python -m ladder_cpu.launch MODULE ARGS...` (launch.py) runs
`python -m MODULE ARGS...` with them (`environment()`), and `reexec()` restarts
a script in place. `LADDER_MALLOC` chooses: `auto` (default:
jemalloc if installed, else thp), `jemalloc`, `thp` or `system` (neither).
Each is skipped, with the reason in `status()`, where it cannot apply: no
libjemalloc.so.2; not Linux with glibc >= 2.35, or the kernel's THP mode not
`madvise` (`always` already gives huge pages, `never` forbids them); a user's
own `glibc.malloc.hugetlb` setting.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENV = "LADDER_MALLOC"
CHOICES = ("auto", "jemalloc", "thp", "system")
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
JEMALLOC = "libjemalloc.so.2"
JEMALLOC_CONF = "narenas:1,oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise or never); None if unknown."""
    try:
        with open(THP_MODE_FILE) as f:
            words = f.read().split()
    except OSError:
        return None
    chosen = [w.strip("[]") for w in words if w.startswith("[")]
    return chosen[0] if chosen else None


def _choice() -> str:
    choice = os.environ.get(ENV, "auto") or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}: unknown value {choice!r}; valid: {', '.join(CHOICES)}")
    return choice


def _tunables() -> list[str]:
    return [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]


def _preloads() -> list[str]:
    return os.environ.get("LD_PRELOAD", "").replace(":", " ").split()


def _jemalloc_on() -> bool:
    return any(os.path.basename(p).startswith("libjemalloc.so") for p in _preloads())


def jemalloc_unavailable() -> str | None:
    """Why jemalloc cannot be preloaded here (one line), or None when it can."""
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    if ctypes.util.find_library("jemalloc") is None:
        return f"no {JEMALLOC} (apt install libjemalloc2)"
    return None


def thp_unavailable() -> str | None:
    """Why glibc's hugetlb tunable would not help here (one line), or None when it would."""
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


def plan() -> tuple[str, str | None]:
    """(what `reexec` sets up here: "jemalloc", "thp" or "system", why not the better
    ones: a one-line reason, or None). ValueError for an unknown LADDER_MALLOC."""
    choice = _choice()
    if choice == "system":
        return "system", f"{ENV}=system"
    reasons = []
    if choice in ("auto", "jemalloc"):
        if (why := jemalloc_unavailable()) is None:
            return "jemalloc", None
        reasons.append(f"jemalloc: {why}")
        if choice == "jemalloc":
            return "system", "; ".join(reasons)
    if (why := thp_unavailable()) is None:
        return "thp", "; ".join(reasons) or None
    reasons.append(f"thp: {why}")
    return "system", "; ".join(reasons)


def status() -> str:
    """How this process's malloc is set: "jemalloc", "thp", or "system (<why>)"."""
    if _jemalloc_on():
        return "jemalloc"
    if TUNABLE in _tunables():
        return "thp"
    try:
        kind, why = plan()
    except ValueError as err:
        return f"system ({err})"
    if kind == "system":
        return f"system ({why})"
    return "system (not started through python -m ladder_cpu.launch)"


def environment() -> dict[str, str]:
    """This process's environment plus what `plan` sets up here: LD_PRELOAD and MALLOC_CONF
    for jemalloc, or glibc's hugetlb tunable; unchanged where neither applies or one is
    already on. ValueError for an unknown LADDER_MALLOC."""
    env = dict(os.environ)
    if _jemalloc_on() or TUNABLE in _tunables():
        return env
    kind, _ = plan()
    if kind == "jemalloc":
        env["LD_PRELOAD"] = " ".join([JEMALLOC, *_preloads()])
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)  # a user's own stands
    elif kind == "thp":
        env["GLIBC_TUNABLES"] = ":".join([*_tunables(), TUNABLE])
    return env


def reexec() -> None:
    """Restart this process in place (same pid, argv) with `environment()`, where it
    differs from the current one. For scripts that set up their own process (the
    experiments); call it first thing, before heavy imports: everything done before it
    is done twice. The CLIs go through `python -m ladder_cpu.launch` instead."""
    try:
        env = environment()
    except ValueError as err:  # before anything is compiled: a one-line error, exit 2
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    if env == dict(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
