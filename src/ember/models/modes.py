"""A module put in eval mode for a while, then every submodule back in its own mode.

``model.train(was_training)`` after an evaluation sets every submodule to the top module's
mode: a frozen backbone its user put in eval mode (batch-norm statistics kept, dropout off)
would train in train mode from the first validation on. ``evaluating`` records each
submodule's mode and puts each back.

Example::

    with evaluating(model):
        logits = model(batch)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; each submodule's own mode again after it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def eval_mode_modules(model: nn.Module) -> list[str]:
    """The names of ``model``'s outermost submodules in eval mode (``[""]``: the module itself); what
    such a submodule holds is not named again."""
    outermost: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(outer + ".") or not outer for outer in outermost)
        if not module.training and not inside:
            outermost.append(name)
    return outermost
