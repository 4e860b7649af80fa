"""The recipe: one YAML file, validated into pydantic models before anything runs.

A recipe has the sections ``data``, ``model``, ``objective``, ``optim``, ``schedule``,
``train``, ``eval``, ``parallel`` and ``init``, and a list of step ``plugins``; the sections
of earlier versions are read as today's (``ember.migrate``). Every key has a default except ``model.name``.
``--set section.key=value`` overrides any key; values are parsed as YAML
(``--set optim.lr=3e-4``, ``--set schedule.milestones=[100,200]``).

Example::

    recipe = load_recipe("recipes/gpt-tiny.yaml", ["train.max_steps=50"])
    recipe.train.max_steps  # 50
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ember.data.config import TASK_OF_DATA, DataConfig, ReplayConfig, data_task  # noqa: F401 (re-exported)
from ember.errors import EmberError
from ember.migrate import migrate_recipe, today_path
from ember.models.registry import ModelConfig  # the registered models' configs, told apart by name
from ember.objectives import ObjectiveConfig, objective_task
from ember.plugins import PluginConfig
from ember.recipe_base import read_with_bases
from ember.recipe_keys import closest, suggest
from ember.schema import RecipeModel, Seed
from ember.training.tasks import METRICS


class Section(RecipeModel):
    """A recipe section (ember.schema: unknown keys, non-finite floats, non-numbers for numbers refused)."""


class OptimConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=100)
    weight_decay: float = Field(
        0.0, ge=0, description="L2 as decoupled (adamw) or coupled decay; never on biases and norms"
    )
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    nesterov: bool = False
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 turns clipping off")

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must both be in [0, 1), got {list(self.betas)}")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov needs optim.name=sgd and optim.momentum > 0")
        return self


class ScheduleConfig(Section):
    name: Literal["constant", "step", "multistep", "exponential", "cosine", "linear", "wsd"] = "cosine"
    warmup_steps: int = Field(0, ge=0, description="linear warmup, in optimiser steps")
    warmup_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="linear warmup as a share of train.max_steps (round(fraction * max_steps), halves up, at "
        "most max_steps - 1), so a shortened run keeps its shape; instead of warmup_steps",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine/linear/wsd: final lr as a fraction of optim.lr")
    step_size: int = Field(
        1000,
        ge=1,
        description="step: decay by gamma every this many steps; exponential: smoothly, gamma per step_size steps",
    )
    milestones: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="multistep: optimiser steps (1 or more, increasing) at which lr *= gamma"
    )
    gamma: float = Field(0.1, gt=0, le=1, description="step/multistep/exponential decay factor")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")

    def warmup(self, max_steps: int) -> int:
        """The warmup in optimiser steps for a run of ``max_steps``: warmup_steps, or warmup_fraction
        of the run rounded half up and kept below max_steps (so the peak lr is always reached).

        >>> ScheduleConfig(warmup_fraction=0.0375).warmup(800), ScheduleConfig(warmup_fraction=0.0375).warmup(5)
        (30, 0)
        """
        if self.warmup_fraction:
            return min(math.floor(self.warmup_fraction * max_steps + 0.5), max_steps - 1)
        return self.warmup_steps

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleConfig:
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError(
                f"schedule.warmup_steps ({self.warmup_steps}) and schedule.warmup_fraction "
                f"({self.warmup_fraction}) are both given; warmup is one or the other. Set the one you do not "
                f"mean to 0 (e.g. --set schedule.warmup_fraction=0 to give the warmup in steps)"
            )
        return self

    @model_validator(mode="after")
    def _milestones_increase(self) -> ScheduleConfig:
        # A repeated or out-of-order milestone would decay twice at one step or never: refuse, never sort.
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(
                f"schedule.milestones must be strictly increasing steps, got {self.milestones}; "
                f"list each step once, in order, e.g. [100, 200]"
            )
        return self


class ProfileConfig(Section):
    start: int = Field(
        0, ge=0, description="first optimiser step traced by torch.profiler (written to RUN/profile/); 0 = no trace"
    )
    steps: int = Field(2, ge=1, description="how many optimiser steps the trace covers")
    memory: bool = Field(
        False,
        description="CUDA: record the allocator's history, with Python stacks, from the run's start for the memory "
        "snapshots written at the trace's end and on out-of-memory (open them at pytorch.org/memory_viz)",
    )


def _registered_trackers_schema(schema: dict[str, Any]) -> None:
    """``train.trackers`` in the JSON schema: the trackers registered when it is made, as the items' choices."""
    from ember.training.trackers import TRACKERS  # registrations only: no tracker's package is imported

    schema["items"] = {"type": "string", "enum": sorted(TRACKERS)}


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1, description="optimiser steps")
    batch_size: int = Field(32, ge=1, description="micro-batch size; one optimiser step sees batch_size * grad_accum")
    grad_accum: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(200, ge=0, description="0 = only at the end")
    checkpoint_every: int = Field(500, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(3, ge=1)
    seed: Seed = Field(1337, description="initialisation, shuffling, dropout (0 to 2**32 - 1)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="auto: bf16 where the device has it natively, fp16 on older GPUs, else fp32"
    )
    compile: bool = False
    deterministic: bool = False
    activation_checkpointing: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    peak_flops: float = Field(
        0.0,
        ge=0,
        description="device peak FLOP/s for MFU; 0 = look up (CUDA) or measure (CPU: once per machine, kept in the user cache)",
    )
    progress: bool = True
    trackers: list[str] = Field(
        default_factory=list,
        description="experiment trackers besides metrics.jsonl (rank 0), any registered one "
        "(ember.training.trackers.register_tracker): tensorboard (RUN/tb, extra ember[tb]), mlflow (RUN/mlflow.db or "
        "$MLFLOW_TRACKING_URI, extra ember[mlflow]), wandb (offline under RUN/wandb unless $WANDB_MODE is set, extra "
        "ember[wandb]); [] = metrics.jsonl only",
        json_schema_extra=_registered_trackers_schema,
    )

    @field_validator("trackers")
    @classmethod
    def _registered_trackers_once(cls, trackers: list[str]) -> list[str]:
        from ember.training.trackers import TRACKERS  # the registry; no tracker's package is imported

        for name in trackers:
            if name not in TRACKERS:
                found = closest(name, TRACKERS, n=1)
                hint = f"; did you mean {found[0]!r}?" if found else "."
                raise ValueError(
                    f"{name!r} is not a registered tracker{hint} The "
                    f"registered ones: {', '.join(sorted(TRACKERS))} (a tracker of one's own is accepted once the "
                    f"module that registers it with ember.training.trackers.register_tracker is imported)"
                )
        twice = sorted({t for t in trackers if trackers.count(t) > 1})
        if twice:
            raise ValueError(f"names {', '.join(twice)} more than once; list each tracker once")
        return trackers

    profile: ProfileConfig = Field(default_factory=ProfileConfig)

    @model_validator(mode="after")
    def _profile_within_run(self) -> TrainConfig:
        if self.profile.start > self.max_steps:
            raise ValueError(
                f"train.profile.start ({self.profile.start}) is past train.max_steps ({self.max_steps}), so no "
                f"step would be traced; start the trace at a step the run reaches, or 0 for none"
            )
        return self


class EvalConfig(Section):
    metric: str = Field("loss", description="validation metric watched by early stopping")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: max for accuracy and exact_match, else min")
    max_batches: int = Field(0, ge=0, description="batches per rank; 0 = the whole validation split")
    batch_size: int = Field(0, ge=0, description="0 = train.batch_size")
    patience: int = Field(0, ge=0, description="early stopping: evaluations without improvement; 0 = off")
    min_delta: float = Field(0.0, ge=0)


class InitConfig(Section):
    from_run: str = Field(
        "",
        description="start from this finished run's weights (and pruned shape) instead of a fresh "
        "initialisation; its model section must equal this recipe's; '' = fresh",
    )
    from_hf: str = Field(
        "",
        description="start from the Hugging Face checkpoint in this directory (config.json, safetensors, "
        "tokenizer.json; GPT-2, Llama, Mistral, Qwen2): the model section is read from its config.json "
        "(a stated field must agree; dropout is free) and the data must be tokenised with its tokenizer.json; "
        "'' = none",
    )

    @model_validator(mode="after")
    def _one_source(self) -> InitConfig:
        if self.from_run and self.from_hf:
            raise ValueError("init.from_run and init.from_hf both name weights to start from; keep one of them")
        return self


class ParallelConfig(Section):
    strategy: Literal["auto", "single", "ddp", "fsdp", "tp", "fsdp+tp", "pp"] = Field(
        "auto",
        description="auto: single for one process, else the simplest layout `ember plan` finds to fit; "
        "ddp: data parallel; fsdp: FSDP2 (parameters, gradients and optimiser state sharded); tp: tensor parallel "
        "(Transformer blocks split by heads); fsdp+tp: a 2-D mesh; pp: pipeline stages (gpt, llama)",
    )
    tp: int = Field(2, ge=1, description="fsdp+tp: ranks per tensor-parallel group (the rest is data parallel)")
    pp_schedule: Literal["1f1b", "gpipe"] = Field(
        "1f1b", description="pp: the micro-batch schedule; train.grad_accum micro-batches per step"
    )
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="fsdp: dtype parameters are gathered and computed in; auto: bf16 when train.precision is bf16",
    )
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = Field("fp32", description="fsdp: dtype gradients are reduced in")
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free gathered parameters after forward (ZeRO-3); false keeps them for backward (ZeRO-2, more memory, less traffic)",
    )
    timeout_s: float = Field(
        600, gt=0, description="a collective waiting longer than this ends the job (a rank died or hangs)"
    )


