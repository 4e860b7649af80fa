"""``ember export RUN --format onnx --out DIR``: a classifier run (cnn, vit, rnn, mlp, encoder) as an ONNX
graph, checked with onnxruntime against the PyTorch model before it is kept (invariant 11).

DIR gets ``model.onnx`` (one input, dynamic batch axis; token inputs also a dynamic length axis),
``model.onnx.json`` (the input and output, the class names, what to do to raw inputs, the check made)
and, for labelled text, the run's ``tokenizer.json``. What the graph takes:

- images (cnn, vit, mlp on images) and row sequences (rnn on digits-rows): the raw pixels as the data
  was prepared (uint8 0-255, or float32 arrays), normalised inside the graph exactly as training's
  validation transform does (``/ 255`` for uint8, then ``(x - mean) / std`` with the data's statistics);
- tables (mlp): the encoded feature row (``ember.data.tables.encode`` by the column recipes copied
  into model.onnx.json: numbers standardised, categories one-hot or an index);
- labelled text (cnn, rnn, encoder): token ids from tokenizer.json, each row a text followed by the
  pad id. The rnn packs each text to its length in PyTorch; ``pack_padded_sequence`` has no ONNX form,
  so its graph is ``MaskedTextRNN``, the same computation masked: each layer and direction runs over
  the padded rows, the backward direction over each text reversed within its own length, and the
  state after each text's last token is read; padding changes nothing, as in PyTorch.

A run trained with LoRA adapters is exported with ``merge`` (``--merge``): the adapters folded into its
weights (``ember.plugins.lora.merge_adapters``), the graph checked against the run as trained.

Every model is exported by the dynamo exporter (``torch.onnx.export(dynamo=True)``, torch's default),
chosen by measurement: on each kind above (tiny models, batches of 3 and 5) both exporters match PyTorch
to 1.2e-7 in onnxruntime, the masked rnn included; the TorchScript one (``dynamo=False``) exports faster
(0.1-1.5 s against 1-7 s on 2 busy cores) but fails on the packed rnn as it is
(``aten::_pack_padded_sequence``). Exactness being equal, torch's default serves every kind: one path.

Example::

    result = export_onnx(Path("runs/cnn-digits"), Path("exports/cnn-digits"))
    print(result.max_abs_diff)  # e.g. 3.7e-08
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ember.atomic import atomic_path, write_json_atomic
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.interop.result import ExportResult
from ember.runs import load_trained_model, read_model_info

OPSET = 18  # onnxruntime 1.32 runs opsets up to 23; 18 is the dynamo exporter's own default
TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| accepted on any output
EXTRA = "pip install 'ember[onnx]'"
CHECK_BATCHES = (3, 5)  # two batch sizes: the second proves the batch axis dynamic


@dataclass
class OnnxGraph:
    """What to export for one run and how to check it.

    ``module``: the exported module (the model, with any preprocessing the graph holds);
    ``reference``: ember's own pipeline on the same raw input (what the graph must equal);
    ``sample``: a valid batch of ``n`` raw inputs (token inputs: of the length given);
    ``input``/``output``: their description for model.onnx.json; ``dynamic``: the input's dynamic axes."""

    module: nn.Module
    reference: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[int, int, torch.Generator], torch.Tensor]
    input: dict
    output: dict
    dynamic: dict[int, torch.export.Dim]
    length: int = 0  # token inputs: the training length (the second check uses a shorter one)
    meta: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # name in DIR -> file to copy there
    notes: tuple[str, ...] = ()  # what ember export prints besides the check


