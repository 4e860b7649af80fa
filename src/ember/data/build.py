"""From the recipe's ``data`` section to a DataSpec and train/val loaders.

Each entry of ``DATASETS`` turns a DataConfig into (spec, train dataset, val dataset);
``build_data`` wraps those in loaders: train is shuffled, endless and drop_last (fixed
batch shapes); val is ordered, one pass, and sees every sample exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ember.data import addition, digits, stdlib
from ember.data.loader import ArrayDataset, BatchLoader, LMWindows
from ember.data.spec import DataSpec
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import DataConfig

Datasets = tuple[DataSpec, Any, Any]  # (spec, train dataset, val dataset)


@dataclass
class Data:
    spec: DataSpec
    train: BatchLoader  # shuffled, endless, drop_last
    val: BatchLoader  # ordered, one pass, exact
    items_per_sample: int  # tokens per sample (lm), target tokens (seq2seq), 1 (classify); for tokens/s


def _stdlib(cfg: "DataConfig") -> Datasets:
    train, val = stdlib.load_corpus(cfg)
    for split, tokens in (("training", train), ("validation", val)):
        if len(tokens) < cfg.seq_len + 1:
            raise EmberError(
                f"The stdlib {split} text has {len(tokens)} bytes, fewer than one window of "
                f"data.seq_len + 1 = {cfg.seq_len + 1}. Raise data.max_bytes (0 = the whole corpus) "
                f"or lower data.seq_len."
            )
    spec = DataSpec(task="lm", vocab_size=stdlib.VOCAB_SIZE, seq_len=cfg.seq_len)
    return spec, LMWindows(train, cfg.seq_len), LMWindows(val, cfg.seq_len)


def _digits(cfg: "DataConfig", rows: bool = False) -> Datasets:
    x_tr, y_tr, x_va, y_va = digits.load_split(cfg, rows=rows)
    spec = DataSpec(task="classify", num_classes=digits.NUM_CLASSES, input_shape=tuple(x_tr.shape[1:]))
    return spec, ArrayDataset(x=x_tr, y=y_tr), ArrayDataset(x=x_va, y=y_va)


def _digits_rows(cfg: "DataConfig") -> Datasets:
    return _digits(cfg, rows=True)


def _addition(cfg: "DataConfig") -> Datasets:
    train, val = addition.load_split(cfg)
    spec = DataSpec(
        task="seq2seq",
        vocab_size=addition.VOCAB_SIZE,
        seq_len=addition.tgt_len(cfg.max_digits),
        src_len=addition.src_len(cfg.max_digits),
        pad_id=addition.PAD,
        bos_id=addition.BOS,
        eos_id=addition.EOS,
    )
    return spec, ArrayDataset(**train), ArrayDataset(**val)


DATASETS: dict[str, Callable[["DataConfig"], Datasets]] = {
    "stdlib": _stdlib,
    "digits": _digits,
    "digits-rows": _digits_rows,
    "addition": _addition,
}


def items_per_sample(spec: DataSpec) -> int:
    return 1 if spec.task == "classify" else spec.seq_len


def build_data(
    cfg: "DataConfig", batch_size: int, eval_batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> Data:
    """Build the dataset named by ``cfg.name`` and its loaders for this rank.

    ``seed`` (the training seed) fixes the shuffle order; ``cfg.seed`` fixes the split
    and any generated data, so changing one does not change the other.
    """
    if cfg.name not in DATASETS:
        raise EmberError(f"Unknown dataset data.name={cfg.name!r}; choose one of {sorted(DATASETS)}.")
    spec, train, val = DATASETS[cfg.name](cfg)
    if len(train) < batch_size * world_size:
        raise EmberError(
            f"The {cfg.name} training set has {len(train)} samples, fewer than one batch of "
            f"train.batch_size={batch_size} x {world_size} rank(s). Lower train.batch_size or use more data."
        )
    if len(val) == 0:
        raise EmberError(f"The {cfg.name} validation split is empty. Raise data.val_fraction.")
    return Data(
        spec=spec,
        train=BatchLoader(train, batch_size, shuffle=True, seed=seed, drop_last=True, rank=rank, world_size=world_size),
        val=BatchLoader(val, eval_batch_size, shuffle=False, seed=seed, drop_last=False, rank=rank, world_size=world_size),
        items_per_sample=items_per_sample(spec),
    )
