"""Structured pruning: remove whole channels, neurons and attention heads, so the model really shrinks.

torch-pruning's dependency graph (Fang et al., DepGraph, CVPR 2023) finds which slices of
which tensors belong together — a conv's output channel, its BatchNorm entry, the next
conv's input channel, and across a residual stream every block that adds into it — and
removes each group at once, ranked by its L1 magnitude. What goes:

- CNN: channels of every conv, residual streams included (stem, stages, shortcuts);
- Transformers (gpt, vit, seq2seq): whole attention heads (q, k, v and the output
  projection's columns together; the head width stays, so ``Attention``'s
  ``view(B, T, -1, head_dim)`` reads the new count), MLP hidden neurons, and the
  residual width (embeddings, every LayerNorm and projection);
- llama, by this module's own cuts (grouped-query attention shares each key/value head among
  a group of query heads, which the dependency graph does not know): whole key/value groups,
  each with its query heads (a model with one key/value head loses query heads instead, the
  same number from every group), SwiGLU neurons (gate and up rows with proj's column) and the
  residual width (embedding columns, every RMSNorm and projection), ranked by L1 magnitude too;
- never the outputs: the classes or the vocabulary.

``ratio`` removes that share of each group's units. ``shrink_to_params`` finds, by
bisection, the ratio that leaves a target parameter count (how ``ember prune --amount``
is stated). The widths that result differ from layer to layer; they are not in model.json:
the weights file holds them. ``ember.models.stored.resize_to_stored`` (imported here too) cuts
a freshly built model to the shapes of a safetensors file before its weights are loaded — no
pickle, no module objects stored.

Example::

    kept = shrink_to_params(model, example_batch, "classify", target_params=20_000)
"""

from __future__ import annotations

import copy
import logging
import warnings
from types import ModuleType

import torch
from torch import nn

from ember.errors import EmberError
from ember.extras import require
from ember.models.layers import Attention
from ember.models.llama import Llama, LlamaAttention, SwiGLU
from ember.models.stored import resize_to_stored  # noqa: F401  (re-exported: ember prune's tests read it here)
from ember.training.tasks import FORWARD

STRUCTURED_MODELS = ("cnn", "gpt", "llama", "vit", "seq2seq")
MAX_RATIO = 0.95  # past this most layers are down to a unit or two: nothing sensible is left
_BISECTIONS = 12  # ratio to within 0.95 / 2**12 ≈ 0.0002


def torch_pruning() -> ModuleType:
    """torch_pruning, or the EmberError naming the extra that installs it (llama is pruned without it)."""
    return require("torch_pruning", "compress", "Structured pruning (ember prune --method structured)")


