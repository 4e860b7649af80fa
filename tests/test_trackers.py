"""Experiment trackers, read back: every registered tracker records the very losses, validation
metrics, recipe and samples that metrics.jsonl holds; MLflow continues the same run on resume
without a step twice; a missing package is refused before training with the extra named; a
tracker registered outside ember is accepted by a recipe and sent the run's figures, and checking a
recipe imports no tracker's package; every log line carries the process's peak memory."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import tiny_recipe
from ember.config import TrainConfig
from ember.errors import EmberError
from ember.training.flops import peak_cache_path
from ember.training.loop import train
from ember.training.peak_memory import peak_memory
from ember.training.trackers import TRACKERS, register_tracker
from ember.training.trackers.base import flat_recipe


@dataclass
class ReadBack:
    """What a tracker holds, in one shape: scalars by tag and step, recipe parameters, texts by tag and step."""

    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    texts: dict[str, dict[int, str]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def read_tensorboard(run: Path) -> ReadBack:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    out = ReadBack()
    for tag in events.Tags()["scalars"]:
        out.scalars[tag] = {e.step: e.value for e in events.Scalars(tag)}
        out.extra.setdefault("history_lengths", {})[tag] = len(events.Scalars(tag))  # a purged event is gone
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    for key, value in hparams.items():
        held = getattr(value, value.WhichOneof("kind"))  # numbers come back as floats: 4 as 4.0
        out.params[key] = str(int(held)) if isinstance(held, float) and held.is_integer() else str(held)
    for tag in events.Tags()["tensors"]:
        texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)}
        out.texts[tag.removesuffix("/text_summary")] = {s: unindent(t) for s, t in texts.items()}
    return out


def unindent(markdown: str) -> str:
    return "\n".join(line.removeprefix("    ") for line in markdown.split("\n"))


def read_mlflow(run: Path) -> ReadBack:
    import mlflow
    from mlflow.tracking import MlflowClient

    kept = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert kept["store"] == "RUN/mlflow.db"
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    info = client.get_run(kept["run_id"])
    out = ReadBack(params=dict(info.data.params), extra={"status": info.info.status, "client": client, "info": info})
    for key in info.data.metrics:
        out.scalars[key] = {m.step: m.value for m in client.get_metric_history(kept["run_id"], key)}
        out.extra.setdefault("history_lengths", {})[key] = len(client.get_metric_history(kept["run_id"], key))
    for artifact in client.list_artifacts(kept["run_id"], "samples"):
        step = int(artifact.path.split("_")[-1].removesuffix(".txt"))
        out.texts.setdefault("sample", {})[step] = mlflow.artifacts.load_text(
            f"{info.info.artifact_uri}/{artifact.path}"
        )
    out.texts["recipe"] = {0: mlflow.artifacts.load_text(f"{info.info.artifact_uri}/recipe.yaml")}
    return out


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks
    of chunks, each with a 7-byte header: crc32, length, type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # too small for a chunk header: padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb(run: Path) -> ReadBack:
    """Every offline run directory under RUN/wandb, oldest first (a resume adds one)."""
    out = ReadBack(extra={"run_ids": set(), "history_lengths": {}})
    for offline in sorted((run / "wandb").glob("offline-run-*")):
        for record in wandb_records(next(offline.glob("run-*.wandb"))):
            read_wandb_record(record, offline, out)
    return out


def read_wandb_record(record, offline: Path, out: ReadBack) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        config.pop("_wandb", None)
        out.params = {k: str(v) for k, v in flat_recipe(config).items()}
        out.extra["run_ids"].add(record.run.run_id)
    elif kind == "history":
        row: dict = {}
        for item in record.history.item:  # a media value comes as one item per field: ["val/sample", "path"]
            *outer, last = [item.key] if item.key else list(item.nested_key)
            place = row
            for key in outer:
                place = place.setdefault(key, {})
            place[last] = json.loads(item.value_json)
        for key, value in row.items():
            if key == "val/sample":
                html = (offline / "files" / value["path"]).read_text()
                out.texts.setdefault("sample", {})[row["_step"]] = html
            elif not key.startswith("_"):
                out.scalars.setdefault(key, {})[row["_step"]] = value
                out.extra["history_lengths"][key] = out.extra["history_lengths"].get(key, 0) + 1
    elif kind == "exit":
        out.extra["exit_code"] = record.exit.exit_code


READERS = {"tensorboard": read_tensorboard, "mlflow": read_mlflow, "wandb": read_wandb}


def logged(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r], [r for r in rows if r.get("split") == "val"]


def tracked_recipe(name: str, *extra: str):
    return tiny_recipe("gpt", f"train.trackers=[{name}]", "train.eval_every=2", *extra)


def trackers_in_schema() -> dict:
    from ember.recipe_tools import recipe_json_schema

    return recipe_json_schema()["$defs"]["TrainConfig"]["properties"]["trackers"]["items"]


def test_every_tracker_has_a_reader_and_is_in_the_recipe_schema():
    assert set(READERS) == set(TRACKERS) == {"tensorboard", "mlflow", "wandb"}
    assert trackers_in_schema() == {"type": "string", "enum": ["mlflow", "tensorboard", "wandb"]}  # for editors


class MemoryTracker:
    """A tracker of one's own, registered outside ember (here, by the ``memory_tracker`` fixture): it
    keeps what it is sent."""

    runs: list[MemoryTracker] = []

    def start(self, recipe: dict, recipe_text: str, run_dir: Path, resumed_step: int, kept: dict | None) -> dict:
        self.recipe, self.run_dir, self.kept, self.status = recipe, run_dir, kept, None
        self.metrics: dict[str, dict[int, dict[str, float]]] = {}
        self.texts: dict[str, dict[int, str]] = {}
        MemoryTracker.runs.append(self)
        return {"started_at": resumed_step}

    def log_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        self.metrics.setdefault(split, {})[step] = dict(metrics)

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.texts.setdefault(tag, {})[step] = text

    def finish(self, status: str) -> None:
        self.status = status


@pytest.fixture
def memory_tracker():
    register_tracker("memory")(MemoryTracker)  # as a user's module would, with the decorator on its class
    MemoryTracker.runs.clear()
    yield MemoryTracker
    TRACKERS.pop("memory")


def test_a_tracker_registered_outside_ember_is_accepted_and_sent_the_runs_figures(tmp_path, memory_tracker):
    run = train(tracked_recipe("memory"), tmp_path).run_dir  # no edit of ember.config: the registry decides
    (tracker,) = memory_tracker.runs
    train_rows, val_rows = logged(run)
    assert tracker.status == "finished" and tracker.run_dir == run and tracker.kept is None
    assert tracker.recipe["train"]["trackers"] == ["memory"] and tracker.recipe["train"]["max_steps"] == 4
    for key in ("loss", "lr", "grad_norm"):
        sent = {step: figures[key] for step, figures in tracker.metrics["train"].items()}
        assert sent == pytest.approx({r["step"]: r[key] for r in train_rows}, rel=1e-6), key
    sent_val = {step: figures["bpb"] for step, figures in tracker.metrics["val"].items()}
    assert sent_val == pytest.approx({r["step"]: r["bpb"] for r in val_rows}, rel=1e-6) and sorted(sent_val) == [2, 4]
    assert sorted(tracker.texts["sample"]) == [2, 4]
    assert json.loads((run / "trackers.json").read_text())["memory"] == {"started_at": 0, "logged_up_to": 4}
    assert "memory" in trackers_in_schema()["enum"]  # the schema lists what is registered when it is made
    from ember.recipe_tools import explain_key

    assert "type     list of one of: memory, mlflow, tensorboard, wandb" in explain_key("train.trackers")  # and explain


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made (~70 migrations, 4 s, once: then a copy of the empty
    store ember keeps in its cache), for a store of one's own."""
    from mlflow.tracking import MlflowClient

    from ember.training.trackers.mlflow_tracker import own_store

    folder = tmp_path_factory.mktemp("mlflow")
    own_store(folder, MlflowClient)
    return folder / "mlflow.db"


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_tracker_records_what_metrics_jsonl_holds(tmp_path, name, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline: the default under test
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = train(tracked_recipe(name), tmp_path).run_dir
    printed = capfd.readouterr()
    assert f"{name}:" not in printed.err + printed.out  # a tracker's own lines stay out of ember's output
    got, (train_rows, val_rows) = READERS[name](run), logged(run)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [r["step"] for r in val_rows] == [2, 4]
    for key in ("loss", "lr", "grad_norm", "peak_rss_mb"):
        assert got.scalars[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in train_rows}, rel=1e-6), key
    for key in ("loss", "ppl", "bpb"):
        assert got.scalars[f"val/{key}"] == pytest.approx({r["step"]: r[key] for r in val_rows}, rel=1e-6), key
    assert all(r["peak_rss_mb"] > 50 for r in train_rows)  # a process with torch loaded holds far more
    assert got.params["train.max_steps"] == "4" and got.params["model.n_embd"] == "32"
    assert got.params["train.trackers"] == json.dumps([name])
    samples = got.texts["sample"]
    assert sorted(samples) == [2, 4] and all(len(text) > 10 for text in samples.values())
    if name != "wandb":  # W&B keeps the recipe as the run's config (the params above)
        assert got.texts["recipe"][0].rstrip("\n") == (run / "recipe.yaml").read_text().rstrip("\n")
    if name == "mlflow":
        assert got.extra["status"] == "FINISHED" and got.extra["info"].info.run_name == run.name
        import mlflow

        assert not Path("mlflow.db").exists()  # MLflow's default store, in the working directory: untouched
        assert (peak_cache_path().parent / f"mlflow-{mlflow.__version__}-empty.db").is_file()  # new stores copy it
    if name == "wandb":
        assert got.extra["exit_code"] == 0 and "<pre>" in samples[2]


