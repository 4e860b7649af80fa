"""Text augmentation: validation accuracy of a labelled-text classifier trained with vs without it.

One figure per configuration (no augmentation, each operation alone, all of them together):
the final validation accuracy, mean ± std over the seeds, each seed's run identical but for
the augmentation (same initial weights, same batch order). Augmentation is
``ember.data.text_augment``'s batch transform, applied to training batches only, exactly as
ember's loader applies ``data.text_augment``.

The task (``--task synthetic``, the default): a generated four-class topic task small
enough to overfit — 200 training texts of 8 to 40 tokens drawn from a 1000-token
vocabulary (Zipf-distributed filler), each holding two to four keywords of its class and one
keyword of another class; 2000 validation texts. The classifier: embedding (64) → 1-D
convolution over 3 tokens (64) → max over each text's own positions → linear; AdamW (lr 3e-3,
weight decay 0.01), batches of 32, a fixed number of epochs, in plain PyTorch (a recurrent
model is ten times slower on a shared CPU, and this one reads word order too, locally).

    python benchmarks/text_augment.py [--seeds 5] [--epochs 40] [--threads 1]

``--task stdlib-functions``: the shipped labelled-text example instead, through ember itself —
``write_sample("labelled-text")`` (Python functions labelled with their standard-library
package, nine classes), ``prepare`` with ``--label package --test-fraction 0.1``, then
``ember.train`` of ``recipes/encoder-text.yaml`` (a Transformer encoder) with ``data.text_augment``
set, ``train.seed`` = each seed, and the final validation accuracy. ``--steps``, ``--seq-len``
and ``--model cnn`` (a one-stage token CNN in place of the LSTM) shorten it to fit a shared
CPU; ``--configs`` picks configurations by name.

    python benchmarks/text_augment.py --task stdlib-functions --seeds 3 --steps 150 --model cnn
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ember.data.text_augment import TextAugmentConfig, build_text_transform

VOCAB, FIRST, CLASSES, LENGTH = 1000, 3, 4, 40  # ids 1, 2 stand for special tokens
KEYWORDS = 10  # per class

CONFIGS: dict[str, TextAugmentConfig] = {
    "none": TextAugmentConfig(),
    "dropout 0.1": TextAugmentConfig(dropout=0.1),
    "swap 0.1": TextAugmentConfig(swap=0.1),
    "insert 0.1": TextAugmentConfig(insert=0.1),
    "span 0.2 replace": TextAugmentConfig(span=0.2),
    "span 0.2 delete": TextAugmentConfig(span=0.2, span_mode="delete"),
    "EDA: all four at 0.1": TextAugmentConfig(dropout=0.1, swap=0.1, insert=0.1, span=0.1),
}


def synthetic(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` texts (Long[n, LENGTH], zeros after each) and their classes."""
    g = torch.Generator().manual_seed(seed)
    ordinary = torch.arange(FIRST + CLASSES * KEYWORDS, VOCAB)
    zipf = 1.0 / torch.arange(1, len(ordinary) + 1).double()
    y = torch.randint(0, CLASSES, (n,), generator=g)
    lengths = torch.randint(8, LENGTH + 1, (n,), generator=g)
    x = ordinary[torch.multinomial(zipf, n * LENGTH, replacement=True, generator=g)].view(n, LENGTH)
    keys = torch.randint(2, 5, (n,), generator=g)
    other = (y + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
    for i in range(n):  # generating the data, not the hot path
        at = torch.randperm(int(lengths[i]), generator=g)[: int(keys[i]) + 1]
        kw = torch.randint(0, KEYWORDS, (len(at),), generator=g)
        owner = torch.full((len(at),), int(y[i]))
        owner[-1] = other[i]
        x[i, at] = FIRST + owner * KEYWORDS + kw
    return torch.where(torch.arange(LENGTH) < lengths.unsqueeze(1), x, 0), y


class ConvClassifier(nn.Module):
    """Embedding → 1-D convolution over 3 tokens → max over each text's own positions → linear."""

    def __init__(self, vocab: int, classes: int, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(self.embed(x).transpose(1, 2)))  # [B, width, L]
        h = h.masked_fill((x == 0).unsqueeze(1), float("-inf")).amax(2)
        return self.head(h)


def run(cfg: TextAugmentConfig, data: tuple, seed: int, epochs: int, batch: int = 32) -> float:
    """Final validation accuracy of one training run."""
    (xt, yt), (xv, yv) = data
    torch.manual_seed(seed)
    model = ConvClassifier(VOCAB, CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    order = torch.Generator().manual_seed(seed)  # the batch order: the same with or without augmentation
    augment = build_text_transform(cfg, VOCAB, FIRST)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=order)
        for i in range(0, len(xt) - batch + 1, batch):
            idx = perm[i : i + batch]
            b = augment({"x": xt[idx], "y": yt[idx]})
            loss = nn.functional.cross_entropy(model(b["x"]), b["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(xv).argmax(1) == yv).float().mean().item()


def transform_ms(cfg: TextAugmentConfig, rounds: int = 50) -> float:
    """Median milliseconds of ``cfg``'s transform on a [256, 128] batch of texts 16 to 128 tokens long."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 129, (256, 1), generator=g)
    x = torch.where(torch.arange(128) < lengths, torch.randint(FIRST, VOCAB, (256, 128), generator=g), 0)
    transform = build_text_transform(cfg, VOCAB, FIRST)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        transform({"x": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def stdlib_functions(args: argparse.Namespace, root: Path) -> Callable[[TextAugmentConfig, int], float]:
    """Write and prepare the shipped labelled-text example under ``root``; returns a function that trains
    the shipped recipe on it with an augmentation and a seed and gives the final validation accuracy."""
    from ember.config import apply_overrides, read_recipe_file, recipe_from_dict
    from ember.data.config import DataConfig
    from ember.data.prepare import prepare
    from ember.data.samples import write_sample
    from ember.training.loop import train

    source = write_sample("labelled-text", root / "functions.jsonl")
    data = root / "functions"
    prepare([str(source)], data, DataConfig(label="package", test_fraction=0.1, seq_len=args.seq_len))
    raw = read_recipe_file(args.recipe)
    raw["data"].update(path=str(data), seq_len=args.seq_len)
    if args.model == "cnn":
        raw["model"] = {"name": "cnn", "width": 64, "stages": 1, "depth": 1, "dropout": 0.2}
    steps = args.steps or raw["train"]["max_steps"]
    fixed = [
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        "train.checkpoint_every=0",
        "train.progress=false",
    ]
    runs = iter(range(1 << 30))

    def run_one(cfg: TextAugmentConfig, seed: int) -> float:
        r = copy.deepcopy(raw)
        r["data"]["text_augment"] = cfg.model_dump(exclude_defaults=True)
        r["train"]["seed"] = seed
        recipe = recipe_from_dict(apply_overrides(r, fixed), args.recipe)
        return float(train(recipe, run_dir=root / f"run-{next(runs)}").metrics["accuracy"])

    return run_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("synthetic", "stdlib-functions"), default="synthetic")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40, help="synthetic: epochs")
    parser.add_argument("--train", type=int, default=200, help="synthetic: training texts")
    parser.add_argument("--recipe", default="recipes/encoder-text.yaml", help="stdlib-functions: the recipe")
    parser.add_argument("--steps", type=int, default=0, help="stdlib-functions: steps (0 = the recipe's)")
    parser.add_argument("--seq-len", type=int, default=256, help="stdlib-functions: tokens kept per text")
    parser.add_argument("--model", choices=("recipe", "cnn"), default="recipe", help="stdlib-functions")
    parser.add_argument("--configs", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",")] if args.configs else list(CONFIGS)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ember-text-augment-") as tmp:
        if args.task == "synthetic":
            data = synthetic(args.train, 1000), synthetic(2000, 2000)
            print(f"synthetic 4-class topic task: {args.train} training texts, 2000 validation, {args.epochs} epochs")
            run_one = lambda cfg, seed: run(cfg, data, seed, args.epochs)  # noqa: E731
        else:
            run_one = stdlib_functions(args, Path(tmp))
            print(
                f"stdlib functions, {args.recipe} ({args.model}), seq_len {args.seq_len}, {args.steps or 'recipe'} steps"
            )
        report(names, run_one, args.seeds)
    print(f"{time.perf_counter() - start:.0f} s; the transform: {transform_ms(CONFIGS['EDA: all four at 0.1']):.2f} ms")
    print("per [256, 128] batch (all four operations, median)")


def report(names: list[str], run_one: Callable[[TextAugmentConfig, int], float], seeds: int) -> None:
    """One line per configuration: accuracy mean ± std over the seeds, the difference to the first."""
    base = None
    for name in names:
        accs = [run_one(CONFIGS[name], seed) for seed in range(seeds)]
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        base = mean if base is None else base
        each = " ".join(f"{a:.3f}" for a in accs)
        print(
            f"{name:24s} val accuracy {mean:.3f} ± {std:.3f}  ({mean - base:+.3f} vs {names[0]}; seeds: {each})",
            flush=True,
        )


if __name__ == "__main__":
    main()
