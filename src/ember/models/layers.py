"""Pieces shared by the model zoo: the pre-norm Transformer block, GPT-2 style
initialisation, block-wise activation checkpointing, the common model base class
(parameter count, FLOP estimate) and the checks that turn a misfit between a
model and its data into an :class:`~ember.errors.EmberError`.

The Transformer block serves three masters: GPT (causal self-attention), the ViT
and the seq2seq encoder (bidirectional self-attention, optionally with a key
padding mask) and the seq2seq decoder (causal self-attention plus
cross-attention over the encoder's output).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import Field, model_validator
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.modes import evaluating
from ember.models.zoo import check_task
from ember.schema import RecipeModel

INIT_STD = 0.02  # GPT-2's initialiser scale for Linear and Embedding weights


# --------------------------------------------------------------------------- configs and checks


def heads_problem(n_embd: int, n_head: int) -> str | None:
    """The reason n_embd cannot be split into n_head heads, or None if it can."""
    if n_embd % n_head:
        return (
            f"n_embd ({n_embd}) must be divisible by n_head ({n_head}) so that every attention "
            f"head gets n_embd / n_head channels; pick e.g. n_head={_divisor_near(n_embd, n_head)}."
        )
    return None


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


class AttentionConfigBase(RecipeModel):
    """The fields every Transformer config (gpt, seq2seq, vit, encoder) shares, and the check that
    the heads divide the width. A config may redeclare a field to change its default or wording
    (vit: a narrower n_embd); pydantic keeps the field where this base puts it."""

    # Declared first so that each config's own Literal name still leads its keys (recipe.yaml,
    # model.json); every subclass narrows it to its registered name.
    name: str
    n_head: int = Field(4, ge=1, le=1024, description="attention heads; must divide n_embd")
    n_embd: int = Field(128, ge=1, le=1 << 16, description="width of the residual stream")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on embeddings, attention and residual branches")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> AttentionConfigBase:
        problem = heads_problem(self.n_embd, self.n_head)
        if problem:
            raise ValueError(problem)
        return self


def check_heads(model: str, n_embd: int, n_head: int) -> None:
    """Build-time twin of the config validator, for configs made without validation."""
    problem = heads_problem(n_embd, n_head)
    if problem:
        raise EmberError(f"model {model}: {problem} Set model.n_head or model.n_embd in the recipe.")


def check_vocab(model: str, spec: DataSpec) -> None:
    if spec.vocab_size < 1:
        raise EmberError(
            f"model {model} needs a token vocabulary, but the data spec has vocab_size="
            f"{spec.vocab_size}. Use a token dataset (task lm or seq2seq) that reports its vocabulary."
        )


def check_decoder(model: str, cfg: Any, spec: DataSpec) -> None:
    """EmberError unless a decoder-only language model ``model`` (gpt, llama) with ``cfg`` fits ``spec``:
    lm data with a vocabulary, heads that divide the width, a context that holds the data's sequences
    and at least one embedding row per token id."""
    check_task(model, spec)
    check_vocab(model, spec)
    check_heads(model, cfg.n_embd, cfg.n_head)
    if spec.seq_len > cfg.block_size:
        raise EmberError(
            f"model {model} has block_size={cfg.block_size} but the data's sequences are "
            f"{spec.seq_len} tokens long. Set model.block_size >= {spec.seq_len} or data.seq_len "
            f"<= {cfg.block_size}."
        )
    if cfg.vocab_size and cfg.vocab_size < spec.vocab_size:
        raise EmberError(
            f"model {model} has vocab_size={cfg.vocab_size} embedding rows but the data's tokenizer has "
            f"{spec.vocab_size} tokens, so some ids would have no row. Set model.vocab_size=0 (the data's) "
            f"or at least {spec.vocab_size}."
        )


def check_classes(model: str, spec: DataSpec) -> None:
    if spec.num_classes < 1:
        raise EmberError(
            f"model {model} needs the number of classes, but the data spec has num_classes="
            f"{spec.num_classes}. Use a classification dataset that reports its classes."
        )


def refuse_tokens(model: str, spec: DataSpec) -> None:
    """EmberError when ``spec`` is labelled text (token ids), which ``model`` cannot read."""
    if spec.reads_tokens:
        raise EmberError(
            f"model {model} reads numbers (images or table rows), but the data is labelled text: rows of token "
            f"ids, which are names, not quantities. Use model.name=rnn, encoder or cnn, which embed the tokens."
        )


def check_image(model: str, spec: DataSpec) -> tuple[int, int, int]:
    """The (C, H, W) of an image classification spec, or EmberError."""
    check_task(model, spec, ("classify",))
    check_classes(model, spec)
    refuse_tokens(model, spec)
    if len(spec.input_shape) != 3 or min(spec.input_shape) < 1:
        raise EmberError(
            f"model {model} needs images of shape (C, H, W), but the data's input_shape is "
            f"{tuple(spec.input_shape)}. Use an image dataset (e.g. data.name=digits), or model rnn "
            f"for (T, F) row sequences."
        )
    c, h, w = spec.input_shape
    return c, h, w


# --------------------------------------------------------------------------- Transformer pieces


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    Self-attention when ``context`` is None, cross-attention over ``context``
    otherwise. ``mask`` is a boolean [B, 1, 1, S] key mask (True = attend).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, causal: bool) -> None:
        super().__init__()
        self.head_dim = n_embd // n_head
        self.causal = causal
        self.dropout = dropout
        # Separate q, k, v parameters (not one fused matrix): tensor parallelism splits each by
        # heads, and LoRA and head pruning address each by name. Self-attention still runs them
        # as one matmul where it can (``_projections``).
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.k = nn.Linear(n_embd, n_embd, bias=bias)
        self.v = nn.Linear(n_embd, n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)  # residual output: scaled init
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, C] -> [B, heads, T, head_dim]; under tensor parallelism this rank holds only
        # its share of the heads, hence -1.
        q, k, v = (t.view(B, t.size(1), -1, self.head_dim).transpose(1, 2) for t in self._projections(x, context))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
        )
        # SDPA's CPU kernels already lay their output out as [B, T, heads, head_dim]: no copy there.
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_drop(self.proj(y))

    def _projections(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """q(x), k(src), v(src); for self-attention through three plain Linear layers outside autocast,
        one matmul (``StackedLinear``): on a CPU three narrow matmuls and their six backward ones cost
        about 1.5x one wide one."""
        layers = (self.q, self.k, self.v)
        if (
            context is not None
            or torch.is_autocast_enabled(x.device.type)
            or not all(map(_plain_linear, layers))
            or len({m.bias is None for m in layers}) > 1
        ):
            src = x if context is None else context
            return self.q(x), self.k(src), self.v(src)
        params = [m.weight for m in layers] + ([m.bias for m in layers] if self.q.bias is not None else [])
        return StackedLinear.apply(x, *params).split([m.out_features for m in layers], dim=-1)


class StackedLinear(torch.autograd.Function):
    """``F.linear(x, cat(weights), cat(biases))`` for three (weight, bias) pairs in one matmul forward
    and two backward. The stacked weight is rebuilt in backward rather than kept, so a step holds
    no more memory than three separate Linear layers; each gradient is its own tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        weights, biases = params[:3], params[3:]
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = bool(biases)
        return F.linear(x, torch.cat(weights), torch.cat(biases) if biases else None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, *weights = ctx.saved_tensors
        sizes = [w.size(0) for w in weights]
        needs = ctx.needs_input_grad
        grad_x = grad @ torch.cat(weights) if needs[0] else None
        flat = grad.reshape(-1, grad.size(-1))
        grad_w = (flat.t() @ x.reshape(-1, x.size(-1))).split(sizes) if any(needs[1:4]) else (None,) * 3
        grad_b = flat.sum(0).split(sizes) if ctx.has_bias and any(needs[4:]) else (None,) * 3
        own = lambda gs, need: [g.clone() if g is not None and n else None for g, n in zip(gs, need)]  # noqa: E731
        return (grad_x, *own(grad_w, needs[1:4]), *(own(grad_b, needs[4:]) if ctx.has_bias else ()))


def _plain_linear(m: nn.Module) -> bool:
    """True when calling ``m`` computes exactly ``F.linear(x, m.weight, m.bias)`` on plain parameters: not
    a subclass, no hooks (LoRA adapters, pruning masks, tracers), no DTensor or quantised weights. The
    memory planner's fake parameters count as plain: it traces the path real ones take."""
    return (
        type(m) is nn.Linear
        and not (m._forward_hooks or m._forward_pre_hooks)
        and all(t is None or (isinstance(t, nn.Parameter) and type(t) in _PLAIN_PARAMETERS) for t in (m.weight, m.bias))
    )


_PLAIN_PARAMETERS = (nn.Parameter, FakeTensor)


class MLP(nn.Module):
    """``proj(gelu(fc(x)))``, 4 x wide. ``activation``: "gelu" is the exact GELU, "gelu_tanh" its tanh
    approximation (GPT-2's ``gelu_new``, kept so that imported GPT-2 weights give GPT-2's logits)."""

    def __init__(self, n_embd: int, dropout: float, bias: bool, activation: str = "gelu") -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)  # residual output: scaled init
        self.drop = nn.Dropout(dropout)
        self.approximate = "tanh" if activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x += attn(ln(x))``, [``x += cross(ln(x), memory)``], ``x += mlp(ln(x))``."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float,
        bias: bool = True,
        causal: bool = False,
        cross: bool = False,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = Attention(n_embd, n_head, dropout, bias, causal=causal)
        self.ln_cross = nn.LayerNorm(n_embd, bias=bias) if cross else None
        self.cross = Attention(n_embd, n_head, dropout, bias, causal=False) if cross else None
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias, activation)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask=mask)
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), context=memory, mask=memory_mask)
        return x + self.mlp(self.ln_2(x))


