"""Memory per device of a run under each parallel layout, the layout to train with, and the check
that refuses a run before it would allocate past the device's memory. ``ember plan`` prints
these figures; ``parallel.strategy: auto`` trains with ``plan``'s recommendation;
``check_memory`` runs before every training run.

Nothing is loaded or allocated. The model is built from the recipe under PyTorch's
``FakeTensorMode``: tensors with shapes, dtypes and a device but no data (their storage is
on the ``meta`` device), so a 24 B-parameter config costs a second and no memory. The data
spec comes from the recipe alone (see ``data_spec``).

The training step itself is traced by ``ember.training.memory_trace.measure_step`` (what is
measured, exactly, is described there).

From that timeline, for one device of the single layout, with N parameters in fp32:

    params      4N                      ember keeps fp32 master weights under autocast
    grads       4N                      fp32, allocated during the backward pass
    optimizer   adam/adamw: 8N (+ a 4-byte step per tensor); sgd: 4N with momentum, else 0
                (gradients, optimiser state and DDP buckets count only the trainable
                parameters: with LoRA, the adapters and train_also, not the frozen base)
                (+ what step plugins keep: 4N for the EMA copy)
    activations what autograd saves for the backward pass (unique storages, parameters
                excluded; under autocast this includes the bf16 copies of the weights)
    other       working memory on top of that at its worst moment: the logits held by the
                loop and their gradients, a recomputed block under checkpointing
    total       params + optimizer + the most bytes alive at once during forward and
                backward. Gradients fill the memory the backward pass frees, so the total
                is smaller than the sum of the parts (``DeviceMemory.overlap``), except with
                gradient accumulation (micro-batch < train.batch_size or
                train.grad_accum > 1), where the gradients of the first micro-batch stay.

The other layouts (each one a ``parallel.strategy`` ember trains with) follow from it by
formula, per device, with d data-parallel ranks, t tensor-parallel ranks, s stages:

    ddp      as single, plus DDP's gradient buckets (4N, persistent: ember wraps the model
             in DDP with gradient_as_bucket_view=False).
    fsdp     FSDP2 ``fully_shard`` on each block and the root: params, grads and optimiser state
             state / d; plus, gathered: the root's parameters (embeddings, head, final norm:
             kept from forward to backward), two blocks' parameters (the current one and the
             prefetched next) in the compute dtype, one block's unsharded fp32 gradients
             (the reduce-scatter input). bf16 assumes MixedPrecisionPolicy(param_dtype=bf16,
             reduce_dtype=fp32) instead of autocast, so there are no bf16 weight copies.
    tp       Megatron-style over the Transformer blocks: attention and MLP weights / t,
             embeddings, norms and head whole. The activations saved inside attention and
             the MLP (q, k, v, attention output, MLP hidden) / t; the block's LayerNorm
             tensors and the inputs of the q, k, v and fc projections stay whole (no sequence
             parallelism); the loss working memory stays whole (no vocabulary-parallel head).
             t must divide n_head (and llama's n_kv_head).
    pp       ceil(L/s) blocks per stage plus all non-block parameters (a conservative stage
             holding both ends; tied embeddings live on both). 1F1B keeps at most
             min(m, s) micro-batches' block activations in flight on the first stage
             (GPipe: all m), m = micro-batches per optimiser step; gradients accumulate over
             the m micro-batches, so nothing overlaps. Throughput x m / (m + s - 1) (bubble).
    fsdp+tp  a 2-D mesh, t x d: the tp figures, then params, grads and optimiser state / d and the
             fsdp gathered terms with blocks / t.

Communication buffers outside the PyTorch allocator (NCCL), the CUDA context and the
caching allocator's fragmentation are not in the figures: the 10 % headroom a layout must
leave (``HEADROOM``) is for them. The throughput estimate assumes ``ASSUMED_MFU`` of the
GPU's dense peak for the recipe's precision (``ember.training.flops.GPU_PEAKS``; TF32 for
fp32), less the recomputation under activation checkpointing (3/4) and the pipeline bubble.
It is a large-model figure: small models are bound by kernel launches and never near it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ember import hardware
from ember.data import addition
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.layers import Attention, repeated_blocks
from ember.models.llama import LlamaAttention
from ember.models.registry import build_model
from ember.training.flops import GPU_PEAKS
from ember.training.memory_trace import SPLIT, WEIGHT, Trace, measure_step
from ember.training.precision import with_precision

if TYPE_CHECKING:
    from ember.config import Recipe

ASSUMED_MFU = 0.4  # model FLOPs utilisation a well-tuned dense Transformer run reaches on these GPUs
HEADROOM = 0.9  # a layout fits when its total is at most this share of the GPU's memory
CPU_FALLBACK_PARAMS = 100_000_000  # real-tensor CPU measurement only for models this small
STRATEGIES = ("single", "ddp", "fsdp", "tp", "fsdp+tp", "pp")  # simplest first: the recommendation order


@dataclass
class DeviceMemory:
    """Bytes per device. ``total`` is the predicted peak: the parts minus ``overlap``,
    the gradient bytes that fill memory the backward pass has already freed."""

    params: int
    grads: int
    optimizer: int
    activations: int
    other: int  # working memory beyond the saved activations; gathered FSDP layers; DDP buckets
    overlap: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.other - self.overlap


@dataclass
class Layout:
    strategy: str
    dp: int
    tp: int
    pp: int
    micro_batch: int
    memory: DeviceMemory
    fits: bool
    note: str = ""

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass
class Plan:
    model: str
    params: int
    flops_per_item: float  # training FLOPs (forward + backward) per item
    item: str  # "token" or "sample"
    precision: str
    gpus: int
    gpu: str
    gpu_memory: int  # bytes
    layouts: list[Layout]
    recommended: Layout | None
    tokens_per_s_estimate: float | None  # items per second of the recommended layout, all its GPUs
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_memory(text: str | int) -> int:
    """``"80GB"`` -> 80e9 bytes, ``"80GiB"`` -> 80 * 2**30; K/M/G/T are decimal, Ki/Mi/Gi/Ti binary,
    the trailing B optional, case ignored. An int is bytes already."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text > 0:
            return text
        raise EmberError(
            f"--gpu-memory must be positive, got {text} bytes. Give the memory of one GPU, e.g. --gpu-memory 80GB."
        )
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*", str(text), flags=re.IGNORECASE)
    if not m or not m.group(2) or float(m.group(1)) <= 0:
        raise EmberError(
            f"--gpu-memory {text!r} is not a memory size. Give a positive number with a unit, e.g. "
            f"--gpu-memory 80GB (decimal: KB, MB, GB, TB) or 80GiB (binary: KiB, MiB, GiB, TiB)."
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gpu_key(gpu: str) -> str:
    """The ``GPU_PEAKS`` name for a user's GPU name (``h100``, ``H100-PCIe``, ...)."""
    wanted = re.sub(r"[-_\s]+", " ", gpu.strip()).lower()
    for name in GPU_PEAKS:
        if name.lower() == wanted:
            return name
    known = ", ".join(n.lower().replace(" ", "-") for n in GPU_PEAKS)
    raise EmberError(f"--gpu {gpu!r} is not a GPU ember knows the peak FLOP/s of. Use one of: {known}.")


def data_spec(recipe: Recipe) -> DataSpec:
    """The DataSpec the recipe's data will have (with its objective's task), from the recipe alone."""
    from dataclasses import replace

    from ember.objectives import objective_task

    spec = _own_data_spec(recipe)
    return replace(spec, task=objective_task(recipe.objective, spec.task))


def _own_data_spec(recipe: Recipe) -> DataSpec:
    """The DataSpec the recipe's data will have, from the recipe alone (nothing is prepared).

    lm: the BPE size asked for (``data.vocab_size``; a small corpus can train fewer tokens),
    256 for ``tokenizer: bytes``, a tokenizer file's own size, or a prepared directory's
    manifest. addition: its fixed vocabulary and lengths. digits: 10 classes, 1x8x8 images or 8 rows of 8.
    """
    d = recipe.data
    if d.name == "prepared":
        from ember.data.build import prepared_spec
        from ember.data.shards import load_manifest

        return prepared_spec(d, d.path, load_manifest(d.path))
    if d.name == "stdlib":
        return DataSpec("lm", vocab_size=_vocab_size(d.tokenizer, d.vocab_size), seq_len=d.seq_len)
    if d.name == "addition":
        return addition.addition_spec(d.max_digits)
    if d.name == "digits-captions":
        from ember.data import captions

        return DataSpec(
            "clip",
            num_classes=10,
            input_shape=(1, 8, 8),
            vocab_size=captions.VOCAB_SIZE,
            seq_len=captions.CAPTION_LEN,
            pad_id=captions.PAD,
        )
    shape = (8, 8) if d.name == "digits-rows" else (1, 8, 8)
    return DataSpec("classify", num_classes=10, input_shape=shape)


def _vocab_size(tokenizer: str, asked: int) -> int:
    if tokenizer == "bytes":
        return 256
    if tokenizer == "bpe":
        return asked
    from ember.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer).get_vocab_size()


