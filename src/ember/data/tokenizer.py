"""Text ↔ token ids: a byte-level BPE trained with Hugging Face ``tokenizers``, any given
``tokenizer.json`` (BPE, byte-level BPE, WordPiece, Unigram: GPT-2's, Llama's, BERT's...), or raw bytes.

``train_bpe`` learns merges from an iterator of documents (deterministic: the same
documents in the same order give the same ``tokenizer.json``); its document separator
``<|endoftext|>`` is id 0. ``load_tokenizer`` reads any saved one; ``token_roles`` finds what
its special tokens do — the end-of-document id (``eos_id``, named by ``eos_token`` when the
tokenizer's own names are ambiguous), the id its template starts a text with (``bos_id``), the
padding id, and the ids its template puts around a text (Llama's ``<s>``, BERT's ``[CLS]`` ...
``[SEP]``). For the ``bytes`` codec all three are the NUL byte, which cleaned text never contains.
``TextCodec`` is what a run keeps to encode prompts and decode samples
(``TextCodec.from_file("data/mine/tokenizer.json")``).

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
from dataclasses import asdict, dataclass
from pathlib import Path

from ember.errors import EmberError

EOT = "<|endoftext|>"
BYTES = "bytes"  # the codec name of raw UTF-8 bytes (vocab 256)
# Names tokenizers give their end-of-text token, most specific first (GPT-2 and ember; Llama 2,
# Mistral, T5; Llama 3; Gemma; Qwen's chat end; BERT's separator).
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>", "<|end|>", "[SEP]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")


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
    """A ``tokenizers.Tokenizer`` from any ``tokenizer.json``."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():  # e.g. a Hugging Face checkpoint directory
        inside = " (it has one)" if (path / "tokenizer.json").is_file() else ""
        raise EmberError(
            f"The tokenizer {path} is a directory; give the tokenizer.json file in it{inside}: "
            f"--tokenizer {path / 'tokenizer.json'}. A Hugging Face checkpoint without one gets it from "
            f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)."
        )
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
    return tok


@dataclass(frozen=True)
class TokenRoles:
    """What a tokenizer's special ids do in ember. ``eos_id`` ends each document of a language-model
    stream (and stands for an empty prompt); ``bos_id`` is the id its template starts a text with, else
    ``eos_id`` (GPT-2's convention); ``pad_id`` fills rows after a text (its padding token, else
    ``eos_id``: a special id, which no text encodes to); ``prefix``/``suffix``: the ids its template puts
    around every text."""

    eos_id: int = 0
    bos_id: int = 0
    pad_id: int = 0
    eos_token: str = EOT
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefix"], d["suffix"] = list(self.prefix), list(self.suffix)
        return d


def token_roles(tok, eos_token: str = "") -> TokenRoles:
    """The roles of ``tok``'s special tokens (None: the bytes codec, all NUL); ``eos_token`` names the
    end-of-text token when the tokenizer's own names do not say it (EmberError when neither does)."""
    if tok is None:
        return TokenRoles(eos_token="\x00")
    specials = {t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items()) if t.special}
    eos_token = eos_token or next((name for name in EOS_NAMES if name in specials), "")
    eos_id = tok.token_to_id(eos_token) if eos_token else None
    if eos_id is None:
        named = ", ".join(specials) or "none"
        raise EmberError(
            f"The tokenizer has no end-of-text token ember recognises"
            f"{f' (no {eos_token!r} in its vocabulary)' if eos_token else ''}; its special tokens are: {named}. "
            f"ember ends every document with one. Name it with --eos-token TOKEN (data.eos_token), e.g. one "
            f"of its special tokens, or add one such as {EOT!r} to the tokenizer."
        )
    prefix, suffix = _template(tok)
    padding = tok.padding["pad_id"] if tok.padding else None
    pad_id = padding if padding is not None else next((specials[n] for n in PAD_NAMES if n in specials), eos_id)
    return TokenRoles(eos_id, prefix[0] if prefix else eos_id, pad_id, eos_token, prefix, suffix)


def _template(tok) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids ``tok``'s post-processor puts before and after a single text (Llama's ``<s>``, BERT's
    ``[CLS]``/``[SEP]``), found by encoding a probe with and without them."""
    probe = "ember"
    plain, full = tok.encode(probe, add_special_tokens=False).ids, tok.encode(probe).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return tuple(full[:k]), tuple(full[k + len(plain) :])
    return (), ()


class TextCodec:
    """Encode and decode text for one prepared data set: BPE (``tokenizer.json``) or raw bytes."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer  # None = bytes
        self._template: tuple[tuple[int, ...], tuple[int, ...]] | None = None

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
        """Ids of each text, without the template's special ids (see ``documents``). A special token's
        text inside a document (``<|endoftext|>`` written in a file) is encoded as plain text, never as
        the special id, so special ids mark only what ember puts there (ends, padding)."""
        if self.tokenizer is None:
            return (list(d.encode("utf-8")) for d in docs)
        specials = [t for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        names = [t.content for t in specials]
        if not any(name in d for d in docs for name in names):
            # encode_batch_fast (tokenizers >= 0.21) gives the same ids without character offsets,
            # which ember never reads: ~25 % less CPU on the encode that dominates prepare.
            encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
            return (e.ids for e in encode(docs, add_special_tokens=False))
        return (self._encode_plain(d, names) for d in docs)

    def template(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids the tokenizer's template puts before and after a text (none for bytes and ember's BPE);
        found once per codec (instruction data asks for it per conversation)."""
        if self._template is None:
            self._template = ((), ()) if self.tokenizer is None else _template(self.tokenizer)
        return self._template

    def documents(self, docs: list[str], eos_id: int) -> Iterator[list[int]]:
        """Each text as one document of a language-model stream: the template's ids around its ids,
        then ``eos_id`` unless the template already ends with it (BERT's ``[SEP]``)."""
        prefix, suffix = (list(ids) for ids in self.template())
        end = [] if suffix[-1:] == [eos_id] else [eos_id]
        return (prefix + ids + suffix + end for ids in self.encode_batch(docs))

    def _encode_plain(self, text: str, names: list[str]) -> list[int]:
        # Cut each occurrence into two halves, neither of which matches the special token.
        pieces = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
        parts = [
            half for p in pieces for half in ((p[: len(p) // 2], p[len(p) // 2 :]) if p in names else (p,)) if half
        ]
        return [i for e in self.tokenizer.encode_batch(parts, add_special_tokens=False) for i in e.ids]

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
