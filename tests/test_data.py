"""Corpora (stdlib, tokens, synthetic) and the batches built from them."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from research import data
from research import sharding as shd
from research.config import ConfigError, DataConfig, MixtureSource


# ------------------------------------------------------------ stdlib


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ladder_cache")


@pytest.fixture(scope="module")
def stdlib(stdlib_cache) -> data.Corpus:
    return data.load(DataConfig(name="stdlib", cache_dir=str(stdlib_cache)))


def test_stdlib_load_is_deterministic_and_cached(stdlib, stdlib_cache):
    again = data.load(DataConfig(name="stdlib", cache_dir=str(stdlib_cache)))
    np.testing.assert_array_equal(np.asarray(stdlib.train), np.asarray(again.train))
    np.testing.assert_array_equal(np.asarray(stdlib.val), np.asarray(again.val))
    assert stdlib.info["corpus_hash"] == again.info["corpus_hash"]
    assert stdlib.info["python_version"] == again.info["python_version"]
    assert len(stdlib.info["corpus_hash"]) == 64
    assert stdlib.vocab_size == 256 and stdlib.name == "stdlib"

    # The cache lives under cache_dir, as uint8 memmaps plus meta.json.
    cache = Path(stdlib.info["cache"])
    assert cache.parent == stdlib_cache
    assert cache.name in [p.name for p in stdlib_cache.iterdir()]
    for name, arr in (("train", again.train), ("val", again.val)):
        path = cache / f"{name}.bin"
        assert path.is_file()
        assert isinstance(arr, np.memmap)
        assert arr.dtype == np.uint8
        assert path.stat().st_size == len(arr) > 0
        assert Path(arr.filename).resolve() == path.resolve()
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["corpus_hash"] == stdlib.info["corpus_hash"]
    assert meta["python_version"] == stdlib.info["python_version"]
    assert not list(cache.glob("*.tmp*"))  # atomic writes left no temporaries


def test_stdlib_split_is_by_file(stdlib):
    """train.bin / val.bin are whole files joined by newlines, assigned by _is_val."""
    root, files = data._stdlib_files()
    assert len(files) == stdlib.info["files"] > 100
    parts = {True: [], False: []}
    for path in files:
        rel = path.relative_to(root).as_posix()
        parts[data._is_val(rel, 0.05)].append(path.read_bytes())
    assert parts[True] and parts[False]
    assert bytes(np.asarray(stdlib.val)) == b"\n".join(parts[True])
    assert bytes(np.asarray(stdlib.train)) == b"\n".join(parts[False])


def test_is_val_deterministic_and_fraction():
    root, files = data._stdlib_files()
    rels = [p.relative_to(root).as_posix() for p in files]
    first = [data._is_val(r, 0.05) for r in rels]
    assert first == [data._is_val(r, 0.05) for r in rels]
    frac = sum(first) / len(rels)
    assert 0.02 <= frac <= 0.10, frac
    # A larger fraction holds out a superset of files (same hash, higher threshold).
    wider = [data._is_val(r, 0.2) for r in rels]
    assert all(w for f, w in zip(first, wider) if f)
    assert 0.12 <= sum(wider) / len(rels) <= 0.28
    # Pure in the path string.
    assert data._is_val("json/decoder.py", 0.5) == data._is_val("json/decoder.py", 0.5)
    assert not data._is_val("json/decoder.py", 0.0)
    assert data._is_val("json/decoder.py", 1.0)


def test_stdlib_val_fraction_changes_cache_key(stdlib, stdlib_cache):
    other = data.load(DataConfig(name="stdlib", cache_dir=str(stdlib_cache), val_fraction=0.2))
    assert other.info["cache"] != stdlib.info["cache"]
    assert other.info["corpus_hash"] == stdlib.info["corpus_hash"]
    assert len(other.val) > len(stdlib.val)
    # Same bytes overall: every file is in exactly one split (+ newline joiners).
    assert len(other.train) + len(other.val) == len(stdlib.train) + len(stdlib.val)


# ------------------------------------------------------------ batches


B, L = 16, 64


def test_host_batch_pure_in_seed_and_step(stdlib):
    a = data.host_batch(stdlib, data.TRAIN, 0, 3, B, L)
    b = data.host_batch(stdlib, data.TRAIN, 0, 3, B, L)
    assert a.shape == (B, L + 1) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.host_batch(stdlib, data.TRAIN, 0, 4, B, L))
    assert not np.array_equal(a, data.host_batch(stdlib, data.TRAIN, 1, 3, B, L))
    assert not np.array_equal(a, data.host_batch(stdlib, data.VAL, 0, 3, B, L))
    assert a.min() >= 0 and a.max() < 256


def test_host_batch_row_slice_matches_full(stdlib):
    full = data.host_batch(stdlib, data.TRAIN, 7, 11, B, L)
    for lo, hi in ((0, 2), (2, 4), (6, 16), (15, 16)):
        part = data.host_batch(stdlib, data.TRAIN, 7, 11, B, L, rows=(lo, hi))
        assert part.shape == (hi - lo, L + 1)
        np.testing.assert_array_equal(part, full[lo:hi])
    # The slices, stacked, rebuild the global batch.
    halves = [data.host_batch(stdlib, data.TRAIN, 7, 11, B, L, rows=(i, i + 4)) for i in range(0, B, 4)]
    np.testing.assert_array_equal(np.concatenate(halves), full)


def test_host_batch_rows_are_corpus_windows(stdlib):
    """Each row is a contiguous window: targets (row[1:]) continue the inputs (row[:-1])."""
    for which in (data.TRAIN, data.VAL):
        arr = np.asarray(stdlib.split(which))
        batch = data.host_batch(stdlib, which, 5, 2, B, L)
        offsets = data.window_offsets(5, which, 2, B, len(arr), L + 1)
        assert len(set(offsets.tolist())) > 1
        for row, o in zip(batch, offsets):
            assert 0 <= o and o + L + 1 <= len(arr)
            np.testing.assert_array_equal(row[:-1], arr[o : o + L])
            np.testing.assert_array_equal(row[1:], arr[o + 1 : o + L + 1])


def test_each_epoch_visits_every_window_once():
    """Windows of 65 tokens at stride 64; the rows of consecutive steps run through a shuffled
    epoch, then the next epoch in another order; any step is computed alone (pure in (seed, step))."""
    n_tokens, length, rows = 64 * 30 + 1, 65, 4  # 30 windows; an epoch ends mid-step (30 / 4)
    assert data.n_windows(n_tokens, 64) == 30
    stream = np.concatenate([data.window_offsets(0, data.TRAIN, s, rows, n_tokens, length) for s in range(15)])
    assert stream.max() + length <= n_tokens and (stream % 64 == 0).all()  # every window fits the split
    epochs = stream.reshape(2, 30)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(30) * 64)  # each window exactly once
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh order each epoch
    assert not np.array_equal(epochs[0], np.arange(30) * 64)  # shuffled
    data._epoch_order.cache_clear()
    np.testing.assert_array_equal(data.window_offsets(0, data.TRAIN, 11, rows, n_tokens, length), stream[44:48])
    other = data.window_offsets(1, data.TRAIN, 0, 30, n_tokens, length)
    assert not np.array_equal(other, epochs[0])  # another seed, another order


# ------------------------------------------------------------ tokens


def _write_tokens(root: Path, train: np.ndarray, val: np.ndarray) -> None:
    root.mkdir(parents=True, exist_ok=True)
    train.astype(np.uint16).tofile(root / "train.bin")
    val.astype(np.uint16).tofile(root / "val.bin")


def test_tokens_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 1000, size=5000).astype(np.uint16)
    val = rng.integers(0, 1000, size=700).astype(np.uint16)
    train[:3] = [999, 0, 65535 % 1000]
    _write_tokens(tmp_path, train, val)

    corpus = data.load(DataConfig(name="tokens", path=str(tmp_path), vocab_size=1000, seq_len=16))
    assert corpus.name == "tokens" and corpus.vocab_size == 1000
    assert corpus.train.dtype == np.uint16 and corpus.val.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(corpus.train), train)
    np.testing.assert_array_equal(np.asarray(corpus.val), val)
    assert corpus.info["path"] == str(tmp_path.resolve())

    batch = data.host_batch(corpus, data.TRAIN, 0, 0, 4, 16)
    assert batch.dtype == np.int32 and batch.max() < 1000


def test_tokens_large_ids_survive(tmp_path):
    """uint16 ids above 32767 are not sign-flipped on the way to int32 batches."""
    train = np.full(100, 50000, np.uint16)
    _write_tokens(tmp_path, train, train)
    corpus = data.load(DataConfig(name="tokens", path=str(tmp_path), vocab_size=50304, seq_len=8))
    batch = data.host_batch(corpus, data.TRAIN, 0, 0, 2, 8)
    assert (batch == 50000).all()


def test_tokens_missing_val_and_short_split(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(ConfigError) as info:
        data.load(DataConfig(name="tokens", path=str(tmp_path), vocab_size=1000, seq_len=8))
    assert info.value.field == "data.path" and "val.bin" in str(info.value)

    np.arange(20, dtype=np.uint16).tofile(tmp_path / "val.bin")
    assert len(data.load(DataConfig(name="tokens", path=str(tmp_path), vocab_size=1000, seq_len=18)).val) == 20
    with pytest.raises(ConfigError) as info:
        data.load(DataConfig(name="tokens", path=str(tmp_path), vocab_size=1000, seq_len=19))
    assert info.value.field == "data.seq_len" and "val" in str(info.value)


# ------------------------------------------------------------ synthetic


@pytest.mark.parametrize("vocab", [None, 7, 50])
def test_synthetic_vocab_bound(vocab):
    corpus = data.load(DataConfig(name="synthetic", vocab_size=vocab, synthetic_tokens=20_000, seq_len=16))
    expected = vocab or 256
    assert corpus.vocab_size == expected
    assert len(corpus.train) == 20_000 and len(corpus.val) == 4096
    for arr in (corpus.train, corpus.val):
        assert arr.min() >= 0 and arr.max() < expected
    # Deterministic: the same config gives the same stream.
    again = data.load(DataConfig(name="synthetic", vocab_size=vocab, synthetic_tokens=20_000, seq_len=16))
    np.testing.assert_array_equal(corpus.train, again.train)
    assert not np.array_equal(corpus.train[:4096], corpus.val)


# ------------------------------------------------------------ device_batch


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 1, 4)])
def test_device_batch_sharded_over_batch(shape):
    assert len(jax.devices()) == 8
    corpus = data.load(DataConfig(name="synthetic", synthetic_tokens=20_000, seq_len=L))
    mesh = shd.make_mesh(shape)
    sharding = shd.batch_sharding(mesh)
    arr = data.device_batch(corpus, data.TRAIN, 3, 9, B, L, sharding)

    assert arr.shape == (B, L + 1) and arr.dtype == np.int32
    expected = data.host_batch(corpus, data.TRAIN, 3, 9, B, L)
    np.testing.assert_array_equal(np.asarray(arr), expected)
    assert arr.sharding.is_equivalent_to(sharding, 2)
    assert arr.sharding.spec == P(("data", "fsdp"), None)
    dp = shape[0] * shape[1]
    assert data.process_rows(sharding, (B, L + 1)) == (0, B)
    assert len(arr.addressable_shards) == 8
    for s in arr.addressable_shards:
        rows, cols = s.index
        assert s.data.shape == (B // dp, L + 1)  # split over batch only
        assert cols == slice(None) or (cols.start in (None, 0) and cols.stop in (None, L + 1))
        np.testing.assert_array_equal(np.asarray(s.data), expected[rows])
    # Devices that differ only in the tensor axis hold the same rows.
    distinct = {(s.index[0].start, s.index[0].stop) for s in arr.addressable_shards}
    assert len(distinct) == dp


# ------------------------------------------------------------ prepared corpora, mixtures, eval sets


def _prepared(tmp_path: Path, name: str, texts: list[str], tokenizer: str = "bytes") -> Path:
    from research import prepare

    src = tmp_path / f"{name}_txt"
    src.mkdir()
    for i, t in enumerate(texts):
        (src / f"{i}.txt").write_text(t)
    prepare.prepare([str(src)], tmp_path / name, tokenizer, val_fraction=0.3)
    return tmp_path / name


def _texts(letter: str, n: int = 30) -> list[str]:
    return [f"{letter * (i % 7 + 1)} {i} " * 20 for i in range(n)]


def test_tokens_reads_a_prepared_dir_without_vocab_size(tmp_path):
    root = _prepared(tmp_path, "web", _texts("a"))
    meta = json.loads((root / "meta.json").read_text())
    corpus = data.load(DataConfig(name="tokens", path=str(root), seq_len=16))
    assert corpus.vocab_size == 257 and corpus.info["corpus_hash"] == meta["content_hash"]
    assert corpus.info["eos_id"] == 256 and len(corpus.val) == meta["splits"]["val"]["tokens"]
    with pytest.raises(ConfigError) as info:
        data.load(DataConfig(name="tokens", path=str(root), seq_len=16, vocab_size=256))
    assert info.value.field == "data.vocab_size" and "257" in str(info.value)
    # A train.bin / val.bin pair without meta.json still needs data.vocab_size.
    _write_tokens(tmp_path / "nano", np.arange(100), np.arange(50))
    with pytest.raises(ConfigError) as info:
        data.load(DataConfig(name="tokens", path=str(tmp_path / "nano"), seq_len=16))
    assert info.value.field == "data.vocab_size"


def test_bits_per_byte_from_the_splits_counts(tmp_path, stdlib):
    """bpb = loss x tokens / (bytes x ln 2) of the split; on the stdlib bytes a token is a byte."""
    import math

    assert stdlib.bpb(data.VAL, 2.0) == pytest.approx(2.0 / math.log(2), rel=1e-12)
    root = _prepared(tmp_path, "web", _texts("a"))
    val = json.loads((root / "meta.json").read_text())["splits"]["val"]
    corpus = data.load(DataConfig(name="tokens", path=str(root), seq_len=16))
    assert val["tokens"] == val["bytes"] + val["documents"]  # bytes tokenizer: + one eos per document
    assert corpus.bpb(data.VAL, 2.0) == pytest.approx(2.0 * val["tokens"] / (val["bytes"] * math.log(2)), rel=1e-12)
    synthetic = data.load(DataConfig(name="synthetic", synthetic_tokens=5000, seq_len=16))
    assert synthetic.bpb(data.VAL, 2.0) is None  # not text: no bits per byte


def test_split_rows_by_weight():
    assert data.split_rows({"a": 0.7, "b": 0.3}, 16) == {"a": 11, "b": 5}  # 11.2, 4.8 -> largest remainder
    assert data.split_rows({"a": 1, "b": 1, "c": 1}, 16) == {"a": 6, "b": 5, "c": 5}  # ties: mixture order
    assert data.split_rows({"a": 2, "b": 6}, 8) == {"a": 2, "b": 6}
    for w in ({"a": 0.11, "b": 0.5, "c": 0.39}, {"x": 1e-3, "y": 1.0}):
        assert sum(data.split_rows(w, 32).values()) == 32


def test_mixture_rows_come_from_their_sources(tmp_path):
    web = _prepared(tmp_path, "web", _texts("a"))
    code = _prepared(tmp_path, "code", _texts("b"))
    cfg = DataConfig(name="tokens", seq_len=16, mixture={"web": MixtureSource(str(web), 3.0),
                                                         "code": MixtureSource(str(code), 1.0)})
    mix = data.load_mixture(cfg, 8)
    assert mix.names == ["web", "code"] and mix.rows == [6, 2]
    batch = data.host_batch(mix, data.TRAIN, 0, 5, 8, 16)
    assert batch.shape == (8, 17)
    letters = [set(bytes(r[r < 256].astype(np.uint8)).decode()) - set(" 0123456789") for r in batch]
    assert all(s <= {"a"} for s in letters[:6]) and all(s <= {"b"} for s in letters[6:])
    for lo, hi in ((0, 4), (4, 8), (5, 7)):  # a process's rows are the same rows
        np.testing.assert_array_equal(data.host_batch(mix, data.TRAIN, 0, 5, 8, 16, (lo, hi)), batch[lo:hi])
    epochs = mix.epochs(10, 16)
    assert epochs["web"] == pytest.approx(60 / data.n_windows(len(mix.corpora[0].train), 16))
    sets = data.eval_sets(DataConfig(name="tokens", seq_len=16, mixture=cfg.mixture, eval={"more": str(web)}), mix)
    assert list(sets) == ["web", "code", "more"]
    with pytest.raises(ConfigError) as info:
        data.eval_sets(DataConfig(name="tokens", seq_len=16, eval={"web": str(web)}), mix)
    assert info.value.field == "data.eval.web"


def test_mixture_refuses_other_tokenizers_and_empty_shares(tmp_path):
    web = _prepared(tmp_path, "web", _texts("a"))
    bpe = _prepared(tmp_path, "bpe", _texts("b"), "bpe:300")
    mixture = {"web": MixtureSource(str(web)), "bpe": MixtureSource(str(bpe))}
    with pytest.raises(ConfigError) as info:
        data.load_mixture(DataConfig(name="tokens", seq_len=16, mixture=mixture), 8)
    assert info.value.field == "data.mixture.bpe.path" and "same --tokenizer" in str(info.value)
    mixture = {"web": MixtureSource(str(web), 1.0), "other": MixtureSource(str(web), 0.01)}
    with pytest.raises(ConfigError) as info:
        data.load_mixture(DataConfig(name="tokens", seq_len=16, mixture=mixture), 8)
    assert info.value.field == "data.mixture.other.weight"
    with pytest.raises(ConfigError) as info:
        data.eval_sets(DataConfig(name="stdlib", eval={"x": str(tmp_path)}),
                       data.Mixture(["web"], [data.load(DataConfig(name="tokens", path=str(web), seq_len=16))], [8]))
    assert info.value.field == "data.eval.x" and "meta.json" in str(info.value)
