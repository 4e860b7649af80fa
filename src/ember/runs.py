"""The run directory, a contract other tools and users rely on.

::

    RUN/recipe.yaml          the resolved recipe
    RUN/metrics.jsonl        one JSON object per logged step / validation
    RUN/checkpoints/         step_XXXXXXXX/ (DCP shards, trainer.pt, record.json: sizes + sha256)
    RUN/model.safetensors    final weights (the EMA's average with the ema plugin)
    RUN/model.json           model config, data spec, parameter count, FLOPs per item (and LoRA's settings)
    RUN/tb/                  TensorBoard events (train.trackers: [tensorboard])
    RUN/trackers.json        the MLflow and W&B run ids a resume continues (with those trackers)

Example::

    model, info = load_trained_model("runs/gpt-tiny")
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from torch import nn

from ember.atomic import atomic_path, explain_write_errors, read_json, sha256_file, write_json_atomic, write_text_atomic
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.stored import check_stored, load_quantized, resize_to_stored
from ember.training.checkpoint import list_checkpoints

if TYPE_CHECKING:
    from ember.config import Recipe


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def require_existing_run(run_dir: str | Path, command: str) -> Path:
    """``run_dir`` as a Path when it exists; else one paragraph saying so, naming the run
    directories beside it that it may have meant (``ember train`` without --run-dir writes
    runs/RECIPE-TIMESTAMP, so ``runs/cnn`` often means ``runs/cnn-digits-20260101-120000``).

    Example::

        require_existing_run("runs/cnn", "ember eval")  # EmberError: runs/cnn does not exist. ...
    """
    run_dir = Path(run_dir)
    if run_dir.exists():
        return run_dir
    parent = run_dir.parent
    hint = f" There is no {parent}/ in {Path.cwd()} either." if not parent.is_dir() else ""
    if parent.is_dir():
        runs = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        names = [p.name for p in runs]
        near = [n for n in names if n.startswith(run_dir.name)] or difflib.get_close_matches(run_dir.name, names, 3)
        shown = [str(parent / n) for n in (near or names)[:5]]
        if shown:
            hint = (
                f" Did you mean {' or '.join(shown)}?"
                if near
                else f" {parent}/ holds (newest first): {', '.join(shown)}."
            )
    raise EmberError(
        f"{run_dir} does not exist.{hint} {command} reads a run directory written by ember train: give the path "
        f"it printed, or name it when training with --run-dir (e.g. ember train recipes/cnn-digits.yaml "
        f"--run-dir runs/cnn)."
    )


def prepare_run_dir(run_dir: Path, recipe: Recipe, resuming: bool) -> Path:
    """Create the run directory and save the resolved recipe; refuse to mix two runs in one folder."""
    if not resuming and list_checkpoints(run_dir / "checkpoints"):
        raise EmberError(
            f"Run directory {run_dir} already holds checkpoints of an earlier run. Pass --resume auto to "
            f"continue it, or choose a new --run-dir."
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise EmberError(
            f"--run-dir {run_dir} is an existing file, not a directory. Choose a new directory name (or "
            f"an earlier run's directory with --resume auto)."
        )
    with explain_write_errors("the run directory", run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
    return run_dir


def build_run_model(recipe: Recipe, spec: DataSpec) -> nn.Module:
    """The recipe's model, freshly initialised, shaped like the run it starts from (``init.from_run``:
    a structurally pruned run has narrower layers than its model section says)."""
    from ember.models.registry import build_model

    model = build_model(recipe.model, spec, recipe.objective)
    source = Path(recipe.init.from_run) if recipe.init.from_run else None
    if source is not None and (source / "model.json").is_file():
        if read_model_info(source).get("pruning", {}).get("structured"):
            resize_to_stored(model, source / "model.safetensors")
    return model


CARRIED = ("pruning", "hf_source")  # model.json entries a run started from another passes on


def starting_model(
    recipe: Recipe, spec: DataSpec, codec_json: str = "", resuming: bool = False
) -> tuple[nn.Module, dict]:
    """The model a run starts from — fresh, or ``init.from_run``'s trained weights — and the
    entries of the source's model.json the new run's carries on (``CARRIED``); ``init.from_hf``: a
    Hugging Face checkpoint's weights (``ember.interop.hf_import``) and its special-token ids
    (``hf_source``). ``resuming``: a checkpoint's weights will replace these, so a Hugging Face
    directory moved away since the start is not needed."""
    if recipe.init.from_hf:
        return _from_hf(recipe, spec, codec_json, resuming)
    if not recipe.init.from_run:
        return build_run_model(recipe, spec), {}
    source = Path(recipe.init.from_run)
    model, info = load_trained_model(source, "cpu")
    fix = "Point init.from_run at a finished run of the same model and data, or leave it empty to start fresh."
    _check_same_tokenizer(source, codec_json)
    if "quantization" in info:
        raise EmberError(
            f"init.from_run: {source} is quantised ({info['quantization']['method']}); int8 weights do "
            f"not train. Start from the float run it came from. {fix}"
        )
    theirs = _as_today(info["model"])
    ours = recipe.model.model_dump(mode="json")
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        raise EmberError(
            f"init.from_run: {source}'s model differs from the recipe's in model.{', model.'.join(differ)}; "
            f"weights only load into the model they were trained as. {fix}"
        )
    theirs_spec = DataSpec.from_dict(info["data"])
    if theirs_spec.task == "simclr" and spec.task == "classify":  # pre-trained body, a fresh classification head
        return _from_pretrained_body(model, recipe, spec, source), {}
    if (theirs_spec.task, theirs_spec.num_classes, theirs_spec.vocab_size, tuple(theirs_spec.input_shape)) != (
        spec.task,
        spec.num_classes,
        spec.vocab_size,
        tuple(spec.input_shape),
    ):
        raise EmberError(
            f"init.from_run: {source} was trained on data of another shape ({theirs_spec.task}, "
            f"{theirs_spec.num_classes} classes, vocabulary {theirs_spec.vocab_size}, input "
            f"{list(theirs_spec.input_shape)}) than this recipe's. {fix}"
        )
    return model.train(), {k: info[k] for k in CARRIED if k in info}


def _from_hf(recipe: Recipe, spec: DataSpec, codec_json: str, resuming: bool) -> tuple[nn.Module, dict]:
    """The recipe's model (its section read from the checkpoint's config.json) holding the weights of
    the Hugging Face checkpoint ``init.from_hf`` names, after checking the data's tokenizer is its; and
    the checkpoint's special-token ids for model.json (``hf_source``, written back by ``ember export``)."""
    from ember.interop.hf_import import check_hf_tokenizer, load_hf_weights, source_ids

    source = Path(recipe.init.from_hf)
    if not (source / "config.json").is_file():
        if resuming:  # every weight comes from the checkpoint (a LoRA run's frozen base is checked there)
            return build_run_model(recipe, spec), {}
        raise EmberError(
            f"init.from_hf: {source} has no config.json (moved or deleted?). Point init.from_hf at the Hugging "
            f"Face checkpoint directory the run is to start from."
        )
    check_hf_tokenizer(source, codec_json)
    if recipe.model.vocab_size < spec.vocab_size:
        raise EmberError(
            f"init.from_hf: {source}'s model has {recipe.model.vocab_size} embedding rows (config.json vocab_size) "
            f"but its tokenizer, which the data was prepared with, has {spec.vocab_size} tokens; ids past the "
            f"rows would have no embedding. The checkpoint and its tokenizer.json do not belong together."
        )
    model = build_run_model(recipe, spec)
    return load_hf_weights(model, source, recipe.model.model_dump(mode="json")).train(), source_ids(source)


