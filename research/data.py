"""Corpora behind one interface, mixtures of them, eval sets, and batches placed on the mesh.

Three sources, each a `Corpus` of train/val token arrays:
  stdlib     the running Python's standard-library `.py` sources as bytes
             (vocab 256), split by file, cached once as uint8 memmaps;
  tokens     a directory written by `python -m research.prepare` (meta.json
             gives vocab, dtype, eos and byte counts), or nanoGPT-style
             `train.bin` / `val.bin` uint16 memmaps in data.path;
  synthetic  a phrase-structured stream generated in-process, for tests.

A training `Mixture` splits each step's rows among prepared corpora by weight
(`data.mixture`); `eval_sets` are the held-out splits evaluated at each eval.

The batch for step s is a pure function of (seed, s): a split is cut into
windows of seq_len + 1 tokens at stride seq_len, and each epoch visits every
window once, in an order drawn from a generator keyed by (seed, split,
source, epoch). Resuming a run therefore needs no iterator state. Each
process builds only the rows its devices hold and
`jax.make_array_from_process_local_data` assembles the global batch, sharded
over the data-parallel axes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
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
    # Tokens per UTF-8 byte of (train, val), from the corpus's own counts; None where the
    # tokens are not text (synthetic, or a train.bin without meta.json): no bits per byte.
    tokens_per_byte: tuple[float | None, float | None] = (None, None)

    def split(self, which: int) -> np.ndarray:
        return self.train if which == TRAIN else self.val

    def bpb(self, which: int, loss: float) -> float | None:
        """Bits per byte of a mean loss (nats per token) on split `which`."""
        tpb = self.tokens_per_byte[which]
        return None if tpb is None else loss * tpb / math.log(2)


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
    return Corpus("stdlib", train, val, 256, info, (1.0, 1.0))  # a token is a byte


# ---------------------------------------------------------------- tokens


def _map(path: Path, dtype) -> np.ndarray:
    """A read-only memmap of `path` (an empty array for an empty file, which mmap refuses)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


class Shards:
    """Token shard files read as one 1-D array: len() and [lo:hi] slices, never loaded whole."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.parts = [_map(p, dtype) for p in paths]
        self.dtype = np.dtype(dtype)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        lo, hi, _ = index.indices(len(self))
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        out = []
        while lo < hi:
            part, base = self.parts[first], self.starts[first]
            out.append(part[lo - base: min(hi - base, len(part))])
            lo, first = base + len(part), first + 1
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0] if out else self.parts[0][:0])


def load_prepared(root: Path, field_name: str, vocab_size: int | None = None) -> Corpus:
    """A directory written by `python -m research.prepare` (it holds meta.json)."""
    try:
        meta = json.loads((root / "meta.json").read_text())
        splits, dtype = meta["splits"], np.dtype(meta["dtype"])
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(field_name, f"{root / 'meta.json'}: unreadable ({type(err).__name__}); "
                          "prepare the directory again") from None
    if vocab_size is not None and vocab_size != meta["vocab_size"]:
        raise ConfigError("data.vocab_size", f"{vocab_size}, but {root / 'meta.json'} says "
                          f"{meta['vocab_size']}; leave data.vocab_size unset (null)")
    arrays = []
    for name in ("train", "val"):
        paths = [root / shard for shard in splits[name]["shards"]]
        missing = [p for p in paths if not p.is_file()]
        if missing or not paths:
            raise ConfigError(field_name, f"{missing[0] if missing else root}: {name} shard missing; "
                              "prepare the directory again")
        arrays.append(_map(paths[0], dtype) if len(paths) == 1 else Shards(paths, dtype))
    info = {"path": str(root.resolve()), "corpus_hash": meta["content_hash"], "tokenizer": meta["tokenizer"],
            "tokenizer_hash": meta["tokenizer_hash"],
            "eos_id": meta["eos_id"], "splits": {k: {c: v[c] for c in ("tokens", "documents", "bytes")}
                                                   for k, v in splits.items()}}
    tpb = tuple(splits[k]["tokens"] / splits[k]["bytes"] if splits[k]["bytes"] else None for k in ("train", "val"))
    return Corpus("tokens", arrays[0], arrays[1], meta["vocab_size"], info, tpb)


@DATASETS.register("tokens")
def load_tokens(cfg: DataConfig) -> Corpus:
    """A prepared directory (meta.json), or nanoGPT-style train.bin and val.bin (uint16), in data.path."""
    root = Path(cfg.path)
    if (root / "meta.json").is_file():
        return load_prepared(root, "data.path", cfg.vocab_size)
    arrays = {}
    for name in ("train", "val"):
        path = root / f"{name}.bin"
        if not path.is_file():
            raise ConfigError("data.path", f"{path} not found; expected a prepared directory (meta.json) "
                              "or train.bin and val.bin (uint16)")
        arrays[name] = np.memmap(path, dtype=np.uint16, mode="r")
    if cfg.vocab_size is None:
        raise ConfigError("data.vocab_size", f"required: {root} has train.bin and val.bin but no meta.json")
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


def _check_length(corpus: Corpus, seq_len: int, what: str) -> Corpus:
    for which, name in ((TRAIN, "train"), (VAL, "val")):
        n = len(corpus.split(which))
        if n < seq_len + 2:
            raise ConfigError("data.seq_len", f"{seq_len} is too long: the {name} split of {what} has {n} "
                              f"tokens (need at least seq_len + 2)")
    return corpus


def load(cfg: DataConfig) -> Corpus:
    """Load the corpus named by `data.name` and check `data.seq_len` fits both splits."""
    if cfg.mixture:
        raise ConfigError("data.mixture", "this tool reads one corpus: set data.path instead")
    return _check_length(DATASETS.get(cfg.name).impl(cfg), cfg.seq_len, cfg.name)


# ---------------------------------------------------------------- mixtures and eval sets


@dataclass
class Mixture:
    """Training sources: each step's first rows[0] rows come from sources[0], the next rows[1]
    from sources[1], and so on (the same split every step)."""

    names: list[str]
    corpora: list[Corpus]
    rows: list[int]

    @property
    def primary(self) -> Corpus:
        return self.corpora[0]

    def epochs(self, step: int, seq_len: int) -> dict[str, float]:
        """Epochs of each source's train split completed after `step` steps."""
        return {n: step * r / n_windows(len(c.train), seq_len) for n, c, r in zip(self.names, self.corpora, self.rows)}


