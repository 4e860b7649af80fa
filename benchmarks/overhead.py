"""How much throughput ember's training loop costs against a minimal hand-written loop and HF Trainer.

The demo's GPT (``recipes/gpt-tiny.yaml``), or a larger shape (``--shape 12m``: 6 layers, 384 wide,
context 256, batch 8, vocabulary 4096; ``--shape gpt2-small``: GPT-2 small's 12 layers, 768 wide,
12 heads, with context 128, batch 4 and vocabulary 4096 so that it runs on a CPU), is trained for
the same number of optimiser steps by each side, once per round, in one process: a plain PyTorch
loop in the style of nanoGPT's ``train.py`` (``plain_loop``), ``transformers.Trainer`` on
``GPT2LMHeadModel`` (``hf_trainer``) and ``ember.training.loop.train``. Every shape uses GPT-2's
layout (biases, tanh GELU) so that GPT2LMHeadModel holds exactly ember's parameters, and it starts
from ember's initial weights (converted). The order rotates every round so that each side leads in
turn (warm caches, CPU frequency, other jobs). The figure is ember's tokens/s divided by the plain
loop's, the median of the per-round ratios (ember/hf beside it); the best run of each side is
compared too, because on a shared machine other jobs only ever slow a run down. Differences of a
few per cent between rounds are noise: use more rounds (and steps) on a quiet machine.

The plain loop does ember's work with ember's parts: the same model (``build_model`` from the
recipe, same seed, so the same initial weights), the same batches (``BatchLoader.next_batch`` of the
same ``build_data`` loader), ember's optimiser (``build_optimizer``: AdamW over the same two
parameter groups, fused on CUDA and on the CPU), the same warmup-plus-cosine learning rate each
step, a mean cross-entropy, backward, ``clip_grad_norm_``, step, ``zero_grad(set_to_none=True)``,
and one ``.item()`` plus one log line every ``--log-every`` steps: ember/plain is the loop's cost.
The Trainer side is what a Hugging Face user gets: its own model code, its own AdamW
(``adamw_torch``) and cosine schedule with the recipe's warmup, peak and floor, clipping, logging
every ``--log-every`` steps, the same batches in the same order (an iterable dataset). Precision
(autocast) and ``torch.compile`` follow the flags on every side, as do TF32 matmuls on CUDA.

What is timed, on every side: the wall clock from the start of optimiser step ``--warmup + 1``
(before its batch is fetched; for the Trainer, its ``on_step_begin``) to the end of the last
optimiser step (the Trainer: its ``on_step_end``). The first ``--warmup`` steps (allocator and
kernel warm-up, compilation) are not timed, and neither are process start-up, data, model and
optimiser construction, or, for ember, the run directory set-up before the loop and the final
validation (one batch), checkpoint and export after it. On CUDA the device is synchronised before
each of the two clock readings and nowhere else. ember is timed from outside, without changing it:
the layout's ``forward_backward`` (``ember.training.layouts.Layout``) and ``validate`` in
``ember.training.layouts`` are wrapped (``unittest.mock.patch.object``) so that the (warmup + 1)-th
call of the first (after that step's batches are fetched) reads the start clock and the first call
of the second, which follows the last step's log when ``train.eval_every=0``, reads the end clock.
Console output goes to a buffer. ember runs with ``train.progress=false``, ``train.eval_every=0``,
``train.checkpoint_every=0`` and ``train.peak_flops=1`` (no CPU peak measurement); it writes its run
directory into a temporary directory, deleted after. The Trainer side needs ``transformers`` and
``accelerate``; leave it out with ``--sides plain,ember``.

Run from the repository root::

    PYTHONPATH=src python benchmarks/overhead.py --steps 60 --rounds 3 --threads 2
    PYTHONPATH=src python benchmarks/overhead.py --shape 12m --steps 8 --warmup 2 --rounds 3 --threads 2
    PYTHONPATH=src python benchmarks/overhead.py --shape gpt2-small --steps 8 --warmup 2 --rounds 3 --threads 2
    PYTHONPATH=src python benchmarks/overhead.py --device cuda --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

import ember.training.layouts as ember_layouts
import ember.training.loop as ember_loop
from ember.config import Recipe, load_recipe
from ember.data.build import build_data
from ember.models.registry import build_model
from ember.training.optim import build_optimizer
from ember.training.schedules import lr_factor

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "gpt-tiny.yaml"


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once all queued device work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def fresh_start(recipe: Recipe) -> None:
    """Free the previous run's memory and compiled graphs before the next run starts."""
    gc.collect()
    if recipe.train.compile:
        torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_loop(recipe: Recipe, warmup: int) -> float:
    """Train the recipe with a minimal hand-written loop; seconds of steps ``warmup+1 ..max_steps``."""
    cfg, device = recipe.train, torch.device(recipe.train.device)
    torch.manual_seed(cfg.seed)
    data = build_data(recipe.data, cfg.batch_size, recipe.eval.batch_size or cfg.batch_size, seed=cfg.seed)
    model = build_model(recipe.model, data.spec).to(device)
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    forward = torch.compile(model) if cfg.compile else model
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if cfg.precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    log = io.StringIO()
    model.train()
    start = 0.0
    for step in range(cfg.max_steps):
        if step == warmup:
            start = clock(device)
        lr = recipe.optim.lr * lr_factor(step, recipe.schedule, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.train.next_batch(device)
        with autocast():
            logits = forward(batch["x"])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["y"].reshape(-1))
        loss.backward()
        if recipe.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            print(f"step {step + 1} loss {loss.item():.4f} lr {lr:.2e}", file=log)
    return clock(device) - start