def export_onnx(run_dir: Path, out: Path, merge: bool = False) -> ExportResult:
    """Write ``run_dir``'s classifier to ``out``/model.onnx with its model.onnx.json, and check it
    with onnxruntime against PyTorch on two batch sizes (max abs difference <= 1e-4, else an EmberError).
    ``merge``: a run with LoRA adapters is written with them folded into its weights (required for one)."""
    _require_exporter()
    info = read_model_info(run_dir)
    _refuse_unexportable(run_dir, info, merge)
    model, info = load_trained_model(run_dir)
    graph = onnx_graph(model, info, run_dir)
    if "lora" in info:  # the graph holds the merged weights; it is checked against the run as trained
        from ember.plugins.lora import merge_adapters

        graph.module = onnx_graph(merge_adapters(load_trained_model(run_dir)[0]), info, run_dir).module
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.onnx") as tmp:
        _export(graph, tmp)
        check, diff = check_graph(tmp, graph)  # a graph that differs is never moved into place
    for name, source in graph.files.items():
        shutil.copyfile(source, out / name)
    meta = {
        "format": "onnx",
        "opset": OPSET,
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "run": str(run_dir),
        "model": info["model"]["name"],
        "task": info["data"]["task"],
        "input": graph.input,
        "output": graph.output,
        **graph.meta,
        "check": {
            "compared": check or f"nothing: onnxruntime is not installed ({EXTRA})",
            "max_abs_diff": diff,
            "tolerance": TOLERANCE,
        },
    }
    write_json_atomic(out / "model.onnx.json", meta)
    notes = graph.notes + (() if diff is not None else (f"unchecked: onnxruntime is not installed ({EXTRA} adds it).",))
    files = ("model.onnx", "model.onnx.json", *graph.files)
    return ExportResult("onnx", out, files, check, diff, notes)


def _require_exporter() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise EmberError(
            f"ONNX export needs the onnx and onnxscript packages ({err.name} is not installed); torch.onnx "
            f"writes the graph with them. Install the extra: {EXTRA} (it also installs onnxruntime, which "
            f"checks the graph against PyTorch)."
        ) from None


def _refuse_unexportable(run_dir: Path, info: dict, merge: bool) -> None:
    """EmberError for the runs this exporter does not write: not a classifier or regressor, quantised,
    with LoRA adapters but no ``merge``, or asked to merge what is not there."""
    task, name = info["data"]["task"], info["model"]["name"]
    if "quantization" in info:
        raise EmberError(
            f"{run_dir} is quantised ({info['quantization'].get('method', 'int8')}): its weights are torchao "
            f"int8 tensors, which torch.onnx cannot write. Export the float run it was quantised from, and "
            f"quantise the ONNX graph with onnxruntime's tools if you need int8 there."
        )
    if task not in ("classify", "regress"):
        hint = {
            "lm": "use --format hf for a gpt or llama language model"
            if name in ("gpt", "llama")
            else f"ember exports {name} language models to no format yet",
            "simclr": "fine-tune it into a classifier (init.from_run) and export that run",
        }.get(task, "it has no ONNX export yet")
        raise EmberError(
            f"{run_dir} holds a {name} model for task {task}; --format onnx exports classifiers and "
            f"regressors (cnn, vit, rnn, mlp, encoder on classify or regress data): {hint}."
        )
    if "lora" in info and not merge:
        raise EmberError(
            f"{run_dir} was trained with LoRA adapters; an ONNX graph holds plain weights. Pass --merge "
            f"(merge=True) to fold the adapters into them (the graph is then checked against the run as trained)."
        )
    if merge and "lora" not in info:
        raise EmberError(
            f"--merge folds LoRA adapters into the weights, and {run_dir} has none (its model.json records no "
            f"lora plugin): the ONNX graph holds all of its weights already. Leave out --merge."
        )


def onnx_graph(model: nn.Module, info: dict, run_dir: Path) -> OnnxGraph:
    """What to export for this run's trained ``model`` (see the module docstring)."""
    spec = DataSpec.from_dict(info["data"])
    output = _output(spec)
    if spec.reads_tokens:
        return _token_graph(model, spec, run_dir, output)
    manifest, why = _data_manifest(run_dir)
    if manifest is not None and manifest.get("kind") == "images" and "mean" in manifest:
        return _pixel_graph(model, spec, manifest, output)
    return _feature_graph(model, spec, manifest, why, output)


