"""Gradient norms and clipping for models whose parameters may be DTensors (FSDP, tensor parallel).

DTensors are recognised by their ``device_mesh`` rather than by class, so a plain
single-process run never imports ``torch.distributed.tensor`` (about 0.6 s).

Example::

    norm = grad_norm_(model.parameters(), max_norm=1.0)   # clipped; the norm before clipping
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _mesh(t: torch.Tensor):
    return getattr(t, "device_mesh", None)  # a DTensor's mesh; None for a plain tensor


def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type`` norm of all gradients together, DTensor ones counted in full.

    Equals ``torch.nn.utils.get_total_norm`` of the unsharded model's gradients, on every rank.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        if _mesh(g) is not None:
            by_mesh.setdefault(_mesh(g), []).append(g)
    plain = [g for g in grads if _mesh(g) is None]
    # A norm of norms is the norm of everything (for any p, and for inf), so each kind is
    # reduced on its own; full_tensor() completes a DTensor norm's cross-shard reduction.
    parts = [torch.nn.utils.get_total_norm(plain, norm_type)] if plain else []
    for sharded in by_mesh.values():
        part = torch.nn.utils.get_total_norm(sharded, norm_type)
        parts.append(part.full_tensor() if _mesh(part) is not None else part)
    if not parts:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(parts, norm_type)


def grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0, foreach: bool | None = None
) -> torch.Tensor:
    """``clip_grad_norm_`` for a model holding both DTensor and plain parameters.

    Scales all gradients by ``min(1, max_norm / total_norm)`` and returns the total norm
    before clipping (a plain tensor, the same on every rank), as torch's version does.
    """
    params = [p for p in parameters if p.grad is not None]
    total = total_grad_norm(params, norm_type)
    # Clipped kind by kind (plain, then DTensors mesh by mesh): the foreach path refuses a
    # list mixing them, and under fsdp+tp block weights live on the 2-D mesh, the rest on dp's.
    kinds: dict[object, list[torch.Tensor]] = {}
    for p in params:
        kinds.setdefault(_mesh(p), []).append(p)
    for kind in kinds.values():
        torch.nn.utils.clip_grads_with_norm_(kind, max_norm, total, foreach=foreach)
    return total
