"""Llama: the decoder-only language model of Llama 2/3, Mistral and Qwen2 (task ``lm``).

Against ``gpt`` it changes the pieces those models changed: rotary position embeddings
(RoPE, with ``rope_theta`` and optional ``linear`` or ``llama3`` frequency scaling) instead of
learned positions, RMSNorm instead of LayerNorm, a SwiGLU MLP, grouped-query attention
(``n_kv_head`` key/value heads shared by groups of query heads), no biases (except Qwen2's on
q, k, v), an untied LM head by default and, for Mistral, an optional sliding attention window.
``model(x: Long[B, T]) -> logits Float[B, T, vocab_size]``, T <= block_size.

The numerics are those of Hugging Face transformers' ``LlamaForCausalLM``,
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` for the same weights (``tests/test_llama.py``
checks the logits to 1e-5 in fp32): RoPE in the rotate-half convention with the inverse
frequencies of ``transformers.modeling_rope_utils``, RMSNorm computed in fp32. The parameter
names below are a fixed interface (Hugging Face import maps checkpoints onto them)::

    tok_emb                      Embedding(V, C)
    blocks.i.norm_1 / norm_2     RMSNorm(C)
    blocks.i.attn.q, k, v, proj  Linear(C, H*hd), Linear(C, KV*hd) x2, Linear(H*hd, C)
    blocks.i.mlp.gate, up, proj  Linear(C, F) x2, Linear(F, C): proj(silu(gate(x)) * up(x))
    norm_f                       RMSNorm(C)
    lm_head                      Linear(C, V), tied to tok_emb when tie_weights
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.layers import (
    AttentionConfigBase,
    ModelBase,
    check_decoder,
    init_gpt2_,
    run_blocks,
    scale_residual_init_,
)
from ember.models.zoo import register_model
from ember.schema import RecipeModel

SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)  # scaled_dot_product_attention(enable_gqa=)


class RopeScaling(RecipeModel):
    """RoPE frequency scaling for a context longer than the one pre-trained on, as transformers
    computes it: ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1) divides
    only the low frequencies, keeps the high ones and interpolates in between."""

    type: Literal["linear", "llama3"]
    factor: float = Field(gt=0, description="how many times longer the context is")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3: wavelengths above original/this are scaled")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3: wavelengths below original/this are kept")
    original_max_position_embeddings: int = Field(8192, ge=1, description="llama3: the pre-trained context")

    @model_validator(mode="after")
    def _band(self) -> RopeScaling:
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"llama3 rope scaling needs high_freq_factor ({self.high_freq_factor}) > low_freq_factor "
                f"({self.low_freq_factor}): the two bound the band of frequencies that is interpolated"
            )
        return self


class LlamaConfig(AttentionConfigBase):
    name: Literal["llama"] = "llama"
    n_layer: int = Field(4, ge=1, le=512, description="Transformer blocks")
    n_kv_head: int = Field(0, ge=0, le=1024, description="key/value heads (grouped-query); 0 = n_head")
    head_dim: int = Field(0, ge=0, le=1024, description="channels per head; 0 = n_embd // n_head")
    ffn_hidden: int = Field(0, ge=0, le=1 << 20, description="SwiGLU hidden width; 0 = 8/3 n_embd up to x64")
    block_size: int = Field(256, ge=1, le=1 << 20, description="longest context in tokens")
    rope_theta: float = Field(10000.0, gt=1.0, description="RoPE base wavelength")
    rope_scaling: RopeScaling | None = Field(None, description="RoPE frequency scaling (linear or llama3)")
    norm_eps: float = Field(1e-5, gt=0, lt=1, description="RMSNorm epsilon")
    qkv_bias: bool = Field(False, description="biases on q, k, v (Qwen2)")
    tie_weights: bool = Field(False, description="the LM head reuses the token embedding matrix")
    sliding_window: int = Field(0, ge=0, description="attend to at most this many tokens (Mistral); 0 = all")
    vocab_size: int = Field(0, ge=0, description="embedding rows; 0 = the data's, else at least the data's")

    @model_validator(mode="after")
    def _kv_heads_divide_heads(self) -> LlamaConfig:
        problem = kv_heads_problem(self.n_head, self.n_kv_head)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_channels(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def ffn_width(self) -> int:
        """SwiGLU's hidden width: ``ffn_hidden``, else Llama's rule, 2/3 of 4 n_embd up to a multiple of 64."""
        return self.ffn_hidden or 64 * math.ceil(int(8 * self.n_embd / 3) / 64)


def kv_heads_problem(n_head: int, n_kv_head: int) -> str | None:
    """Why ``n_kv_head`` key/value heads cannot serve ``n_head`` query heads, or None."""
    if n_kv_head and n_head % n_kv_head:
        return (
            f"n_kv_head ({n_kv_head}) must divide n_head ({n_head}): each key/value head serves an equal "
            f"group of query heads; set model.n_kv_head to a divisor of {n_head} (0 = n_head)"
        )
    return None


# --------------------------------------------------------------------------- pieces


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32 and cast back, as Llama's."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2] in fp32, as ``transformers.modeling_rope_utils``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def sliding_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, T] mask (True = attend): causal, and each query sees at most ``window`` keys (itself included)."""
    i = torch.arange(t, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE, through ``F.scaled_dot_product_attention``.

    The head counts are not stored: q holds ``q.out_features / head_dim`` heads and k, v
    ``k.out_features / head_dim``, so that under tensor parallelism a rank holding a share
    of each reshapes with ``-1``.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        c, hd = cfg.n_embd, cfg.head_channels
        self.head_dim = hd
        self.dropout = cfg.dropout
        self.sliding_window = cfg.sliding_window
        self.q = nn.Linear(c, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(c, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(c, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * hd, c, bias=False)  # residual output: scaled init
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        windowed = 0 < self.sliding_window < T
        # Grouped-query: each kv head serves `group` consecutive query heads.
        group, gqa = q.size(1) // k.size(1), {}
        if group > 1 and SDPA_GQA:
            gqa = {"enable_gqa": True}
        elif group > 1:  # torch < 2.5: expand the kv heads by hand
            k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=sliding_mask(T, self.sliding_window, x.device) if windowed else None,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=not windowed,
            **gqa,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_drop(self.proj(y))


class SwiGLU(nn.Module):
    def __init__(self, n_embd: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=False)
        self.up = nn.Linear(n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden, n_embd, bias=False)  # residual output: scaled init
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.silu(self.gate(x)) * self.up(x)))


class LlamaBlock(nn.Module):
    """Pre-norm block: ``x += attn(norm_1(x))``, ``x += mlp(norm_2(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.norm_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.n_embd, cfg.ffn_width, cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin)
        return x + self.mlp(self.norm_2(x))


# --------------------------------------------------------------------------- the model


class Llama(ModelBase):
    def __init__(self, cfg: LlamaConfig, vocab_size: int, train_len: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.train_len = train_len or cfg.block_size  # context the FLOP estimate assumes
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        init_gpt2_(self)
        scale_residual_init_(self.blocks, 2 * cfg.n_layer)  # attention and MLP per block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = embed_tokens(self, x)
        cos, sin = rope_tables(self.cfg, x.size(1), x.device)
        h = run_blocks(self.blocks, h, cos, sin, checkpoint=self.grad_checkpointing and self.training)
        return self.lm_head(self.norm_f(h))

    def non_embedding_params(self) -> int:
        """Parameters that do matmul work per token: the blocks, the final norm and the LM head."""
        blocks = sum(p.numel() for p in self.blocks.parameters())
        return blocks + self.norm_f.weight.numel() + self.lm_head.weight.numel()

    def flops_per_item(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, gpt's estimate (``ember.models.gpt``): 6 N + 12 L (H hd) T.

        The attention term counts QK^T and AV over all n_head query heads (grouped-query
        attention shares keys and values, not that work), over the full T x T square.
        """
        t = self.train_len if seq_len is None else seq_len
        return float(
            6 * self.non_embedding_params() + 12 * len(self.blocks) * self.cfg.n_head * self.cfg.head_channels * t
        )


def embed_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Token embeddings (with dropout) by ``model``'s ``tok_emb`` and ``drop``: a Llama's, or
    its first pipeline stage's; refuses a sequence longer than ``model.block_size``."""
    if x.size(1) > model.block_size:
        raise EmberError(
            f"Llama got a sequence of {x.size(1)} tokens but its context (model.block_size) is "
            f"{model.block_size}. Feed at most block_size tokens (crop the context), or train a "
            f"model with a larger block_size."
        )
    return model.drop(model.tok_emb(x))


def rope_tables(cfg: LlamaConfig, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] of positions 0..T-1, in fp32.

    Computed each forward (a few thousand numbers) rather than kept as buffers, so that they
    are right whatever the model was built on (meta, fake tensors) or cast to."""
    inv_freq = rope_inv_freq(cfg.head_channels, cfg.rope_theta, cfg.rope_scaling, device)
    freqs = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@register_model("llama", LlamaConfig, tasks=("lm",))
def build(cfg: LlamaConfig, spec: DataSpec) -> Llama:
    """A Llama for ``spec``'s vocabulary (or ``cfg.vocab_size`` rows, at least as many)."""
    check_decoder("llama", cfg, spec)
    problem = kv_heads_problem(cfg.n_head, cfg.n_kv_head)
    if problem:
        raise EmberError(f"model llama: {problem}.")
    return Llama(cfg, cfg.vocab_size or spec.vocab_size, spec.seq_len or None)
