"""hostmem.reexec(): the process restarts in place with glibc's hugetlb tunable, so large
blocks come as transparent huge pages (a few faults of 2 MiB, not 4 KiB each)."""

import os
import subprocess
import sys

import pytest

from research import hostmem

# Runs twice when re-executed: "start" is printed by each run, "done" by the last.
SCRIPT = """
import ctypes, os, resource
from research import hostmem
print("start", os.getpid(), hostmem.status(), flush=True)
hostmem.reexec()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20  # far above glibc's mmap threshold, as XLA's per-step block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(ctypes.c_size_t(n))
ctypes.memset(block, 1, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
libc.free(ctypes.c_void_p(block))
print("done", os.getpid(), faults, hostmem.status())
"""
SMALL_PAGES = (256 << 20) // 4096  # faults for the block in 4 KiB pages


def _run(repo, **env):
    env = {**os.environ, **env}
    env.pop("GLIBC_TUNABLES", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split(maxsplit=2) for line in proc.stdout.splitlines()]
    return [[*line[:2], *line[2].split(maxsplit=1)] if line[0] == "done" else line for line in lines]


@pytest.mark.skipif(hostmem.unavailable() is not None, reason=f"huge pages: {hostmem.unavailable()}")
def test_reexec_gives_huge_pages(repo):
    (s1, pid1, status1), (s2, pid2, status2), (done, pid3, faults, status3) = _run(repo)
    assert (s1, s2, done) == ("start", "start", "done")
    assert pid1 == pid2 == pid3  # exec in place: launchers and signals see one process
    assert status1.startswith("system (not re-executed") and status2 == status3 == "thp"
    # Most of the block came as 2 MiB pages (the kernel may fall back to 4 KiB for some).
    assert int(faults) < SMALL_PAGES // 2


def test_opt_out_keeps_small_pages(repo):
    (start, _, status), (done, _, faults, _) = _run(repo, LADDER_MALLOC="system")
    assert status == "system (LADDER_MALLOC=system)"
    if hostmem.thp_mode() == "madvise":  # nobody asked for huge pages: one fault per 4 KiB
        assert int(faults) >= SMALL_PAGES * 0.9


def test_users_own_setting_stands(repo):
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    code = "from research import hostmem; hostmem.reexec(); print(hostmem.status())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["system (GLIBC_TUNABLES sets glibc.malloc.hugetlb=0)"]
