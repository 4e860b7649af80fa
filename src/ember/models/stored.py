"""Reading weights in the shapes and formats ember writes, so a model can be rebuilt from a run
directory without the commands that wrote it:

- structurally pruned widths (``ember prune --method structured``): the layers' widths are not
  in model.json; the weights file holds them. ``resize_to_stored`` cuts a freshly built model to
  the shapes of a safetensors file before its weights are loaded — no pickle, no module objects.
- int8 (``ember quantize``): ``load_quantized`` quantises the freshly built float model the way
  model.json's ``quantization`` entry says (torchao), then copies the stored ``NAME.qdata``,
  ``NAME.scale``... tensors into it. ``quantize_model`` and ``quantized_state`` are the halves
  ``ember quantize`` shares with it.

torchao is imported only when a quantised model is built or loaded (it is slow to import).

Example::

    resize_to_stored(build_model(cfg, spec), Path("runs/cnn-pruned/model.safetensors"))
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ember.errors import EmberError
from ember.extras import require
from ember.models.layers import untied_layers

# safetensors' names of the dtypes ember stores (its header's "dtype"), both ways.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_STORED_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_fits(want: torch.dtype, got: torch.dtype | None) -> bool:
    """Whether a stored tensor of dtype ``got`` may be copied into a tensor of dtype ``want``: a float
    into a float (any width), an integer into an integer, a bool into a bool; never a complex, a
    float8/float4 or another kind, which a copy would silently mangle or refuse with a traceback."""
    if got is None:
        return False
    if want in _FLOATS:
        return got in _FLOATS
    if want == torch.bool or got == torch.bool:
        return want == got
    if not want.is_floating_point and not want.is_complex:
        return not got.is_floating_point and not got.is_complex
    return want == got


def check_stored(model: nn.Module, weights: Path) -> None:
    """EmberError naming ``weights`` when a tensor it holds has another shape than ``model``'s of that
    name, or a dtype that cannot stand for it (see ``dtype_fits``); read from the header alone."""
    from safetensors import safe_open

    own = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        stored = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys() if k in own}
    wrong = [
        f"{k} is {dtype} {list(shape)}, the model's {str(own[k].dtype).removeprefix('torch.')} {list(own[k].shape)}"
        for k, (shape, dtype) in sorted(stored.items())
        if shape != tuple(own[k].shape) or not dtype_fits(own[k].dtype, _STORED_DTYPES.get(dtype))
    ]
    if wrong:
        raise EmberError(
            f"{weights} does not fit the model model.json describes ({'; '.join(wrong[:3])}); it was not "
            f"written by ember for this run or has been altered. Re-run the command that wrote "
            f"{weights.parent}, or point at another run."
        )


def resize_to_stored(model: nn.Module, weights: Path) -> nn.Module:
    """Cut a freshly built ``model``'s tensors to the (smaller) shapes stored in ``weights``, in place,
    keeping tied parameters tied and the layers' size attributes true; the values are loaded after."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    slots = [
        (module, tensors, name, t, f"{module_name}.{name}".lstrip("."))
        for module_name, module in model.named_modules()
        for tensors in (module._parameters, module._buffers)
        for name, t in tensors.items()
        if t is not None
    ]
    # a tied tensor is stored once; a quantised weight as KEY.qdata, of the weight's shape
    shapes = {
        id(t): stored.get(key, stored.get(f"{key}.qdata"))
        for _, _, _, t, key in slots
        if key in stored or f"{key}.qdata" in stored
    }
    replaced: dict[int, torch.Tensor] = {}
    for _module, tensors, name, t, key in slots:
        if id(t) not in shapes:
            continue
        if id(t) not in replaced:
            shape = shapes[id(t)]
            if len(shape) != t.dim() or any(s > n for s, n in zip(shape, t.shape)):
                raise EmberError(
                    f"{weights}: tensor {key} has shape {list(shape)}, which a pruned "
                    f"{list(t.shape)} tensor cannot have; the run directory is inconsistent."
                )
            new = torch.empty(shape, dtype=t.dtype, device=t.device)
            replaced[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
        tensors[name] = replaced[id(t)]
    for module in model.modules():
        _fix_sizes(module)
    return model


def _fix_sizes(module: nn.Module) -> None:
    """The size attributes a layer reads in forward (LayerNorm) or shows in repr, from its weight."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = w.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(w.shape)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = w.shape


def _torchao():
    """Import torchao quietly: on a CPU machine it warns about its CUDA-only kernels."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        require("torchao.quantization", "compress", "Int8 quantisation (ember quantize, and loading a quantised run)")
        import torchao
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return torchao


def quantize_model(
    model: nn.Module, method: str, reduce_range: bool | None = None, layers: list[str] | None = None
) -> dict:
    """Quantise ``model``'s ``layers`` (default: its untied Linear layers) in place; return the
    ``quantization`` entry that rebuilds it."""
    torchao = _torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    from torchao.utils import should_reduce_range

    if reduce_range is None:  # int8 products overflow int16 sums on CPUs without VNNI; the choice is stored
        reduce_range = method == "int8-dynamic" and should_reduce_range(torch.device("cpu"))
    config = (
        Int8DynamicActivationInt8WeightConfig(set_inductor_config=False, reduce_range=reduce_range)
        if method == "int8-dynamic"
        else Int8WeightOnlyConfig(set_inductor_config=False)
    )
    if layers is None:
        layers = [name for name, m in untied_layers(model, (nn.Linear,)) if type(m) is nn.Linear]
    chosen = set(layers)
    quantize_(model, config, filter_fn=lambda m, name: name in chosen)
    return {"library": "torchao", "version": torchao.__version__, "reduce_range": reduce_range, "layers": layers}


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of ``model``, sharing its memory: a tensor subclass (torchao's int8
    weight) as its plain parts ``NAME.qdata``, ``NAME.scale``...; a tied tensor once."""
    state, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if hasattr(t, "__tensor_flatten__"):
            for part in t.__tensor_flatten__()[0]:
                state[f"{name}.{part}"] = getattr(t, part).detach()
        else:
            state[name] = t.detach()
    return state


def load_quantized(model: nn.Module, entry: dict, weights: Path, device: str = "cpu") -> nn.Module:
    """Quantise the freshly built float ``model`` as ``entry`` says, then copy ``weights`` into it."""
    import safetensors.torch

    quantize_model(model, entry["method"], entry.get("reduce_range", False), entry["layers"])
    stored = safetensors.torch.load_file(str(weights))
    state = quantized_state(model)
    same = {
        k for k in set(state) & set(stored) if (state[k].shape, state[k].dtype) == (stored[k].shape, stored[k].dtype)
    }
    wrong = sorted((set(state) | set(stored)) - same)
    if wrong:
        raise EmberError(
            f"{weights} does not match the {entry['method']} model that model.json describes "
            f"(tensors {wrong[:5]} differ); the run directory is inconsistent: quantise the source run again."
        )
    with torch.no_grad():
        for k, t in state.items():
            t.copy_(stored[k])
    return model.to(device)