def ember_run(recipe: Recipe, warmup: int) -> float:
    """Train the recipe with ``ember.training.loop.train``; seconds of steps ``warmup+1 ..max_steps``."""
    device = torch.device(recipe.train.device)
    real_step, real_validate = ember_layouts.Layout.forward_backward, ember_layouts.validate
    clocks: dict[str, float] = {}
    calls = 0

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if calls == warmup:
            clocks["start"] = clock(device)
        calls += 1
        return real_step(*args, **kwargs)

    def timed_validate(*args: Any, **kwargs: Any) -> Any:
        clocks.setdefault("end", clock(device))  # the final validation: the last step is done
        return real_validate(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(ember_layouts.Layout, "forward_backward", timed_step))
        stack.enter_context(mock.patch.object(ember_layouts, "validate", timed_validate))
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ember-overhead-"))) / "run"
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))  # ember's console lines
        result = ember_loop.train(recipe, run_dir=run_dir)
    if result.step != recipe.train.max_steps or calls != result.step or clocks.keys() != {"start", "end"}:
        raise RuntimeError(
            f"ember ran {result.step} steps ({calls} timed calls, clocks {sorted(clocks)}); cannot time it"
        )
    return clocks["end"] - clocks["start"]


# Shapes beside the demo's: model and batch overrides of the recipe. GPT-2's layout (biases,
# tanh GELU) everywhere so that transformers' GPT2LMHeadModel has exactly ember's parameters.
GPT2_LAYOUT = ["model.bias=true", "model.activation=gelu_tanh"]
SHAPES: dict[str, list[str]] = {
    "tiny": GPT2_LAYOUT,  # the demo: 4 layers, 128 wide, context 128, batch 32, vocabulary 2048
    "12m": [
        *GPT2_LAYOUT,
        *("model.n_layer=6", "model.n_embd=384", "model.n_head=6", "model.block_size=256"),
        *("data.seq_len=256", "data.vocab_size=4096", "train.batch_size=8"),
    ],
    "gpt2-small": [  # GPT-2 small's blocks; a short context, a small batch and vocabulary for a CPU
        *GPT2_LAYOUT,
        *("model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.block_size=128"),
        *("data.seq_len=128", "data.vocab_size=4096", "train.batch_size=4"),
    ],
}