class Recipe(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    plugins: list[PluginConfig] = Field(
        default_factory=list,
        description="step plugins (ember.plugins): distill, "
        "keep_zeros, ewc, l1, ema; each acts at its own point of every step",
    )

    @model_validator(mode="before")
    @classmethod
    def _earlier_forms(cls, raw: Any) -> Any:
        return migrate_recipe(raw)  # optim.l1, train.ema_decay, distill, init.keep_zeros, continual (ember.migrate)

    @model_validator(mode="before")
    @classmethod
    def _model_from_hf(cls, raw: Any) -> Any:
        """With init.from_hf, the model section is the checkpoint's config.json (ember.interop.hf_config);
        without the directory (a run resumed elsewhere) the section saved in the run's recipe stands."""
        init = raw.get("init") if isinstance(raw, dict) else None
        source = init.get("from_hf") if isinstance(init, dict) else None
        if not source or not isinstance(source, str):
            return raw
        if not (Path(source) / "config.json").is_file() and isinstance(raw.get("model"), dict) and raw["model"]:
            return raw
        from ember.interop.hf_config import resolve_model_section

        try:
            return {**raw, "model": resolve_model_section(raw.get("model"), source)}
        except EmberError as err:
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.train.precision == "fp16" and self.train.device == "cpu":
            raise ValueError("train.precision=fp16 needs CUDA (a grad scaler); use bf16 on the CPU")
        if self.schedule.warmup_steps >= self.train.max_steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be smaller than train.max_steps "
                f"({self.train.max_steps}), or the peak learning rate is never reached; give the warmup as a "
                f"share of the run instead (schedule.warmup_fraction=0.05 and schedule.warmup_steps=0), which "
                f"shortens with the run"
            )
        names = [p.name for p in self.plugins]
        if len(set(names)) < len(names):
            raise ValueError(
                f"plugins lists {sorted({n for n in names if names.count(n) > 1})} more than once; each "
                f"plugin acts once per step, so list it once"
            )
        if self.objective.name == "simclr" and self.train.label_smoothing:
            raise ValueError(
                "train.label_smoothing does not apply to objective.name=simclr (a view's score against "
                "itself is -inf, never a candidate); set it to 0"
            )
        task = self.model.task if self.model.name == "custom" else objective_task(self.objective, data_task(self.data))
        if task == "loss" and self.train.label_smoothing:
            raise ValueError(
                "train.label_smoothing smooths ember's cross-entropy; a module with model.task=loss "
                "computes its own loss, so it would be ignored. Set it to 0 (or smooth inside the module)"
            )
        metrics = METRICS[task] if task else (self.eval.metric,)
        if self.eval.metric not in metrics:
            raise ValueError(
                f"eval.metric {self.eval.metric!r} is not reported for task {task!r} (data "
                f"{self.data.name!r}, objective {self.objective.name!r}); choose one of {list(metrics)}"
            )
        return self

    def to_yaml(self) -> str:
        """The recipe as YAML that :func:`load_recipe` reads back equal (RUN/recipe.yaml)."""
        return yaml.dump(self.model_dump(mode="json"), Dumper=RecipeDumper, sort_keys=False, allow_unicode=True)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 160, 160


