"""A one-process checkpoint's weights and optimiser state: one safetensors file, no pickle, no DCP.

A run in one process has whole tensors, so its checkpoint needs none of the distributed
machinery: the state ``{"model": ..., "optimizer": {"state": ..., "param_groups": ...}}``,
keyed by parameter name exactly as ``get_state_dict`` (what the DCP format saves) keys it,
goes into ``state.safetensors``. Its tensors are stored under '/'-joined paths
(``optimizer/state/blocks.0.attn.weight/exp_avg``), tied tensors once; everything else
(``param_groups``' rates, betas and flags) is JSON in the file's metadata with each
tensor's place marked ``{"$tensor": name}``. The file is written in one pass and hashed
as it is written, so sealing it costs no second read.

Any layout reads it back (``fill``): each rank takes what it holds of each whole tensor
(its shard of a DTensor), so a checkpoint saved by one process resumes on several ranks.

Example::

    digest = write_state(path, single_process_state(model, optimizer))
    fill(target_state, read_state(path), path)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.errors import EmberError
from ember.models.stored import SAFETENSORS_DTYPES, dtype_fits

STATE = "state.safetensors"
_SKELETON = "ember_state"  # the metadata key holding the JSON skeleton


def _fqn(name: str) -> str:
    """A parameter's name as ``get_state_dict`` gives it: without torch.compile's or activation
    checkpointing's wrapper segments."""
    return ".".join(p for p in name.split(".") if p not in ("_orig_mod", "_checkpoint_wrapped_module"))


def optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimiser holds, in its ids' order (``state_dict`` numbers them so);
    a tied parameter by its first name."""
    names = {p: _fqn(name) for name, p in reversed(list(model.named_parameters()))}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def single_process_state(model: nn.Module, optimizer: torch.optim.Optimizer, skip: set[str] = frozenset()) -> dict:
    """``{"model", "optimizer"}`` as ``get_state_dict`` gives them for a plain module (optimiser state
    keyed by parameter name, not id), less the names in ``skip`` (a frozen base), without DCP."""
    model_state = {_fqn(k): v for k, v in model.state_dict().items() if _fqn(k) not in skip}
    saved = optimizer.state_dict()
    by_id = dict(enumerate(optimizer_names(model, optimizer)))
    groups = [{**g, "params": [by_id[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {
        "model": model_state,
        "optimizer": {"state": {by_id[i]: s for i, s in saved["state"].items()}, "param_groups": groups},
    }


def optimizer_state_by_id(optim_state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse for ``optimizer.load_state_dict``: parameter names back to the optimiser's ids."""
    ids = {name: i for i, name in enumerate(optimizer_names(model, optimizer))}
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in optim_state["param_groups"]]
    groups = _like([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups], groups)
    return {"state": {ids[n]: s for n, s in optim_state["state"].items()}, "param_groups": groups}


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor], seen: dict) -> Any:
    """The JSON skeleton of ``value``; its tensors go into ``tensors`` (a storage shared by two
    names, such as tied weights, once)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
            tensor.dtype,
        )
        if tensor.numel() == 0 or key not in seen:  # empty tensors share no data, whatever their pointer
            seen[key] = path
            tensors[path] = tensor
        return {"$tensor": seen[key]}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{path}/{k}" if path else str(k), tensors, seen) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]
    return value


def write_state(path: Path, state: dict) -> dict:
    """Write ``state`` to ``path`` as safetensors, fsynced; returns its ``{"bytes", "sha256"}``,
    hashed from the bytes as they were written."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors, {})
    header, offset = {"__metadata__": {_SKELETON: json.dumps(skeleton)}}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"a checkpoint tensor {name} has dtype {tensor.dtype}, which safetensors does not hold")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest, written = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(text)), text, *(_bytes(t) for t in tensors.values())):
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": written, "sha256": digest.hexdigest()}


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order on the CPU (a view where it already is one)."""
    flat = tensor.cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def bad_state_file(path: Path, why: str) -> EmberError:
    """One paragraph: the state file ``path`` cannot be used, ``why``, and what to do."""
    return EmberError(
        f"Checkpoint file {path} cannot be used: {why}. The checkpoint was not written by ember for this "
        f"model or has been altered: resume from an older checkpoint (--resume PATH), or start a new run directory."
    )


def read_state(path: Path) -> dict:
    """The state ``write_state`` wrote, tensors on the CPU (read by safetensors: no code runs)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        placed: set[str] = set()
        state = _join(json.loads(meta[_SKELETON]), tensors, path, placed)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise bad_state_file(
            path, f"it is not a checkpoint state file ({type(err).__name__}: {str(err):.300})"
        ) from None
    if set(tensors) - placed:  # ``write_state`` stores a tensor only where its index places it
        raise bad_state_file(
            path, f"it holds tensor(s) {names_of(set(tensors) - placed)} that its index places nowhere"
        )
    _check_layout(state, path)
    return state


