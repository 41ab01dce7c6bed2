"""Inputs of `python -m research.prepare`: paths, globs and datasets -> documents, streamed.

- `expand` turns the command line's inputs into `Source`s: text files (one
  document each), `.jsonl` (one per line), `.parquet` (one per row),
  directories (every file below, hidden ones skipped), globs, and
  `hf:NAME[:SPLIT]` (a Hugging Face dataset through `datasets`, online only).
- `documents` yields a source's documents as strings; `content_hash` hashes
  the inputs' bytes; `is_val` is the document-level held-out split.

Bad input raises `InputError` with one line naming the file (and line).
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class InputError(ValueError):
    """Bad input or option; one line naming the file or option, exit code 2."""


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
