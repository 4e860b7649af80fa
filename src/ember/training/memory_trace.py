"""One training step's memory, measured without allocating it (``measure_step``), and the CPU
allocator's real figure for the same step to check it against (``allocator_peak``,
``reference_step``). ``ember.training.memory`` turns these traces into memory per device of
each parallel layout.

What is measured, exactly, for one training micro-batch on one device
---------------------------------------------------------------------
One forward pass, the recipe's loss and one backward pass run on fake tensors, with the
recipe's precision (``torch.autocast`` on the CPU for bf16/fp16) and activation
checkpointing (``model.grad_checkpointing``). A ``TorchDispatchMode`` follows every storage
an operation creates until it is freed, so the bytes alive after each operation are
known, split into gradients, low-precision copies of the weights (autocast), activations
tensor parallelism would split, and everything else; ``saved_tensors_hooks`` record what
autograd saves. Fake tensors, not plain ``meta`` ones, because fake tensors dispatch as
the CPU would: plain meta tensors run attention on the math path, which saves the T x T
probabilities no fused kernel keeps, and ignore autocast. The run is repeated at
micro-batch 1 and 2; every tensor's size is affine in the micro-batch, so the two
timelines give any other micro-batch exactly (a different operation sequence is measured
directly). Recurrent models are measured on the CPU with real tensors instead (the fused
CPU LSTM/GRU kernels keep a workspace their fake version does not), at the same two sizes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ember.data.spec import DataSpec
from ember.models.layers import MLP, Attention, repeated_blocks
from ember.models.llama import LlamaAttention, SwiGLU
from ember.training.tasks import FORWARD, summed_loss

# What each live byte is, in the columns of a Trace's timeline.
ACT, SPLIT, WEIGHT, GRAD = range(4)


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage: views share it; valid while the storage lives."""
    return t.untyped_storage()._cdata


@dataclass
class Trace:
    """One forward and backward pass of one micro-batch, in bytes.

    ``timeline[i]``: bytes alive after operation i beyond the parameters and buffers, as
    (activations and working memory, what tensor parallelism would split, weight copies, gradients).
    ``saved*``: unique storages autograd saved (parameters excluded), and of them those
    tensor parallelism splits, the weight copies and those saved inside the repeated blocks.
    """

    micro_batch: int
    timeline: np.ndarray
    saved: int
    saved_split: int
    saved_weight: int
    saved_blocks: int
    grads: int

    def at(self, other: Trace, micro_batch: int) -> Trace | None:
        """The trace at ``micro_batch`` from this one and ``other`` (sizes are affine in the batch),
        or None when the two ran different operations."""
        if self.timeline.shape != other.timeline.shape:
            return None
        f = (micro_batch - self.micro_batch) / (other.micro_batch - self.micro_batch)

        def lerp(a, b):
            return np.rint(a + f * (b - a)).astype(np.int64) if isinstance(a, np.ndarray) else round(a + f * (b - a))

        return Trace(
            micro_batch,
            lerp(self.timeline, other.timeline),
            lerp(self.saved, other.saved),
            lerp(self.saved_split, other.saved_split),
            lerp(self.saved_weight, other.saved_weight),
            lerp(self.saved_blocks, other.saved_blocks),
            self.grads,
        )

    def peak(self, scale: tuple[float, float, float, float] = (1, 1, 1, 1), drop_grads: bool = False) -> int:
        """Most bytes alive at once with each column scaled (a device's share); without the
        gradient column when the gradients are there throughout (accumulation)."""
        s = np.array(scale, dtype=np.float64)
        if drop_grads:
            s[GRAD] = 0.0
        return int((self.timeline @ s).max(initial=0))