def _output(spec: DataSpec) -> dict:
    if spec.task == "regress":
        return {"name": "prediction", "dtype": "float32", "shape": ["batch", 1], "meaning": "the predicted value"}
    out = {
        "name": "logits",
        "dtype": "float32",
        "shape": ["batch", spec.num_classes],
        "meaning": "unnormalised class scores: softmax gives the probabilities; index i is class i",
    }
    if spec.class_names:
        out["class_names"] = list(spec.class_names)
    return out


def _data_manifest(run_dir: Path) -> tuple[dict | None, str]:
    """The manifest of the data the run was trained on, or None and why it could not be read."""
    from ember.config import load_recipe
    from ember.data.build import prepared_dir
    from ember.data.shards import load_manifest

    try:
        data = load_recipe(run_dir / "recipe.yaml").data
        if data.name not in ("prepared", "digits", "digits-rows"):
            return None, f"data.name={data.name} has no prepared manifest"
        return load_manifest(prepared_dir(data)), ""
    except (EmberError, OSError) as err:
        return None, str(err).split(". ")[0]


class PixelInput(nn.Module):
    """``model`` behind the validation transform of its data: raw pixels (uint8 0-255, or float32 arrays)
    ``/ 255`` (uint8 only), then ``(x - mean) / std`` per channel; ``rows``: [B, T, F] one-channel rows
    (digits-rows) instead of [B, C, H, W] images."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], uint8: bool, rows: bool) -> None:
        super().__init__()
        self.model, self.uint8 = model, uint8
        shape = (1, 1) if rows else (-1, 1, 1)  # rows have one channel: its statistics broadcast over [T, F]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[: 1 if rows else None].view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[: 1 if rows else None].view(shape))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32)
        if self.uint8:
            x = x / 255
        return self.model((x - self.mean) / self.std)


def _pixel_graph(model: nn.Module, spec: DataSpec, manifest: dict, output: dict) -> OnnxGraph:
    """Images (or digits-rows sequences) with their normalisation inside the graph."""
    from ember.data.augment import build_image_transform

    mean, std, pixels = manifest["mean"], manifest["std"], manifest.get("image_dtype", "uint8")
    shape = tuple(spec.input_shape)
    rows = len(shape) == 2  # the prepared images' rows: [B, 1, H, W] read as [B, H, W]
    transform = build_image_transform(mean, std, None, pixels).eval()

    def reference(x: torch.Tensor) -> torch.Tensor:  # ember's own path: data/build.py's _images
        return model(transform(x[:, None])[:, 0] if rows else transform(x))

    def sample(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        if pixels == "uint8":
            return torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
        return torch.randn((n, *shape), generator=gen)

    what = "rows of a one-channel image (T x F)" if rows else "images (C x H x W)"
    return OnnxGraph(
        PixelInput(model, mean, std, pixels == "uint8", rows),
        reference,
        sample,
        {"name": "pixels", "dtype": pixels, "shape": ["batch", *shape]},
        output,
        {0: torch.export.Dim("batch")},
        meta={
            "preprocessing": {
                "in_graph": ("x / 255, then " if pixels == "uint8" else "")
                + "(x - mean) / std per channel, with the training data's statistics (below)",
                "mean": mean,
                "std": std,
                "you_do": f"give {what} as the data was prepared: resized to {list(shape)[-2:]}, "
                + ("0-255 uint8 pixels" if pixels == "uint8" else "float32 values as given to prepare")
                + ("; grey images have 1 channel, colour ones 3 (RGB)" if not rows else ""),
            }
        },
    )


def _feature_graph(model: nn.Module, spec: DataSpec, manifest: dict | None, why: str, output: dict) -> OnnxGraph:
    """Table rows (encoded features), or inputs whose data statistics cannot be read (given normalised)."""
    shape = tuple(spec.input_shape)

    def sample(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        x = torch.randn((n, *shape), generator=gen)
        for position, codes in spec.embeddings:  # index columns: codes 0 .. K-1, and unseen ones beyond
            x.view(n, -1)[:, position] = torch.randint(0, codes + 2, (n,), generator=gen).float()
        return x

    notes: tuple[str, ...] = ()
    if manifest is not None and manifest.get("kind") == "table":
        meta = {
            "preprocessing": {
                "in_graph": "nothing: the graph takes encoded rows",
                "you_do": "encode each row as ember.data.tables.encode does with the column recipes below (in "
                "order; dropped ones skipped): a numeric cell becomes (value - mean) / std (missing: 0), a "
                "category its one-hot block in the listed order (missing: the missing slot if there is one), "
                "an index column its 1-based position among the categories (0: missing or unseen)",
            },
            "columns": [c for c in manifest["columns"] if not c.get("dropped")],
        }
    else:
        why = why or "neither images nor a table"
        meta = {
            "preprocessing": {
                "in_graph": "nothing",
                "you_do": "give inputs normalised as the run's data loader gave them in training; the data's "
                f"statistics could not be read when exporting ({why})",
            }
        }
        notes = (f"the graph takes normalised inputs, not raw ones: the run's data could not be read ({why}).",)
    return OnnxGraph(
        model,
        model,
        sample,
        {"name": "features", "dtype": "float32", "shape": ["batch", *shape]},
        output,
        {0: torch.export.Dim("batch")},
        meta=meta,
        notes=notes,
    )


class MaskedTextRNN(nn.Module):
    """A labelled-text RNN (``ember.models.rnn.RNN``, which packs each text to its length) as the same
    computation without packing, which ONNX cannot hold: every layer and direction runs over the padded
    rows, the backward direction over each text reversed within its own length (the padding stays
    behind it), and the head reads the state after each text's last token. Steps past a text's end
    only ever feed steps past it, so padding changes no output. Dropout is left out: export is eval."""

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        rnn = model.rnn
        self.embed, self.head, self.pad_id = model.embed, model.head, pad_id
        self.directions = 2 if rnn.bidirectional else 1
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if rnn.bias else ("weight_ih", "weight_hh")
        cells = []
        for layer in range(rnn.num_layers):
            n_in = rnn.input_size if layer == 0 else self.directions * rnn.hidden_size
            for suffix in ("", "_reverse")[: self.directions]:  # one single-layer, one-way RNN each
                cell = type(rnn)(n_in, rnn.hidden_size, batch_first=True, bias=rnn.bias)
                cell.load_state_dict({f"{n}_l0": getattr(rnn, f"{n}_l{layer}{suffix}").detach() for n in names})
                cells.append(cell)
        self.cells = nn.ModuleList(cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x != self.pad_id).sum(1).clamp(min=1)[:, None]  # as RNN.forward packs them
        steps = torch.arange(x.size(1), device=x.device)[None, :]
        reverse = torch.where(steps < lengths, lengths - 1 - steps, steps)  # each text backwards, in place
        h = self.embed(x)
        for layer in range(len(self.cells) // self.directions):
            forward_out, _ = self.cells[layer * self.directions](h)
            if self.directions == 1:
                h = forward_out
                continue
            backward_out, _ = self.cells[layer * self.directions + 1](_at_steps(h, reverse))
            h = torch.cat([forward_out, _at_steps(backward_out, reverse)], dim=2)
        final = [_at_steps(forward_out, lengths - 1)[:, 0]]  # after the last real token
        if self.directions == 2:  # the backward direction's state after reading back to the first token
            final.append(_at_steps(backward_out, lengths - 1)[:, 0])
        return self.head(torch.cat(final, dim=1))


def _at_steps(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``h[b, index[b, t]]`` for every row b and step t: [B, T', H] of [B, T, H] and index [B, T']."""
    return h.gather(1, index[..., None].expand(-1, -1, h.size(2)))