# --------------------------------------------------------------------------- the model's facts


@dataclass
class ModelFacts:
    """What the layouts need from the model, counted on the built (fake) model."""

    name: str
    params: int  # unique parameters
    param_tensors: int
    block_params: int  # in the repeated blocks, all of them
    largest_block: int  # parameters of the largest block (an FSDP unit, the gathered size)
    n_blocks: int
    n_head: int  # 0 when the blocks are not Transformer blocks (no tensor parallelism)
    buffer_bytes: int
    flops_per_item: float
    item: str
    n_kv_head: int = 0  # llama's key/value heads (grouped-query attention); 0: as many as n_head
    trainable: int = -1  # parameters that train (all but LoRA's frozen base); -1: all of them
    trainable_tensors: int = -1

    def __post_init__(self) -> None:
        if self.trainable < 0:
            self.trainable, self.trainable_tensors = self.params, self.param_tensors

    @property
    def kv_heads(self) -> int:
        """Key/value heads: llama's n_kv_head, else (0) as many as query heads."""
        return self.n_kv_head or self.n_head

    def tp_divides(self, t: int) -> bool:
        """Whether t tensor-parallel ranks get equal shares of whole query and key/value heads."""
        return self.n_head % t == 0 and self.kv_heads % t == 0

    @property
    def other_params(self) -> int:
        """Parameters outside the blocks: embeddings, head, final norm (all of them for an RNN)."""
        return self.params - self.block_params


