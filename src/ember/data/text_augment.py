"""Batched token-level augmentation of labelled-text training batches, on the training device.

A labelled-text batch is ``{"x": Long[B, L], "y": Long[B]}``: each row holds a text's token
ids followed by the padding id (0 for ember's tokenizers; another special id for a given one,
exchanged with 0 for the operations and back), which never occurs inside a text (models read
each row's length as ``(x != pad_id).sum(1)``). ``build_text_transform`` returns a batch transform that
rewrites ``x`` with the EDA-style operations at token level and keeps that invariant: real
tokens first, then only zeros; no 0 inside a row; no row ever empty; no row longer than L.

The operations, in this fixed order, each only on the rows that the per-row gate ``p`` picks
(one draw per row decides whether a row is augmented at all):

1. span masking (``span``, ``span_max``, ``span_mode``): one contiguous span covering
   ``span`` of the row's tokens (rounded, at least 1, at most ``span_max`` when set) at a
   uniformly random place is replaced by random ordinary tokens (``replace``: there is no
   mask token in ember's vocabularies, and a learned mask embedding would not exist at
   evaluation time) or deleted (``delete``; a one-token row keeps its token);
2. token dropout (``dropout``): each token is deleted with this probability (a row that would
   lose every token is left as it was);
3. random swap (``swap``): ``swap * n`` swaps (stochastically rounded, so the mean is exact) of
   the tokens at two uniformly random positions of the row's n tokens;
4. random insertion (``insert``): before each token, with this probability, one id drawn
   uniformly from ``[first_id, vocab_size)`` (ordinary tokens only, never a special token);
   a row that grows past L is cut at L, the end of the text dropped, as prepare cuts texts.

Deletions come before insertion so that inserted tokens are not deleted again, and the
rates stay what the recipe says: dropout of the original tokens, insertion per remaining
token. EDA's synonym replacement needs a thesaurus that token ids do not have; span
replacement by random tokens is the token-level stand-in.

Mixing (token-level mixup, or mixing two texts' tokens) is not here: it needs soft targets
(a mix of two labels per row) and a loss that takes them, while ember's classification loss,
metrics and batches carry one integer class per row; doing it cleanly means a loss change in
the task, not a data transform.

Randomness: every draw comes from torch's global CPU generator, which ember's checkpoints
save and restore, so a resumed run draws the same augmentations as an uninterrupted one. The
draws depend only on the batch shape and the settings, never on the data, and are made on
the CPU then moved to the batch's device (no host sync: nothing is read back), so a seed
gives the same augmentations on any device. The work is vectorised over the batch; the only
Python loop is over the (static, small) number of swap rounds.

Example::

    transform = build_text_transform(TextAugmentConfig(dropout=0.1, insert=0.05), 4096, 1)
    batch = transform({"x": x, "y": y})  # x: Long[B, L], padded with 0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import Tensor

from ember.errors import EmberError
from ember.schema import RecipeModel

if TYPE_CHECKING:
    from ember.data.config import DataConfig

Batch = dict[str, Tensor]


class TextAugmentConfig(RecipeModel):
    """Which token-level augmentations a labelled-text training batch gets; the defaults turn every one off."""

    dropout: float = Field(0.0, ge=0, lt=1, description="probability that each token is deleted (0 = off)")
    swap: float = Field(
        0.0, ge=0, le=1, description="swaps of two random positions per token of the row (0.1: 10 per 100 tokens)"
    )
    insert: float = Field(
        0.0, ge=0, le=1, description="probability of inserting a random ordinary token before each token (0 = off)"
    )
    span: float = Field(
        0.0, ge=0, lt=1, description="share of each row's tokens in one random contiguous span (0 = off)"
    )
    span_max: int = Field(0, ge=0, description="the span's most tokens (0 = no limit beyond span)")
    span_mode: Literal["replace", "delete"] = Field(
        "replace", description="the span's tokens are replaced by random ordinary tokens, or deleted"
    )
    p: float = Field(1.0, ge=0, le=1, description="probability that a row is augmented at all")

    def enabled(self) -> bool:
        """True if any operation can change a row."""
        return self.p > 0 and any(v > 0 for v in (self.dropout, self.swap, self.insert, self.span))


def check_augment_fits(cfg: DataConfig, text: bool, where: str) -> None:
    """Refuse augmentation settings that ``where`` (a path or set name) cannot use: image
    augmentation on text (``text``) and text augmentation on anything else."""
    if text and cfg.augment.enabled():
        raise EmberError(
            f"data.augment transforms images; {where} holds text (token ids), which it cannot rotate, crop or "
            f"flip. Remove the data.augment settings; data.text_augment (dropout, swap, insert, span) "
            f"augments labelled text."
        )
    if not text and cfg.text_augment.enabled():
        raise EmberError(
            f"data.text_augment rewrites the token ids of labelled text; {where} holds no labelled text "
            f"(prepared with `ember data prepare --label` from texts). Remove the data.text_augment settings "
            f"for this data (data.augment augments images)."
        )


def build_text_transform(
    cfg: TextAugmentConfig, vocab_size: int, first_id: int, pad_id: int = 0
) -> Callable[[Batch], Batch]:
    """The training-batch transform for ``cfg``; inserted and replacement ids are drawn uniformly from
    ``[first_id, vocab_size)``, the vocabulary's ordinary tokens (never ``pad_id``)."""
    if not 0 <= first_id < vocab_size or first_id <= pad_id < vocab_size:
        raise EmberError(
            f"Text augmentation draws new tokens from the ordinary ids [{first_id}, {vocab_size}), which is "
            f"empty or holds the padding id {pad_id}; the data's vocabulary must have ordinary tokens beside its "
            f"special ones. Prepare the data again with a larger vocabulary, or remove data.text_augment."
        )

    def transform(batch: Batch) -> Batch:
        if not cfg.enabled():
            return batch
        return {**batch, "x": augment_tokens(batch["x"], cfg, vocab_size, first_id, pad_id)}

    return transform


