"""`python -m ladder_cpu.launch MODULE [ARGS...]`: run `python -m MODULE ARGS...` with
jemalloc or glibc's huge pages for XLA:CPU's step buffers (hostmem.py).

The allocator is chosen when a process starts, so it cannot be a config field of
the run itself; this launcher starts the run's process with it. Example:

    python -m ladder_cpu.launch research.train plugins=[cpu] experiment=demo
    python -m ladder_cpu.launch research.bench plugins=[cpu]

`LADDER_MALLOC` = auto (jemalloc if installed, else huge pages) | jemalloc | thp | system.
"""

from __future__ import annotations

import os
import sys

from ladder_cpu import hostmem

USAGE = "usage: python -m ladder_cpu.launch MODULE [ARGS...]  (e.g. research.train plugins=[cpu])"


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        env = hostmem.environment()
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", argv[0], *argv[1:]], env)
    return 0  # not reached: execve replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
