"""ember prune: masks reach the asked sparsity and stay through fine-tuning; structured pruning
removes channels and heads for real, and the smaller model runs, saves and loads."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import safetensors.torch
import torch

from conftest import tiny_recipe
from ember.cli import main
from ember.compress.prune import mask_smallest, prunable_layers, prune, sparsity
from ember.compress.quantize import quantize
from ember.compress.structure import count_params, resize_to_stored, shrink_to_params
from ember.config import recipe_from_dict
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.eval.evaluate import evaluate
from ember.models.cnn import CNNConfig
from ember.models.gpt import GPTConfig
from ember.models.llama import LlamaConfig
from ember.models.registry import build_model
from ember.models.seq2seq import Seq2SeqConfig
from ember.models.vit import ViTConfig
from ember.runs import load_trained_model
from ember.training.loop import train
from ember.training.tasks import FORWARD

SILENT = {"say": lambda text: None}
FINETUNE = {"finetune_steps": 60, "finetune_lr": 1e-2, "overrides": ["train.log_every=1000"]}


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A width-8 digits CNN, 95 % right on the val split after 60 steps."""
    run = tmp_path_factory.mktemp("cnn") / "cnn"
    train(
        tiny_recipe(
            "cnn",
            "train.max_steps=60",
            "train.batch_size=64",
            "optim.lr=1e-2",
            "train.log_every=1000",
            "eval.max_batches=0",
        ),
        run,
    )
    return run


def weights_of(run) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "model.safetensors"))


def test_l1_unstructured_zeros_the_smallest_share_of_every_layer():
    model = build_model(
        CNNConfig(width=8, depth=1, stages=2), DataSpec("classify", num_classes=10, input_shape=(1, 8, 8))
    )
    before = [m.weight.detach().clone() for m in prunable_layers(model)]
    mask_smallest(model, "l1-unstructured", 0.6)
    for w0, m in zip(before, prunable_layers(model)):
        zero = m.weight == 0
        assert int(zero.sum()) == round(0.6 * w0.numel())  # torch.nn.utils.prune rounds the count
        assert w0[zero].abs().max() <= w0[~zero].abs().min()  # the smallest went
        assert torch.equal(m.weight[~zero], w0[~zero])  # the rest is untouched
    assert not any(name.endswith("_orig") or name.endswith("_mask") for name in model.state_dict())  # made permanent


def test_global_zeros_the_smallest_weights_of_the_whole_model():
    model = build_model(
        CNNConfig(width=8, depth=1, stages=2), DataSpec("classify", num_classes=10, input_shape=(1, 8, 8))
    )
    before = torch.cat([m.weight.detach().flatten().clone() for m in prunable_layers(model)])
    mask_smallest(model, "global", 0.6)
    after = torch.cat([m.weight.detach().flatten() for m in prunable_layers(model)])
    zero = after == 0
    assert int(zero.sum()) == round(0.6 * before.numel()) and sparsity(model) == pytest.approx(0.6, abs=1e-3)
    assert before[zero].abs().max() <= before[~zero].abs().min()
    shares = [float((m.weight == 0).float().mean()) for m in prunable_layers(model)]
    assert max(shares) - min(shares) > 0.1  # layers lose different shares, unlike l1-unstructured


