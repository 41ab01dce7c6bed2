"""Orbax checkpoints in `<run_dir>/checkpoints/`: save, resume, reshard, skip damage.

Each checkpoint `<step>/` holds two items:
  state/  the train state pytree: params, opt_state, step, rng (Orbax
          StandardSave; readable with plain Orbax, see docs/runs.md);
  meta/   JSON: the run's config, vocab size, params layout, Python version,
          corpus hash.

Whether a checkpoint fits a run is decided here too, from its meta alone and
before any restore: `check_layout` (the params layout) and `check_compatible`
(the fields that shape the params, or the whole state to resume).

Restores always read into an abstract target that carries the *current*
shardings, so a checkpoint written on one mesh loads onto another. Saves are
asynchronous and every process must call them. Orbax writes a step into a
temporary directory and renames it only when complete, and deletes old steps
only after a newer one is committed, so a kill mid-save never costs a good
checkpoint. A committed step that fails to restore (a file deleted or
truncated) is moved aside to `damaged-<step>` with a warning, and the one
before it is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from research.config import Config, ConfigError


class CheckpointError(RuntimeError):
    """A save failed (disk full, read-only, ...): one line naming the directory."""


GLOB_CHARS = "[]*?"


def check_directory(directory: str | Path, field_name: str) -> None:
    """ConfigError naming `field_name` if the absolute `directory` holds a glob metacharacter.

    Orbax (0.12) finds a checkpoint's per-process files with a glob below the step's
    directory; below a `[`, the glob matches nothing, the files are never merged, and the
    checkpoint saves without error but cannot be restored.
    """
    path = str(Path(directory).absolute())
    if bad := sorted({c for c in path if c in GLOB_CHARS}):
        raise ConfigError(field_name, f"{path} contains {' '.join(bad)}: Orbax finds checkpoint files by glob, "
                          f"so checkpoints below it cannot be read back; use a directory without {' '.join(GLOB_CHARS)}")


def _warn(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class Checkpointer:
    """`ocp.CheckpointManager` with the run's save and keep policy."""

    def __init__(self, directory: str | Path, every: int = 0, keep: int = 3, keep_every: int = 0):
        check_directory(directory, "checkpoint directory")
        self.directory = Path(directory).absolute()
        self.every = every
        self.options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # `maybe_save` decides; Orbax only writes
            max_to_keep=keep,
            keep_period=keep_every or None,  # also keep every keep_every-th step
            enable_async_checkpointing=True,
            create=False,  # do not create anything until the first save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.directory.exists() else []

    # -- saving

    def due(self, step: int) -> bool:
        """Whether `step` is one that `maybe_save` saves without being forced."""
        return self.every > 0 and step % self.every == 0

    def maybe_save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Save at multiples of `every` (if > 0), or always when `force`."""
        if not force and not self.due(step):
            return False
        if step in self.steps():
            return False  # already on disk (e.g. a resumed, finished run)
        self._probe_writable()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            return self.manager.save(step, args=args, force=True)
        except Exception as err:  # e.g. OSError from a full or read-only disk
            raise CheckpointError(f"checkpoint save to {self.directory} failed: {_one_line(err)}") from None

    def _probe_writable(self) -> None:
        """Fail fast on a read-only or full disk: Orbax's async writer can stall on one."""
        probe = self.directory / f".write-probe-{jax.process_index()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as err:
            raise CheckpointError(f"checkpoint save to {self.directory} failed: {_one_line(err)}") from None

    def wait(self) -> None:
        """Block until pending async saves are committed (raises CheckpointError)."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise CheckpointError(f"checkpoint save to {self.directory} failed: {_one_line(err)}") from None

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # -- restoring

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state):
        """Read checkpoint `step` into `abstract_state` (ShapeDtypeStructs with shardings)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def restore_latest(self, abstract_state, check=None):
        """(step, state, meta) of the newest checkpoint that restores; (None, None, None) if none.

        `check(meta)` runs before the state is read and may raise (e.g. a
        ConfigError when the checkpoint is for another model): that is not
        damage and propagates. Damaged steps are moved aside to
        `damaged-<step>-<time>` (never deleted) with a warning.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.meta(step)
            except Exception as err:
                _warn(f"checkpoint {self.directory / str(step)} is damaged or incomplete "
                      f"({_one_line(err)}); skipping it and trying the one before")
                self._quarantine(step)
                continue
            if check:
                check(meta)
            try:
                problem = self.mismatch(step, abstract_state)
            except Exception:
                problem = None  # unreadable metadata: let the restore below report the damage
            if problem:  # another config's state is not damage: refuse, move nothing
                raise ConfigError("checkpoint.resume", f"{self.directory / str(step)} holds the state of "
                                  f"another config ({problem}); use another run dir or checkpoint.init_from")
            try:
                return step, self.restore(step, abstract_state), meta
            except Exception as err:
                _warn(f"checkpoint {self.directory / str(step)} is damaged or incomplete "
                      f"({_one_line(err)}); skipping it and trying the one before")
                self._quarantine(step)
        return None, None, None

    def mismatch(self, step: int, abstract_state) -> str | None:
        """The first difference in tree or shapes between checkpoint `step` and the target."""
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # reading an item dir directly warns of a missing step file
        try:
            tree = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state").item_metadata
        finally:
            absl.setLevel(level)
        saved = _shapes(tree)
        want = _shapes(abstract_state)
        for key in sorted(saved.keys() ^ want.keys()):
            return f"{key} is only in {'the checkpoint' if key in saved else 'this config'}"
        for key in sorted(want):
            if saved[key] != want[key]:
                return f"{key} has shape {saved[key]} there, {want[key]} here"
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            src.rename(self.directory / f"damaged-{step}-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine-{step}")
        self.manager.reload()


def _shapes(tree) -> dict[str, tuple]:
    """{'params/blocks/0/wq': shape, ...} with list indices and dict keys spelled alike."""
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)

    return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# How the params are laid out, recorded in every checkpoint's meta: the Transformer's blocks
# as one stack of weights with a leading layers dim (model.Block). Checkpoints written
# before have none: their blocks are separate subtrees (params/blocks/0/wq, ...).
PARAM_LAYOUT = "stacked-blocks"


def check_layout(meta: dict, where: str, field: str) -> None:
    """ConfigError naming `field` when the checkpoint whose meta this is has another
    params layout than this version reads; the checkpoint itself is left untouched."""
    layout = meta.get("param_layout", "per-layer blocks")
    if layout != PARAM_LAYOUT:
        raise ConfigError(field, f"{where} was written with {layout} (before the blocks were stacked "
                          f"into one scanned layer); this version reads only {PARAM_LAYOUT}: "
                          "use another run dir, or an earlier Ladder to read it (it is left as it is)")


# Fields whose change makes a checkpoint's params (or, to resume, its whole state) unusable.
PARAM_FIELDS = ("model.d_model", "model.n_layers", "model.n_heads", "model.mlp_ratio",
                "model.mlp", "model.mlp_hidden", "model.n_kv_heads", "model.qk_norm",
                "model.norm", "model.pos", "model.tie_embeddings", "model.share_layers")
# param.name too: mup and completep add a link to the optimizer chain (and change the dynamics).
STATE_FIELDS = (*PARAM_FIELDS, "optim.name", "param.name")
DEFAULTS = dataclasses.asdict(Config())


def _get(d: dict, dotted: str):
    """d[a][b] for 'a.b'; a field a checkpoint predates (e.g. param) reads as its default."""
    default = DEFAULTS
    for key in dotted.split("."):
        default = default[key]
        d = d.get(key, default) if isinstance(d, dict) else default
    return d


def check_compatible(meta: dict, cfg: Config, vocab: int, where: str, field: str) -> None:
    """ConfigError unless a checkpoint with `meta` fits this run's state."""
    check_layout(meta, where, field)
    current = dataclasses.asdict(cfg)
    for name in STATE_FIELDS if field == "checkpoint.resume" else PARAM_FIELDS:
        if _get(meta["config"], name) != _get(current, name):
            raise ConfigError(
                name, f"{_get(current, name)!r}, but {where} was written with {_get(meta['config'], name)!r}; "
                f"use another run dir (or checkpoint.init_from to start from its params)")
    if meta["vocab_size"] != vocab:
        raise ConfigError("data", f"vocab {vocab}, but {where} was written with vocab {meta['vocab_size']}")


def find_checkpoint(path: str | Path) -> tuple[Path, int]:
    """Resolve a run dir, its checkpoints/ dir, or one step dir to (checkpoints dir, step).

    A run or checkpoints dir gives its newest step. Raises FileNotFoundError.
    """
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.glob("*") if p.name.isdigit() and (p / "state").is_dir()) \
        if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{path}: no checkpoint (expected a run dir, its checkpoints/ or a step dir)")
    return path, steps[-1]


def restore_params(path: str | Path, abstract_params) -> tuple[dict, int, dict]:
    """Only the params of another run's checkpoint, onto `abstract_params`' shardings.

    Returns (params, step, meta). Used by `checkpoint.init_from` and `load_run`.
    """
    directory, step = find_checkpoint(path)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    target = {"params": abstract_params}
    partial = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)  # the optimizer state may be for another optimizer
    state = manager.restore(step, args=ocp.args.Composite(state=partial))["state"]
    manager.close()
    return state["params"], step, meta
