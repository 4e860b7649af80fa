"""Text ↔ token ids: a byte-level BPE trained with Hugging Face ``tokenizers``, or raw bytes.

``train_bpe`` learns merges from an iterator of documents (deterministic: the same
documents in the same order give the same ``tokenizer.json``); ``load_tokenizer`` reads a
saved one. Id 0 is always the document separator ``<|endoftext|>`` — for the ``bytes``
codec it is the NUL byte, which cleaned text never contains. ``TextCodec`` is what a
run keeps to encode prompts and decode samples.

>>> codec = TextCodec.from_file("data/mine/tokenizer.json")
>>> codec.decode(codec.encode("def f(x):"))
'def f(x):'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ember.errors import EmberError

EOT = "<|endoftext|>"
BYTES = "bytes"  # the codec name of raw UTF-8 bytes (vocab 256)


def train_bpe(docs: Iterable[str], vocab_size: int, special_tokens: Optional[list[str]] = None, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``docs``; EOT is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOT] + [t for t in (special_tokens or []) if t != EOT]
    if vocab_size < 256 + len(specials):
        raise EmberError(
            f"A byte-level BPE needs vocab_size >= 256 bytes + {len(specials)} special token(s) = "
            f"{256 + len(specials)}; got {vocab_size}. Raise --vocab-size (or data.vocab_size), e.g. 4096."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``; it must have EOT as id 0."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise EmberError(f"The tokenizer file {path} does not exist. Give a tokenizer.json written by `tokenizers` or by `ember data prepare`.")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise EmberError(f"{path} is not a readable tokenizers file ({err}). Give a tokenizer.json saved by Tokenizer.save().") from None
    if tok.token_to_id(EOT) != 0:
        raise EmberError(
            f"{path} has no {EOT!r} token at id 0 (ember separates documents with it). Add it as the first "
            f"special token when training the tokenizer, or let `ember data prepare` train one (--vocab-size)."
        )
    return tok


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TextCodec:
    """Encode and decode text for one prepared data set: BPE (``tokenizer.json``) or raw bytes."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer  # None = bytes

    @classmethod
    def from_file(cls, path: str | Path) -> "TextCodec":
        return cls(load_tokenizer(path))

    @classmethod
    def from_json(cls, text: str) -> "TextCodec":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return 256 if self.tokenizer is None else self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return self.tokenizer.encode(text).ids

    def encode_batch(self, docs: list[str]) -> Iterator[list[int]]:
        if self.tokenizer is None:
            return (list(d.encode("utf-8")) for d in docs)
        return (e.ids for e in self.tokenizer.encode_batch(docs))

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"codec": BYTES}) if self.tokenizer is None else self.tokenizer.to_str()


def codec_from_json(text: str) -> TextCodec:
    """The codec a run saved with ``TextCodec.to_json()``."""
    if json.loads(text).get("codec") == BYTES:
        return TextCodec(None)
    return TextCodec.from_json(text)