CASES = {
    "cnn": (
        CNNConfig(width=16),
        DataSpec("classify", num_classes=10, input_shape=(1, 8, 8)),
        {"x": torch.randn(4, 1, 8, 8), "y": torch.zeros(4, dtype=torch.long)},
    ),
    "vit": (
        ViTConfig(n_embd=32, n_head=4, n_layer=2),
        DataSpec("classify", num_classes=10, input_shape=(1, 8, 8)),
        {"x": torch.randn(4, 1, 8, 8), "y": torch.zeros(4, dtype=torch.long)},
    ),
    "gpt": (
        GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=16),
        DataSpec("lm", vocab_size=100, seq_len=16),
        {"x": torch.randint(0, 100, (2, 16)), "y": torch.randint(0, 100, (2, 16))},
    ),
    "llama": (
        LlamaConfig(n_layer=2, n_embd=64, n_head=8, n_kv_head=4, block_size=16, tie_weights=True),
        DataSpec("lm", vocab_size=100, seq_len=16),
        {"x": torch.randint(0, 100, (2, 16)), "y": torch.randint(0, 100, (2, 16))},
    ),
    "seq2seq": (
        Seq2SeqConfig(n_embd=32, n_head=4, max_len=16),
        DataSpec("seq2seq", vocab_size=20, seq_len=8, src_len=10),
        {
            "src": torch.randint(1, 20, (2, 10)),
            "tgt_in": torch.randint(1, 20, (2, 8)),
            "tgt_out": torch.randint(1, 20, (2, 8)),
        },
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_structured_pruning_halves_the_parameters_and_the_model_reloads_from_its_file(name, tmp_path):
    cfg, spec, batch = CASES[name]
    task = spec.task
    model = build_model(cfg, spec).eval()
    full = count_params(model)
    small, ratio = shrink_to_params(model, batch, task, full // 2)
    assert full // 2 * 0.85 < count_params(small) <= full // 2 and 0 < ratio < 1
    assert count_params(model) == full  # the original is left alone
    logits = FORWARD[task](small, batch)[0]
    assert logits.shape == FORWARD[task](model, batch)[0].shape  # the classes / vocabulary stay
    attn = [m for n, m in small.named_modules() if n.endswith("attn")]
    if attn:  # whole heads went: q keeps a multiple of the head width, and fewer heads than before
        assert all(a.q.out_features % a.head_dim == 0 and a.q.out_features < a.head_dim * cfg.n_head for a in attn)
    if name in ("gpt", "llama"):
        assert small.lm_head.weight is small.tok_emb.weight  # still tied
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_model(small, str(path))
    fresh = resize_to_stored(build_model(cfg, spec), path)
    safetensors.torch.load_model(fresh, str(path))
    assert torch.equal(FORWARD[task](fresh.eval(), batch)[0], logits)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_llama_head_pruning_keeps_grouped_query_attention_whole(n_kv_head):
    """Two kv groups: one goes, with both of its query heads. One kv head (multi-query): it stays,
    and half of the query heads go. Either way each kept query head keeps its own key/value head."""
    from ember.compress.structure import _prune_groups

    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=1, n_embd=64, n_head=4, n_kv_head=n_kv_head, qkv_bias=True)
    attn = build_model(cfg, DataSpec("lm", vocab_size=50, seq_len=8)).blocks[0].attn
    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    with torch.no_grad():
        attn.q.weight[16:32] *= 0.01  # query head 1 (kv group 0 when n_kv_head=2) is the least important
    before["q.weight"] = attn.q.weight.detach().clone()
    _prune_groups(attn, 0.5)
    heads = lambda t, idx: torch.cat([t[16 * h : 16 * (h + 1)] for h in idx])  # noqa: E731
    if n_kv_head == 2:
        kept_q, kept_kv = [2, 3], [1]  # group 0 (query heads 0 and 1, kv head 0) went
    else:  # the two query heads of least L1 (their q rows and proj columns) went, head 1 among them
        importance = before["q.weight"].abs().view(4, -1).sum(1) + before["proj.weight"].abs().view(64, 4, 16).sum(
            (0, 2)
        )
        kept_q, kept_kv = sorted(torch.argsort(importance)[2:].tolist()), [0]
        assert 1 not in kept_q
    assert torch.equal(attn.q.weight, heads(before["q.weight"], kept_q))
    assert torch.equal(attn.q.bias, heads(before["q.bias"], kept_q))
    assert torch.equal(attn.k.weight, heads(before["k.weight"], kept_kv))
    assert torch.equal(attn.v.bias, heads(before["v.bias"], kept_kv))
    assert torch.equal(attn.proj.weight, heads(before["proj.weight"].T, kept_q).T)
    assert (attn.q.out_features, attn.k.out_features, attn.proj.in_features) == (32, 16 * len(kept_kv), 32)
    x = torch.randn(1, 8, 64)
    cos, sin = torch.ones(8, 16), torch.zeros(8, 16)
    assert attn(x, cos, sin).shape == (1, 8, 64)


def test_structured_pruning_refuses_what_it_cannot_reach():
    cfg, spec, batch = CASES["cnn"]
    with pytest.raises(EmberError, match="cannot bring this model to 10 parameters"):
        shrink_to_params(build_model(cfg, spec), batch, "classify", 10)


@pytest.mark.parametrize("method", ["l1-unstructured", "global"])
def test_masks_reach_the_amount_and_survive_fine_tuning_which_wins_accuracy_back(cnn_run, tmp_path, method):
    report = prune(cnn_run, 0.9, method, iterative=2, out=tmp_path / "p", **FINETUNE, **SILENT)
    out = tmp_path / "p"
    model, info = load_trained_model(out)
    assert sparsity(model) == pytest.approx(0.9, abs=2e-3) and info["pruning"]["sparsity"] == sparsity(model)
    pruned, tuned = weights_of(out / "rounds" / "r2-pruned"), weights_of(out)
    for m_name in ("stem.0.weight", "blocks.1.conv2.weight", "head.1.weight"):
        assert torch.equal(pruned[m_name] == 0, tuned[m_name] == 0)  # the same weights stayed zero...
        assert not torch.equal(pruned[m_name], tuned[m_name])  # ...while the others trained
    assert [r["round"] for r in report.rounds] == [1, 2]
    assert report.rounds[0]["sparsity"] == pytest.approx(1 - 0.1**0.5, abs=2e-3)  # the same share each round
    source, before, after = report.rows
    assert source.quality > 0.9 and before.quality < 0.3  # 90 % pruned without fine-tuning is near chance
    assert after.quality > before.quality + 0.2  # fine-tuning wins much of it back
    assert after.nonzero < 0.2 * source.nonzero and after.params == source.params
    assert json.loads((out / "prune.json").read_text())["rows"][-1]["quality"] == after.quality


def test_structured_prune_cli_writes_a_smaller_run_that_evaluates_and_quantises(cnn_run, tmp_path):
    out = tmp_path / "s"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):  # the rounds are log lines
        assert (
            main(
                [
                    "prune",
                    str(cnn_run),
                    "--amount",
                    "0.5",
                    "--method",
                    "structured",
                    "--finetune-steps",
                    "60",
                    "--finetune-lr",
                    "1e-2",
                    "--set",
                    "train.log_every=1000",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    text = printed.getvalue()
    assert "structured 50%" in text and "round 1/1" in text and str(out) in text
    source, before, after = json.loads((out / "prune.json").read_text())["rows"]
    assert after["params"] <= source["params"] / 2 and after["bytes"] < 0.55 * source["bytes"]
    assert after["quality"] > before["quality"] + 0.3 and after["quality"] > 0.8
    assert evaluate(out, max_batches=0).metrics["accuracy"] == pytest.approx(after["quality"])
    int8 = quantize(out, "int8-weight-only", out=tmp_path / "s8")  # a pruned run is a run like any other
    assert int8.rows[1].quality == pytest.approx(after["quality"], abs=0.02)


def test_prune_resumes_where_it_stopped_and_refuses_other_settings(cnn_run, tmp_path):
    out = tmp_path / "r"
    prune(cnn_run, 0.5, "global", iterative=2, out=out, **FINETUNE, **SILENT)
    done = {p: p.stat().st_mtime_ns for p in (out / "rounds").rglob("model.safetensors")}
    # as if the process died during round 2's fine-tuning, after its first checkpoint
    (out / "rounds" / "r2-finetuned" / "model.json").unlink()
    first = weights_of(out)
    report = prune(cnn_run, 0.5, "global", iterative=2, out=out, **FINETUNE, **SILENT)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items() if "r2-finetuned" not in str(p))  # no round redone
    assert all(torch.equal(first[k], v) for k, v in weights_of(out).items())  # the resumed run ends the same
    assert report.rows[-1].nonzero == json.loads((out / "model.json").read_text())["pruning"]["nonzero"]
    with pytest.raises(EmberError, match="other settings \\(amount differ"):
        prune(cnn_run, 0.6, "global", iterative=2, out=out, **FINETUNE, **SILENT)


def test_mistakes_are_one_paragraph_messages(cnn_run, tmp_path, capsys):
    rnn = tmp_path / "rnn"
    train(tiny_recipe("rnn"), rnn)
    cases = [
        (["prune", str(rnn), "--amount", "0.5", "--method", "structured"], "Structured pruning covers"),
        (["prune", str(cnn_run), "--amount", "1.5"], "between 0 and 1"),
        (["prune", str(cnn_run), "--amount", "0.5", "--method", "random"], "Unknown pruning method"),
        (
            ["prune", str(cnn_run), "--amount", "0.5", "--iterative", "3", "--finetune-steps", "2"],
            "fewer than the 3 rounds",
        ),
        (["prune", str(cnn_run), "--amount", "0.5", "--out", str(cnn_run)], "is the run being pruned"),
        (["prune", str(tmp_path), "--amount", "0.5"], "not a finished run directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_init_from_run_needs_the_same_model(cnn_run, tmp_path):
    wider = tiny_recipe("cnn", "model.width=16", f"init.from_run={cnn_run}")
    with pytest.raises(EmberError, match="differs from the recipe's in model.width"):
        train(wider, tmp_path / "w")
    same = recipe_from_dict({**tiny_recipe("cnn").model_dump(mode="json"), "init": {"from_run": str(cnn_run)}})
    result = train(same, tmp_path / "s")  # starts from the trained weights: already far better than chance
    assert result.metrics["accuracy"] > 0.8
