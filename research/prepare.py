"""`python -m research.prepare INPUT... --out DIR [--tokenizer bytes|bpe:VOCAB|PATH]`.

Text -> documents -> tokenizer -> token shards + meta.json, streamed in
batches of documents (memory does not grow with the corpus; one text file is
one document and is held whole while it is encoded).

- Inputs: text files, `.jsonl` (one document per line, in `--field`),
  `.parquet` (column `--field`), directories (every file below, hidden ones
  skipped), globs, and `hf:NAME[:SPLIT]` (a Hugging Face dataset, streamed
  through `datasets`, where the machine is online).
- Tokenizers: `bytes` (the UTF-8 bytes, ids 0..255, end-of-document 256);
  `bpe:VOCAB` (a byte-level BPE trained on the input, or on
  `--train-tokenizer-on`, saved as tokenizer.json); a path to a tokenizer.json.
- Every document ends with the end-of-document token. A hash of the
  document's text puts it in the held-out split (`--val-fraction`).
- Output, written into a temporary directory and renamed into place:
  `train-NNNNN.bin`, `val-NNNNN.bin` (uint16, or uint32 for vocabularies over
  65536), `meta.json` (tokenizer, vocab size, eos id, dtype, per split the
  tokens, documents, UTF-8 bytes and shards, and the content hash of inputs
  and options), and `tokenizer.json` unless `--tokenizer bytes`. Run again
  with the same inputs and options, it reuses DIR; a changed input changes
  the hash and DIR is rebuilt.

Bad input (a missing path, no text, a `.jsonl` line without the field, a
vocabulary too small for the bytes): one line on stderr naming the file or
option, exit code 2, and DIR as it was.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "ladder-tokens-1"
EOS = "<|endoftext|>"
EOS_NAMES = (EOS, "</s>", "<eos>", "<|eos|>")  # looked up in a given tokenizer.json
BATCH_BYTES = 4 << 20  # text per encoded batch: the memory bound
SHARD_TOKENS = 1 << 28  # tokens per shard file
SPLITS = ("train", "val")


class InputError(ValueError):
    """Bad input or option; one line naming the file or option, exit code 2."""


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Source:
    """One input: a local file (kind text, jsonl or parquet) or a Hugging Face dataset (kind hf)."""

    kind: str
    name: str  # the path, or NAME[:SPLIT]


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def expand(inputs: list[str]) -> list[Source]:
    """The files (and datasets) named by `inputs`, in order; InputError for one that matches nothing."""
    sources: list[Source] = []
    for item in inputs:
        if item.startswith("hf:"):
            sources.append(Source("hf", item[3:]))
            continue
        if glob.has_magic(item):
            paths = [Path(p) for p in sorted(glob.glob(item, recursive=True))]
            paths = [p for p in paths if p.is_file()]
            if not paths:
                raise InputError(f"{item}: no file matches")
        elif Path(item).is_dir():
            root = Path(item)
            paths = sorted(p for p in root.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(root).parts))
        elif Path(item).is_file():
            paths = [Path(item)]
        else:
            raise InputError(f"{item}: no such file or directory")
        sources += [Source(_kind(p), str(p)) for p in paths]
    return sources


def documents(source: Source, field: str) -> Iterator[str]:
    """The documents of one input, as strings, streamed."""
    if source.kind == "text":
        raw = Path(source.name).read_bytes()
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{source.name}: not UTF-8 text (byte {err.start})") from None
    elif source.kind == "jsonl":
        with open(source.name, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{source.name}:{n}: not a JSON object") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise InputError(f"{source.name}:{n}: no text field {field!r} (set --field)")
                yield row[field]
    elif source.kind == "parquet":
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415 (optional: only for parquet inputs)
        except ImportError:
            raise InputError(f"{source.name}: parquet needs pyarrow (pip install 'ladder[parquet]')") from None

        pf = pq.ParquetFile(source.name)
        if field not in pf.schema_arrow.names:
            raise InputError(f"{source.name}: no column {field!r} (set --field)")
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    else:  # hf
        try:
            import datasets  # noqa: PLC0415 (optional: only for hf: inputs)
        except ImportError:
            raise InputError(f"hf:{source.name}: needs the `datasets` package (pip install datasets)") from None
        name, _, split = source.name.partition(":")
        for row in datasets.load_dataset(name, split=split or "train", streaming=True):
            if not isinstance(row.get(field), str):
                raise InputError(f"hf:{source.name}: no text field {field!r} (set --field)")
            yield row[field]


def all_documents(sources: list[Source], field: str) -> Iterator[str]:
    for source in sources:
        yield from documents(source, field)


def content_hash(sources: list[Source], options: dict) -> str:
    """SHA-256 of the options and of every input's bytes (a dataset: its name), streamed."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for source in sources:
        digest.update(f"\0{source.kind}\0".encode())
        if source.kind == "hf":
            digest.update(source.name.encode())
            continue
        with open(source.name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def is_val(text_utf8: bytes, val_fraction: float) -> bool:
    """The document-level split: a hash of the document's text, never of a run."""
    h = int.from_bytes(hashlib.sha256(text_utf8).digest()[:8], "little")
    return h / 2**64 < val_fraction


# ---------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; the end-of-document token is 256."""

    vocab_size, eos_id = 257, 256

    def encode(self, texts_utf8: list[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(t, np.uint8) for t in texts_utf8]


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`; `encode_batch` runs on every core."""

    def __init__(self, tok, eos_id: int):
        self.tok, self.eos_id = tok, eos_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(self, texts_utf8: list[bytes]) -> list[np.ndarray]:
        texts = [t.decode("utf-8") for t in texts_utf8]
        return [np.asarray(e.ids, np.uint32) for e in self._encode(texts, add_special_tokens=False)]


def train_bpe(vocab: int, texts: Iterator[str], progress: bool):
    """A byte-level BPE of `vocab` ids (the 256 bytes, EOS and merges) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def make_tokenizer(spec: str, sources: list[Source], train_on: list[Source] | None, field: str,
                   progress: bool):
    """(tokenizer, the tokenizers.Tokenizer to save or None) for `--tokenizer spec`."""
    if spec == "bytes":
        return ByteTokenizer(), None
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise InputError(f"--tokenizer: {spec!r}: expected bpe:VOCAB with VOCAB an integer") from None
        if vocab < 257:
            raise InputError(f"--tokenizer: {spec} is too small: a byte-level BPE needs at least 257 ids "
                             "(256 bytes + end-of-document)")
        tok = train_bpe(vocab, all_documents(train_on or sources, field), progress)
        return HFTokenizer(tok, tok.token_to_id(EOS)), tok
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--tokenizer: {spec}: not bytes, bpe:VOCAB or an existing tokenizer.json")
    from tokenizers import Tokenizer  # noqa: PLC0415

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a bad file
        raise InputError(f"--tokenizer: {spec}: cannot read ({str(err).splitlines()[0][:80]})") from None
    eos = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
    if eos is None:
        raise InputError(f"--tokenizer: {spec}: no end-of-document token (one of {', '.join(EOS_NAMES)})")
    return HFTokenizer(tok, eos), tok


# ---------------------------------------------------------------- output


class ShardWriter:
    """Appends token arrays to `{split}-NNNNN.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.tokens = self.documents = self.bytes = 0
        self._file, self._room = None, 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._room == 0:
                self._next_shard()
            part, ids = ids[: self._room], ids[self._room:]
            part.tofile(self._file)
            self._room -= len(part)
            self.tokens += len(part)

    def _next_shard(self) -> None:
        if self._file:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._file, self._room = open(self.root / name, "wb"), self.shard_tokens

    def close(self) -> dict:
        if not self.shards:  # an empty split still has its (empty) shard: readers need no special case
            self._next_shard()
        self._file.close()
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def _batches(texts: Iterator[str]) -> Iterator[list[bytes]]:
    batch, size = [], 0
    for text in texts:
        raw = text.encode("utf-8")
        batch.append(raw)
        size += len(raw)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_tokens(root: Path, tokenizer, sources: list[Source], field: str, val_fraction: float,
                 shard_tokens: int, progress: bool) -> dict:
    """Encode every document into `root`'s shards; returns meta.json's `splits`."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {s: ShardWriter(root, s, dtype, shard_tokens) for s in SPLITS}
    eos = np.array([tokenizer.eos_id], np.uint32)
    files = [s for s in sources if s.kind != "hf"]
    total = sum(Path(s.name).stat().st_size for s in files) if len(files) == len(sources) else None
    bar = _progress(total, progress)

    def encode(batch: list[bytes]):
        return batch, tokenizer.encode(batch)

    # One batch is encoded (on every core, outside the GIL) while the next one is read.
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in _chain(_batches(all_documents(sources, field))):
            if pending is not None:
                _write_batch(*pending.result(), writers, eos, val_fraction, bar)
            pending = pool.submit(encode, batch) if batch is not None else None
    bar.close()
    return {s: w.close() for s, w in writers.items()}


def _chain(batches: Iterator[list[bytes]]) -> Iterator[list[bytes] | None]:
    """The batches, then None (the signal to write out the last one)."""
    yield from batches
    yield None


def _write_batch(batch: list[bytes], encoded: list[np.ndarray], writers: dict, eos: np.ndarray,
                 val_fraction: float, bar) -> None:
    for split in SPLITS:
        picked = [(raw, ids) for raw, ids in zip(batch, encoded) if is_val(raw, val_fraction) == (split == "val")]
        if not picked:
            continue
        w = writers[split]
        w.write(np.concatenate([part for _, ids in picked for part in (ids, eos)]))
        w.documents += len(picked)
        w.bytes += sum(len(raw) for raw, _ in picked)
    bar.update(sum(len(raw) for raw in batch))


def prepare(inputs: list[str], out: str | Path, tokenizer: str = "bytes", field: str = "text",
            val_fraction: float = 0.05, train_tokenizer_on: list[str] | None = None,
            shard_tokens: int = SHARD_TOKENS, progress: bool | None = None) -> dict:
    """Prepare `inputs` into `out`; return meta.json's dict (with `reused`: whether `out` was up to date).
    InputError (one line) for bad input; `out` is then left as it was."""
    out = Path(out)
    progress = sys.stderr.isatty() if progress is None else progress
    if not 0 < val_fraction < 1:
        raise InputError(f"--val-fraction: must be in (0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise InputError(f"--shard-tokens: must be > 0, got {shard_tokens}")
    sources = expand(inputs)
    if not sources:
        raise InputError(f"{' '.join(inputs)}: no input files")
    if train_tokenizer_on and not tokenizer.startswith("bpe:"):
        raise InputError(f"--train-tokenizer-on: only with --tokenizer bpe:VOCAB (not {tokenizer})")
    train_on = expand(train_tokenizer_on) if train_tokenizer_on else None
    options = {"tokenizer": tokenizer, "field": field, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
               "format": FORMAT}
    if tokenizer not in ("bytes",) and not tokenizer.startswith("bpe:") and Path(tokenizer).is_file():
        options["tokenizer_sha256"] = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    if train_on:
        options["train_tokenizer_on"] = content_hash(train_on, {})
    chash = content_hash(sources, options)
    if (out / "meta.json").is_file():
        old = json.loads((out / "meta.json").read_text())
        if old.get("content_hash") == chash:
            return {**old, "reused": True}
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out: {out} exists and is not a prepared corpus (no meta.json); choose another")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        tok, hf_tok = make_tokenizer(tokenizer, sources, train_on, field, progress)
        train_s = time.perf_counter() - t0
        if hf_tok is not None:
            hf_tok.save(str(tmp / "tokenizer.json"))
        # Two prepared dirs hold comparable ids exactly when these match (data.py checks).
        tok_hash = "bytes" if hf_tok is None else hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()
        t0, cpu0 = time.perf_counter(), time.process_time()  # process time: every thread's CPU
        splits = write_tokens(tmp, tok, sources, field, val_fraction, shard_tokens, progress)
        encode_s, encode_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        n_bytes = sum(s["bytes"] for s in splits.values())
        if n_bytes == 0:
            raise InputError(f"{' '.join(inputs)}: no text in the input")
        for split, counts in splits.items():
            if not counts["documents"]:
                print(f"warning: no document fell in the {split} split; training needs both "
                      "(change --val-fraction, or add documents)", file=sys.stderr)
        meta = {
            "format": FORMAT,
            "tokenizer": tokenizer if tokenizer == "bytes" or tokenizer.startswith("bpe:") else str(Path(tokenizer)),
            "tokenizer_file": "tokenizer.json" if hf_tok is not None else None,
            "tokenizer_hash": tok_hash,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": "uint16" if tok.vocab_size <= 1 << 16 else "uint32",
            "splits": splits,
            "content_hash": chash,
            "options": options,
            "inputs": inputs,
            "files": len(sources),
            "seconds": {"tokenizer": round(train_s, 3), "encode": round(encode_s, 3),
                        "encode_cpu": round(encode_cpu_s, 3)},
            "encode_mb_per_s": round(n_bytes / 1e6 / encode_s, 3) if encode_s else None,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**meta, "reused": False}


def _replace_dir(new: Path, out: Path) -> None:
    """Put `new` at `out`: renames only, so `out` is at every moment the old corpus or the new."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="text files, .jsonl, .parquet, directories, globs, or hf:NAME[:SPLIT]")
    parser.add_argument("--out", required=True, help="the prepared directory to write")
    parser.add_argument("--tokenizer", default="bytes", help="bytes (default), bpe:VOCAB, or a tokenizer.json")
    parser.add_argument("--train-tokenizer-on", nargs="+", metavar="FILE",
                        help="train bpe:VOCAB on these inputs instead of INPUT")
    parser.add_argument("--field", default="text", help="the text field of .jsonl, parquet, hf: inputs (default text)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    parser.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file (default 2^28)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        meta = prepare(args.inputs, args.out, args.tokenizer, args.field, args.val_fraction,
                       args.train_tokenizer_on, args.shard_tokens)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if meta["reused"]:
        print(f"up to date: {args.out} (content hash {meta['content_hash'][:12]})", file=sys.stderr)
        return 0
    s = meta["splits"]
    n_bytes = s["train"]["bytes"] + s["val"]["bytes"]
    print(f"wrote {args.out}: {meta['files']} file(s), {s['train']['documents'] + s['val']['documents']} documents, "
          f"{n_bytes / 1e6:.2f} MB -> {s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens "
          f"(vocab {meta['vocab_size']}, {meta['dtype']}); tokenizer {meta['seconds']['tokenizer']:.1f} s, "
          f"encoding {meta['encode_mb_per_s']} MB/s on {meta['seconds']['encode_cpu'] / meta['seconds']['encode']:.1f} "
          f"cores' worth of CPU; {time.perf_counter() - t0:.1f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
