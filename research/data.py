"""Corpora behind one interface, and batches placed on the mesh.

Three sources, each a `Corpus` of train/val token arrays:
  stdlib     the running Python's standard-library `.py` sources as bytes
             (vocab 256), split by file, cached once as uint8 memmaps;
  tokens     nanoGPT-style `train.bin` / `val.bin` uint16 memmaps in data.path;
  synthetic  a phrase-structured stream generated in-process, for tests.

The batch for step s is a pure function of (seed, s): windows start at
offsets drawn from a generator keyed by (seed, split, s). Resuming a run
therefore needs no iterator state. Each process builds only the rows its
devices hold and `jax.make_array_from_process_local_data` assembles the
global batch, sharded over the data-parallel axes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from research.registry import Registry
from research.config import ConfigError, DataConfig

TRAIN, VAL = 0, 1


@dataclass
class Corpus:
    """Token arrays (any 1-D integer array, usually a memmap) and what they are."""

    name: str
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    info: dict = field(default_factory=dict)

    def split(self, which: int) -> np.ndarray:
        return self.train if which == TRAIN else self.val


# ---------------------------------------------------------------- stdlib


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    return root, files


def _is_val(rel: str, val_fraction: float) -> bool:
    """Deterministic file-level split: a hash of the path, not of the run."""
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little")
    return h / 2**64 < val_fraction


def _default_cache() -> Path:
    return Path(os.environ.get("LADDER_CACHE", Path.home() / ".cache" / "ladder"))


DATASETS = Registry("dataset")  # name -> DataConfig -> Corpus


@DATASETS.register("stdlib")
def load_stdlib(cfg: DataConfig) -> Corpus:
    root, files = _stdlib_files()
    parts: dict[int, list[bytes]] = {TRAIN: [], VAL: []}
    digest = hashlib.sha256()
    for path in files:
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + data + b"\0")
        parts[VAL if _is_val(rel, cfg.val_fraction) else TRAIN].append(data)
    content_hash = digest.hexdigest()
    version = platform.python_version()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache()
    key = f"stdlib-py{version}-{content_hash[:16]}-val{cfg.val_fraction:g}"
    out = cache / key
    if not (out / "meta.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for which, name in ((TRAIN, "train"), (VAL, "val")):
            tmp = out / f"{name}.bin.tmp{os.getpid()}"
            tmp.write_bytes(b"\n".join(parts[which]))
            tmp.replace(out / f"{name}.bin")  # atomic: a reader never sees half a file
        meta = {"python_version": version, "corpus_hash": content_hash, "files": len(files)}
        tmp = out / f"meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta))
        tmp.replace(out / "meta.json")
    train = np.memmap(out / "train.bin", dtype=np.uint8, mode="r")
    val = np.memmap(out / "val.bin", dtype=np.uint8, mode="r")
    info = {
        "python_version": version,
        "corpus_hash": content_hash,
        "files": len(files),
        "cache": str(out),
    }
    return Corpus("stdlib", train, val, 256, info)


# ---------------------------------------------------------------- tokens


@DATASETS.register("tokens")
def load_tokens(cfg: DataConfig) -> Corpus:
    """Your own tokens: nanoGPT-style train.bin and val.bin (uint16) in data.path."""
    root = Path(cfg.path)
    arrays = {}
    for name in ("train", "val"):
        path = root / f"{name}.bin"
        if not path.is_file():
            raise ConfigError("data.path", f"{path} not found; expected train.bin and val.bin (uint16)")
        arrays[name] = np.memmap(path, dtype=np.uint16, mode="r")
    info = {"path": str(root.resolve())}
    return Corpus("tokens", arrays["train"], arrays["val"], cfg.vocab_size, info)


# ---------------------------------------------------------------- synthetic


@DATASETS.register("synthetic")
def load_synthetic(cfg: DataConfig) -> Corpus:
    """A stream of phrases drawn from a fixed random phrasebook.

    After a phrase's first token the rest is predictable, so loss falls
    quickly and well below log(V): a model that learns shows it.
    """
    vocab = cfg.vocab_size or 256
    rng = np.random.default_rng(1234)
    lengths = rng.integers(3, 12, size=64)
    phrasebook = [rng.integers(0, vocab, size=n).astype(np.uint16) for n in lengths]

    def stream(n_tokens: int, seed: int) -> np.ndarray:
        ids = np.random.default_rng(seed).integers(0, len(phrasebook), size=n_tokens // 3 + 1)
        return np.concatenate([phrasebook[i] for i in ids])[:n_tokens]

    n = cfg.synthetic_tokens
    info = {"synthetic_tokens": n}
    return Corpus("synthetic", stream(n, 1), stream(max(n // 10, 4096), 2), vocab, info)


def load(cfg: DataConfig) -> Corpus:
    """Load the corpus named by `data.name` and check `data.seq_len` fits both splits."""
    corpus = DATASETS.get(cfg.name).impl(cfg)
    for which, name in ((TRAIN, "train"), (VAL, "val")):
        n = len(corpus.split(which))
        if n < cfg.seq_len + 2:
            raise ConfigError(
                "data.seq_len",
                f"{cfg.seq_len} is too long: the {name} split of {cfg.name} has {n} tokens "
                f"(need at least seq_len + 2)",
            )
    return corpus


# ---------------------------------------------------------------- batches


def window_offsets(seed: int, which: int, step: int, n_rows: int, n_tokens: int, length: int) -> np.ndarray:
    """Start offsets of the `n_rows` windows of global batch `step` (pure in its args)."""
    rng = np.random.default_rng([seed, which, step])
    return rng.integers(0, n_tokens - length, size=n_rows)


def host_batch(corpus: Corpus, which: int, seed: int, step: int, batch_size: int,
               seq_len: int, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Rows [lo, hi) of global batch `step`: int32 array (hi - lo, seq_len + 1)."""
    arr = corpus.split(which)
    offsets = window_offsets(seed, which, step, batch_size, len(arr), seq_len + 1)
    lo, hi = rows or (0, batch_size)
    return np.stack([np.asarray(arr[o : o + seq_len + 1]) for o in offsets[lo:hi]]).astype(np.int32)


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """The contiguous block of batch rows that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map(global_shape)
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_shape[0] if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return min(starts), max(stops)


def device_batch(corpus: Corpus, which: int, seed: int, step: int, batch_size: int,
                 seq_len: int, sharding: jax.sharding.Sharding) -> jax.Array:
    """Global batch `step` as a (B, seq_len + 1) int32 array sharded by `sharding`."""
    shape = (batch_size, seq_len + 1)
    rows = process_rows(sharding, shape)
    local = host_batch(corpus, which, seed, step, batch_size, seq_len, rows)
    return jax.make_array_from_process_local_data(sharding, local, shape)
