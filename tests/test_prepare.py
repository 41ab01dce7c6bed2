"""`python -m research.prepare`: text -> documents -> tokens, shards and meta.json.

Small corpora written here; nothing reaches the network."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research import data, documents, prepare, tokenizer
from research.config import ConfigError


def write_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> list[str]:
    """A folder of small text files (one document each, some non-ASCII); returns their texts in order."""
    rng = np.random.default_rng(seed)
    words = "the a model loss scales with data compute tokens bytes déjà vu naïve größe 数据".split()
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n_docs):
        text = "\n".join(" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(rng.integers(2, 9)))
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def split_docs(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    """A split's token stream cut at each end-of-document token (every document ends with one)."""
    assert len(ids) and ids[-1] == eos
    cuts = np.flatnonzero(ids == eos)
    return np.split(ids, cuts + 1)[:-1]


def read_split(out: Path, meta: dict, split: str) -> np.ndarray:
    return np.concatenate([np.fromfile(out / s, dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])


def test_bytes_round_trip_and_document_split(tmp_path):
    texts = write_corpus(tmp_path / "txt")
    meta = prepare.prepare([str(tmp_path / "txt")], tmp_path / "out", "bytes", val_fraction=0.25, shard_tokens=500)
    out = tmp_path / "out"
    assert meta["vocab_size"] == 257 and meta["eos_id"] == 256 and meta["dtype"] == "uint16"
    assert meta["tokenizer_file"] is None and not (out / "tokenizer.json").exists()
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == {k: v for k, v in meta.items() if k != "reused"}
    expected = {"train": [], "val": []}
    for t in texts:  # the split is a hash of the document's text
        expected["val" if documents.is_val(t.encode(), 0.25) else "train"].append(t.encode())
    assert expected["train"] and expected["val"]
    for split in ("train", "val"):
        s = meta["splits"][split]
        ids = read_split(out, meta, split)
        assert len(s["shards"]) == -(-len(ids) // 500)  # shards of at most 500 tokens
        docs = [bytes(d[:-1].astype(np.uint8)) for d in split_docs(ids, 256)]
        assert docs == expected[split]  # every document once, in input order, bytes intact
        assert s["documents"] == len(docs)
        assert s["bytes"] == sum(map(len, docs))
        assert s["tokens"] == len(ids) == s["bytes"] + s["documents"]  # one id per byte, one eos per doc
    assert not list(tmp_path.glob(".out.*"))  # the temporary directory was renamed into place


def test_bpe_tokenizer_is_trained_saved_and_decodes_back(tmp_path):
    from tokenizers import Tokenizer

    texts = write_corpus(tmp_path / "txt")
    meta = prepare.prepare([str(tmp_path / "txt")], tmp_path / "out", "bpe:300", val_fraction=0.25)
    out = tmp_path / "out"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert meta["vocab_size"] == tok.get_vocab_size() == 300
    assert meta["eos_id"] == tok.token_to_id(tokenizer.EOS)
    decoded = []
    for split in ("train", "val"):
        ids = read_split(out, meta, split)
        assert ids.max() < 300
        docs = split_docs(ids, meta["eos_id"])
        decoded += [tok.decode(d[:-1].tolist()) for d in docs]
        assert meta["splits"][split]["tokens"] == len(ids)
        # BPE merges: fewer tokens than bytes (the corpus repeats its words).
        assert len(ids) < meta["splits"][split]["bytes"]
    assert sorted(decoded) == sorted(texts)

    # The saved tokenizer, given by path, encodes another input to the same ids.
    again = prepare.prepare([str(tmp_path / "txt")], tmp_path / "again", str(out / "tokenizer.json"), val_fraction=0.25)
    assert again["tokenizer_hash"] == meta["tokenizer_hash"]
    np.testing.assert_array_equal(read_split(tmp_path / "again", again, "train"), read_split(out, meta, "train"))


def test_jsonl_parquet_and_globs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": f"line {i} é"}) + "\n" for i in range(30)))
    pq.write_table(pa.table({"body": [f"row {i}" for i in range(20)]}), tmp_path / "b.parquet")
    meta = prepare.prepare([str(tmp_path / "*.jsonl"), str(tmp_path / "b.parquet")], tmp_path / "out",
                           field="body", val_fraction=0.2)
    s = meta["splits"]
    assert meta["files"] == 2
    assert s["train"]["documents"] + s["val"]["documents"] == 50
    assert s["train"]["bytes"] + s["val"]["bytes"] == sum(len(f"line {i} é".encode()) for i in range(30)) + \
        sum(len(f"row {i}") for i in range(20))


def test_rerun_reuses_and_a_changed_input_rebuilds(tmp_path):
    write_corpus(tmp_path / "txt", n_docs=10)
    first = prepare.prepare([str(tmp_path / "txt")], tmp_path / "out")
    stamp = (tmp_path / "out" / "meta.json").stat().st_mtime_ns
    again = prepare.prepare([str(tmp_path / "txt")], tmp_path / "out")
    assert again["reused"] and not first["reused"]
    assert (tmp_path / "out" / "meta.json").stat().st_mtime_ns == stamp
    # Another option is another corpus.
    assert not prepare.prepare([str(tmp_path / "txt")], tmp_path / "out", val_fraction=0.5)["reused"]
    (tmp_path / "txt" / "doc003.txt").write_text("changed", encoding="utf-8")
    changed = prepare.prepare([str(tmp_path / "txt")], tmp_path / "out", val_fraction=0.5)
    assert not changed["reused"] and changed["content_hash"] != first["content_hash"]
    docs = changed["splits"]["train"]["documents"] + changed["splits"]["val"]["documents"]
    assert docs == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "txt"]  # no temporary or old dirs left


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "research.prepare", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)


