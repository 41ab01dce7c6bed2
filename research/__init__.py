"""Ladder: scaling experiments in JAX. `research.load_run(run_dir)` opens a run.

Submodules import JAX; this file does not, so XLA flags (device counts) can
still be set after `import research`.
"""


def __getattr__(name):
    if name == "load_run":
        from research.load import load_run

        return load_run
    raise AttributeError(f"module 'research' has no attribute {name!r}")


__all__ = ["load_run"]