def model_facts(model: nn.Module, recipe: Recipe, spec: DataSpec, count_flops: bool = True) -> ModelFacts:
    """The facts of ``model`` (fake or real; on ``meta`` with count_flops=False: FLOPs 0)."""
    blocks = repeated_blocks(model)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    transformer = any(isinstance(m, (Attention, LlamaAttention)) for b in blocks for m in b.modules())
    return ModelFacts(
        name=recipe.model.name,
        params=sum(p.numel() for p in model.parameters()),
        param_tensors=len(list(model.parameters())),
        block_params=sum(sizes),
        largest_block=max(sizes, default=0),
        n_blocks=len(blocks),
        n_head=getattr(recipe.model, "n_head", 0) if transformer else 0,
        n_kv_head=getattr(recipe.model, "n_kv_head", 0) if transformer else 0,
        buffer_bytes=sum(b.untyped_storage().nbytes() for b in model.buffers()),
        flops_per_item=float(model.flops_per_item()) if count_flops else 0.0,
        item="sample" if spec.task in ("classify", "regress", "simclr", "clip") else "token",
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        trainable_tensors=sum(1 for p in model.parameters() if p.requires_grad),
    )


def optimizer_bytes(recipe: Recipe, facts: ModelFacts) -> int:
    """fp32 optimiser state for the trainable parameters: Adam/AdamW two moments and a 4-byte step per
    tensor; SGD one momentum buffer (none without momentum); plus what step plugins keep (an EMA copy)."""
    o = recipe.optim
    if o.name in ("adam", "adamw"):
        state = 8 * facts.trainable + 4 * facts.trainable_tensors
    else:
        state = 4 * facts.trainable if o.momentum > 0 else 0
    return state + sum(p.state_bytes(facts.params, facts.buffer_bytes) for p in recipe.plugins)


