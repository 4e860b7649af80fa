"""Megatron-style tensor parallelism (tp) for ember's Transformer models.

Every :class:`~ember.models.layers.Block` (GPT, ViT, both halves of seq2seq) and every
:class:`~ember.models.llama.LlamaBlock` is split over the ranks of a 1-D ``DeviceMesh`` with
``torch.distributed.tensor.parallel``:

* attention: ``q``, ``k``, ``v`` column-parallel (each rank holds n_head / t whole
  heads, which is why ``Attention`` reshapes with ``view(B, T, -1, head_dim)``),
  ``proj`` row-parallel; the same for the decoder's cross-attention. Llama's grouped-query
  attention has n_kv_head key/value heads: k and v are split by those (t must divide both
  head counts), and since both splits are contiguous, rank r's query heads are exactly
  the ones its key/value heads serve;
* MLP: ``fc`` column-parallel (4 * n_embd / t hidden units per rank), ``proj`` row-parallel;
  Llama's SwiGLU: ``gate`` and ``up`` column-parallel, ``proj`` row-parallel.

So each block costs two all-reduces forward (after each row-parallel ``proj``) and
two backward (the gradient of each column-parallel input). Nothing else is split.

What a training loop has to know
--------------------------------
Parameters. The weights of q, k, v, fc (and their biases) and of the two ``proj``
matrices are ``DTensor``s sharded over the mesh (``Shard(0)`` column-parallel,
``Shard(1)`` row-parallel; a row-parallel bias is a replicated ``DTensor``). Everything
else -- embeddings, LayerNorms, the LM / classifier head, a tied embedding -- stays a
plain tensor, a full copy on every tp rank. ``p.grad`` has the parameter's type.

Replicated gradients need no all-reduce over the tp group. Every replicated parameter
sees the same input on every tp rank (the row-parallel all-reduce makes the residual
stream identical again after each block, and the column-parallel backward all-reduces
the gradient flowing back into it), so its gradient is the same on every rank already.
The test checks this: the plain gradients agree across the two ranks to the bit.
Data parallelism (ddp, fsdp) still averages over the *data-parallel* ranks only.

Same inputs, same RNG on a tp group. That identity holds only if all ranks of a tp
group get the same batch and draw the same random numbers: shard the data by the
data-parallel rank and seed dropout with ``seed + dp_rank``, not ``seed + global_rank``.
Dropout is applied to replicated tensors (embeddings, the residual branches after the
row-parallel all-reduce); with a different mask per rank the "replicas" differ, the next
block's all-reduce adds up pieces computed from different activations, and the result is
neither rank's model (the test measures the divergence). A cost of the shared seed: the
dropout inside attention (on this rank's heads) repeats the same mask on each rank's
share of the heads, where Megatron would draw those from a per-tp-rank stream; the
result is still a valid, synchronised model, with masks correlated across head shards.

Gradient clipping. ``torch.nn.utils.clip_grad_norm_`` and ``get_total_norm`` fail on a
mix of ``DTensor`` and plain gradients in this torch ("aten._foreach_norm.Scalar got
mixed torch.Tensor and DTensor"); use :func:`grad_norm_` / :func:`total_grad_norm`,
which take each DTensor gradient's full (all-shard) norm and return the same total norm
as the unsharded model.

Optimisers. The foreach kernels reject a parameter group mixing DTensor and plain
tensors the same way. On the CPU AdamW defaults to the per-tensor loop and works (the
fused CPU AdamW works too); on CUDA it defaults to foreach, which fails.
:func:`separate_dtensor_groups` splits each group in two with the same options.

Checkpoints. ``model.state_dict()`` holds the sharded DTensors (safetensors cannot
save them) and ``model.load_state_dict(full)`` rejects full tensors. Use
``torch.distributed.checkpoint.state_dict``: ``get_model_state_dict(model,
options=StateDictOptions(full_state_dict=True))`` returns plain full tensors on every
rank (with ``cpu_offload=True`` on rank 0 only, an empty dict elsewhere), and
``set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))``
loads them back into the shards; ``get_optimizer_state_dict`` does the same for AdamW's
moments. So this module needs no ``full_state_dict`` helper.

Not done here: sequence parallelism (LayerNorm and dropout activations stay whole on
every rank) and loss parallelism (the LM head is replicated, so every rank computes the
full logits and loss).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ember.errors import EmberError
from ember.models.layers import Block
from ember.models.llama import LlamaBlock

TP_FIX = "the process count for parallel.strategy=tp, parallel.tp for fsdp+tp"
SPLIT_BLOCKS = (Block, LlamaBlock)  # the blocks this module knows how to cut


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every ember Transformer block in ``model``, at any depth, in module order."""
    return [m for m in model.modules() if isinstance(m, SPLIT_BLOCKS)]