def untied_layers(model: nn.Module, kinds: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every ``kinds`` layer whose weight no other module shares: a GPT's LM
    head, tied to the token embedding, is left out (compressing it would store the matrix twice)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds) and uses.get(id(m.weight)) == 1]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated units (each ModuleList child: Transformer or residual blocks):
    FSDP's wrapping units, what pipeline stages split and tensor parallelism cuts."""
    return [b for child in model.children() if isinstance(child, nn.ModuleList) for b in child]


def key_padding_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Boolean [B, 1, 1, S] attention mask that hides ``pad_id`` keys (True = attend)."""
    keep = tokens != pad_id
    # A row of nothing but padding would softmax over no keys and give NaN; let it
    # attend everywhere instead (its output is garbage either way, but finite).
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]


def init_gpt2_(module: nn.Module) -> None:
    """GPT-2 initialisation: Linear and Embedding weights ~ N(0, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)


def scale_residual_init_(blocks: nn.Module, n_residual: int) -> None:
    """Re-draw the residual output projections (``*.proj``) with std 0.02/sqrt(n_residual).

    Each residual branch adds its output to the stream, so with ``n_residual``
    branches the stream's variance grows with their count; GPT-2 shrinks the
    branches' last layer to keep it about constant at init.
    """
    for name, m in blocks.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] == "proj":
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD / math.sqrt(n_residual))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args: Any, checkpoint: bool) -> torch.Tensor:
    """Apply ``blocks`` in order; with ``checkpoint`` each block's activations are
    recomputed in the backward pass instead of kept (memory for compute)."""
    for block in blocks:
        if not checkpoint:
            x = block(x, *args)
            continue
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if not torch.compiler.is_compiling():
            # Compiled graphs recompute only what backward needs, never buffer updates
            # (and accept no custom context_fn); eager recomputation reruns them.
            kwargs["context_fn"] = functools.partial(_recompute_keeps_buffers, block)
        # Looked up on the module each call so that tests can observe it.
        x = torch.utils.checkpoint.checkpoint(block, x, *args, **kwargs)
    return x