def _check_layout(state: Any, path: Path) -> None:
    """A state file holds ``{"model": {name: tensor}, "optimizer": {"state": {...}, "param_groups": [...]}}``
    and nothing else (``single_process_state``'s keys): an entry beside them would be ignored."""
    optim = state.get("optimizer") if isinstance(state, dict) else None
    if (
        not isinstance(state, dict)
        or set(state) != {"model", "optimizer"}
        or not isinstance(state["model"], dict)
        or not isinstance(optim, dict)
        or set(optim) != {"state", "param_groups"}
        or not isinstance(optim["state"], dict)
        or not isinstance(optim["param_groups"], list)
    ):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        inner = f" (optimizer: {sorted(optim)})" if isinstance(optim, dict) else ""
        raise bad_state_file(
            path,
            f"its index holds {have}{inner}, where ember writes exactly a model and an optimiser state and param groups",
        )


def names_of(names: set[str], shown: int = 5) -> str:
    """Up to ``shown`` names, sorted, and how many more."""
    listed = ", ".join(repr(n)[:120] for n in sorted(names)[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def tensor_names(path: Path) -> set[str]:
    """Where the file's state holds a tensor, as '.'-joined paths (``model.wte.weight``; tied ones
    under each name), read from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        skeleton = json.loads((f.metadata() or {})[_SKELETON])
    names: set[str] = set()

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict) and set(node) == {"$tensor"}:
            names.add(where)
        elif isinstance(node, (dict, list)):
            for k, v in node.items() if isinstance(node, dict) else enumerate(node):
                walk(v, f"{where}.{k}" if where else str(k))

    walk(skeleton, "")
    return names


def _join(node: Any, tensors: dict[str, torch.Tensor], path: Path, placed: set[str]) -> Any:
    """The state of the skeleton ``node``, each ``{"$tensor": name}`` replaced by that tensor; ``placed``
    collects the names used."""
    if isinstance(node, dict) and set(node) == {"$tensor"}:
        if not isinstance(node["$tensor"], str) or node["$tensor"] not in tensors:
            raise bad_state_file(path, f"its index names a tensor {node['$tensor']!r:.100} the file does not hold")
        placed.add(node["$tensor"])
        return tensors[node["$tensor"]]
    if isinstance(node, dict):
        return {k: _join(v, tensors, path, placed) for k, v in node.items()}
    if isinstance(node, list):
        return [_join(v, tensors, path, placed) for v in node]
    return node


def fill(target: dict, saved: dict, path: Path, where: str = "") -> None:
    """Copy ``saved``'s values into ``target`` (a state as this run's layout holds it) in place:
    each tensor into the tensor of the same name (a DTensor gets its own shard of the whole
    one), each other value over the target's (a tuple stays a tuple). Every tensor the target
    holds must be in ``saved``, with its shape, and ``saved`` may hold nothing else (it would be ignored)."""
    extra = set(saved) - set(target)
    if extra:
        names = {f"{where}/{k}".lstrip("/") for k in extra}
        raise bad_state_file(path, f"it holds {names_of(names)}, which this model and optimiser do not have")
    for key, want in target.items():
        name = f"{where}/{key}"
        if key not in saved:
            raise bad_state_file(path, f"it holds no {name.lstrip('/')!r}, which this model has")
        got = saved[key]
        if isinstance(want, dict) and isinstance(got, dict):
            fill(want, got, path, name)
        elif isinstance(want, torch.Tensor):
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise bad_state_file(path, f"{name.lstrip('/')!r} is {shape}, this model's is {tuple(want.shape)}")
            if not dtype_fits(want.dtype, got.dtype):
                raise bad_state_file(
                    path, f"{name.lstrip('/')!r} is {got.dtype}, which cannot stand for this model's {want.dtype}"
                )
            _copy_into(want, got)
        else:
            target[key] = _like(want, got)


def _like(want: Any, got: Any) -> Any:
    """A saved non-tensor value in the target's container types (JSON keeps tuples as lists)."""
    if isinstance(got, dict) and isinstance(want, dict):
        return {k: _like(want.get(k), v) for k, v in got.items()}
    if isinstance(got, list) and isinstance(want, (list, tuple)) and len(got) == len(want):
        return type(want)(_like(w, g) for w, g in zip(want, got))
    return got


@torch.no_grad()
def _copy_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    mesh = getattr(target, "device_mesh", None)  # a DTensor: this rank keeps its own part
    if mesh is None:
        target.copy_(whole)
        return
    from torch.distributed.tensor import distribute_tensor

    local = target.to_local()
    # Every rank holds the whole tensor: each cuts its own part, no rank sends anything.
    part = distribute_tensor(whole.to(local.device), mesh, target.placements, src_data_rank=None)
    local.copy_(part.to_local())