def _short_repr(value: Any) -> str:
    """``repr(value)`` cut to one line's worth: a given list may hold thousands of items."""
    return _short(_REPR.repr(value))


def _error_path(loc: tuple) -> str:
    """pydantic's location as the --set key that fixes it: a list entry by its name (plugins.ema.decay)."""
    parts = [p for p in loc if p not in {"function-after[_cross_checks(), Recipe]"}]
    if len(parts) >= 3 and isinstance(parts[1], int) and isinstance(parts[2], str):  # [index, tag]: the tag names it
        parts = [parts[0], *parts[2:]]
    return ".".join(str(p) for p in parts)


def _did_you_mean(loc: tuple) -> str:
    """The advice after an unknown key: the keys spelt like it (ember.recipe_keys.suggest), and where to look."""
    where = _error_path(loc).rpartition(".")[0]  # the section: model.gpt, plugins.ema, data.clean, train
    listing = f"`ember recipe explain {where}` lists its keys" if where else "`ember recipe explain` lists the sections"
    found = suggest(Recipe, loc)
    if not found:
        return f"no key is spelt like it; {listing}"
    return f"did you mean {' or '.join(found)}? ({listing})"


def _closest_choice(e: dict) -> str:
    """' (did you mean 'gpt'?)' after a name that is not one of the choices, when one is spelt like it."""
    given = e.get("ctx", {}).get("tag") if e["type"] == "union_tag_invalid" else e.get("input")
    choices = e.get("ctx", {}).get("expected_tags" if e["type"] == "union_tag_invalid" else "expected")
    if e["type"] not in ("union_tag_invalid", "literal_error") or not isinstance(given, str) or not choices:
        return ""
    found = closest(given, re.findall(r"'([^']*)'", choices), n=1)
    return f"; did you mean {found[0]!r}?" if found else ""


