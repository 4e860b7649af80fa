"""Seq2seq quality of decoded answers, for ``ember eval``: BLEU and exact match of what the model writes.

Validation's ``accuracy`` and ``exact_match`` are teacher-forced (each target token predicted from the
true ones before it). Here every source is decoded from bos alone — greedily, or by beam search — and
the answer up to eos is compared with the reference target:

- ``decoded_exact_match``: the share of answers equal to their reference;
- ``bleu``: corpus BLEU-4 over token ids (the model's own units: BPE pieces, bytes or characters):
  the geometric mean of the clipped 1- to 4-gram precisions summed over the corpus, times the
  brevity penalty exp(1 - r/c) when the answers' total length c is below the references' r.
  No smoothing: an order without any match gives 0, as in sacreBLEU's default.

The counts are sums, so the figures are exact across ranks. Example::

    bleu([[1, 2, 3, 4]], [[1, 2, 3, 4]])  # 1.0
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from ember.data.loader import BatchLoader
from ember.data.spec import IGNORE_INDEX
from ember.models.modes import evaluating
from ember.training.distributed import all_reduce_

MAX_N = 4


def ngram_counts(candidate: Sequence, reference: Sequence, max_n: int = MAX_N) -> list[float]:
    """[clipped matches of each order 1..max_n, candidate n-grams of each order, candidate length,
    reference length] of one sentence: BLEU's sufficient statistics (sums over a corpus)."""
    matches, totals = [], []
    for n in range(1, max_n + 1):
        cand = Counter(tuple(candidate[i : i + n]) for i in range(len(candidate) - n + 1))
        ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
        matches.append(sum(min(c, ref[g]) for g, c in cand.items()))
        totals.append(sum(cand.values()))
    return [*matches, *totals, len(candidate), len(reference)]


def bleu_from_counts(counts: Sequence[float], max_n: int = MAX_N) -> float:
    """Corpus BLEU from summed ``ngram_counts``: 0 when some order has no match."""
    matches, totals, c, r = counts[:max_n], counts[max_n : 2 * max_n], counts[2 * max_n], counts[2 * max_n + 1]
    if min(matches) <= 0 or min(totals) <= 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if c >= r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision)


def bleu(candidates: Sequence[Sequence], references: Sequence[Sequence], max_n: int = MAX_N) -> float:
    """Corpus BLEU-``max_n`` of ``candidates`` against one reference each (token ids or words)."""
    totals = [0.0] * (2 * max_n + 2)
    for cand, ref in zip(candidates, references, strict=True):
        totals = [a + b for a, b in zip(totals, ngram_counts(cand, ref, max_n))]
    return bleu_from_counts(totals, max_n)


def _reference(row: list[int], eos: int) -> list[int]:
    """A target row of tgt_out: its ids before eos (IGNORE_INDEX padding after it dropped)."""
    ids = [i for i in row if i != IGNORE_INDEX]
    return ids[: ids.index(eos)] if eos in ids else ids


@torch.no_grad()
def decoded_metrics(model: torch.nn.Module, loader: BatchLoader, spec, limit: int = 0, beam: int = 1) -> dict:
    """BLEU and exact match of decoding the first ``limit`` samples of ``loader`` (0 = all; shared out
    over the ranks); also returns how many samples were decoded."""
    from ember.generation import beam_search, greedy_decode_batch

    bos, eos, max_len = spec.bos_id, spec.eos_id, spec.seq_len
    # This rank's share of the first ``limit``: the shares add up to exactly ``limit``.
    share = limit // loader.world_size + (loader.rank < limit % loader.world_size) if limit else None
    counts = torch.zeros(2 * MAX_N + 4, dtype=torch.float64)  # BLEU's sums, exact answers, samples
    seen = 0
    with evaluating(model):  # each submodule back in its own mode after
        for batch in loader.epoch_batches(next(model.parameters()).device):
            if share is not None and seen >= share:
                break
            src, tgt = batch["src"], batch["tgt_out"]
            if share is not None:
                src, tgt = src[: share - seen], tgt[: share - seen]
            if beam == 1:
                answers = greedy_decode_batch(model, src, bos, eos, max_len)
            else:
                answers = [beam_search(model, src[i : i + 1], bos, eos, max_len, beam) for i in range(len(src))]
            for answer, row in zip(answers, tgt.tolist()):
                hyp, ref = _reference(answer, eos), _reference(row, eos)
                counts += torch.tensor([*ngram_counts(hyp, ref), float(hyp == ref), 1.0], dtype=torch.float64)
            seen += len(src)
    device = next(model.parameters()).device
    counts = all_reduce_(counts.to(device)).cpu().tolist()
    samples = counts[-1]
    return {
        "bleu": bleu_from_counts(counts[:-2]),
        "decoded_exact_match": counts[-2] / max(1.0, samples),
        "samples": int(samples),
    }