class _Probe(TorchDispatchMode):
    """Follows each storage an operation creates until it is freed (a weakref finalizer on
    the storage), and what autograd saves; records the live bytes after every operation."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.params = {_key(p) for p in model.parameters()}
        self.fixed = self.params | {_key(b) for b in model.buffers()}
        self.size: dict[int, int] = {}
        self.kind: dict[int, int] = {}
        self.live = [0, 0, 0, 0]
        self.rows: list[tuple[int, int, int, int]] = []
        self.saved = {"all": 0, "split": 0, "weight": 0, "blocks": 0}
        self.saved_keys: set[int] = set()
        self.stack: list[nn.Module] = []
        # Tensor parallelism splits what attention and the MLP compute between their first
        # projections (q, k, v, fc: column-parallel) and their output projections (row-parallel).
        split = (Attention, MLP, LlamaAttention, SwiGLU)
        self.split_modules = {id(m) for a in model.modules() if isinstance(a, split) for m in (a, a.proj)}
        self.block_ids = {id(b) for b in blocks}
        self.block_depth = 0
        self.from_block: set[int] = set()  # storages a block produced: under checkpointing the
        # next block's saved input is one of them, saved by checkpoint() outside any block

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # autocast's cast of a parameter: a low-precision weight copy, not an activation
        weight = func is torch.ops.aten._to_copy.default and _key(args[0]) in self.params
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, WEIGHT if weight else ACT)
        self.rows.append(tuple(self.live))
        return out

    def _track(self, t: torch.Tensor, kind: int) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.fixed or key in self.size:
            return
        self.size[key], self.kind[key] = storage.nbytes(), kind
        self.live[kind] += storage.nbytes()
        if self.block_depth:
            self.from_block.add(key)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live[self.kind.pop(key)] -= self.size.pop(key)
        self.from_block.discard(key)

    def relabel(self, key: int, kind: int) -> None:
        if key in self.size and self.kind[key] != kind:
            self.live[self.kind[key]] -= self.size[key]
            self.live[kind] += self.size[key]
            self.kind[key] = kind

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if key in self.fixed or key in self.saved_keys:
            return t
        self.saved_keys.add(key)
        n = t.untyped_storage().nbytes()
        self.saved["all"] += n
        if self.kind.get(key) == WEIGHT:
            self.saved["weight"] += n
        elif self.stack and id(self.stack[-1]) in self.split_modules:
            self.saved["split"] += n
            self.relabel(key, SPLIT)
        if self.block_depth or key in self.from_block:
            self.saved["blocks"] += n
        return t

    def on_grad(self, p: torch.Tensor) -> None:
        self.relabel(_key(p.grad), GRAD)

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        """Module stack (who is saving) and gradient arrival hooks, removed afterwards."""
        handles = []

        def enter(mod: nn.Module, args: tuple) -> None:
            self.stack.append(mod)
            self.block_depth += id(mod) in self.block_ids

        def leave(mod: nn.Module, args: tuple, out: object) -> None:  # None: the output stays
            self.block_depth -= id(self.stack.pop()) in self.block_ids

        for m in model.modules():
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        for p in model.parameters():
            if p.requires_grad:  # a frozen one (LoRA's base) gets no gradient, and refuses the hook
                handles.append(p.register_post_accumulate_grad_hook(self.on_grad))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()


def _dummy_batch(spec: DataSpec, b: int) -> dict[str, torch.Tensor]:
    # Values do not matter, only shapes; non-pad source tokens so no row is all padding.
    if spec.task in ("lm", "mlm"):
        return {
            "x": torch.zeros(b, spec.seq_len, dtype=torch.long),
            "y": torch.zeros(b, spec.seq_len, dtype=torch.long),
        }
    if spec.reads_tokens:  # labelled text: token ids, no padding
        return {"x": torch.ones(b, *spec.input_shape, dtype=torch.long), "y": torch.zeros(b, dtype=torch.long)}
    if spec.task == "classify":
        return {"x": torch.zeros(b, *spec.input_shape), "y": torch.zeros(b, dtype=torch.long)}
    if spec.task == "regress":
        return {"x": torch.zeros(b, *spec.input_shape), "y": torch.zeros(b)}
    if spec.task == "simclr":  # each sample's two views
        return {"x": torch.zeros(2 * b, *spec.input_shape), "y": torch.arange(2 * b).roll(b)}
    if spec.task == "clip":
        return {
            "x": torch.zeros(b, *spec.input_shape),
            "y": torch.zeros(b, dtype=torch.long),
            "text": torch.ones(b, spec.seq_len, dtype=torch.long),
        }
    ones = dict(dtype=torch.long)
    return {
        "src": torch.ones(b, spec.src_len, **ones),
        "tgt_in": torch.ones(b, spec.seq_len, **ones),
        "tgt_out": torch.ones(b, spec.seq_len, **ones),
    }


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def measure_step(
    model: nn.Module, spec: DataSpec, micro_batch: int, precision: str = "fp32", label_smoothing: float = 0.0
) -> Trace:
    """Run one training forward and backward of ``micro_batch`` dummy samples through
    ``model`` the way ember's loop does, and record its memory. Works on fake tensors (call
    it inside the FakeTensorMode the model was built in) and on real CPU tensors alike."""
    model.train()
    blocks = repeated_blocks(model)
    probe = _Probe(model, blocks)
    batch = _dummy_batch(spec, micro_batch)
    with probe, probe.watching(model):
        with _autocast(precision):
            logits, targets = FORWARD[spec.task](model, batch)
            loss = summed_loss(logits, targets, label_smoothing) / targets.numel()
        loss.backward()  # logits stay referenced meanwhile, as in the loop
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    s = probe.saved
    return Trace(
        micro_batch,
        np.array(probe.rows, dtype=np.int64).reshape(-1, 4),
        s["all"],
        s["split"],
        s["weight"],
        s["blocks"],
        grads,
    )


# --------------------------------------------------------------------------- checking a prediction on the CPU


def allocator_peak(fn) -> int:
    """Most bytes the CPU allocator had handed out at once while ``fn`` ran (``torch.profiler``
    reports the running total with each allocation): what a plan's total is checked against."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def reference_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, precision: str, grad_clip: float
) -> None:
    """One LM optimiser step as ember's loop takes it (one micro-batch): forward under
    autocast, summed loss over the target count, backward, clipping, step, zero_grad.
    The logits stay referenced until the step ends, as in the loop's ``Layout.forward_backward``."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    with _autocast(precision):
        logits = model(x)
        loss = summed_loss(logits, y) / y.numel()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