def prune_channels(model: nn.Module, batch: dict, task: str, ratio: float) -> nn.Module:
    """Remove ``ratio`` of every prunable group's channels, heads and neurons of ``model`` in place
    (rounded down, and never a layer's last channel or last head: the count falls as ``ratio`` grows)."""
    if isinstance(model, Llama):
        return _prune_llama(model, ratio)
    tp = torch_pruning()

    outputs = _output_layers(model)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    qkv = {lin: attn for attn in attentions for lin in (attn.q, attn.k, attn.v)}
    heads = {lin: lin.out_features // attn.head_dim for lin, attn in qkv.items()}
    # torch-pruning keeps int(n * (1 - ratio)) channels of a group, and skips a group that would keep none
    widths = [_out_size(m) for m in model.modules() if _out_size(m) and m not in outputs and m not in qkv]
    channel_ratio = min(ratio, 1 - 1 / min(widths) - 1e-9) if widths else ratio
    # ... and removes ceil(ratio * n) heads: ask for k - 0.5 of them to get k, at most n - 1
    head_ratio = {
        lin: (min(int(ratio * n + 1e-9), n - 1) - 0.5) / n if int(ratio * n + 1e-9) else 0.0 for lin, n in heads.items()
    }
    unwrapped = [(p, p.dim() - 1) for name, p in model.named_parameters() if "." not in name]  # e.g. ViT's pos_emb
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")  # its notes on unwrapped parameters and on tracing
        pruner = tp.pruner.MetaPruner(
            model,
            batch,
            forward_fn=lambda m, b: FORWARD[task](m, b)[0],
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=channel_ratio,
            num_heads=heads,
            prune_num_heads=bool(heads),
            prune_head_dims=False,
            head_pruning_ratio_dict=head_ratio,
            ignored_layers=outputs,
            unwrapped_parameters=unwrapped,
        )
        ties = _shared_parameters(model)
        pruner.step()
    for owners in ties:  # the pruner cuts each user of a tied matrix alike but into separate copies
        (first, name), *rest = owners
        for module, other in rest:
            setattr(module, other, getattr(first, name))
    return model


def _removed(ratio: float, n: int) -> int:
    """How many of n units ``ratio`` removes: rounded down, never all of them."""
    return min(int(ratio * n + 1e-9), n - 1)


def _smallest(importance: torch.Tensor, n_removed: int) -> torch.Tensor:
    """Sorted indices of the units to keep: all but the ``n_removed`` of least importance."""
    order = torch.argsort(importance, stable=True)
    return order[n_removed:].sort().values


@torch.no_grad()
def _cut(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Keep only the ``keep`` slices of ``module.name`` along ``dim``, and the Linear's sizes true."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(old.index_select(dim, keep).clone(), old.requires_grad))
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape


def _prune_llama(model: Llama, ratio: float) -> Llama:
    """Remove ``ratio`` of each block's key/value groups, of its SwiGLU neurons and of the residual width."""
    with torch.no_grad():
        for block in model.blocks:
            _prune_groups(block.attn, ratio)
            _prune_neurons(block.mlp, ratio)
        _prune_width(model, ratio)
    return model


def _prune_groups(attn: LlamaAttention, ratio: float) -> None:
    """Whole key/value heads with the query heads they serve; with one key/value head, query heads."""
    hd = attn.head_dim
    n_kv, n_q = attn.k.out_features // hd, attn.q.out_features // hd
    group = n_q // n_kv
    # One importance per query head: its q rows and proj columns, in units of [n_kv, group] order.
    q_heads = attn.q.weight.abs().view(n_q, -1).sum(1) + attn.proj.weight.abs().view(-1, n_q, hd).sum((0, 2))
    if n_kv > 1:
        kv_heads = attn.k.weight.abs().view(n_kv, -1).sum(1) + attn.v.weight.abs().view(n_kv, -1).sum(1)
        keep_kv = _smallest(q_heads.view(n_kv, group).sum(1) + kv_heads, _removed(ratio, n_kv))
        keep_q = (keep_kv[:, None] * group + torch.arange(group)).flatten()
    else:  # multi-query: one key/value head serves every query head
        keep_kv = torch.arange(1)
        keep_q = _smallest(q_heads, _removed(ratio, n_q))
    rows = lambda heads: (heads[:, None] * hd + torch.arange(hd)).flatten()  # noqa: E731
    for lin, heads in ((attn.q, keep_q), (attn.k, keep_kv), (attn.v, keep_kv)):
        _cut(lin, "weight", 0, rows(heads))
        if lin.bias is not None:
            _cut(lin, "bias", 0, rows(heads))
    _cut(attn.proj, "weight", 1, rows(keep_q))


def _prune_neurons(mlp: SwiGLU, ratio: float) -> None:
    importance = mlp.gate.weight.abs().sum(1) + mlp.up.weight.abs().sum(1) + mlp.proj.weight.abs().sum(0)
    keep = _smallest(importance, _removed(ratio, importance.numel()))
    _cut(mlp.gate, "weight", 0, keep)
    _cut(mlp.up, "weight", 0, keep)
    _cut(mlp.proj, "weight", 1, keep)


def _prune_width(model: Llama, ratio: float) -> None:
    """The residual channels: columns of the embedding, the head and every input projection, rows of
    every output projection, entries of every RMSNorm, the same channels everywhere."""
    tied = model.lm_head.weight is model.tok_emb.weight
    inputs = [model.lm_head] if not tied else []
    outputs, norms = [], [model.norm_f]
    for block in model.blocks:
        inputs += [block.attn.q, block.attn.k, block.attn.v, block.mlp.gate, block.mlp.up]
        outputs += [block.attn.proj, block.mlp.proj]
        norms += [block.norm_1, block.norm_2]
    importance = model.tok_emb.weight.abs().sum(0) + sum(m.weight.abs().sum(0) for m in inputs)
    importance = importance + sum(m.weight.abs().sum(1) for m in outputs) + sum(m.weight.abs() for m in norms)
    keep = _smallest(importance, _removed(ratio, importance.numel()))
    _cut(model.tok_emb, "weight", 1, keep)
    for m in inputs:
        _cut(m, "weight", 1, keep)
    for m in outputs:
        _cut(m, "weight", 0, keep)
    for m in norms:
        _cut(m, "weight", 0, keep)
    if tied:
        model.lm_head.weight = model.tok_emb.weight
        model.lm_head.in_features = model.tok_emb.embedding_dim


def _shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, attribute) pairs of every parameter that more than one module holds (a tied LM head)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    return [o for o in owners.values() if len(o) > 1]


def _out_size(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return 0


def _output_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are classes or tokens: never pruned."""
    return [m for name, m in model.named_modules() if name in ("head", "head.1", "lm_head")]


class _quiet:
    """torch-pruning logs each unwrapped parameter it meets at WARNING level."""

    def __enter__(self):
        self.log = logging.getLogger("torch_pruning")
        self.level = self.log.level
        self.log.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.log.setLevel(self.level)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shrink_to_params(model: nn.Module, batch: dict, task: str, target_params: int) -> tuple[nn.Module, float]:
    """``model`` with the smallest channel ratio that leaves at most ``target_params`` parameters
    (the one ratio applied to every group), and that ratio. ``model`` itself is not changed."""
    if count_params(model) <= target_params:
        return copy.deepcopy(model), 0.0
    smallest = prune_channels(copy.deepcopy(model), batch, task, MAX_RATIO)
    if count_params(smallest) > target_params:
        raise EmberError(
            f"Structured pruning cannot bring this model to {target_params:,} parameters: removing "
            f"{MAX_RATIO:.0%} of every layer's channels still leaves {count_params(smallest):,} (the embeddings, "
            f"heads and inputs that stay). Ask for a smaller --amount, or use --method l1-unstructured or global."
        )
    low, high, best = 0.0, MAX_RATIO, smallest
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        trial = prune_channels(copy.deepcopy(model), batch, task, mid)
        if count_params(trial) <= target_params:
            high, best = mid, trial
        else:
            low = mid
    return best, high