def _attentions(block: nn.Module) -> dict[str, nn.Module]:
    """The block's attention layers by attribute name: ``attn`` and, in a decoder, ``cross``."""
    return {name: a for name in ("attn", "cross") if (a := getattr(block, name, None)) is not None}


def _mlp_inputs(block: nn.Module) -> list[str]:
    """The names of the MLP's column-parallel layers: ``fc``, or SwiGLU's ``gate`` and ``up``."""
    return [name for name, m in block.mlp.named_children() if isinstance(m, nn.Linear) and name != "proj"]


def tp_problem(model: nn.Module, tp_size: int) -> str | None:
    """Why ``model`` cannot be split over ``tp_size`` tensor-parallel ranks, or None if it can."""
    if tp_size < 1:
        return f"the tensor-parallel degree must be at least 1, not {tp_size}; set it ({TP_FIX})."
    blocks = transformer_blocks(model)
    if not blocks:
        return (
            f"tp needs a Transformer model: gpt, llama, vit or seq2seq; {type(model).__name__} has no Transformer "
            f"blocks whose attention heads and MLP could be split. Use ddp or fsdp for other models "
            f"(cnn, rnn), or choose a Transformer model."
        )
    for block in blocks:
        for attn in _attentions(block).values():
            problem = _heads_problem(attn, tp_size)
            if problem:
                return problem
        hidden = getattr(block.mlp, _mlp_inputs(block)[0]).out_features
        if hidden % tp_size:
            what = "(4 * n_embd)" if isinstance(block, Block) else "(model.ffn_hidden)"
            return (
                f"tp over {tp_size} ranks splits the MLP's {hidden} hidden units {what} evenly, but "
                f"{tp_size} does not divide {hidden}. Change model.n_embd, or use a tp degree that divides "
                f"{hidden} ({TP_FIX})."
            )
    return None


def _heads_problem(attn: nn.Module, tp_size: int) -> str | None:
    """Why ``attn``'s query or key/value heads do not split into ``tp_size`` equal shares of whole heads."""
    # The head counts are not stored; q's output is n_head heads of head_dim channels, k's n_kv_head.
    n_head = attn.q.out_features // attn.head_dim
    n_kv_head = attn.k.out_features // attn.head_dim
    if n_head % tp_size:
        return (
            f"tp over {tp_size} ranks gives every rank an equal share of whole attention heads, "
            f"but {tp_size} does not divide n_head={n_head}. Set model.n_head to a multiple of "
            f"{tp_size}, or use a tp degree that divides {n_head} ({TP_FIX})."
        )
    if n_kv_head % tp_size:
        return (
            f"tp over {tp_size} ranks gives every rank an equal share of whole key/value heads (with the "
            f"query heads they serve), but {tp_size} does not divide n_kv_head={n_kv_head}. Set "
            f"model.n_kv_head to a multiple of {tp_size}, or use a tp degree that divides {n_kv_head} ({TP_FIX})."
        )
    return None


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan of one block: column-parallel in, row-parallel out."""
    plan: dict[str, ParallelStyle] = {}
    for name in _attentions(block):
        # Column-parallel outputs stay local tensors (n_head / t heads each), which the
        # attention reshapes with -1 heads; the row-parallel proj all-reduces them back.
        plan.update({f"{name}.q": ColwiseParallel(), f"{name}.k": ColwiseParallel(), f"{name}.v": ColwiseParallel()})
        plan[f"{name}.proj"] = RowwiseParallel()
    plan.update({f"mlp.{name}": ColwiseParallel() for name in _mlp_inputs(block)})
    plan["mlp.proj"] = RowwiseParallel()
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Split every Transformer block of ``model`` over the 1-D ``tp_mesh``, in place; returns ``model``.

    All ranks must hold the same weights before the call (build the model from the same
    seed): each keeps its shard of the block matrices and a full copy of everything else.
    """
    if tp_mesh.ndim != 1:
        raise EmberError(
            f"tensor parallelism needs a 1-D device mesh, got {tp_mesh.ndim}-D. Pass the tp dimension "
            f"of a larger mesh, e.g. mesh['tp']."
        )
    problem = tp_problem(model, tp_mesh.size())
    if problem:
        raise EmberError(problem)
    blocks = transformer_blocks(model)
    if any(isinstance(p, DTensor) for b in blocks for p in b.parameters()):
        raise EmberError(
            "the model is already split (its blocks hold DTensor weights): apply tensor parallelism "
            "once, to a freshly built model."
        )
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan(block))
    return model


def separate_dtensor_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimiser parameter groups with the DTensor and the plain parameters of each group apart.

    The foreach optimiser kernels (CUDA's default) refuse a list mixing the two; every other
    option of a group is kept on both halves. A group with only one kind stays as it is.
    """
    out: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        sharded = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        halves = [half for half in (plain, sharded) if half] or [params]
        out += [{**group, "params": half} for half in halves]
    return out
