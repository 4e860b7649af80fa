"""Checkpoints: sharded, atomic, verified; newest-valid discovery.

A checkpoint is a directory, ``checkpoints/step_00000100/``, holding

- the model and optimiser state, keyed by parameter name with whole (global) shapes, so
  it loads into any layout — one process, DDP, FSDP or tensor parallel — on any number of
  ranks. One process writes it as one safetensors file (``state.safetensors``, see
  ``ember.training.state_file``: no distributed machinery, hashed as it is written);
  several ranks save together with ``torch.distributed.checkpoint`` (DCP): each rank
  writes its own shards (``__R_0.distcp``), rank 0 the index (``.metadata``), read back
  through ``safe_dcp`` (the index by a restricted unpickler, non-tensor entries as
  ``weights_only`` data): DCP's own reader would run a crafted file. Either format
  resumes under any number of ranks (checkpoints of one process written before
  ``state.safetensors`` are DCP's, and still load);
  A model whose frozen parameters are its starting point (``mark_frozen_base``: LoRA's base)
  saves only its trainable tensors and buffers: the base is rebuilt at resume from where the
  run started, and its sha256, kept in the trainer state, must match (``ember.training.resume``);
- ``trainer.pt``: the rest of what a resume needs (step, schedule, scaler, EMA,
  every rank's RNG and own buffers, the data position, the recipe), written by rank 0 with
  ``torch.save`` and read with ``weights_only=True`` (a checkpoint cannot run code);
- ``record.json``: the size and sha256 of every file above, written last.

Everything is written into ``step_00000100.partial/`` and the directory is renamed
once complete, so a crash at any moment leaves either a complete, verifiable
checkpoint or a ``.partial`` directory that is never loaded (the next save of that
step clears it). On several nodes, ``checkpoints/`` must be on a filesystem all of
them share.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ember.atomic import explain_write_errors, fsync_path, read_json, sha256_file, write_json_atomic
from ember.errors import EmberError
from ember.training.distributed import barrier, is_distributed
from ember.training.optim_state import first_step_entries
from ember.training.state_file import (
    STATE,
    bad_state_file,
    fill,
    names_of,
    optimizer_names,
    optimizer_state_by_id,
    read_state,
    single_process_state,
    tensor_names,
    write_state,
)

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
RECORD, TRAINER, INDEX = "record.json", "trainer.pt", ".metadata"
FROZEN_BASE = "frozen_base_sha256"  # set on a model whose frozen parameters are its starting point


def frozen_digest(model: torch.nn.Module) -> str:
    """sha256 of the frozen parameters (names, dtypes, shapes, values), in name order. Whole tensors
    only: taken before the layout shards them."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            digest.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
            digest.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy on the CPU
    return digest.hexdigest()


def mark_frozen_base(model: torch.nn.Module) -> None:
    """Declare ``model``'s frozen parameters its starting point (rebuilt at resume, never changed by
    training): checkpoints then hold only what trains, and record this digest of the rest."""
    setattr(model, FROZEN_BASE, frozen_digest(model))


def _frozen_names(model: torch.nn.Module) -> set[str]:
    """Names of the frozen parameters of a model marked by ``mark_frozen_base`` (tied aliases
    included: DCP's own ``ignore_frozen_params`` misses them), else none."""
    if getattr(model, FROZEN_BASE, None) is None:
        return set()
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and optimiser's state as DCP saves and loads them: without the frozen base."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    frozen = _frozen_names(model)
    return {k: v for k, v in model_state.items() if k not in frozen}, optim_state


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def save_checkpoint(
    directory: Path,
    step: int,
    keep: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict,
    is_main: bool = True,
) -> Path:
    """Save ``model`` and ``optimizer`` (from every rank) and ``trainer`` (rank 0's) as the
    checkpoint of ``step``; keep the newest ``keep``. Called by all ranks together."""
    final = checkpoint_path(directory, step)
    partial = final.with_name(final.name + ".partial")
    earlier = list_checkpoints(directory)
    single = not is_distributed()
    if single:  # whole tensors: one file, without DCP
        states = single_process_state(model, optimizer, _frozen_names(model))
    else:
        states = dict(zip(("model", "optimizer"), _states(model, optimizer)))
    intact = (
        f"The previous checkpoint {earlier[-1]} is intact (a checkpoint is written beside it and renamed only "
        f"when complete): --resume auto continues from it."
        if earlier
        else "No earlier checkpoint exists."
    )
    with (
        explain_write_errors(f"the checkpoint of step {step}", partial, _state_bytes(states), intact),
        _removed_on_failure(partial, is_main),
    ):
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash
            partial.mkdir(parents=True)
        barrier()
        if single:
            _seal(partial, step, trainer, {STATE: write_state(partial / STATE, states)})
        else:
            _save_dcp(partial, states)
            if is_main:
                _seal(partial, step, trainer, {})
    if is_main:  # DCP's save returns on rank 0 once every rank's shards are written
        _publish(partial, final, directory, keep)
    barrier()
    return final


