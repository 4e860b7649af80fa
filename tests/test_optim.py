"""Optimisers: weight decay only on weights that should decay; L1 as an explicit penalty."""

import pytest
import torch

from ember.config import OptimConfig
from ember.data.spec import DataSpec
from ember.models.cnn import CNNConfig
from ember.models.gpt import GPTConfig
from ember.models.registry import build_model
from ember.training.optim import build_optimizer, l1_penalty, split_decay


@pytest.mark.parametrize(
    "cfg, spec",
    [
        (
            GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True),
            DataSpec(task="lm", vocab_size=50, seq_len=8),
        ),
        (CNNConfig(width=4, depth=1), DataSpec(task="classify", num_classes=3, input_shape=(1, 8, 8))),
    ],
)
def test_no_decay_on_biases_and_norms(cfg, spec):
    model = build_model(cfg, spec)
    decay, no_decay = split_decay(model)
    norms = {
        id(p)
        for m in model.modules()
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))
        for p in m.parameters()
    }
    assert norms and norms <= {id(p) for p in no_decay}
    assert all(p.ndim >= 2 for p in decay) and all(p.ndim < 2 or id(p) in norms for p in no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))  # tied weights once, nothing lost
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, weight_decay=0.5, nesterov=True))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert opt.param_groups[0]["nesterov"] is True


def test_l1_penalty_is_the_sum_of_absolute_values():
    a, b = torch.nn.Parameter(torch.tensor([[1.0, -2.0]])), torch.nn.Parameter(torch.tensor([[-3.0]]))
    assert l1_penalty([a, b]).item() == 6.0
