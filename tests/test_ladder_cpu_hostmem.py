"""ladder_cpu.hostmem.reexec(): the process restarts in place with jemalloc preloaded (freed
blocks are reused, not faulted in again) or with glibc's hugetlb tunable (large blocks come as
transparent huge pages: a few faults of 2 MiB, not 4 KiB each). The launcher
(`python -m ladder_cpu.launch`) starts a process with the same environment:
tests/test_ladder_cpu_plugin.py."""

import os
import subprocess
import sys

import pytest

from ladder_cpu import hostmem

# Runs twice when re-executed: "start" is printed by each run, "done" by the last. The
# block is allocated, touched and freed twice, as XLA:CPU does with a step's temporaries:
# the faults of each round are printed.
SCRIPT = """
import ctypes, os, resource
from ladder_cpu import hostmem
print("start", os.getpid(), hostmem.status(), flush=True)
hostmem.reexec()
libc = ctypes.CDLL(None)  # the process's malloc: a preloaded one wins over glibc's
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20  # far above glibc's mmap threshold, as XLA's per-step block
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(ctypes.c_size_t(n))
    ctypes.memset(block, 1, n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(ctypes.c_void_p(block))
print("done", os.getpid(), faults[0], faults[1], hostmem.status())
"""
SMALL_PAGES = (256 << 20) // 4096  # faults for the block in 4 KiB pages
NOT_LAUNCHED = "system (not started through python -m ladder_cpu.launch)"


def _env(**extra):
    """This environment without any malloc settings of its own, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", hostmem.ENV)}
    return {**env, **extra}


def _run(repo, **extra):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=repo, env=_env(**extra),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("start"):
            rows.append(line.split(maxsplit=2))
        else:
            done, pid, first, second, status = line.split(maxsplit=4)
            rows.append([done, pid, int(first), int(second), status])
    return rows


@pytest.mark.skipif(hostmem.thp_unavailable() is not None,
                    reason=f"huge pages: {hostmem.thp_unavailable()}")
def test_reexec_gives_huge_pages(repo):
    (s1, pid1, status1), (s2, pid2, status2), (done, pid3, first, second, status3) = _run(
        repo, LADDER_MALLOC="thp")
    assert (s1, s2, done) == ("start", "start", "done")
    assert pid1 == pid2 == pid3  # exec in place: launchers and signals see one process
    assert status1 == NOT_LAUNCHED and status2 == status3 == "thp"
    # Most of the block came as 2 MiB pages (the kernel may fall back to 4 KiB for some),
    # in both rounds: glibc gives the block back to the kernel each time.
    assert first < SMALL_PAGES // 2 and second < SMALL_PAGES // 2


@pytest.mark.skipif(hostmem.jemalloc_unavailable() is not None,
                    reason=f"jemalloc: {hostmem.jemalloc_unavailable()}")
def test_reexec_preloads_jemalloc_which_reuses_the_freed_block(repo):
    (_, pid1, status1), (_, pid2, status2), (_, pid3, first, second, status3) = _run(
        repo, LADDER_MALLOC="jemalloc")
    assert pid1 == pid2 == pid3
    assert status1 == NOT_LAUNCHED and status2 == status3 == "jemalloc"
    assert first >= SMALL_PAGES * 0.9  # the first round faults the block in
    assert second < SMALL_PAGES // 100  # the second reuses it: no faults, no kernel zeroing


def test_auto_takes_the_best_available(repo):
    rows = _run(repo)  # LADDER_MALLOC unset: auto
    kind, why = hostmem.plan()
    assert rows[-1][-1] == (kind if kind != "system" else f"system ({why})")
    if hostmem.jemalloc_unavailable() is None:
        assert kind == "jemalloc"
    elif hostmem.thp_unavailable() is None:
        assert kind == "thp" and why.startswith("jemalloc: ")


def test_opt_out_keeps_the_system_malloc(repo):
    (start, _, status), (done, _, first, second, _) = _run(repo, LADDER_MALLOC="system")
    assert status == "system (LADDER_MALLOC=system)"
    if hostmem.thp_mode() == "madvise":  # nobody asked for huge pages: one fault per 4 KiB
        assert first >= SMALL_PAGES * 0.9 and second >= SMALL_PAGES * 0.9


def test_users_own_settings_stand(repo):
    code = ("import os; from ladder_cpu import hostmem; hostmem.reexec(); "
            "print(hostmem.status(), os.environ.get('MALLOC_CONF'))")
    env = _env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0", LADDER_MALLOC="thp")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "system (thp: GLIBC_TUNABLES sets glibc.malloc.hugetlb=0) None"]
    if hostmem.jemalloc_unavailable() is None:
        env = _env(LADDER_MALLOC="jemalloc", MALLOC_CONF="narenas:2")
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.stdout.splitlines() == ["jemalloc narenas:2"]


@pytest.mark.parametrize("how", ["launch", "reexec"])
def test_unknown_choice_is_a_one_line_error(repo, how):
    # Before the module runs (the launcher) or anything else is done (reexec): exit 2.
    cmd = (["-m", "ladder_cpu.launch", "research.bench"] if how == "launch"
           else ["-c", "from ladder_cpu import hostmem; hostmem.reexec(); print('ran')"])
    proc = subprocess.run([sys.executable, *cmd], cwd=repo, env=_env(LADDER_MALLOC="tcmalloc"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("config error: LADDER_MALLOC: unknown value 'tcmalloc'; "
                                   "valid: auto, jemalloc, thp, system")