# --------------------------------------------------------------------------- per-device memory of each layout


@dataclass
class _Shape:
    """One layout's degrees and what they keep on a device."""

    strategy: str
    dp: int = 1
    tp: int = 1
    pp: int = 1
    share: float = 1.0  # share of parameters (and gradients, optimiser state) a device holds
    scale: tuple[float, float, float, float] = (1, 1, 1, 1)  # of the timeline's columns
    persistent: int = 0  # bytes held throughout: gathered FSDP parameters, DDP buckets


def _shape(strategy: str, f: ModelFacts, gpus: int, precision: str, t: int = 1) -> _Shape:
    cdt = 4 if precision == "fp32" else 2  # bytes of a gathered parameter in the compute dtype
    blocks_per_stage = math.ceil(f.n_blocks / gpus) if f.n_blocks else 0
    if strategy == "tp":
        t = gpus
    tp_share = (f.block_params / t + f.other_params) / f.params
    copies = 0.0 if precision != "fp32" else 1.0  # fsdp's mixed-precision policy: no autocast weight copies
    if strategy == "single":
        return _Shape("single")
    if strategy == "ddp":
        return _Shape("ddp", dp=gpus, persistent=4 * f.trainable)  # the gradient buckets
    if strategy == "fsdp":
        gathered = cdt * (f.other_params + 2 * f.largest_block) + round(4 * f.largest_block * f.trainable / f.params)
        return _Shape("fsdp", dp=gpus, share=1 / gpus, scale=(1, 1, copies, 1 / gpus), persistent=gathered)
    if strategy == "tp":
        return _Shape("tp", tp=gpus, share=tp_share, scale=(1, 1 / gpus, tp_share, tp_share))
    if strategy == "fsdp+tp":
        d = gpus // t
        gathered = cdt * (f.other_params + 2 * f.largest_block / t) + 4 * f.largest_block / t
        return _Shape(
            "fsdp+tp", dp=d, tp=t, share=tp_share / d, scale=(1, 1 / t, copies, tp_share / d), persistent=int(gathered)
        )
    share = min(1.0, (blocks_per_stage * f.largest_block + f.other_params) / f.params)
    return _Shape("pp", pp=gpus, share=share)


def layout_memory(
    shape: _Shape, f: ModelFacts, trace: Trace, opt_bytes: int, accumulate: bool, in_flight: int = 1
) -> DeviceMemory:
    """Bytes per device of one layout at ``trace``'s micro-batch (formulas in the module docstring)."""
    params = round(4 * f.params * shape.share)
    grads = round(4 * f.trainable * shape.share)
    optim = round(opt_bytes * shape.share)
    s = shape.scale
    acts = round(trace.saved - trace.saved_split * (1 - s[SPLIT]) - trace.saved_weight * (1 - s[WEIGHT]))
    act_peak = trace.peak(s, drop_grads=True)
    work = max(0, act_peak - acts)
    if shape.strategy == "pp":
        return DeviceMemory(params, grads, optim, _stage_activations(shape, f, trace, in_flight), work)
    other = work + shape.persistent
    if accumulate:
        peak = grads + act_peak  # the first micro-batch's gradients stay for the others
    else:
        peak = trace.peak(s)
    total = params + optim + shape.persistent + peak
    return DeviceMemory(params, grads, optim, acts, other, overlap=params + grads + optim + acts + other - total)