@pytest.mark.parametrize("name", ["mlflow", "wandb", "tensorboard"])
def test_resume_continues_the_same_tracker_run_without_a_step_twice(tmp_path, monkeypatch, name):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tracked_recipe(name, "train.checkpoint_every=2", "schedule.name=cosine", "train.max_steps=6")
    run = train(recipe, tmp_path).run_dir
    first_lrs = {r["step"]: r["lr"] for r in logged(run)[0]}
    # As if the process died right after step 4's checkpoint, with steps 5 and 6 already tracked; resumed
    # with a longer run, whose cosine schedule gives step 6 another learning rate.
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "model.safetensors").unlink()
    longer = tracked_recipe(name, "train.checkpoint_every=2", "schedule.name=cosine", "train.max_steps=7")
    train(longer, run, resume="auto")
    again, lrs = READERS[name](run), {r["step"]: r["lr"] for r in logged(run)[0]}
    assert again.extra["history_lengths"]["train/lr"] == 7  # steps 1..7, each once
    assert lrs[6] != pytest.approx(first_lrs[6]) and sorted(lrs) == [1, 2, 3, 4, 5, 6, 7]
    if name == "tensorboard":  # purged and written again: the resumed run's values
        assert again.scalars["train/lr"] == pytest.approx(lrs, rel=1e-6)
        return
    # MLflow cannot delete a value, W&B's steps only go up: the first one logged at a step stays
    assert again.scalars["train/lr"] == pytest.approx({**lrs, 5: first_lrs[5], 6: first_lrs[6]}, rel=1e-6)
    if name == "wandb":
        assert len(again.extra["run_ids"]) == 1 and len(list((run / "wandb").glob("offline-run-*"))) == 2
    else:
        import mlflow.artifacts

        info = again.extra["info"].info
        assert again.params["train.max_steps"] == "6"  # a parameter cannot change; recipe_step_4.yaml says 7
        assert "max_steps: 7" in mlflow.artifacts.load_text(f"{info.artifact_uri}/recipe_step_4.yaml")
        assert json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"] == info.run_id
        assert len(again.extra["client"].search_runs([info.experiment_id])) == 1 and info.status == "FINISHED"