@pytest.mark.parametrize("case", ["missing", "empty", "no_field", "bad_json", "small_vocab", "not_utf8",
                                  "train_on_without_bpe", "out_not_a_corpus"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case, capsys):
    (tmp_path / "ok.txt").write_text("some text")
    inputs, options, needle = [str(tmp_path / "ok.txt")], [], None
    if case == "missing":
        inputs, needle = [str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such file"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        inputs, needle = [str(tmp_path / "empty.txt")], "no text in the input"
    elif case == "no_field":
        (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"other": "no text"}\n')
        inputs, needle = [str(tmp_path / "x.jsonl")], f"{tmp_path / 'x.jsonl'}:2: no text field 'text'"
    elif case == "bad_json":
        (tmp_path / "x.jsonl").write_text('{"text": "fine"}\nnot json\n')
        inputs, needle = [str(tmp_path / "x.jsonl")], f"{tmp_path / 'x.jsonl'}:2: not a JSON object"
    elif case == "small_vocab":
        options, needle = ["--tokenizer", "bpe:200"], "--tokenizer: bpe:200 is too small"
    elif case == "train_on_without_bpe":
        options, needle = ["--train-tokenizer-on", inputs[0]], "--train-tokenizer-on: only with --tokenizer bpe:VOCAB"
    elif case == "out_not_a_corpus":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "mine.txt").write_text("keep me")
        needle = f"--out: {tmp_path / 'out'} exists and is not a prepared corpus"
    else:
        (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
        inputs, needle = [str(tmp_path / "bin.txt")], f"{tmp_path / 'bin.txt'}: not UTF-8 text (byte 3)"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = prepare.main([*inputs, "--out", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out dir, no temporary dir
    if case == "out_not_a_corpus":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_cli_prints_throughput_and_reuses(tmp_path):
    write_corpus(tmp_path / "txt", n_docs=5)
    proc = _cli(str(tmp_path / "txt"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and "MB/s" in proc.stderr and "5 documents" in proc.stderr
    proc = _cli(str(tmp_path / "txt"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.startswith("up to date:"), proc.stderr


def test_large_vocab_is_uint32(tmp_path):
    """A tokenizer of more than 65536 ids writes uint32 shards, and ids above 65535 survive into batches."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab[tokenizer.EOS] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    for k in range(20):
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{k:02d}.txt").write_text(f"w{69_000 + k} w{69_970 + k}")
    meta = prepare.prepare([str(tmp_path / "txt")], tmp_path / "out", str(tmp_path / "tokenizer.json"),
                           val_fraction=0.3)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["eos_id"] == 70_000
    corpus = data.load_prepared(tmp_path / "out", "data.path")
    docs = [d.tolist() for split in (corpus.train, corpus.val) for d in split_docs(np.asarray(split[:]), 70_000)]
    assert sorted(docs) == [[69_000 + k, 69_970 + k, 70_000] for k in range(20)]
    assert corpus.train[:].dtype == np.uint32


def test_sharded_split_reads_as_one_array(tmp_path):
    write_corpus(tmp_path / "txt")
    meta = prepare.prepare([str(tmp_path / "txt")], tmp_path / "out", shard_tokens=97, val_fraction=0.25)
    corpus = data.load_prepared(tmp_path / "out", "data.path")
    whole = read_split(tmp_path / "out", meta, "train")
    assert isinstance(corpus.train, data.Shards) and len(corpus.train) == len(whole)
    for lo, hi in ((0, 97), (90, 110), (5, 400), (len(whole) - 3, len(whole)), (10, 10)):
        np.testing.assert_array_equal(corpus.train[lo:hi], whole[lo:hi])
    s = meta["splits"]
    assert corpus.tokens_per_byte == (s["train"]["tokens"] / s["train"]["bytes"], s["val"]["tokens"] / s["val"]["bytes"])
    with pytest.raises(ConfigError) as info:
        data.load_prepared(tmp_path / "out", "data.path", vocab_size=300)
    assert info.value.field == "data.vocab_size" and "257" in str(info.value)
