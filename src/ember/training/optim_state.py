"""Which state entries an optimiser keeps for each parameter, found without touching it.

Optimisers create their per-parameter state lazily, at the first step (Adam's ``step``, ``exp_avg``,
``exp_avg_sq``, and ``max_exp_avg_sq`` with amsgrad; SGD's ``momentum_buffer`` with momentum), so a
fresh optimiser holds nothing to compare a checkpoint with. ``first_step_entries`` steps a copy of the
optimiser once over a meta-device stand-in of each kind of parameter (its shape, dtype and group: no
memory, no arithmetic; a zero CPU tensor for an optimiser that reads values), with its param groups'
settings as they are (a checkpoint's, once loaded): what that step creates for a parameter is exactly what
a checkpoint of this optimiser may hold for it.

Example::

    optimizer.load_state_dict(saved)
    expected = first_step_entries(optimizer)  # [{"step", "exp_avg", "exp_avg_sq"}, ...] in parameter order
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)

# Settings of torch's optimisers that choose a kernel, never the state it keeps: the probe takes the plain
# one-tensor-at-a-time kernel, the one every kernel agrees with and the meta device runs.
_PLAIN_KERNEL = {"foreach": False, "fused": False, "capturable": False, "differentiable": False}
# Attributes of the optimiser the probe does not share: its state and parameters, and what a scaler or a
# scheduler set on this instance (a scheduler wraps ``step`` on the instance itself).
_NOT_SHARED = {"state", "param_groups", "grad_scale", "found_inf"}


def first_step_entries(optimizer: torch.optim.Optimizer) -> list[set[str]] | None:
    """For each parameter of ``optimizer``, in param-group order, the names of the state entries its first
    step creates (an empty set for a stateless one, such as SGD without momentum); None when a copy of
    this optimiser cannot step at all (one that needs a closure), and so cannot tell.

    An optimiser keeps state per parameter, by its shape, dtype and group: one probe per distinct kind."""
    entries: dict[tuple, set[str] | None] = {}
    found = []
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            kind = (index, tuple(param.shape), param.dtype)
            if kind not in entries:
                entries[kind] = _probe(optimizer, group, param)
            if entries[kind] is None:
                return None
            found.append(entries[kind])
    return found


def _probe(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> set[str] | None:
    """The entries one step of a copy of ``optimizer`` creates for a stand-in of ``param`` in ``group``: on
    the meta device, or, for an optimiser that reads values (Adafactor: ``.item()``), a zero CPU tensor."""
    for device in ("meta", "cpu"):
        stand_in = torch.nn.Parameter(torch.zeros(param.shape, dtype=param.dtype, device=device))
        stand_in.grad = torch.zeros_like(stand_in)
        plain = {k: v for k, v in _PLAIN_KERNEL.items() if k in group}
        probe = object.__new__(type(optimizer))
        probe.__dict__.update({k: v for k, v in vars(optimizer).items() if k not in _NOT_SHARED and not callable(v)})
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                # Fresh state and hooks; then the class's step, never a wrapper set on the instance.
                torch.optim.Optimizer.__init__(
                    probe, [{**group, "params": [stand_in], **plain}], dict(optimizer.defaults)
                )
                type(probe).step(probe)
        except Exception as err:  # noqa: BLE001 (any optimiser; one that cannot step is not checked)
            logger.debug("%s cannot step on %s stand-ins: %s", type(optimizer).__name__, device, err)
            continue
        return set(probe.state.get(stand_in, {}))
    return None
