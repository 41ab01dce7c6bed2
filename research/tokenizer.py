"""Tokenizers of `python -m research.prepare`: bytes, a byte-level BPE trained here, or a tokenizer.json.

Each has `vocab_size`, `eos_id` and `encode(list of UTF-8 bytes) -> list of id arrays`;
`make_tokenizer` builds one from the `--tokenizer` value.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from research.documents import InputError, Source, all_documents

EOS = "<|endoftext|>"
EOS_NAMES = (EOS, "</s>", "<eos>", "<|eos|>")  # looked up in a given tokenizer.json


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
