"""The training step's speed choices keep its maths: the fused CPU AdamW equals torch's per-tensor
loop, and the overhead benchmark's three sides train the same model (parameters and logits)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ember.config import OptimConfig
from ember.data.spec import DataSpec
from ember.models.gpt import GPTConfig
from ember.models.registry import build_model
from ember.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def gpt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, activation="gelu_tanh")
    return build_model(cfg, DataSpec(task="lm", vocab_size=64, seq_len=16))


@pytest.mark.parametrize("name, fused", [("adamw", True), ("adam", True), ("sgd", None)])
def test_adam_and_adamw_take_the_fused_kernel_on_the_cpu(name, fused):
    opt = build_optimizer(gpt(), OptimConfig(name=name, lr=1e-3, weight_decay=0.1))
    assert opt.defaults.get("fused") is fused


def test_fused_adamw_steps_equal_the_per_tensor_loop():
    fused_model, loop_model = gpt(), gpt()
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    fused = build_optimizer(fused_model, cfg)
    loop = build_optimizer(loop_model, cfg)
    for group in loop.param_groups:  # what build_optimizer gave before: torch's default kernel
        group["fused"], group["foreach"] = None, False
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(5):  # both take the same gradients: the kernels alone are compared
        torch.nn.functional.cross_entropy(fused_model(x).flatten(0, 1), x.flatten()).backward()
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            b.grad = a.grad.clone()
        fused.step(), loop.step()
        fused.zero_grad(set_to_none=True), loop.zero_grad(set_to_none=True)
    moved = max((a - b).abs().max().item() for a, b in zip(fused_model.parameters(), gpt().parameters()))
    apart = max((a - b).abs().max().item() for a, b in zip(fused_model.parameters(), loop_model.parameters()))
    assert moved > 1e-2  # five steps at lr 1e-2 moved the weights ...
    assert apart < 1e-6  # ... and both kernels moved them alike


def load_overhead():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # imports transformers (about 10 s on 2 busy cores)
def test_the_hf_side_of_the_overhead_benchmark_is_ember_s_model():
    pytest.importorskip("transformers")
    from ember.config import load_recipe

    overhead = load_overhead()
    recipe = load_recipe(
        ROOT / "recipes" / "gpt-tiny.yaml",
        [*overhead.SHAPES["tiny"], "model.n_layer=2", "model.n_embd=32", "model.n_head=2"],
    )
    ember = build_model(recipe.model, DataSpec(task="lm", vocab_size=2048, seq_len=128)).eval()
    hf = overhead.hf_model(recipe, ember).eval()
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ember.parameters())
    x = torch.randint(0, 2048, (2, 128))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ember(x), rtol=1e-4, atol=1e-4)


def test_stacked_q_k_v_equal_three_linear_layers():
    """One matmul for q, k and v gives the outputs and gradients of the three layers called one by one
    (a no-op hook on q makes the attention call them separately), each gradient its own tensor."""
    from ember.models.layers import Attention

    torch.manual_seed(0)
    attention = Attention(48, 4, dropout=0.0, bias=True, causal=True)
    x = torch.randn(3, 10, 48)
    runs = []
    for separate in (False, True):
        hook = attention.q.register_forward_hook(lambda *args: None) if separate else None
        xi = x.clone().requires_grad_()
        out = attention(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs.append((out.detach(), xi.grad, {n: p.grad for n, p in attention.named_parameters()}))
        attention.zero_grad(set_to_none=True)
        if hook:
            hook.remove()
    q = attention._projections(x.clone().requires_grad_(), None)[0]
    assert type(q.grad_fn.next_functions[0][0]).__name__ == "StackedLinearBackward"  # the one-matmul path ran
    (fused_out, fused_dx, fused_grads), (out, dx, grads) = runs
    torch.testing.assert_close(fused_out, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_dx, dx, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == grads.keys() and len(grads) == 8  # q, k, v, proj: weight and bias
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-5, atol=1e-6)
    storages = {fused_grads[f"{p}.weight"].untyped_storage().data_ptr() for p in "qkv"}
    assert len(storages) == 3  # not views of one buffer: an optimiser or a planner sees three tensors
