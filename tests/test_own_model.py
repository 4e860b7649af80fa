"""Bring your own model and data in Python: ``ember.train(recipe, model=module, data=dataset)``.

The module and the dataset are defined here, as a user would define them; they get ember's
loop, checkpoints, bit-exact resume, exact accumulation and run directory."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
from torch import nn

from conftest import QUIET
from ember.config import recipe_from_dict
from ember.errors import EmberError
from ember.training.loop import train


class Blobs(torch.utils.data.Dataset):
    """Two Gaussian blobs in 8 dimensions: class 0 around -1, class 1 around +1."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 8, generator=g) * 0.8 + (self.y[:, None] * 2 - 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]  # an (x, y) pair, as many datasets return


class TinyNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SelfScoring(nn.Module):
    """A module that returns its own loss, summed over the batch's samples (model.task=loss)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        target = batch["y"].float() * 2 - 1
        return (self.net(batch["x"]).squeeze(-1) - target).pow(2).sum()


def recipe(task: str = "classify", *overrides: str):
    raw = {
        "model": {"name": "custom", "task": task},
        "data": {"name": "custom"},
        "train": {**QUIET["train"], "deterministic": True, "max_steps": 30, "batch_size": 16},
        "optim": {"lr": 0.01},
        "eval": {"max_batches": 0},
    }
    for item in overrides:
        key, value = item.split("=")
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = json.loads(value)
    return recipe_from_dict(raw)


def weights(run_dir):
    return safetensors.torch.load_file(str(run_dir / "model.safetensors"))


def test_own_module_and_dataset_learn_and_leave_a_run_directory(tmp_path):
    result = train(recipe(), tmp_path / "run", model=TinyNet(), data=Blobs())
    assert result.metrics["accuracy"] > 0.9 and result.metrics["loss"] < 0.35  # chance is 0.5 and 0.69
    assert {"recipe.yaml", "metrics.jsonl", "model.safetensors", "model.json"} <= {
        p.name for p in result.run_dir.iterdir()
    }
    mine = TinyNet(seed=1)
    safetensors.torch.load_model(mine, str(result.run_dir / "model.safetensors"))  # back into the user's class
    assert torch.equal(mine.body[0].weight, weights(result.run_dir)["body.0.weight"])


def test_own_module_resumes_bit_identically(tmp_path):
    cut = recipe("classify", "train.max_steps=6", "train.checkpoint_every=3")
    full = weights(train(cut, tmp_path / "full", model=TinyNet(), data=Blobs()).run_dir)
    run = tmp_path / "cut"
    train(cut, run, model=TinyNet(), data=Blobs())
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "model.safetensors").unlink()
    assert train(cut, run, resume="auto", model=TinyNet(seed=7), data=Blobs()).step == 6  # any fresh instance
    resumed = weights(run)
    assert all(torch.equal(full[n], resumed[n]) for n in full)


def test_a_module_scoring_itself_is_exact_under_accumulation(tmp_path):
    small = recipe("loss", "train.batch_size=4", "train.grad_accum=4", "train.max_steps=3", 'optim.name="sgd"')
    big = recipe("loss", "train.batch_size=16", "train.grad_accum=1", "train.max_steps=3", 'optim.name="sgd"')
    a = weights(train(small, tmp_path / "a", model=SelfScoring(), data=Blobs()).run_dir)
    b = weights(train(big, tmp_path / "b", model=SelfScoring(), data=Blobs()).run_dir)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    assert train(small, tmp_path / "c", model=SelfScoring(), data=Blobs()).metrics.keys() == {"loss"}


def test_an_ember_model_trains_on_a_dataset_of_your_own(tmp_path):
    images = [(torch.rand(1, 8, 8) + (i % 3), i % 3) for i in range(120)]  # a plain list of pairs
    r = recipe_from_dict(
        {
            "model": {"name": "cnn", "width": 8, "depth": 1, "stages": 2},
            "data": {"name": "custom"},
            "train": {**QUIET["train"], "max_steps": 20},
            "optim": {"lr": 0.01},
        }
    )
    result = train(r, tmp_path / "cnn", data=images)
    info = json.loads((result.run_dir / "model.json").read_text())
    assert info["data"]["num_classes"] == 3 and info["data"]["input_shape"] == [1, 8, 8]
    assert result.metrics["accuracy"] > 0.8


def test_mismatches_are_one_paragraph(tmp_path):
    with pytest.raises(EmberError, match="goes with model.name=custom"):
        train(recipe_from_dict({"model": {"name": "cnn"}, "data": {"name": "digits"}}), tmp_path / "a", model=TinyNet())
    with pytest.raises(EmberError, match="a dict of tensors"):
        train(recipe(), tmp_path / "b", model=TinyNet(), data=[torch.zeros(8)] * 64)
    with pytest.raises(EmberError, match="integer targets"):
        train(recipe(), tmp_path / "c", model=TinyNet(), data=[(torch.zeros(8), 0.5)] * 64)

    class PerSample(SelfScoring):
        def forward(self, batch):
            return (self.net(batch["x"]).squeeze(-1) - batch["y"].float()).pow(2)  # not summed

    with pytest.raises(EmberError, match="summed over the batch's samples, one number"):
        train(recipe("loss"), tmp_path / "d", model=PerSample(), data=Blobs())

    class Summed(TinyNet):
        def forward(self, x):
            return super().forward(x).sum()  # one number where logits belong

    with pytest.raises(EmberError, match="model.task=loss"):
        train(recipe("classify"), tmp_path / "e", model=Summed(), data=Blobs())


def test_a_module_of_your_own_is_refused_by_layouts_that_shard_it():
    from ember.training.distributed import DistContext
    from ember.training.layouts import LAYOUTS

    for strategy in ("fsdp", "tp", "fsdp+tp", "pp"):
        with pytest.raises(EmberError, match="parallel.strategy=ddp"):
            LAYOUTS[strategy](DistContext(), recipe()).check()
    LAYOUTS["ddp"](DistContext(), recipe()).check()