def _token_graph(model: nn.Module, spec: DataSpec, run_dir: Path, output: dict) -> OnnxGraph:
    """Labelled text: token ids with a dynamic length (up to the encoder's positions), padding after each text."""
    from ember.models.rnn import RNN

    pad = int(getattr(model, "pad_id", 0))  # models before pad ids pad with 0
    length = spec.input_shape[0] if spec.input_shape else spec.seq_len
    most = getattr(model, "block_size", None)  # the encoder's learned positions end there

    def sample(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        ids = torch.randint(0, spec.vocab_size - 1, (n, size), generator=gen)
        ids += (ids >= pad).long()  # never the pad id inside a text
        ends = torch.randint(1, size + 1, (n,), generator=gen)
        ends[0] = size  # one text fills its row
        return ids.masked_fill(torch.arange(size)[None, :] >= ends[:, None], pad)

    module = MaskedTextRNN(model, pad) if isinstance(model, RNN) else model
    files = {"tokenizer.json": run_dir / "tokenizer.json"} if (run_dir / "tokenizer.json").is_file() else {}
    tokenizer = "tokenizer.json (copied here)" if files else "ember's byte codec (the run has no tokenizer.json)"
    return OnnxGraph(
        module,
        model,
        sample,
        {"name": "token_ids", "dtype": "int64", "shape": ["batch", "length"], "pad_id": pad, "max_length": most},
        output,
        {0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=most) if most else torch.export.Dim("length")},
        length=length,
        meta={
            "preprocessing": {
                "in_graph": f"each text's length is its count of ids other than {pad}",
                "you_do": f"encode each text with {tokenizer}, keep its first {length} tokens (as training cut "
                f"them), and fill the row after it with the pad id {pad}; a batch may hold texts of any lengths"
                + (f" (rows of at most {most} ids)" if most else "")
                + ": padding changes no output",
            }
        },
        files=files,
    )