def test_mlflow_writes_where_its_environment_says(tmp_path, monkeypatch, empty_mlflow_store):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "team.db"
    shutil.copy(empty_mlflow_store, store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits")
    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts in ./mlruns: not in the checkout
    run = train(tracked_recipe("mlflow"), tmp_path / "run").run_dir
    assert not (run / "mlflow.db").exists() and not (run / "mlartifacts").exists()
    client = MlflowClient(f"sqlite:///{store}")
    (found,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert found.info.run_name == "run" and found.data.tags["ember.run_dir"] == str(run.resolve())
    losses = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train/loss")}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in logged(run)[0]}, rel=1e-6)


@pytest.mark.parametrize("name,extra", [("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tb")])
def test_a_missing_tracker_package_is_refused_before_training(tmp_path, monkeypatch, name, extra):
    import importlib.util

    real = importlib.util.find_spec
    module = TRACKERS[name].module
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(EmberError, match=rf"pip install 'ember\[{extra}\]'") as err:
        train(tracked_recipe(name), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    message = str(err.value)  # ember.extras' paragraph, as for every other extra
    assert message.startswith(f"The {name} tracker (train.trackers) needs the {module} package") and "\n" not in message
    assert message.endswith(f"; or take {name} out of train.trackers.")


def test_a_package_that_fails_to_import_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # installed but broken: import raises ImportError
    from ember.training.trackers.wandb_tracker import WandbTracker

    with pytest.raises(EmberError, match=r"ember\[wandb\]"):
        WandbTracker().start({}, "", tmp_path, 0, None)


def test_trackers_are_listed_once_and_by_a_registered_name(memory_tracker):
    with pytest.raises(ValueError, match="tensorboard more than once"):
        TrainConfig(trackers=["tensorboard", "mlflow", "tensorboard"])
    assert TrainConfig().trackers == [] and TrainConfig(trackers=["memory", "mlflow"]).trackers == ["memory", "mlflow"]
    with pytest.raises(EmberError) as err:
        tiny_recipe("gpt", "train.trackers=[memory,mlfow]")
    message = str(err.value)
    assert (
        "train.trackers: 'mlfow' is not a registered tracker; did you mean 'mlflow'? The registered ones: " in message
    )
    assert "ones: memory, mlflow, tensorboard, wandb (a tracker of one's own" in message
    with pytest.raises(ValueError, match="'neptune' is not a registered tracker. The registered ones: memory, mlflow"):
        TrainConfig(trackers=["neptune"])
    TRACKERS.pop("memory")
    with pytest.raises(ValueError, match="'memory' is not a registered tracker"):  # once unregistered, refused
        TrainConfig(trackers=["memory"])
    register_tracker("memory")(MemoryTracker)  # for the fixture's teardown
    with pytest.raises(ValueError, match="give both module and extra"):
        register_tracker("half", module="neptune")
    with pytest.raises(ValueError, match="one of ember's extras"):
        register_tracker("neptune", module="neptune", extra="neptune")


def test_tracker_modules_import_no_tracker_package_when_loaded():
    """``ember.config`` checks train.trackers against the registry, which loads these modules: each
    imports its package (slow: MLflow and W&B take seconds) only when a run starts."""
    import ast

    packages = {"tensorboard", "mlflow", "wandb"}
    folder = Path(sys.modules["ember.training.trackers"].__file__).parent
    checked = 0
    for path in folder.glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # the module's own lines, not its functions'
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[0] in packages or n.startswith("torch.utils.tensorboard")]
            assert not bad, f"{path.name} imports {bad} when loaded"
        checked += 1
    assert checked >= 5


@pytest.mark.slow  # about 5 s: a fresh process imports torch
def test_checking_a_recipes_trackers_imports_no_tracker_package():
    script = (
        "import sys\n"
        "from ember.config import TrainConfig\n"
        "from ember.recipe_tools import explain_key, recipe_json_schema\n"
        "TrainConfig(trackers=['tensorboard', 'mlflow', 'wandb'])\n"
        "recipe_json_schema(), explain_key('train.trackers')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow', 'wandb')"
        " or m.startswith('torch.utils.tensorboard')))\n"
    )
    src = str(Path(sys.modules["ember"].__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_peak_rss_is_the_kernels_high_water_mark():
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("reads Linux's /proc")
    figures = peak_memory(__import__("torch").device("cpu"))
    hwm = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    assert figures["peak_rss_mb"] == pytest.approx(hwm / 1024, rel=0.02)  # VmHWM is in KiB
    assert "cuda_peak_mb" not in figures


def test_recipe_values_become_tracker_parameters():
    flat = flat_recipe(
        {"train": {"lr": 0.1, "trackers": ["mlflow"]}, "data": {"augment": {"scale": None}}, "plugins": []}
    )
    assert flat == {"train.lr": 0.1, "train.trackers": '["mlflow"]', "data.augment.scale": "null", "plugins": "[]"}
    from ember.training.trackers.mlflow_tracker import clip

    assert clip("x" * 10, 10) == "x" * 10
    cut = clip("y" * 7000, 6000)
    assert len(cut) == 6000 and cut.startswith("y" * 100) and cut.endswith("(cut: see the artifact recipe.yaml)")


def test_an_mlflow_store_mlflow_refuses_is_one_paragraph(tmp_path, monkeypatch):
    from ember.training.trackers.mlflow_tracker import MlflowTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # MLflow 3: file stores refused
    with pytest.raises(EmberError, match=r"MLflow cannot use the store MLFLOW_TRACKING_URI=file://.*sqlite:///"):
        MlflowTracker().start({"model": {"name": "mlp"}}, "", tmp_path, 0, None)


def test_mlflows_own_info_lines_stay_out_of_a_run(capfd):
    import logging

    import mlflow  # noqa: F401 (its import sets up the "mlflow" logger and its stderr handler)

    from ember.training.trackers.mlflow_tracker import quiet_mlflow

    with quiet_mlflow():
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        logging.getLogger("mlflow.store.db.utils").warning("a real warning")
    logging.getLogger("mlflow.store.db.utils").info("after: shown again")
    err = capfd.readouterr().err
    assert "Creating initial" not in err and "a real warning" in err and "after: shown again" in err


def test_a_wandb_setting_wandb_refuses_is_one_paragraph(tmp_path, monkeypatch):
    from ember.training.trackers.wandb_tracker import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(EmberError, match=r"W&B could not start a run \(WANDB_MODE=bogus: .*Unset WANDB_MODE"):
        WandbTracker().start({"model": {"name": "mlp"}}, "", tmp_path, 0, None)