def _stage_activations(shape: _Shape, f: ModelFacts, trace: Trace, in_flight: int) -> int:
    """A pipeline stage's saved activations: its blocks' share for each micro-batch in flight,
    the embedding/head/loss ends once (a conservative stage has both), and the weight copies
    of autocast once (one autocast region around the schedule's step caches them)."""
    weight_in_blocks = trace.saved_weight * f.block_params / f.params
    per_micro_batch = (trace.saved_blocks - weight_in_blocks) * math.ceil(f.n_blocks / shape.pp) / f.n_blocks
    ends = trace.saved - trace.saved_blocks - (trace.saved_weight - weight_in_blocks)
    return round(in_flight * per_micro_batch + ends + trace.saved_weight * shape.share)


# --------------------------------------------------------------------------- building and measuring


def _candidates(batch_size: int) -> list[int]:
    """Micro-batches tried: powers of two up to train.batch_size, largest first."""
    return [1 << i for i in range(batch_size.bit_length() - 1, -1, -1)]


def _traces(model: nn.Module, spec: DataSpec, recipe: Recipe, sizes: list[int]) -> dict[int, Trace]:
    """A trace per micro-batch: measured at 1 and 2, the rest from those two (exact while the
    operations are the same), measured where they are not."""
    t = recipe.train
    model.grad_checkpointing = t.activation_checkpointing

    def measure(b: int) -> Trace:
        return measure_step(model, spec, b, t.precision, t.label_smoothing)

    one, two = measure(1), measure(2)
    out = {1: one, 2: two}
    for b in sizes:
        if b not in out:
            out[b] = one.at(two, b) or measure(b)
    return out