def _save_dcp(partial: Path, states: dict) -> None:
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        dcp.save(states, checkpoint_id=partial, no_dist=not is_distributed())


def _publish(partial: Path, final: Path, directory: Path, keep: int) -> None:
    """Rename the sealed ``partial`` directory to ``final`` (durably), then drop all but the newest ``keep``."""
    if final.is_dir():  # rewriting a step (a resumed run reaching it again)
        shutil.rmtree(final)
    elif final.exists():  # a stray file named like this step, skipped by --resume auto
        final.unlink()
    os.replace(partial, final)
    fsync_path(directory)
    for old in list_checkpoints(directory)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _seal(partial: Path, step: int, trainer: dict, hashed: dict[str, dict]) -> None:
    """Rank 0's part, after every rank's files: the trainer state, then the record of every file
    (``hashed``: those whose size and sha256 were taken as they were written; the others are read back)."""
    buffer = io.BytesIO()
    torch.save(trainer, buffer)
    data = buffer.getvalue()
    with open(partial / TRAINER, "wb") as f:  # the directory is renamed once sealed: no temporary file needed
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    hashed = {**hashed, TRAINER: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    files = sorted(f for f in os.listdir(partial) if f != RECORD)
    write_json_atomic(
        partial / RECORD,
        {
            "step": step,
            "files": {
                f: hashed.get(f) or {"bytes": (partial / f).stat().st_size, "sha256": sha256_file(partial / f)}
                for f in files
            },
        },
    )


def _state_bytes(state: dict) -> int:
    """Bytes of the tensors this rank writes (its local shards): what a save needs on disk, about."""
    total = 0
    for value in state.values() if isinstance(state, dict) else state:
        if isinstance(value, (dict, list, tuple)):
            total += _state_bytes(value)
        elif isinstance(value, torch.Tensor):
            local = getattr(value, "_local_tensor", value)  # a DTensor writes its own shard
            total += local.numel() * local.element_size()
    return total


@contextlib.contextmanager
def _removed_on_failure(partial: Path, is_main: bool):
    """A save that fails leaves no half checkpoint taking the space a retry needs."""
    try:
        yield
    except BaseException:
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every save and load in one process that there is no process group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, oldest first (by step, not by file time)."""
    return [p for p in checkpoint_entries(directory) if p.is_dir()]


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is complete and intact, else the reason it is not."""
    if not path.is_dir():
        return "it does not exist" if not path.exists() else "it is not a checkpoint directory"
    if not (path / RECORD).exists():
        return "it has no integrity record (the write was interrupted)"
    try:  # the shared reader: bounded in size and nesting, a key twice refused
        files = read_json(path / RECORD, "", max_bytes=1 << 20).get("files")
    except EmberError:
        return "its integrity record is unreadable (not JSON written by ember)"
    if not isinstance(files, dict) or TRAINER not in files or not ({INDEX, STATE} & set(files)):
        return "its integrity record lists no trainer state or no model state (DCP index or state file)"
    for name, want in files.items():
        f = path / name
        if not isinstance(want, dict) or Path(name).name != name:
            return f"its integrity record's entry {name!r} is malformed"
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f"{name} is {size} bytes but was written as {want.get('bytes')!r:.40} (truncated?)"
        if sha256_file(f) != want.get("sha256"):
            return f"the sha256 of {name} does not match the one recorded at write time (corrupted)"
    if INDEX not in files:
        return None  # a state file: read by safetensors, which runs no code, and checked as it loads
    from ember.training.safe_dcp import index_problem  # lazy: pulls in torch.distributed.checkpoint

    # A record matching a crafted index proves nothing (whoever wrote one wrote both): read it safely.
    return index_problem(path)


def checkpoint_entries(directory: Path) -> list[Path]:
    """Everything named like a checkpoint (``step_N``), directory or not, oldest first; ``.partial``
    directories are interrupted writes, not entries."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(directory: Path) -> Path | None:
    """Newest checkpoint that verifies, each invalid newer one named in a warning; None when
    ``directory`` holds no checkpoint entry at all. Entries that are all invalid are refused:
    training from step 0 would overwrite the run they belong to (invariant 10)."""
    problems = []
    for path in reversed(checkpoint_entries(directory)):
        problem = verify_checkpoint(path)
        if problem is None:
            for bad, why in problems:
                warnings.warn(f"Skipping checkpoint {bad}: {why}.", stacklevel=2)
            return path
        problems.append((path, problem))
    if problems:
        named = "; ".join(f"{p.name}: {why}" for p, why in problems)
        raise EmberError(
            f"--resume auto found no valid checkpoint in {directory} ({named}), so it cannot continue the run, and "
            f"starting over from step 0 would overwrite it. Restore a good checkpoint there (or pass --resume PATH "
            f"to one), or train into a new --run-dir; move the invalid entries away only if you mean to discard them."
        )
    return None


def load_trainer_state(path: Path, verify: bool = True) -> dict:
    """Verify the checkpoint (unless the caller just did) and load its trainer state on the CPU."""
    problem = verify_checkpoint(path) if verify else None
    if problem is not None:
        raise EmberError(
            f"Checkpoint {path} cannot be used: {problem}. Resume from an older checkpoint in the same "
            f"folder (--resume PATH) or let --resume auto pick the newest valid one."
        )
    try:
        state = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: a crafted file
        from ember.training.safe_dcp import refused_global

        cause = f"it holds objects a checkpoint never holds ({refused_global(err)}); ember does not load it, since it could run code"
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # not a torch.save zip at all
        cause = (
            f"it is not a file torch.save wrote ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        )
    else:
        if isinstance(state, dict) and "step" in state:
            return state
        cause = f"it holds a {type(state).__name__} without a step, not ember's trainer state"
    raise EmberError(
        f"{path / TRAINER} cannot be used: {cause}. The checkpoint was not written by ember or has been altered: "
        f"resume from an older checkpoint (--resume PATH), or start a new run directory."
    )


def load_model_and_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the checkpoint's weights and optimiser state into ``model`` and ``optimizer``, whatever
    their layout now (plain, DDP, FSDP, tensor parallel) and however many ranks saved them."""
    if not (path / STATE).is_file():
        _load_dcp(path, model, optimizer)
    elif is_distributed():
        _load_state_file_sharded(path, model, optimizer)
    else:
        _load_state_file(path, model, optimizer)


def _load_state_file(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One process: the state file straight into the module and the optimiser (no DCP)."""
    saved = read_state(path / STATE)
    frozen = _frozen_names(model)
    target = single_process_state(model, optimizer, frozen)["model"]
    _check_trainable(path, set(saved["model"]) - set(target), set(target) - set(saved["model"]))
    fill(target, saved["model"], path / STATE)  # in place: the module's own tensors
    try:
        optimizer.load_state_dict(optimizer_state_by_id(saved["optimizer"], model, optimizer))
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise EmberError(
            f"Checkpoint {path}'s optimiser state does not fit this run's optimiser ({type(err).__name__}: "
            f"{str(err):.200}). Resume with the recipe that wrote it, or start a new run directory."
        ) from None
    _check_optimizer_entries(path / STATE, model, optimizer)


def _check_optimizer_entries(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's loaded optimiser state holds exactly the entries this optimiser creates for it
    (``optim_state.first_step_entries``, with the checkpoint's group settings): an entry it does not keep
    would be carried along unused, one it lacks would fail at the first step."""
    expected = first_step_entries(optimizer)
    if expected is None:  # an optimiser that cannot step on meta tensors: loaded as torch loads it
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unexpected, missing = set(), set()
    for name, param, want in zip(optimizer_names(model, optimizer), params, expected):
        have = set(optimizer.state.get(param, {}))
        if have:  # a parameter that never had a gradient has no state
            unexpected |= {f"optimizer/state/{name}/{k}" for k in have - want}
            missing |= {f"optimizer/state/{name}/{k}" for k in want - have}
    if unexpected or missing:
        found = [f"holds {names_of(unexpected)}"] * bool(unexpected) + [f"lacks {names_of(missing)}"] * bool(missing)
        kept = sorted(set().union(*expected))
        raise bad_state_file(
            path,
            f"its optimiser state {' and '.join(found)}, where this run's {type(optimizer).__name__} keeps exactly "
            f"{kept} for each parameter it updates",
        )


def _load_state_file_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Several ranks, one process's state file: each rank cuts its own part of every whole tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    saved = read_state(path / STATE)
    model_state, optim_state = _states(model, optimizer)
    _check_trainable(path, set(saved["model"]) - set(model_state), set(model_state) - set(saved["model"]))
    fill(model_state, saved["model"], path / STATE)
    fill(optim_state, saved["optimizer"], path / STATE)
    options = StateDictOptions(strict=not _frozen_names(model))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def _check_trainable(path: Path, unexpected: set[str], missing: set[str]) -> None:
    if unexpected or missing:
        raise EmberError(
            f"Checkpoint {path} does not hold this model's trainable weights (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}). Resume with the recipe that wrote it, or start a new run directory."
        )


def _load_dcp(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint several ranks wrote (or one process before ``state.safetensors``), through the safe DCP reader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from ember.training.safe_dcp import SafeLoadPlanner, SafeReader, read_index

    read_index(path)  # a crafted index is refused here, as one message, before DCP's ranks exchange plans
    frozen = _frozen_names(model)
    model_state, optim_state = _states(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _quiet_single_process():
            dcp.load(
                state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(path), no_dist=not is_distributed()
            )
    except CheckpointException as err:  # DCP gathers each rank's exception into this one
        raise _load_failure(path, err) from None
    options = StateDictOptions(strict=not frozen)  # the frozen base is not in the checkpoint: it stays
    keys = set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    if frozen and (keys.unexpected_keys or set(keys.missing_keys) - frozen):
        _check_trainable(path, set(keys.unexpected_keys), set(keys.missing_keys) - frozen)


def saved_names(path: Path) -> set[str]:
    """The names of the tensors a checkpoint holds, spelled as DCP's index spells them
    (``model.blocks.0.attn.q.weight``, ``optimizer.state.NAME.exp_avg``), in either format."""
    if (path / STATE).is_file():
        return tensor_names(path / STATE)
    from ember.training.safe_dcp import read_index

    return set(read_index(path).state_dict_metadata)


def _load_failure(path: Path, err: BaseException) -> EmberError:
    """One paragraph for a checkpoint DCP could not read: the first rank's own message when it is
    ember's, else its cause named."""
    causes = [exc for exc, _ in getattr(err, "failures", {}).values()]
    for cause in causes:
        if isinstance(cause, EmberError):
            return cause
    cause = f"{type(causes[0]).__name__}: {causes[0]}" if causes else str(err)
    return EmberError(
        f"Checkpoint {path} cannot be loaded: its shards do not hold what its index describes ({cause:.300}). "
        f"It was not written by ember for this model or has been altered: resume from an older checkpoint "
        f"(--resume PATH), or start a new run directory."
    )


def rng_state() -> dict:
    """Every RNG a training step may draw from, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        # This rank's device only: every visible GPU's state would not restore where fewer are visible.
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state and torch.cuda.current_device() < len(state["cuda"]):  # written before: every GPU's
        torch.cuda.set_rng_state(state["cuda"][torch.cuda.current_device()])
