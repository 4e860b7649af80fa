"""Text ↔ token ids: a byte-level BPE trained with Hugging Face ``tokenizers``, or raw bytes.

``train_bpe`` learns merges from an iterator of documents (deterministic: the same
documents in the same order give the same ``tokenizer.json``); ``load_tokenizer`` reads a
saved one. Id 0 is always the document separator ``<|endoftext|>`` — for the ``bytes``
codec it is the NUL byte, which cleaned text never contains. ``TextCodec`` is what a
run keeps to encode prompts and decode samples (``TextCodec.from_file("data/mine/tokenizer.json")``).

>>> codec = TextCodec(train_bpe(["def f(x): return x + 1"] * 50, vocab_size=300))
>>> codec.decode(codec.encode("def f(x):"))
'def f(x):'
>>> TextCodec().encode("hi")  # the bytes codec
[104, 105]
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from ember.errors import EmberError

EOT = "<|endoftext|>"
BYTES = "bytes"  # the codec name of raw UTF-8 bytes (vocab 256)


def train_bpe(docs: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None, min_frequency: int = 2):
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
        raise EmberError(
            f"The tokenizer file {path} does not exist. Give a tokenizer.json written by `tokenizers` or by `ember data prepare`."
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise EmberError(
            f"{path} is not a readable tokenizers file ({err}). Give a tokenizer.json saved by Tokenizer.save()."
        ) from None
    if tok.token_to_id(EOT) != 0:
        raise EmberError(
            f"{path} has no {EOT!r} token at id 0 (ember separates documents with it). Add it as the first "
            f"special token when training the tokenizer, or let `ember data prepare` train one (--vocab-size)."
        )
    return tok


class TextCodec:
    """Encode and decode text for one prepared data set: BPE (``tokenizer.json``) or raw bytes."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer  # None = bytes

    @classmethod
    def from_file(cls, path: str | Path) -> TextCodec:
        return cls(load_tokenizer(path))

    @classmethod
    def from_json(cls, text: str) -> TextCodec:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return 256 if self.tokenizer is None else self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return next(iter(self.encode_batch([text])))

    def encode_batch(self, docs: list[str]) -> Iterator[list[int]]:
        """Ids of each text. A special token's text inside a document (``<|endoftext|>``
        written in a file) is encoded as plain text, never as the special id."""
        if self.tokenizer is None:
            return (list(d.encode("utf-8")) for d in docs)
        specials = [t for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        names = [t.content for t in specials]
        if not any(name in d for d in docs for name in names):
            return (e.ids for e in self.tokenizer.encode_batch(docs))
        return (self._encode_plain(d, names) for d in docs)

    def _encode_plain(self, text: str, names: list[str]) -> list[int]:
        # Cut each occurrence into two halves, neither of which matches the special token.
        pieces = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
        parts = [
            half for p in pieces for half in ((p[: len(p) // 2], p[len(p) // 2 :]) if p in names else (p,)) if half
        ]
        return [i for e in self.tokenizer.encode_batch(parts) for i in e.ids]

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"codec": BYTES}) if self.tokenizer is None else self.tokenizer.to_str()


def data_codec(data_dir: str | Path, manifest: dict) -> TextCodec:
    """The codec a prepared directory's ids were made with: its tokenizer.json, or bytes."""
    tok = manifest["tokenizer"]
    return TextCodec.from_file(Path(data_dir) / tok["file"]) if tok.get("file") else TextCodec(None)


def data_codec_json(data_dir: str | Path, manifest: dict) -> str:
    """That codec's text as a run keeps it (RUN/tokenizer.json): the directory's file as it is, or bytes'."""
    tok = manifest["tokenizer"]
    return (Path(data_dir) / tok["file"]).read_text(encoding="utf-8") if tok.get("file") else TextCodec(None).to_json()


def codec_from_json(text: str) -> TextCodec:
    """The codec a run saved with ``TextCodec.to_json()``."""
    if json.loads(text).get("codec") == BYTES:
        return TextCodec(None)
    return TextCodec.from_json(text)