def _format_validation_error(err: ValidationError, source: str, within: tuple = ()) -> str:
    """One paragraph for all of ``err``'s problems; ``within``: where the validated mapping sits in a
    recipe (``("data",)`` for a data section alone), for the keys suggested."""
    lines = [f"The recipe {source} is not valid:"]
    for e in err.errors():
        path = ".".join(filter(None, [*within, _error_path(e["loc"])]))  # a section's own checks: the section
        # Discriminated unions put the tag in the path (model.gpt.n_head): keep it, it names the model.
        given = e.get("input")
        given_text = "" if isinstance(given, dict) else f" (given: {_short_repr(given)})"
        if e["type"] == "number_expected":  # ember.schema: the section's location, the key in the context
            key = e["ctx"]["key"]
            lines.append(
                f"  - {path + '.' + key if path else key}: {e['ctx']['problem']} (given: {_short(e['ctx']['given'])})"
            )
        elif e["type"] == "extra_forbidden":
            lines.append(f"  - {path}: unknown key{given_text}; {_did_you_mean((*within, *e['loc']))}")
        elif e["type"] == "missing":
            lines.append(f"  - {path}: required key is missing")
        elif e["type"] == "list_type" and isinstance(given, str | int | float):  # --set k=v where k takes a list
            lines.append(
                f"  - {path}: takes a list, in brackets (given: {_short_repr(given)}): --set '{path}=[{given}]', "
                f"or [{given}] in the file"
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  - {path or 'recipe'}: {msg}{given_text}{_closest_choice(e)}")
    lines.append("Fix the recipe file or the --set override and run again.")
    return "\n".join(lines)


# --- reading YAML -------------------------------------------------------------------------
# A recipe is small and flat. These bounds refuse, quickly and with a message, documents that
# would otherwise hang or crash the loader (a billion-laughs alias bomb expands 100 bytes into
# 10^9 list items; 50,000 nested brackets exhaust Python's stack) and never bind a real recipe.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 64  # nesting, aliases expanded; a recipe needs about 4
MAX_NODES = 20_000  # scalars, lists and mappings, aliases expanded; a recipe has a few hundred

# YAML 1.2 floats: PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so
# 3e-4 and 1e5 would be text, and text is refused where a number is expected (ember.schema).
_YAML12_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _Refused(Exception):
    """Well-formed YAML that a recipe may not be; the message says why."""


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats, duplicate keys refused, and nesting and
    alias expansion bounded (:data:`MAX_DEPTH`, :data:`MAX_NODES`)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._values = 0  # values so far, aliases expanded: refused as soon as it passes MAX_NODES
        self._checked: set[int] = set()

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        event = self.peek_event()
        line = event.start_mark.line + 1
        self._depth += 1
        if self._depth > MAX_DEPTH:  # before recursing further: the composer recurses per level
            raise _Refused(f"it nests deeper than {MAX_DEPTH} levels (line {line})")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(event, yaml.AliasEvent):
            if not hasattr(node, "ember_size"):  # the anchored node is still open: it contains the alias
                raise _Refused(f"the alias *{event.anchor} on line {line} refers to a list or mapping that contains it")
        else:
            _measure(node)
        # An alias adds its whole expansion; a fresh list or mapping only itself (its items were counted).
        self._values += node.ember_size if isinstance(event, (yaml.AliasEvent, yaml.ScalarEvent)) else 1
        if self._values > MAX_NODES or node.ember_depth > MAX_DEPTH:
            raise _Refused(
                f"with its aliases (*name) expanded it holds more than {MAX_NODES} values or nests deeper "
                f"than {MAX_DEPTH} levels (line {line}); a recipe never needs that many"
            )
        return node

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked before flattening: merging (<<) mutates the node, and its merged keys may
        # legitimately repeat the node's own (the node's win). Each node once, as written.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            _refuse_duplicate_keys(self, node)
        super().flatten_mapping(node)


class RecipeDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes text the :class:`RecipeLoader` would read as a float ('1e5')."""


for _cls in (RecipeLoader, RecipeDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def _measure(node: yaml.Node) -> None:
    """Size and depth of a freshly composed node with aliases expanded; its children are measured."""
    if isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    node.ember_size = 1 + sum(child.ember_size for child in children)
    node.ember_depth = 1 + max((child.ember_depth for child in children), default=0)


def _refuse_duplicate_keys(loader: RecipeLoader, node: yaml.MappingNode) -> None:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the constructor refuses it with its own error
            continue
        seen[key] = line
        if first is not None:
            raise _Refused(
                f"the key {key!r} appears twice in one mapping (lines {first} and {line}); YAML would keep "
                f"only the second and drop the first without a word. Remove one of them"
            )


def read_yaml(text: str, source: str) -> Any:
    """Parse ``text`` with :class:`RecipeLoader`; any problem is an EmberError naming ``source``."""
    if len(text) > MAX_RECIPE_BYTES:
        raise EmberError(
            f"{source} is {len(text)} characters long; a recipe is refused above {MAX_RECIPE_BYTES} "
            f"(a real one is a few hundred). Check that it is the file you meant."
        )
    loader = None
    try:
        loader = RecipeLoader(text)  # its reader already refuses control characters
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise EmberError(f"{source} is not valid YAML: {err}. Fix the syntax and run again.") from None
    except _Refused as err:
        raise EmberError(f"{source} is refused: {err}.") from None
    except RecursionError:  # a last guard; MAX_DEPTH stops nesting long before the stack ends
        raise EmberError(f"{source} is refused: it nests too deeply for a recipe.") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_recipe_file(path: str | Path) -> Any:
    """The YAML document in ``path``, read as :func:`load_recipe` reads recipes (UTF-8, bounded)."""
    p = Path(path)
    if not p.is_file():
        raise EmberError(f"Recipe file {p} does not exist. Pass a path to a YAML recipe, e.g. recipes/gpt-tiny.yaml.")
    try:
        if p.stat().st_size > MAX_RECIPE_BYTES:
            raise EmberError(
                f"Recipe {p} is {p.stat().st_size} bytes; a recipe is refused above {MAX_RECIPE_BYTES} "
                f"bytes (a real one is a few hundred). Check that it is the file you meant."
            )
        data = p.read_bytes()
    except OSError as err:
        raise EmberError(f"Recipe {p} cannot be read ({err.strerror}). Check its permissions and run again.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EmberError(
            f"Recipe {p} is not UTF-8 text (byte {err.start} is {data[err.start]:#04x}). Save it as "
            f"UTF-8 (most editors offer it under 'encoding') and run again."
        ) from None
    return read_yaml(text, f"Recipe {p}")


def read_recipe(path: str | Path) -> dict:
    """The recipe mapping in ``path`` with its ``base:`` chain merged under it (ember.recipe_base),
    before ``--set`` overrides and validation.

    Example::

        read_recipe("recipes/gpt-tiny.yaml")["model"]["name"]  # "gpt"
    """
    return read_with_bases(Path(path), read_recipe_file)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` → (["optim", "lr"], 0.0003). Values are YAML."""
    if "=" not in text:
        raise EmberError(f"--set {text!r} is not of the form section.key=value (for example --set optim.lr=3e-4).")
    key, _, raw = text.partition("=")
    path = key.strip().split(".")
    if (len(path) < 2 and path[0] not in LIST_KEYS) or not all(path):
        raise EmberError(
            f"--set {text!r}: the key must name a section and a key, like train.max_steps=100 (or a "
            f"plugin and its key, like plugins.ema.decay=0.999)."
        )
    # The recipe's own reader: 3e-4 is a float, and an alias bomb or unclosed [ is an EmberError.
    value = read_yaml(raw, f"--set {text!r}: the value") if raw.strip() else ""
    return path, value


def _unshared(value: Any) -> Any:
    """A copy in which no dict or list appears twice: YAML aliases (*name) share one object, and an
    override of one place must not change the other silently. Depth is bounded by the reader."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


# Top-level recipe keys holding a list of named entries (``plugins``).
LIST_KEYS = frozenset(k for k, f in Recipe.model_fields.items() if get_origin(f.annotation) is list)


def _entry(entries: list, name: str) -> dict:
    """The entry of ``entries`` named ``name``, appended when there is none (``--set plugins.ema.decay=0.99``)."""
    found = next((e for e in entries if isinstance(e, dict) and e.get("name") == name), None)
    if found is None:
        found = {"name": name}
        entries.append(found)
    return found


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of ``raw`` with each ``section.key=value`` override set (see :func:`parse_override`
    and :func:`set_key`)."""
    raw = _unshared(raw) if overrides else raw
    for text in overrides:
        path, value = parse_override(text)
        set_key(raw, path, value, f"--set {text!r}")
    return raw


def set_key(raw: dict, path: list[str], value: Any, what: str) -> None:
    """Set the key ``path`` of the recipe mapping ``raw``: a section's key; in a list of named
    entries the entry of that name (``plugins.ema.decay``, the entry added when missing;
    ``plugins.ema=null`` removes it); an earlier version's key at today's place
    (``train.ema_decay``, ``ember.migrate``; 0 removes the plugin). ``what`` names it in errors."""
    path, off = today_path(path, value)
    if (len(path) == 2 or off) and path[0] in LIST_KEYS:
        entries = raw.setdefault(path[0], [])
        if not isinstance(entries, list):
            raise EmberError(f"{what}: {path[0]} is not a list of entries.")
        if off or value is None:
            raw[path[0]] = [e for e in entries if not (isinstance(e, dict) and e.get("name") == path[1])]
        elif value is True or isinstance(value, dict):
            _entry(entries, path[1]).update(value if isinstance(value, dict) else {})
        else:
            raise EmberError(
                f"{what}: name a key of the entry, like {path[0]}.{path[1]}.KEY=VALUE, or null to remove it."
            )
        return
    node: Any = raw
    for depth, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = _entry(node, part)
            continue
        child = node.setdefault(part, [] if depth == 0 and part in LIST_KEYS else {})
        if not isinstance(child, (dict, list)) or (isinstance(child, list) and part not in LIST_KEYS):
            raise EmberError(f"{what}: {part} is a value, not a section.")
        node = child
    if isinstance(node, list):
        raise EmberError(f"{what}: name a key of the entry, like plugins.{path[-1]}.KEY=VALUE.")
    node[path[-1]] = value


def recipe_from_dict(raw: dict, source: str = "<dict>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise EmberError(_format_validation_error(err, source)) from None


def data_config_from_dict(raw: dict, source: str = "<dict>") -> DataConfig:
    """A recipe's ``data`` section on its own (``ember data prepare --recipe``)."""
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as err:
        raise EmberError(_format_validation_error(err, source, ("data",))) from None


STEP_CAP_ENV = "EMBER_MAX_STEPS"


def step_capped(recipe: Recipe) -> tuple[Recipe, str | None]:
    """``recipe`` with train.max_steps lowered to ``$EMBER_MAX_STEPS`` when that is set and smaller,
    and the line that says so (None when nothing changed). A smoke-test knob: the README's
    commands run under it in the tests, so every example trains a few steps. A warmup given as
    warmup_fraction shortens with the run; warmup_steps at or past the cap is refused as always.

    Example::

        os.environ["EMBER_MAX_STEPS"] = "5"
        step_capped(load_recipe("recipes/gpt-tiny.yaml"))[0].train.max_steps  # 5
    """
    raw = os.environ.get(STEP_CAP_ENV, "").strip()
    if not raw:
        return recipe, None
    if not raw.isdigit() or int(raw) < 1:
        raise EmberError(f"{STEP_CAP_ENV}={raw!r} is not a step count: set it to a whole number ≥ 1, or unset it.")
    cap = int(raw)
    if recipe.train.max_steps <= cap:
        return recipe, None
    dumped = recipe.model_dump(mode="json")
    dumped["train"]["max_steps"] = cap
    try:  # a key bound to the run's length (warmup_steps, profile.start) may not fit the shorter run
        capped = recipe_from_dict(dumped, f"{STEP_CAP_ENV}={cap} applied to the recipe")
    except EmberError as err:
        raise EmberError(
            str(err).replace(
                "Fix the recipe file or the --set override and run again.",
                f"{STEP_CAP_ENV}={cap} cut train.max_steps from {recipe.train.max_steps}: raise {STEP_CAP_ENV} "
                f"past that key, or unset it, and run again.",
            )
        ) from None
    return capped, f"{STEP_CAP_ENV}={cap}: train.max_steps {recipe.train.max_steps} → {cap} for this run"


def require_recipe(recipe: Any, function: str) -> None:
    """Refuse, with the way to make one, anything but a Recipe where ``function`` takes one (a path, a dict)."""
    if not isinstance(recipe, Recipe):
        raise EmberError(
            f"{function} takes a Recipe, not a {type(recipe).__name__} ({_short_repr(recipe)}). Make one with "
            f'ember.load_recipe("recipes/mlp-digits.yaml", ["train.max_steps=10"]) (a file and --set-style '
            f"overrides) and pass that."
        )


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (its ``base:`` chain merged under it), apply ``section.key=value``
    overrides, validate.

    Example::

        load_recipe("recipes/cnn-digits.yaml", ["train.max_steps=10"]).train.max_steps  # 10
    """
    raw: Any = {}
    source = "<overrides>"
    if path is not None:
        top = read_recipe_file(Path(path))  # read once: the chain below starts from it
        raw = read_with_bases(Path(path), lambda p: top if p == Path(path) else read_recipe_file(p))
        based_on = top.get("base") if isinstance(top, dict) else None  # a key in error may be in the base
        source = f"{path} (merged over its base: {based_on})" if based_on else str(path)
    try:  # the file's own old sections first: an override then lands on today's keys
        raw = migrate_recipe(raw)
    except ValueError as err:
        raise EmberError(
            f"The recipe {source} is not valid:\n  - recipe: {err}\nFix the recipe file and run again."
        ) from None
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, source)