def _rows_of(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's token count [B] and the positions [1, L] of a row."""
    return (x != 0).sum(1), torch.arange(x.shape[1], device=x.device).unsqueeze(0)


def _pack(x: Tensor, keep: Tensor) -> Tensor:
    """The kept tokens of each row moved to its front, in order; zeros after."""
    b, length = x.shape
    dest = torch.where(keep, keep.cumsum(1) - 1, length)  # dropped tokens go to a discarded column
    out = torch.zeros(b, length + 1, dtype=x.dtype, device=x.device)
    return out.scatter_(1, dest, x)[:, :length]


def augment_tokens(x: Tensor, cfg: TextAugmentConfig, vocab_size: int, first_id: int, pad_id: int = 0) -> Tensor:
    """``x`` (ids [B, L], each row's tokens then ``pad_id``) with ``cfg``'s operations applied in the
    module's order, on ``x``'s device; the draws come from torch's global CPU generator."""
    if x.ndim != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise TypeError(f"text augmentation takes integer token ids [B, L]; got {x.dtype} {list(x.shape)}")
    # The operations pad with 0: exchange the ids 0 and pad_id before them and after (a bijection).
    return _exchange(_augment_zero_padded(_exchange(x, pad_id), cfg, vocab_size, first_id, pad_id), pad_id)


def _exchange(x: Tensor, pad_id: int) -> Tensor:
    """``x`` with the ids 0 and ``pad_id`` exchanged (itself when the padding is 0)."""
    if pad_id == 0:
        return x
    return torch.where(x == pad_id, 0, torch.where(x == 0, pad_id, x))


def _augment_zero_padded(x: Tensor, cfg: TextAugmentConfig, vocab_size: int, first_id: int, pad_id: int) -> Tensor:
    """``augment_tokens`` on rows padded with 0; new ids are drawn from ``[first_id, vocab_size)`` and
    exchanged like ``x`` (the draws never hold ``pad_id``, so they never hold 0 once exchanged)."""
    b, length = x.shape
    gate = _draw(torch.rand(b), x) < cfg.p  # [B]: this row is augmented
    if cfg.span > 0:
        new = _exchange(torch.randint(first_id, vocab_size, (b, length)), pad_id)
        x = _span(x, cfg, gate, _draw(torch.rand(b), x), _draw(new, x))
    if cfg.dropout > 0:
        x = _dropout(x, gate.unsqueeze(1) & (_draw(torch.rand(b, length), x) < cfg.dropout))
    if cfg.swap > 0:
        rounds = math.ceil(cfg.swap * length)
        x = _swap(x, cfg.swap, gate, _draw(torch.rand(b), x), _draw(torch.rand(rounds, 2, b), x))
    if cfg.insert > 0:
        where = gate.unsqueeze(1) & (_draw(torch.rand(b, length), x) < cfg.insert)
        x = _insert(x, where, _draw(_exchange(torch.randint(first_id, vocab_size, (b, length)), pad_id), x))
    return x


def _draw(values: Tensor, like: Tensor) -> Tensor:
    """A CPU draw moved to ``like``'s device (ids in ``like``'s dtype)."""
    dtype = like.dtype if not values.dtype.is_floating_point else values.dtype
    return values.to(like.device, dtype, non_blocking=True)


def _span(x: Tensor, cfg: TextAugmentConfig, gate: Tensor, at: Tensor, ids: Tensor) -> Tensor:
    """One contiguous span per gated row replaced by ``ids`` or deleted; ``at`` [B] in [0, 1) places it."""
    n, pos = _rows_of(x)
    size = torch.clamp(torch.round(cfg.span * n.double()).long(), min=1)
    if cfg.span_max:
        size = size.clamp(max=cfg.span_max)
    if cfg.span_mode == "delete":
        size = torch.minimum(size, n - 1)  # a row keeps at least one token
    size = torch.where(gate & (n > 0), size.clamp(min=0), 0)
    start = (at * (n - size + 1).double()).long().clamp(min=0)
    inside = (pos >= start.unsqueeze(1)) & (pos < (start + size).unsqueeze(1))
    if cfg.span_mode == "replace":
        return torch.where(inside, ids, x)
    return _pack(x, (x != 0) & ~inside)


def _dropout(x: Tensor, drop: Tensor) -> Tensor:
    """``x`` without the tokens marked in ``drop`` [B, L]; a row that would lose them all keeps them."""
    real = x != 0
    keep = real & ~drop
    emptied = (keep.sum(1) == 0).unsqueeze(1)
    return _pack(x, torch.where(emptied, real, keep))


def _swap(x: Tensor, rate: float, gate: Tensor, rounding: Tensor, picks: Tensor) -> Tensor:
    """Gated rows get ``rate * n`` swaps (stochastically rounded by ``rounding`` [B]); ``picks``
    [rounds, 2, B] in [0, 1) choose the two positions of each round's swap."""
    n, _ = _rows_of(x)
    count = torch.where(gate, torch.floor(rate * n.double() + rounding).long(), 0)
    # All rounds' positions at once, [rounds, B, 1]; a round past a row's count swaps a position with itself.
    i, j = (torch.minimum((picks[:, s] * n).long(), (n - 1).clamp(min=0)) for s in (0, 1))
    active = count.unsqueeze(0) > torch.arange(picks.shape[0], device=x.device).unsqueeze(1)
    i, j = i.unsqueeze(2), torch.where(active, j, i).unsqueeze(2)
    x = x.clone()
    for k in range(picks.shape[0]):
        a, c = x.gather(1, i[k]), x.gather(1, j[k])
        x.scatter_(1, i[k], c)
        x.scatter_(1, j[k], a)
    return x


def _insert(x: Tensor, where: Tensor, ids: Tensor) -> Tensor:
    """``ids[b, t]`` inserted before token t of row b where ``where`` [B, L] says so (tokens only);
    what grows past L is cut."""
    b, length = x.shape
    real = x != 0
    added = where & real
    shift = added.long().cumsum(1)  # insertions at or before each token
    out = torch.zeros(b, length + 1, dtype=x.dtype, device=x.device)
    pos = torch.arange(length, device=x.device).unsqueeze(0)
    token_at = torch.where(real, (pos + shift).clamp(max=length), length)
    new_at = torch.where(added, (pos + shift - 1).clamp(max=length), length)
    out.scatter_(1, token_at, x)
    out.scatter_(1, new_at, ids)
    return out[:, :length]