def split_rows(weights: dict[str, float], batch_size: int) -> dict[str, int]:
    """Rows per step for each source: largest remainders of batch_size x weight share (ties: order)."""
    total = sum(weights.values())
    exact = {k: batch_size * w / total for k, w in weights.items()}
    rows = {k: math.floor(v) for k, v in exact.items()}
    order = sorted(exact, key=lambda k: -(exact[k] - rows[k]))  # stable: ties keep the mixture's order
    for k in order[: batch_size - sum(rows.values())]:
        rows[k] += 1
    return rows


def _source_name(cfg: DataConfig) -> str:
    """The eval-set name of a single training corpus: its name, or a prepared directory's name."""
    return Path(cfg.path).resolve().name if cfg.name == "tokens" else cfg.name


def _same_tokens(first: Corpus, other: Corpus, field_name: str, where: str) -> None:
    if other.vocab_size != first.vocab_size or other.info.get("tokenizer_hash") != first.info.get("tokenizer_hash"):
        raise ConfigError(field_name, f"{where} has tokenizer {other.info.get('tokenizer')!r} with vocab "
                          f"{other.vocab_size}, the training data {first.info.get('tokenizer')!r} with vocab "
                          f"{first.vocab_size}; prepare both with the same --tokenizer")


def _load_dir(path: str, field_name: str, seq_len: int) -> Corpus:
    root = Path(path)
    if not (root / "meta.json").is_file():
        raise ConfigError(field_name, f"{root}: not a prepared directory (no meta.json); "
                          "run python -m research.prepare")
    return _check_length(load_prepared(root, field_name), seq_len, str(root))