def _as_today(section: dict) -> dict:
    """A saved model section with the fields added since it was written at their defaults (what it ran with)."""
    from ember.models.registry import MODEL_CONFIGS

    return MODEL_CONFIGS[section["name"]].model_validate(section).model_dump(mode="json")


def _check_same_tokenizer(source: Path, codec_json: str) -> None:
    """EmberError when the data's tokenizer is not the one ``source`` was trained with: the same ids
    would name other tokens, and the weights would silently mean something else."""
    import json

    theirs = source / "tokenizer.json"
    if not codec_json or not theirs.is_file():
        return
    try:
        same = json.loads(theirs.read_text(encoding="utf-8")) == json.loads(codec_json)
    except ValueError:
        same = False
    if not same:
        raise EmberError(
            f"init.from_run: {source} was trained with another tokenizer than this data's, so each token id "
            f"would mean another piece of text to its weights. Prepare the new data with the run's tokenizer "
            f"(ember data prepare ... --tokenizer {theirs}), or start fresh (init.from_run empty)."
        )


def _from_pretrained_body(pretrained: nn.Module, recipe: Recipe, spec: DataSpec, source: Path) -> nn.Module:
    """A classifier whose body holds a SimCLR run's weights; only its head starts fresh."""
    model = build_run_model(recipe, spec)
    body = {k.removeprefix("body."): v for k, v in pretrained.state_dict().items() if k.startswith("body.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise EmberError(
            f"init.from_run: {source}'s body does not fit this recipe's model (missing {missing}, "
            f"unexpected {unexpected}); start from a SimCLR run of the same model section."
        )
    return model.train()


def save_trained_model(run_dir: Path, model: nn.Module, recipe: Recipe, spec: DataSpec, summary: dict) -> None:
    """Write model.safetensors (tied weights stored once) and model.json."""
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    intact = "The run's checkpoints are intact: free space and finish with --resume auto."
    with explain_write_errors("the final model", run_dir / "model.safetensors", needed, intact):
        with atomic_path(run_dir / "model.safetensors") as tmp:
            safetensors.torch.save_model(model, str(tmp))
        info = {"model": recipe.model.model_dump(mode="json"), "data": spec.to_dict(), **summary}
        if recipe.objective.name != "auto":  # what the model was built with besides its own section
            info["objective"] = recipe.objective.model_dump(mode="json")
        write_model_info(run_dir, info)


def write_model_info(run_dir: Path, info: dict) -> None:
    """Write model.json for the model.safetensors already in ``run_dir``, with that file's size and
    sha256 (``weights``): every writer of a finished model ends here, after its weights."""
    weights = Path(run_dir) / "model.safetensors"
    info = {**info, "weights": {"file": weights.name, "bytes": weights.stat().st_size, "sha256": sha256_file(weights)}}
    write_json_atomic(Path(run_dir) / "model.json", info)


def read_model_info(run_dir: str | Path) -> dict:
    """A finished run's model.json, checked to be ember's: an object with the model and data sections."""
    path = Path(run_dir) / "model.json"
    fix = f"Re-run the command that wrote {path.parent}, or point at another finished run."
    info = read_json(path, fix)
    if (
        not isinstance(info.get("model"), dict)
        or not isinstance(info.get("model").get("name"), str)
        or not isinstance(info.get("data"), dict)
    ):
        raise EmberError(
            f"{path} has no model and data sections: it was not written by ember or has been altered. {fix}"
        )
    for key in ("weights", "pruning", "quantization", "lora", "objective"):  # what readers index into
        if key in info and not isinstance(info[key], dict):
            raise EmberError(
                f"{path}'s {key} entry is a {type(info[key]).__name__}, not an object: it was altered. {fix}"
            )
    weights, quantization = info.get("weights", {}), info.get("quantization", {})
    if "weights" in info and not (isinstance(weights.get("bytes"), int) and isinstance(weights.get("sha256"), str)):
        raise EmberError(f"{path}'s weights record has no size in bytes or no sha256: it was altered. {fix}")
    if "quantization" in info and not (
        isinstance(quantization.get("method"), str) and isinstance(quantization.get("layers"), list)
    ):
        raise EmberError(f"{path}'s quantization entry has no method or layers: it was altered. {fix}")
    return info


def verify_weights(run_dir: Path, info: dict) -> dict:
    """Check model.safetensors against the size and sha256 model.json recorded when it was written,
    then read its header: the metadata there is returned, and a file that is not safetensors is a
    message. Runs written before the record existed have none: only their header is checked."""
    want, path = info.get("weights"), Path(run_dir) / "model.safetensors"
    fix = f"The file is corrupted or was replaced: re-run the command that wrote {run_dir}, or point at another run."
    if want is not None:
        if not isinstance(want, dict):
            raise EmberError(f"{path.parent / 'model.json'}'s weights record is malformed. {fix}")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise EmberError(f"{path} is {size} bytes but was written as {want.get('bytes')} (truncated?). {fix}")
        if sha256_file(path) != want.get("sha256"):
            raise EmberError(f"{path} does not match the sha256 recorded when it was written. {fix}")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except safetensors.SafetensorError as err:
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> EmberError:
    return EmberError(
        f"{path} is not a readable safetensors file ({err}); it may be truncated or not written by "
        f"ember. Re-run the command that wrote {path.parent}, or point at another run."
    )


def _build_from_info(info: dict, path: Path) -> nn.Module:
    """The model model.json describes, freshly initialised; a description ember cannot build is a message."""
    from pydantic import ValidationError

    from ember.models.registry import MODEL_CONFIGS, build_model  # heavy; only when needed
    from ember.objectives import ObjectiveConfig

    name = info["model"]["name"]
    if name not in MODEL_CONFIGS:
        raise EmberError(
            f"{path} names the model {name!r}, which ember does not have ({', '.join(sorted(MODEL_CONFIGS))}); "
            f"it was written by another version or altered. Point at a run written by this ember."
        )
    try:
        model_cfg = MODEL_CONFIGS[name].model_validate(info["model"])
        objective = ObjectiveConfig.model_validate(info["objective"]) if "objective" in info else None
        spec = DataSpec.from_dict(info["data"])
    except (ValidationError, TypeError, KeyError, ValueError) as err:
        raise EmberError(
            f"{path} does not describe a model ember can build ({str(err).splitlines()[0]}); it was "
            f"written by another version or altered. Point at a run written by this ember."
        ) from None
    try:
        # Its random initial weights are overwritten by the stored ones: drawn on a forked generator,
        # so loading a run (ember.load_model, ember.evaluate) leaves the caller's next draws as they were.
        with torch.random.fork_rng(devices=[]):
            model = build_model(model_cfg, spec, objective)
    except EmberError as err:  # the description is the file's: name it
        raise EmberError(f"{path} describes a model ember cannot build: {err}") from None
    return with_adapters(model, info, path)


def with_adapters(model: nn.Module, info: dict, path: Path | str = "model.json") -> nn.Module:
    """``model`` with the LoRA adapters ``info`` (a run's model.json) records, zeroed for the run's
    weights to be loaded into them; as it is when there are none."""
    from ember.training.low_rank import attach_adapters

    lora = info.get("lora")
    if lora is None:
        return model
    try:
        attach_adapters(
            model,
            int(lora["rank"]),
            float(lora["alpha"]),
            float(lora.get("dropout", 0.0)),
            list(lora["targets"]),
            fresh=False,
        )
    except (TypeError, KeyError, ValueError, EmberError) as err:
        raise EmberError(
            f"{path}'s lora section does not fit its model ({str(err).splitlines()[0]}); it was written by "
            f"another version or altered. Point at a run written by this ember."
        ) from None
    return model


def load_merged_model(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A finished run's model with any LoRA adapters folded into its weights, and its model.json without
    the lora entry: what compression works on (a pruned zero or an int8 weight must stay what it is,
    not be shifted again by an adapter's dense update)."""
    model, info = load_trained_model(run_dir, device)
    if "lora" not in info:
        return model, info
    from ember.training.low_rank import merge_adapters

    return merge_adapters(model), {k: v for k, v in info.items() if k != "lora"}


def load_model(run_dir: str | Path, device: str = "cpu") -> nn.Module:
    """A finished run's model, rebuilt from ``model.json`` with its final weights, in eval mode on
    ``device``: what ``ember.train`` wrote (``result.run_dir``), ready to call in Python. A module
    of your own (``model.name: custom``) loads back into your class with
    ``safetensors.torch.load_model(module, result.model_path)`` instead.

    Example::

        model = ember.load_model(ember.train(recipe).run_dir)
        logits = model(images)
    """
    return load_trained_model(run_dir, device)[0]


def load_trained_model(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a finished run's model from model.json and load model.safetensors (checked against the
    sha256 model.json recorded for it)."""
    run_dir = Path(run_dir)
    info_path, weights_path = run_dir / "model.json", run_dir / "model.safetensors"
    if not info_path.is_file() or not weights_path.is_file():
        raise EmberError(
            f"{run_dir} has no finished model (model.json and model.safetensors are written when training "
            f"ends). Point at a completed run directory, or finish the run with `ember train ... --resume auto`."
        )
    info = read_model_info(run_dir)
    verify_weights(run_dir, info)
    model = _build_from_info(info, info_path)
    try:
        if info.get("pruning", {}).get("structured"):  # ember prune removed channels: the file holds the widths
            resize_to_stored(model, weights_path)
        if "quantization" in info:  # ember quantize: int8 tensors loaded into the re-quantised float model
            return load_quantized(model, info["quantization"], weights_path, device).eval(), info
        check_stored(model, weights_path)
        missing, unexpected = safetensors.torch.load_model(model, str(weights_path), strict=False, device=device)
    except safetensors.SafetensorError as err:  # only reachable for runs written before the sha256 record
        raise _unreadable(weights_path, err) from None
    if missing or unexpected:
        raise EmberError(
            f"{weights_path} does not match model.json (missing {missing}, unexpected {unexpected}); the run directory is inconsistent."
        )
    return model.to(device).eval(), info
