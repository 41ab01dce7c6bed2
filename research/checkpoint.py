"""Orbax checkpoints in `<run_dir>/checkpoints/`: save, find the newest, restore.

Each checkpoint holds the train state (params, optimizer state, step) and
the run's config as JSON. Restores always read into an abstract target that
carries the *current* shardings, so a checkpoint written on one mesh loads
onto another. Saves are asynchronous; every process must call `save`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the run's save policy."""

    def __init__(self, directory: str | Path, every: int, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every if every > 0 else 1,
            max_to_keep=keep,
            enable_async_checkpointing=True,
            create=True,
        )
        self.every = every
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def maybe_save(self, step: int, state, config: dict, force: bool = False) -> bool:
        """Save at multiples of `every` (if > 0), or always when `force`."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state):
        """Read checkpoint `step` into `abstract_state` (ShapeDtypeStructs with shardings)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def close(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(shapes, shardings):
    """ShapeDtypeStructs carrying `shardings`: the restore target for the current mesh."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