def load_mixture(cfg: DataConfig, batch_size: int) -> Mixture:
    """The training sources: `data.mixture` if set, else the one corpus of `data.name`."""
    if not cfg.mixture:
        return Mixture([_source_name(cfg)], [load(cfg)], [batch_size])
    rows = split_rows({k: v.weight for k, v in cfg.mixture.items()}, batch_size)
    for name, n in rows.items():
        if n == 0:
            raise ConfigError(f"data.mixture.{name}.weight", f"gives 0 of train.batch_size={batch_size} rows "
                              "per step; raise it or the batch size")
    corpora = [_load_dir(src.path, f"data.mixture.{name}.path", cfg.seq_len) for name, src in cfg.mixture.items()]
    for name, corpus in zip(list(cfg.mixture)[1:], corpora[1:]):
        _same_tokens(corpora[0], corpus, f"data.mixture.{name}.path", cfg.mixture[name].path)
    if cfg.vocab_size is not None and cfg.vocab_size != corpora[0].vocab_size:
        raise ConfigError("data.vocab_size", f"{cfg.vocab_size}, but the mixture's meta.json says "
                          f"{corpora[0].vocab_size}; leave data.vocab_size unset (null)")
    return Mixture(list(cfg.mixture), corpora, [rows[k] for k in cfg.mixture])


def eval_sets(cfg: DataConfig, mixture: Mixture) -> dict[str, Corpus]:
    """{name: corpus whose val split is evaluated}: the training sources, then `data.eval`.
    The first is the primary set (`val_loss`, `final_val_loss`)."""
    sets = dict(zip(mixture.names, mixture.corpora))
    for name, path in cfg.eval.items():
        if name in sets:
            raise ConfigError(f"data.eval.{name}", f"{name!r} is already a training source's eval set; "
                              "choose another name")
        sets[name] = _load_dir(path, f"data.eval.{name}", cfg.seq_len)
        _same_tokens(mixture.primary, sets[name], f"data.eval.{name}", path)
    return sets


# ---------------------------------------------------------------- batches


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len: every token but the first is a target once."""
    return (n_tokens - 1) // seq_len


@functools.lru_cache(maxsize=16)
def _epoch_order(seed: int, which: int, source: int, epoch: int, n: int) -> np.ndarray:
    order = np.random.default_rng([seed, which, source, epoch]).permutation(n)
    return order.astype(np.int32) if n < 2**31 else order


def window_offsets(seed: int, which: int, step: int, n_rows: int, n_tokens: int, length: int,
                   source: int = 0) -> np.ndarray:
    """Start offsets of the `n_rows` windows of step `step` (pure in its args).

    Row r = step * n_rows + i of the stream is window order_e[r mod W] of epoch e = r // W,
    where W = n_windows and order_e is a permutation keyed by (seed, which, source, e).
    """
    seq_len = length - 1
    n = n_windows(n_tokens, seq_len)
    epochs, pos = np.divmod(step * n_rows + np.arange(n_rows, dtype=np.int64), n)
    offsets = np.empty(n_rows, np.int64)
    for e in np.unique(epochs):
        mask = epochs == e
        offsets[mask] = _epoch_order(seed, which, source, int(e), n)[pos[mask]]
    return offsets * seq_len


def host_batch(corpus: Corpus | Mixture, which: int, seed: int, step: int, batch_size: int,
               seq_len: int, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Rows [lo, hi) of global batch `step`: int32 array (hi - lo, seq_len + 1).

    A `Mixture` gives each source its block of rows (training split only)."""
    lo, hi = rows or (0, batch_size)
    if isinstance(corpus, Corpus):
        parts = [(corpus, 0, batch_size)]
    else:
        parts = [(c, i, n) for i, (c, n) in enumerate(zip(corpus.corpora, corpus.rows))]
    out, start = [], 0
    for source, index, n in parts:
        a, b = max(lo, start) - start, min(hi, start + n) - start  # this source's rows in [lo, hi)
        start += n
        if a >= b:
            continue
        arr = source.split(which)
        offsets = window_offsets(seed, which, step, n, len(arr), seq_len + 1, index)
        out += [np.asarray(arr[o: o + seq_len + 1]) for o in offsets[a:b]]
    return np.stack(out).astype(np.int32)


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """The contiguous block of batch rows that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map(global_shape)
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_shape[0] if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return min(starts), max(stops)


def device_batch(corpus: Corpus | Mixture, which: int, seed: int, step: int, batch_size: int,
                 seq_len: int, sharding: jax.sharding.Sharding) -> jax.Array:
    """Global batch `step` as a (B, seq_len + 1) int32 array sharded by `sharding`."""
    shape = (batch_size, seq_len + 1)
    rows = process_rows(sharding, shape)
    local = host_batch(corpus, which, seed, step, batch_size, seq_len, rows)
    return jax.make_array_from_process_local_data(sharding, local, shape)
