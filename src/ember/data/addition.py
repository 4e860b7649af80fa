"""A generated seq2seq task: read "a+b", write the decimal sum.

a and b are uniform in [0, 10**max_digits), drawn from ``numpy.random.default_rng(seed)``,
so the data is the same on every machine. Characters are tokens::

    pad=0, bos=1, eos=2, then "0123456789+" → 3..13

Operands are zero-padded to ``max_digits`` so that digits of equal weight sit
at fixed positions. The sum is written least-significant digit first ("123+4567" → "0964"): the
way people add, carry by carry, and what lets a small Transformer learn the task
in a minute; ``decode_tgt`` turns it back into the number.

src is "a+b" padded with pad to ``2*max_digits + 1``; the target has length
``max_digits + 2``: tgt_in = [bos] + digits (pad after), tgt_out = digits + [eos]
(IGNORE_INDEX after, so padding costs nothing in the loss).

Validation pairs are drawn first, then test pairs (only with ``data.test_fraction`` > 0)
that repeat no validation pair; training pairs never repeat either. Training pairs may
repeat each other (with small ``max_digits`` there are few pairs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ember.data.spec import IGNORE_INDEX, DataSpec
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import DataConfig

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+"
VOCAB_SIZE = 3 + len(CHARS)
_ID = {c: i + 3 for i, c in enumerate(CHARS)}
MIN_VAL = 500


def src_len(max_digits: int) -> int:
    return 2 * max_digits + 1


def tgt_len(max_digits: int) -> int:
    return max_digits + 2  # bos/eos + a sum of up to max_digits + 1 digits


def addition_spec(max_digits: int) -> DataSpec:
    """The task's DataSpec for operands of up to ``max_digits`` digits."""
    return DataSpec(
        task="seq2seq",
        vocab_size=VOCAB_SIZE,
        seq_len=tgt_len(max_digits),
        src_len=src_len(max_digits),
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
    )


def encode_src(text: str, length: int | None = None) -> list[int]:
    """ "12+34" → token ids, right-padded with pad to ``length`` when given."""
    text = text.replace(" ", "")
    bad = sorted({c for c in text if c not in _ID})
    if bad:
        raise EmberError(
            f"The addition model reads only digits and '+', got {bad} in {text!r}. Write the input like 12+34."
        )
    ids = [_ID[c] for c in text]
    if length is not None:
        if len(ids) > length:
            raise EmberError(
                f"{text!r} has {len(ids)} characters but the model reads at most {length}; use fewer digits."
            )
        ids += [PAD] * (length - len(ids))
    return ids


def _problem(a: int, b: int, max_digits: int) -> str:
    return f"{a:0{max_digits}d}+{b:0{max_digits}d}"  # fixed width: digits of equal weight align


def problem_ids(text: str, max_digits: int) -> list[int]:
    """A sum typed by a user ("12+34") as the model reads it: operands zero-padded."""
    parts = text.replace(" ", "").split("+")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= max_digits for p in parts):
        raise EmberError(
            f"The addition model reads a sum like 12+34 with operands of at most {max_digits} digits; got {text!r}."
        )
    return encode_src(_problem(int(parts[0]), int(parts[1]), max_digits))


def _chars(ids: Iterable[int]) -> str:
    """Characters of ``ids`` up to eos, skipping bos, pad and ignored positions."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    chars = []
    for i in ids:
        if i == EOS:
            break
        if 3 <= i < VOCAB_SIZE:
            chars.append(CHARS[i - 3])
    return "".join(chars)


def decode_src(ids: Iterable[int]) -> str:
    """Source ids → "a+b"."""
    return _chars(ids)


def decode_tgt(ids: Iterable[int]) -> str:
    """Target ids → the sum they spell (digits are stored reversed); stops at eos."""
    return _chars(ids)[::-1]


def num_val(cfg: DataConfig, fraction: float | None = None) -> int:
    """max(500, num_examples * val_fraction), but never more than val_fraction of all pairs
    (``fraction`` in place of val_fraction: the size of the test split)."""
    fraction = cfg.val_fraction if fraction is None else fraction
    n = max(MIN_VAL, round(cfg.num_examples * fraction))
    return max(1, min(n, int(100**cfg.max_digits * fraction)))


def _draw_distinct(rng: np.random.Generator, high: int, n: int, taken: dict) -> list[tuple[int, int]]:
    """``n`` distinct pairs that are not in ``taken``; adds them to it."""
    new: dict[tuple[int, int], None] = {}  # insertion-ordered set of distinct pairs
    while len(new) < n:
        for a, b in rng.integers(0, high, size=(n, 2)).tolist():
            if len(new) < n and (a, b) not in taken:
                new.setdefault((a, b))
    taken.update(new)
    return list(new)


def _draw_pairs(cfg: DataConfig) -> tuple[list[tuple[int, int]], ...]:
    """(train, val, test) pairs; test is empty, and nothing else drawn differently, without test_fraction."""
    rng = np.random.default_rng(cfg.seed)
    high = 10**cfg.max_digits
    held: dict[tuple[int, int], None] = {}
    val = _draw_distinct(rng, high, num_val(cfg), held)
    test = _draw_distinct(rng, high, num_val(cfg, cfg.test_fraction), held) if cfg.test_fraction > 0 else []
    train: list[tuple[int, int]] = []
    while len(train) < cfg.num_examples:
        draws = rng.integers(0, high, size=(cfg.num_examples - len(train), 2)).tolist()
        train += [(a, b) for a, b in draws if (a, b) not in held]
    return train, val, test


def _encode_pairs(pairs: list[tuple[int, int]], max_digits: int) -> dict[str, Tensor]:
    s, t = src_len(max_digits), tgt_len(max_digits)
    src, tgt_in, tgt_out = [], [], []
    for a, b in pairs:
        digits = encode_src(str(a + b)[::-1])  # least-significant digit first
        src.append(encode_src(_problem(a, b, max_digits), s))
        tgt_in.append([BOS] + digits + [PAD] * (t - 1 - len(digits)))
        tgt_out.append(digits + [EOS] + [IGNORE_INDEX] * (t - 1 - len(digits)))
    return {
        "src": torch.tensor(src, dtype=torch.long).reshape(-1, s),
        "tgt_in": torch.tensor(tgt_in, dtype=torch.long).reshape(-1, t),
        "tgt_out": torch.tensor(tgt_out, dtype=torch.long).reshape(-1, t),
    }


def load_splits(cfg: DataConfig) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor] | None]:
    """(train, val, test) as dicts of Long tensors ``src``, ``tgt_in``, ``tgt_out``; test is None
    unless ``cfg.test_fraction`` > 0."""
    train, val, test = _draw_pairs(cfg)
    encoded = _encode_pairs(test, cfg.max_digits) if test else None
    return _encode_pairs(train, cfg.max_digits), _encode_pairs(val, cfg.max_digits), encoded


def load_split(cfg: DataConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(train, val) as dicts of Long tensors ``src``, ``tgt_in``, ``tgt_out``."""
    return load_splits(cfg)[:2]