def hf_model(recipe: Recipe, ember_model: torch.nn.Module):
    """transformers' GPT2LMHeadModel of the recipe's shape, holding ``ember_model``'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ember.interop.hf_weights import gpt_to_hf

    m = recipe.model
    if m.name != "gpt" or not m.bias:
        raise SystemExit("the hf side needs a gpt with biases (GPT-2's layout): use --shape")
    config = GPT2Config(
        vocab_size=ember_model.tok_emb.num_embeddings,
        n_positions=m.block_size,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        activation_function="gelu_new" if m.activation == "gelu_tanh" else "gelu",
        resid_pdrop=m.dropout,
        embd_pdrop=m.dropout,
        attn_pdrop=m.dropout,
        tie_word_embeddings=m.tie_weights,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    state = gpt_to_hf(ember_model.state_dict(), m.n_layer, m.n_embd, m.tie_weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GPT-2 weights do not match: missing {missing}, unexpected {unexpected}")
    return model


def hf_trainer(recipe: Recipe, warmup: int) -> float:
    """Train the recipe's shape as GPT2LMHeadModel with ``transformers.Trainer``; seconds of the timed steps.

    Same initial weights (ember's, converted) and batches as the other sides; the Trainer's own
    AdamW (``adamw_torch``, decay on the same parameters: not biases or norms) and its cosine
    schedule with the recipe's warmup, peak and floor: what a Trainer user gets.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cfg, device = recipe.train, torch.device(recipe.train.device)
    torch.manual_seed(cfg.seed)
    data = build_data(recipe.data, cfg.batch_size, recipe.eval.batch_size or cfg.batch_size, seed=cfg.seed)
    model = hf_model(recipe, build_model(recipe.model, data.spec)).to(device)
    samples = [b for _ in range(cfg.max_steps) for b in _rows(data.train.next_batch(torch.device("cpu")))]
    clocks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == warmup:
                clocks["start"] = clock(device)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == cfg.max_steps:
                clocks["end"] = clock(device)

    with tempfile.TemporaryDirectory(prefix="ember-overhead-hf-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size,
            max_grad_norm=recipe.optim.grad_clip,
            optim="adamw_torch",
            learning_rate=recipe.optim.lr,
            weight_decay=recipe.optim.weight_decay,
            adam_beta1=recipe.optim.betas[0],
            adam_beta2=recipe.optim.betas[1],
            adam_epsilon=recipe.optim.eps,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": recipe.schedule.min_lr_ratio},
            warmup_steps=recipe.schedule.warmup(cfg.max_steps),
            logging_steps=cfg.log_every,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=cfg.precision == "bf16",
            torch_compile=cfg.compile,
            dataloader_num_workers=0,
            seed=cfg.seed,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Rows(samples),
            compute_loss_func=_mean_cross_entropy,
            callbacks=[Clock()],
        )
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.train()
    return clocks["end"] - clocks["start"]


def _rows(batch: dict) -> list[dict]:
    return [{"input_ids": x, "labels": y} for x, y in zip(batch["x"], batch["y"])]


class _Rows(torch.utils.data.IterableDataset):
    """The samples in the order ember's loader gave them (a map-style set would be shuffled again)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __iter__(self):  # noqa: ANN204
        return iter(self.rows)


def _mean_cross_entropy(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """ember's targets are already the next tokens: no shift (GPT2LMHeadModel's own loss would shift again)."""
    logits = outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


SIDES: dict[str, Callable[[Recipe, int], float]] = {"plain": plain_loop, "hf": hf_trainer, "ember": ember_run}


def make_recipe(args: argparse.Namespace) -> Recipe:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = [
        *SHAPES[args.shape],
        f"train.max_steps={args.steps}",
        f"train.device={device}",
        f"train.precision={args.precision}",
        f"train.compile={str(args.compile).lower()}",
        "train.progress=false",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.peak_flops=1",
        "eval.max_batches=1",  # ember's final validation (untimed) stays short at the larger shapes
    ]
    if args.log_every:
        overrides.append(f"train.log_every={args.log_every}")
    if args.steps <= 30:  # the recipe warms up for 30 steps; the work per step is the same either way
        overrides += [f"schedule.warmup_steps={args.steps // 2}", "schedule.warmup_fraction=0"]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    return load_recipe(RECIPE, overrides)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ember's tokens/s against a minimal PyTorch loop and HF Trainer.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model and batch (default tiny)")
    parser.add_argument(
        "--sides", default="plain,hf,ember", help="comma-separated, of plain, hf, ember (default all three)"
    )
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one run per side (default 3)")
    parser.add_argument("--batch-size", type=int, default=0, help="override the shape's batch size")
    parser.add_argument(
        "--log-every", type=int, default=0, help="steps per log line and .item() (default: the recipe's)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model on all sides")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--no-warm-run", dest="warm_run", action="store_false", help="skip the untimed first run of each side"
    )
    args = parser.parse_args()
    args.sides = args.sides.split(",")
    if not 0 <= args.warmup < args.steps or args.rounds < 1:
        parser.error("need 0 <= --warmup < --steps and --rounds >= 1")
    if "ember" not in args.sides or not set(args.sides) <= set(SIDES) or len(set(args.sides)) != len(args.sides):
        parser.error(f"--sides: ember plus any of {sorted(set(SIDES) - {'ember'})}, each once")
    missing = [m for m in ("transformers", "accelerate") if "hf" in args.sides and not importlib.util.find_spec(m)]
    if missing:
        parser.error(
            f"the hf side needs {' and '.join(missing)}: pip install -e '.[bench]', or use --sides plain,ember"
        )
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = make_recipe(args)
    cfg = recipe.train
    if cfg.device == "cuda":  # what ember's configure_determinism sets; nanoGPT sets the same
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    timed_tokens = (cfg.max_steps - args.warmup) * cfg.batch_size * recipe.data.seq_len
    m = recipe.model
    print(
        f"{args.shape}: {m.n_layer} layers, {m.n_embd} wide, {m.n_head} heads, context {recipe.data.seq_len}, "
        f"batch {cfg.batch_size}, {parameters(recipe):,} parameters; {cfg.device} {cfg.precision}"
        f"{' compiled' if cfg.compile else ''}, {torch.get_num_threads()} threads, {cfg.max_steps} steps per run, "
        f"steps {args.warmup + 1}..{cfg.max_steps} timed ({timed_tokens:,} tokens), log every {cfg.log_every}",
        flush=True,
    )
    speed: dict[str, list[float]] = {name: [] for name in args.sides}
    # The first run in a process is slower whichever side it is (at the demo's shape plain ran at
    # about 0.35x its later speed when it led round 1): one untimed run of each side first.
    for name in args.sides if args.warm_run else ():
        fresh_start(recipe)
        SIDES[name](recipe, args.warmup)
    for r in range(args.rounds):
        order = args.sides[r % len(args.sides) :] + args.sides[: r % len(args.sides)]  # each side leads in turn
        for name in order:
            fresh_start(recipe)
            speed[name].append(timed_tokens / SIDES[name](recipe, args.warmup))
        cells = "  ".join(f"{name} {speed[name][-1]:,.0f}" for name in args.sides)
        print(f"round {r + 1} ({order[0]} first), tok/s: {cells}  {_ratios(speed, -1)}", flush=True)
    medians = {name: statistics.median(v) for name, v in speed.items()}
    ratios = {
        other: statistics.median(e / o for e, o in zip(speed["ember"], speed[other]))
        for other in args.sides
        if other != "ember"
    }
    head = "ember/plain" if "plain" in ratios else f"ember/{next(iter(ratios))}" if ratios else "ember"
    others = "; ".join(f"ember/{o} {v:.3f}" for o, v in ratios.items() if f"ember/{o}" != head)
    best = {o: max(speed["ember"]) / max(speed[o]) for o in ratios}  # other jobs only ever slow a run down
    print(
        f"overhead ({args.shape}): {head} tokens/s = {ratios.get(head[6:], 1.0):.3f} (median of {args.rounds} "
        f"rounds' ratios){'; ' + others if others else ''}; best vs best "
        f"{', '.join(f'{o} {v:.3f}' for o, v in best.items())}; medians "
        f"{', '.join(f'{n} {v:,.0f}' for n, v in medians.items())} tok/s"
    )


def _ratios(speed: dict[str, list[float]], i: int) -> str:
    return "  ".join(f"ember/{o} {speed['ember'][i] / v[i]:.3f}" for o, v in speed.items() if o != "ember")


def parameters(recipe: Recipe) -> int:
    """Parameters of the recipe's model (all sides hold exactly these)."""
    data = build_data(recipe.data, recipe.train.batch_size, recipe.train.batch_size, seed=recipe.train.seed)
    return sum(p.numel() for p in build_model(recipe.model, data.spec).parameters())


if __name__ == "__main__":
    main()