def _export(graph: OnnxGraph, path: Path) -> None:
    """torch.onnx's dynamo exporter writes ``graph.module`` to ``path`` (one file, weights inside)."""
    example = graph.sample(3, graph.length, torch.Generator().manual_seed(0))
    module = graph.module.eval()
    try:
        # The exporter reports each of its steps on stdout and warns about internals: not the user's concern.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_exporter(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[graph.input["name"]],
                output_names=[graph.output["name"]],
                dynamic_shapes=(graph.dynamic,),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
            )
    except Exception as err:  # torch.export / onnxscript raise many kinds; the user needs the first line
        raise EmberError(
            f"torch.onnx could not export this {type(graph.module).__name__} ({str(err).strip().splitlines()[0]:.300}). "
            f"ONNX export covers ember's cnn, vit, rnn, mlp and encoder classifiers; report this with the run's "
            f"model.json if it is one of them."
        ) from None


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's log (optional packages it skips, such as torchvision) at ERROR only, for the export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@torch.no_grad()
def check_graph(path: Path, graph: OnnxGraph) -> tuple[str, float | None]:
    """Run the graph at ``path`` with onnxruntime (CPU) on valid batches of 3 and 5 inputs (token inputs:
    the training length, then a shorter one) and compare with ``graph.reference``: what was compared and
    the largest absolute difference; ("", None) without onnxruntime. Over TOLERANCE is an EmberError."""
    try:
        import onnxruntime
    except ImportError:
        return "", None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen, worst, shapes = torch.Generator().manual_seed(1), 0.0, []
    shorter = min(graph.length, graph.length // 2 + 1)  # token inputs: a second length (others ignore it)
    for n, length in zip(CHECK_BATCHES, (graph.length, shorter)):
        x = graph.sample(n, length, gen)
        want = graph.reference(x).float().numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != want.shape:
            raise EmberError(
                f"The ONNX graph answered shape {got.shape} where PyTorch gives {want.shape}: an exporter bug."
            )
        diff = float(abs(got - want).max())
        if not diff <= TOLERANCE:  # NaN fails too
            raise EmberError(
                f"The ONNX graph's outputs differ from PyTorch's by up to {diff:.3g} (more than {TOLERANCE}), so "
                f"it was not written: an export is exact or it is not kept. Report this with the run's model.json."
            )
        worst = max(worst, diff)
        shapes.append("x".join(map(str, x.shape)))
    return f"onnxruntime (CPUExecutionProvider) against PyTorch on inputs {' and '.join(shapes)}", worst