def _measure(recipe: Recipe, spec: DataSpec) -> tuple[ModelFacts, dict[int, Trace], str]:
    """Build the model and trace its training step: on fake tensors, or on real CPU tensors
    for a small recurrent model and for a small model the fake run cannot handle."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sizes = _candidates(recipe.train.batch_size)
    small = _count_params(recipe, spec) <= CPU_FALLBACK_PARAMS if recipe.model.name == "rnn" else None
    if small:  # the fused CPU LSTM/GRU kernels keep a workspace their fake version does not
        model = _run_model(recipe, spec)
        return model_facts(model, recipe, spec), _traces(model, spec, recipe, sizes), "real CPU tensors"
    try:
        with FakeTensorMode():
            model = _run_model(recipe, spec)
            return model_facts(model, recipe, spec), _traces(model, spec, recipe, sizes), "fake tensors"
    except EmberError:
        raise
    except Exception as err:  # an operation without a fake implementation
        error = err
    params = _count_params(recipe, spec)
    if params > CPU_FALLBACK_PARAMS:
        raise EmberError(
            f"ember plan could not trace model {recipe.model.name} on fake tensors ({error}) and it is too "
            f"large ({params:,} parameters) to measure on the CPU instead. Plan a smaller configuration "
            f"of the same model and scale the figures, or report the error."
        ) from None
    model = _run_model(recipe, spec)
    how = f"real CPU tensors (fake tensors failed: {error})"
    return model_facts(model, recipe, spec), _traces(model, spec, recipe, sizes), how


def _run_model(recipe: Recipe, spec: DataSpec) -> nn.Module:
    """The recipe's model as its run trains it: with what plugins change before the layout (LoRA's
    adapters, its frozen base)."""
    model = build_model(recipe.model, spec, recipe.objective)
    for plugin in recipe.plugins:
        plugin.prepare_model(model)
    return model


def _count_params(recipe: Recipe, spec: DataSpec) -> int:
    with shapes_only():  # free at any size
        return sum(p.numel() for p in build_model(recipe.model, spec, recipe.objective).parameters())


class _NoRandomInit(TorchFunctionMode):
    """Random initialisers on meta tensors return them as they are: there are no values to draw,
    and drawing them on meta runs torch's Python decompositions, whose first use imports
    torch._dynamo (about 2 s) — which every run's memory check would pay."""

    INITIALISERS = {
        "normal_",
        "uniform_",
        "trunc_normal_",
        "random_",
        "exponential_",
        "log_normal_",
        "cauchy_",
        "geometric_",
        "bernoulli_",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by name
        if getattr(func, "__name__", None) in self.INITIALISERS and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Build modules on the meta device: every shape, no memory, no initialisation."""
    with torch.device("meta"), _NoRandomInit():
        yield


# --------------------------------------------------------------------------- the plan


def _layouts(f: ModelFacts, gpus: int, precision: str) -> tuple[list[tuple[_Shape, str]], list[str]]:
    """The layouts that apply to this model and GPU count, each with a note; why others do not."""
    out: list[tuple[_Shape, str]] = [
        (_shape("single", f, 1, precision), "one GPU" if gpus == 1 else f"one of the {gpus} GPUs")
    ]
    skipped: list[str] = []
    if gpus == 1:
        return out, skipped
    out += [
        (_shape("ddp", f, gpus, precision), "buckets: gradient_as_bucket_view=False"),
        (
            _shape("fsdp", f, gpus, precision),
            "FSDP2 per block; bf16 as MixedPrecisionPolicy" if precision != "fp32" else "FSDP2 per block",
        ),
    ]
    if not f.n_head:
        skipped.append(f"tp, fsdp+tp: model {f.name} has no Transformer blocks to split")
    elif f.n_head % gpus:
        skipped.append(f"tp: {gpus} GPUs do not divide n_head={f.n_head}")
    elif f.kv_heads % gpus:
        skipped.append(f"tp: {gpus} GPUs do not divide n_kv_head={f.kv_heads}")
    else:
        out.append((_shape("tp", f, gpus, precision), "across nodes: slow" if gpus > 8 else ""))
    degrees = [t for t in (2, 4, 8) if t < gpus and gpus % t == 0 and f.n_head and f.tp_divides(t)]
    out += [(_shape("fsdp+tp", f, gpus, precision, t), f"{t}-way tp within a node") for t in degrees]
    if f.n_blocks < gpus:
        skipped.append(
            f"pp: model {f.name} has no repeated blocks to stage"
            if not f.n_blocks
            else f"pp: {f.n_blocks} blocks cannot fill {gpus} stages"
        )
    else:
        out.append((_shape("pp", f, gpus, precision), "1F1B"))
    return out, skipped


def _best(
    shape: _Shape, note: str, f: ModelFacts, traces: dict[int, Trace], recipe: Recipe, opt_bytes: int, budget: float
) -> Layout:
    """The layout at its largest power-of-two micro-batch that fits the budget (else at 1, not fitting)."""
    t = recipe.train
    layout = None
    for b in _candidates(t.batch_size):
        steps = math.ceil(t.batch_size * t.grad_accum / b)  # micro-batches per optimiser step
        in_flight = min(steps, shape.pp)
        mem = layout_memory(shape, f, traces[b], opt_bytes, accumulate=steps > 1, in_flight=in_flight)
        text = note
        if shape.strategy == "pp":
            gpipe = layout_memory(shape, f, traces[b], opt_bytes, True, in_flight=steps).total
            text = f"1F1B, {steps} micro-batches, {math.ceil(f.n_blocks / shape.pp)} blocks/stage (GPipe: {format_bytes(gpipe)})"
        layout = Layout(shape.strategy, shape.dp, shape.tp, shape.pp, b, mem, mem.total <= budget, text)
        if layout.fits:
            return layout
    return layout


def _throughput(layout: Layout, f: ModelFacts, recipe: Recipe, gpu_key: str) -> float:
    """Items per second: ASSUMED_MFU of the peak of all the layout's GPUs, less recomputation and bubble."""
    t = recipe.train
    rate = ASSUMED_MFU * GPU_PEAKS[gpu_key][t.precision] * layout.gpus / f.flops_per_item
    if t.activation_checkpointing:
        rate *= 3 / 4  # the forward pass runs twice: 4 units of work for 3 of model FLOPs
    if layout.pp > 1:
        m = math.ceil(t.batch_size * t.grad_accum / layout.micro_batch)
        rate *= m / (m + layout.pp - 1)
    return rate


def plan(recipe: Recipe, gpus: int = 1, gpu_memory: int | str = "80GB", gpu: str = "h100") -> Plan:
    """Predict parameters, FLOPs and memory per device for each layout of ``gpus`` GPUs of
    ``gpu_memory`` each, and recommend the simplest that fits with 10 % headroom."""
    if not isinstance(gpus, int) or gpus < 1:
        raise EmberError(f"--gpus must be a whole number of at least 1, got {gpus!r}.")
    memory = parse_memory(gpu_memory)
    gpu_key = _gpu_key(gpu)
    auto = recipe.train.precision == "auto"
    if auto:  # every GPU in GPU_PEAKS is Ampere or later: auto resolves to bf16 on each
        recipe = with_precision(recipe, "bf16")
    spec = data_spec(recipe)
    facts, traces, how = _measure(recipe, spec)
    opt_bytes = optimizer_bytes(recipe, facts)
    shapes, skipped = _layouts(facts, gpus, recipe.train.precision)
    layouts = [_best(s, note, facts, traces, recipe, opt_bytes, HEADROOM * memory) for s, note in shapes]
    # The simplest layout that fits and uses every GPU asked for (single only when that is one).
    usable = [lay for lay in layouts if lay.fits and lay.gpus == gpus]
    recommended = min(usable, key=lambda lay: STRATEGIES.index(lay.strategy), default=None)
    notes = [f"memory traced on {how}: one forward and backward per micro-batch, eager (torch.compile may save less)"]
    notes += [f"not planned: {s}" for s in skipped]
    if auto:
        notes.append(f"train.precision=auto is planned as bf16: the {gpu_key} does bf16 natively")
    if facts.trainable < facts.params:  # LoRA: the base is frozen
        notes.append(f"{facts.trainable:,} of the {facts.params:,} parameters train: grads and optim count them alone")
    if recommended is None and not recipe.train.activation_checkpointing:
        notes.append("nothing fits: try train.activation_checkpointing=true, more GPUs, or a smaller model")
    elif recommended is None:
        notes.append("nothing fits: try more GPUs or a smaller model")
    return Plan(
        model=facts.name,
        params=facts.params,
        flops_per_item=facts.flops_per_item,
        item=facts.item,
        precision=recipe.train.precision,
        gpus=gpus,
        gpu=gpu_key,
        gpu_memory=memory,
        layouts=layouts,
        recommended=recommended,
        tokens_per_s_estimate=_throughput(recommended, facts, recipe, gpu_key) if recommended else None,
        notes=notes,
    )


# --------------------------------------------------------------------------- before a run: does it fit?

SKIP_MEMORY_CHECK = "EMBER_SKIP_MEMORY_CHECK"  # set to 1 to start a run the check would refuse
TRACE_SHARE = 0.01  # below this share of the budget, a model's state is too small for its step to matter


def check_memory(
    recipe: Recipe, spec: DataSpec, device: torch.device, strategy: str = "single", ranks: int = 1, tp: int = 1
) -> None:
    """Refuse a run whose predicted peak per device is over ``HEADROOM`` of the memory the device
    has free, before the model is built: else it allocates until the system kills it.

    CPU ranks of one machine (``LOCAL_WORLD_SIZE``) share its memory. Nothing is allocated:
    see ``predicted_run_bytes``. ``EMBER_SKIP_MEMORY_CHECK=1`` skips the check.
    """
    if os.environ.get(SKIP_MEMORY_CHECK, "").strip() not in ("", "0"):
        return
    free = hardware.available_memory(device)
    if free is None:  # nothing to compare with: run as before
        return
    here = int(os.environ.get("LOCAL_WORLD_SIZE", ranks)) if device.type == "cpu" else 1
    budget = HEADROOM * free / max(1, here)
    need, what = predicted_run_bytes(recipe, spec, strategy, ranks, tp, budget)
    for weights in filter(None, (p.weights_file() for p in recipe.plugins)):
        if weights.is_file():  # a distillation teacher: frozen weights on every rank
            need += weights.stat().st_size
            what += f" plus the teacher's {format_bytes(weights.stat().st_size)} of weights"
    if need <= budget:
        return
    where = (
        f"this CPU has {format_bytes(free)} free" if device.type == "cpu" else f"{device} has {format_bytes(free)} free"
    )
    if here > 1:
        where += f", shared by {here} ranks"
    layout = f"{strategy} over {ranks} ranks" if ranks > 1 else strategy
    raise EmberError(
        f"model {recipe.model.name} needs {what.format(format_bytes(need))} (`ember plan`'s figures "
        f"for layout {layout} at micro-batch {recipe.train.batch_size}), but {where} and a run may use "
        f"{HEADROOM:.0%} of it: training would allocate until the system kills it. Make the model or "
        f"train.batch_size smaller, set train.activation_checkpointing=true, spread it over more ranks or GPUs with "
        f"a sharded layout (fsdp, tp, pp: see `ember plan RECIPE --gpus N`), or, if the prediction is wrong, "
        f"pass --no-memory-check (or set {SKIP_MEMORY_CHECK}=1) to start anyway."
    )


def predicted_run_bytes(
    recipe: Recipe, spec: DataSpec, strategy: str = "single", ranks: int = 1, tp: int = 1, budget: float = math.inf
) -> tuple[int, str]:
    """Bytes per device of the run's layout, and what they are ("{}" for the figure); no real tensor is made.

    First the state (weights, gradients, optimiser) of the model built on ``meta``: cheap at
    any size, and a lower bound. When it is under ``budget`` but not negligible next to it,
    the training step is traced on fake tensors as ``ember plan`` does, at the recipe's batch.
    """
    t = recipe.train
    with shapes_only():
        model = _run_model(recipe, spec)
    facts = model_facts(model, recipe, spec, count_flops=False)
    shape = _shape(strategy, facts, ranks, t.precision, tp)
    opt_bytes = optimizer_bytes(recipe, facts)
    weights, grads = round(4 * facts.params * shape.share), round(4 * facts.trainable * shape.share)
    state = weights + grads + round(opt_bytes * shape.share) + shape.persistent
    if state > budget or state < TRACE_SHARE * budget:
        return state, "at least {} per device for its weights, gradients and optimiser state alone"
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            fake = _run_model(recipe, spec)
            fake.grad_checkpointing = t.activation_checkpointing
            trace = measure_step(fake, spec, t.batch_size, t.precision, t.label_smoothing)
    except EmberError:
        raise
    except Exception:  # an operation without a fake implementation: the lower bound stands
        return state, "at least {} per device for its weights, gradients and optimiser state alone"
    memory = layout_memory(
        shape, facts, trace, opt_bytes, accumulate=t.grad_accum > 1, in_flight=min(t.grad_accum, shape.pp)
    )
    return memory.total, "about {} per device at the peak of a training step"


def format_bytes(n: float) -> str:
    """Decimal units, as --gpu-memory reads them: 1.23 GB, 512 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"