def _recompute_keeps_buffers(block: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), _buffers_restored(block)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """Undo the buffer updates made inside ``module``, e.g. BatchNorm's running
    averages, so that recomputing a block in the backward pass does not take each
    momentum step twice. (Switching the updates off instead would change what
    BatchNorm saves for backward, which checkpointing rejects.)"""
    saved = [b.clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved):
                b.copy_(s)


# --------------------------------------------------------------------------- model base


class ModelBase(nn.Module):
    """What every ember model offers the trainer besides ``forward``.

    ``grad_checkpointing``: when True and training, repeated blocks recompute
    their activations in the backward pass.
    ``num_params()``: unique parameters (a tied matrix counts once).
    ``flops_per_item()``: training FLOPs (forward + backward = 3 x forward, matmuls
    and convolutions only, 2 FLOPs per multiply-add) per token for lm and seq2seq
    (per target token), per sample for classify. Computed once, then cached.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing: bool = False
        self._flops: float | None = None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once

    def flops_per_item(self) -> float:
        if self._flops is None:
            self._flops = float(self._count_flops())
        return self._flops

    def _count_flops(self) -> float:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def measure_forward_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model(*inputs)`` counted by ``FlopCounterMode``.

    Runs in eval mode without grad. Attention is forced onto the math backend
    because it decomposes into counted matmuls on every device, whereas the
    fused CPU kernel is not in the counter's table.
    """
    # BatchNorm cannot normalise a single sample in train mode; each submodule back in its own mode after
    with evaluating(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def image_train_flops(model: ModelBase) -> float:
    """Training FLOPs per image of an image classifier: 3 x the counted forward of one image."""
    return 3 * measure_forward_flops(model, torch.zeros(1, *model.input_shape, device=model.device))
