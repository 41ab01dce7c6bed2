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

Inputs and documents: research/documents.py; tokenizers: research/tokenizer.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from research.documents import InputError, Source, all_documents, content_hash, expand, is_val
from research.tokenizer import make_tokenizer

FORMAT = "ladder-tokens-1"
BATCH_BYTES = 4 << 20  # text per encoded batch: the memory bound
SHARD_TOKENS = 1 << 28  # tokens per shard file
SPLITS = ("train", "val")


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
    held_out = [is_val(raw, val_fraction) for raw in batch]
    for split in SPLITS:
        picked = [(raw, ids) for raw, ids, v in zip(batch, encoded, held_out) if v == (split == "val")]
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
