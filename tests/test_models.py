"""The model zoo: shapes, causality, padding, overfitting, checkpointing, tying,
parameter and FLOP counts, and the errors a misfit between model and data raises.

The generic tests run over CASES, which must hold an example of every registered model
(``ember.models.zoo.REGISTRY``): registering a model is what gets it tested."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, get_args

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import ValidationError

from ember.config import Recipe
from ember.data.spec import IGNORE_INDEX, DataSpec
from ember.errors import EmberError
from ember.models.clip import ClipConfig
from ember.models.cnn import CNNConfig
from ember.models.encoder import EncoderConfig
from ember.models.gpt import GPTConfig
from ember.models.layers import AttentionConfigBase, measure_forward_flops
from ember.models.llama import LlamaConfig
from ember.models.mlp import MLPConfig
from ember.models.registry import MODEL_CONFIGS, MODELS, SIMCLR_BODIES, ModelConfig, build_model, model_summary
from ember.models.rnn import RNNConfig
from ember.models.seq2seq import Seq2SeqConfig
from ember.models.simclr import SimCLR
from ember.models.vit import ViTConfig
from ember.models.zoo import REGISTRY
from ember.training.tasks import FORWARD

LM = DataSpec("lm", vocab_size=32, seq_len=16)
MLM = DataSpec("mlm", vocab_size=32, seq_len=16)
DIGITS = DataSpec("classify", num_classes=5, input_shape=(1, 8, 8))
RGB = DataSpec("classify", num_classes=5, input_shape=(3, 16, 16))
ROWS = DataSpec("classify", num_classes=5, input_shape=(8, 8))
TABLE = DataSpec("classify", num_classes=5, input_shape=(12,))  # tabular rows of 12 features
TEXT = DataSpec("classify", num_classes=5, vocab_size=40, input_shape=(16,), seq_len=16)  # labelled text
S2S = DataSpec("seq2seq", vocab_size=20, seq_len=10, src_len=12, pad_id=0, bos_id=1, eos_id=2)
CAPTIONS = DataSpec("clip", vocab_size=32, num_classes=5, input_shape=(1, 8, 8), seq_len=12, pad_id=0)
SIMCLR = replace(DIGITS, task="simclr")
# One spec per task, for the tests that try every model on every task.
TASK_SPECS = {spec.task: spec for spec in (LM, MLM, DIGITS, S2S, CAPTIONS, SIMCLR)}


@dataclass
class Case:
    id: str
    cfg: Any
    spec: DataSpec
    lr: float = 3e-3


CASES = [
    Case("gpt", GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16), LM),
    Case("llama", LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, tie_weights=True), LM),
    Case("seq2seq", Seq2SeqConfig(n_encoder_layer=1, n_decoder_layer=2, n_head=2, n_embd=32, max_len=16), S2S),
    Case("vit-digits", ViTConfig(n_layer=2, n_head=2, n_embd=32), DIGITS),
    Case("vit-rgb", ViTConfig(patch_size=4, n_layer=1, n_head=2, n_embd=32), RGB),
    Case("cnn-digits", CNNConfig(width=8, depth=1, stages=2), DIGITS),
    Case("cnn-rgb", CNNConfig(width=8, depth=1, stages=3), RGB),
    Case("lstm-rows", RNNConfig(hidden_size=32), ROWS, lr=1e-2),
    Case("gru-bi-rows", RNNConfig(kind="gru", hidden_size=32, num_layers=2, bidirectional=True), ROWS, lr=1e-2),
    Case("lstm-lm", RNNConfig(hidden_size=64, embd=32), LM, lr=1e-2),
    Case("gru-lm", RNNConfig(kind="gru", hidden_size=64, embd=32, num_layers=2), LM, lr=1e-2),
    Case("mlp-table", MLPConfig(depth=2, width=32), TABLE),
    Case("lstm-text", RNNConfig(hidden_size=32, embd=16, bidirectional=True), TEXT, lr=1e-2),
    Case("encoder-text", EncoderConfig(n_layer=2, n_head=2, n_embd=32, block_size=16), TEXT),
    Case("cnn-text", CNNConfig(width=16, depth=1, stages=2), TEXT),
    Case("mlp-batchnorm-digits", MLPConfig(depth=3, width=32, norm="batch"), DIGITS),
    Case("encoder", EncoderConfig(n_layer=2, n_head=2, n_embd=32, block_size=16), MLM),
    Case(
        "clip",
        ClipConfig(
            image=CNNConfig(width=8, depth=1, stages=2), text_layers=1, text_heads=2, text_embd=32, embed_dim=16
        ),
        CAPTIONS,
    ),
]
BLOCK_CASES = [c for c in CASES if c.cfg.name != "rnn"]  # models with checkpointable blocks


def case_of(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def by_id(cases: list[Case]) -> Any:
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


def make(case: Case, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(case.cfg, case.spec)


def make_batch(spec: DataSpec, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of ``spec``'s task, as the loader (and objective) hands it to the trainer, from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    if spec.task in ("lm", "mlm"):
        tokens = torch.randint(spec.vocab_size, (batch, spec.seq_len + 1), generator=g)
        if spec.task == "lm":
            return {"x": tokens[:, :-1], "y": tokens[:, 1:]}
        x = tokens[:, :-1]
        chosen = torch.rand(x.shape, generator=g) < 0.3  # the mask token (id vocab_size) in, the token to restore out
        return {"x": torch.where(chosen, spec.vocab_size, x), "y": torch.where(chosen, x, IGNORE_INDEX)}
    if spec.reads_tokens:  # labelled text: ids, then zeros after each (shorter) text
        x = torch.randint(1, spec.vocab_size, (batch, *spec.input_shape), generator=g)
        x[::2, -5:] = 0
        return {"x": x, "y": torch.randint(spec.num_classes, (batch,), generator=g)}
    if spec.task in ("classify", "clip"):
        x = torch.randn(batch, *spec.input_shape, generator=g)
        out = {"x": x, "y": torch.randint(spec.num_classes, (batch,), generator=g)}
        if spec.task == "clip":
            text = torch.randint(1, spec.vocab_size, (batch, spec.seq_len), generator=g)
            text[::2, -4:] = spec.pad_id  # every other caption is shorter, padded on the right
            out["text"] = text
        return out
    src = torch.randint(3, spec.vocab_size, (batch, spec.src_len), generator=g)
    src[:, -3:] = spec.pad_id  # every row ends in padding
    tgt = torch.randint(3, spec.vocab_size, (batch, spec.seq_len + 1), generator=g)
    tgt[:, 0] = spec.bos_id
    tgt_out = tgt[:, 1:].clone()
    tgt_out[:, -2:] = IGNORE_INDEX
    return {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt_out}


def forward(model: torch.nn.Module, spec: DataSpec, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) the trainer's task forward (ember.training.tasks) makes of ``batch``."""
    return FORWARD[spec.task](model, batch)


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def expected_shape(spec: DataSpec, batch: int) -> tuple[int, ...]:
    if spec.task == "classify":
        return (batch, spec.num_classes)
    if spec.task == "clip":
        return (2 * batch, batch)  # each image against every caption, then each caption against every image
    return (batch, spec.seq_len, spec.vocab_size)


# --------------------------------------------------------------------------- forward contract


@by_id(CASES)
def test_output_shape_and_finite(case: Case) -> None:
    model = make(case)
    logits, _ = forward(model, case.spec, make_batch(case.spec, batch=3))
    assert logits.shape == expected_shape(case.spec, 3)
    assert torch.isfinite(logits).all()


@by_id(CASES)
def test_autocast_bf16(case: Case) -> None:
    model = make(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, targets = forward(model, case.spec, make_batch(case.spec))
        loss = loss_of(logits, targets)
    loss.backward()
    assert logits.shape == expected_shape(case.spec, 4)
    assert torch.isfinite(loss)


@by_id(CASES)
def test_same_seed_same_model(case: Case) -> None:
    a, b, c = make(case, seed=1), make(case, seed=1), make(case, seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def _change_token(case: Case, key: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits for a batch, and for the same batch with ``key``'s token t changed."""
    model = make(case).eval()
    batch = make_batch(case.spec, batch=2)
    x2 = batch[key].clone()
    x2[:, t] = (x2[:, t] + 1) % case.spec.vocab_size
    with torch.no_grad():
        return forward(model, case.spec, batch)[0], forward(model, case.spec, {**batch, key: x2})[0]


@pytest.mark.parametrize("case", [c for c in CASES if c.spec.task in ("lm", "seq2seq")], ids=lambda c: c.id)
def test_lm_and_decoder_are_causal(case: Case) -> None:
    t = 6
    a, b = _change_token(case, "tgt_in" if case.spec.task == "seq2seq" else "x", t + 1)  # lm tokens, or tgt_in
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])  # the change is seen where it may be


@pytest.mark.parametrize("case", [c for c in CASES if c.spec.task == "mlm"], ids=lambda c: c.id)
def test_masked_lm_reads_both_ways(case: Case) -> None:
    a, b = _change_token(case, "x", 7)
    assert not torch.allclose(a[:, 6], b[:, 6])  # a later token informs an earlier position


def test_seq2seq_ignores_source_padding() -> None:
    case = case_of("seq2seq")
    model = make(case).eval()
    batch = make_batch(case.spec)
    src, tgt_in = batch["src"], batch["tgt_in"]
    longer = torch.cat([src, torch.full((src.size(0), 3), S2S.pad_id)], dim=1)  # more padding, same sentences
    other = src.clone()
    other[:, 0] = (other[:, 0] + 1 - 3) % (S2S.vocab_size - 3) + 3  # a real token changes
    with torch.no_grad():
        base, padded, changed = model(src, tgt_in), model(longer, tgt_in), model(other, tgt_in)
    torch.testing.assert_close(base, padded)
    assert not torch.allclose(base, changed)


def test_gpt2_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    model = build_model(GPTConfig(n_layer=8, n_embd=256, n_head=4), LM)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (model.blocks[3].attn.proj, model.blocks[3].mlp.proj):
        assert proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8)


def test_gpt_rejects_input_longer_than_block_size() -> None:
    model = make(case_of("gpt"))
    with pytest.raises(EmberError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------- training


@by_id(CASES)
def test_overfits_one_batch(case: Case) -> None:
    model = make(case).train()
    batch = make_batch(case.spec, batch=8)
    opt = torch.optim.Adam(model.parameters(), lr=case.lr)
    losses = []
    for _ in range(40):
        loss = loss_of(*forward(model, case.spec, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def _grads(model: torch.nn.Module, spec: DataSpec, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_of(*forward(model, spec, batch)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@by_id(BLOCK_CASES)
def test_grad_checkpointing_gives_same_grads(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = make(case).train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    batch = make_batch(case.spec)
    g_plain, g_ckpt = _grads(plain, case.spec, batch), _grads(ckpt, case.spec, batch)
    assert calls and all(r is False for r in calls)  # checkpointing really ran, non-reentrant
    assert any(g.abs().sum() > 0 for g in g_plain.values())
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], msg=name)
    # Recomputing in backward must not step BatchNorm's running averages a second time.
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, msg=name)
    calls.clear()
    with torch.no_grad():
        forward(ckpt.eval(), case.spec, batch)
    assert not calls  # only when training


# --------------------------------------------------------------------------- counting


@by_id(CASES)
def test_num_params_counts_unique_tensors(case: Case) -> None:
    model = make(case)
    unique = {id(p): p.numel() for m in model.modules() for p in m._parameters.values() if p is not None}
    assert model.num_params() == sum(unique.values())


@pytest.mark.parametrize("case", [c for c in CASES if "tie_weights" in type(c.cfg).model_fields], ids=lambda c: c.id)
def test_weight_tying_shares_storage(case: Case) -> None:
    tied = make(case)
    untied = build_model(case.cfg.model_copy(update={"tie_weights": False}), case.spec)
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == tied.lm_head.weight.numel()
    with torch.no_grad():
        tied.tok_emb.weight[0, 0] = 123.0
    assert tied.lm_head.weight[0, 0] == 123.0


@by_id(CASES)
def test_flops_per_item_positive_and_cached(case: Case) -> None:
    model = make(case)
    flops = model.flops_per_item()
    assert flops > 0 and flops == model.flops_per_item()
    assert model_summary(model) == {"params": model.num_params(), "flops_per_item": flops}


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_flops_match_palm_formula_and_counter(tie: bool) -> None:
    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, tie_weights=tie)
    model = build_model(cfg, DataSpec("lm", vocab_size=50, seq_len=32))
    # N leaves out the token and position tables but keeps the head's matmul, tied or not.
    n = model.num_params() - 50 * 64 - 32 * 64 + (50 * 64 if tie else 0)
    assert model.flops_per_item() == 6 * n + 12 * 3 * 64 * 32
    # The estimate agrees with counting the matmuls of a full-context forward, x3.
    measured = 3 * measure_forward_flops(model, torch.zeros(1, 32, dtype=torch.long)) / 32
    assert measured == pytest.approx(model.flops_per_item(), rel=0.02)
    assert model.flops_per_item(seq_len=16) == 6 * n + 12 * 3 * 64 * 16


def test_gpt_flops_use_the_data_context() -> None:
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
    short = build_model(cfg, DataSpec("lm", vocab_size=50, seq_len=16))
    assert short.flops_per_item() == short.flops_per_item(seq_len=16) < short.flops_per_item(seq_len=64)


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_mlp_flops_are_the_counted_matmuls_x3(norm: str) -> None:
    model = build_model(MLPConfig(depth=3, width=24, norm=norm), TABLE)
    # 12 -> 24 -> 24 -> 24 -> 5, 2 FLOPs per multiply-add, x3 for forward and backward
    assert model.flops_per_item() == 6 * (12 * 24 + 2 * 24 * 24 + 24 * 5)
    measured = 3 * measure_forward_flops(model, torch.zeros(1, 12))
    assert model.flops_per_item() == pytest.approx(measured, rel=0.01)


def test_mlp_flattens_images_and_counts_their_pixels() -> None:
    model = build_model(MLPConfig(depth=1, width=16), DIGITS)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 5)
    assert model.flops_per_item() == 6 * (64 * 16 + 16 * 5)
    with pytest.raises(EmberError, match="64 input features"):
        model(torch.randn(3, 1, 8, 9))


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_mlp_norms_train(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(MLPConfig(depth=2, width=32, norm=norm, dropout=0.1), TABLE).train()
    kinds = {"none": torch.nn.Identity, "layer": torch.nn.LayerNorm, "batch": torch.nn.BatchNorm1d}
    assert all(isinstance(b.norm, kinds[norm]) for b in model.blocks)
    batch = make_batch(TABLE, batch=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = loss_of(*forward(model, TABLE, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_cnn_flops_grow_with_image_size() -> None:
    small = build_model(CNNConfig(), DIGITS).flops_per_item()
    large = build_model(CNNConfig(), DataSpec("classify", num_classes=5, input_shape=(1, 16, 16))).flops_per_item()
    assert large == pytest.approx(4 * small, rel=0.05)  # 4x the pixels


# --------------------------------------------------------------------------- configs and errors


WRONG = [
    ("gpt-classify", GPTConfig(), DIGITS, "task"),
    ("gpt-seq2seq", GPTConfig(), S2S, "task"),
    ("gpt-short-context", GPTConfig(block_size=8), LM, "block_size"),
    ("seq2seq-lm", Seq2SeqConfig(), LM, "task"),
    ("seq2seq-max-len", Seq2SeqConfig(max_len=8), S2S, "max_len"),
    ("vit-lm", ViTConfig(), LM, "task"),
    ("vit-rows", ViTConfig(), ROWS, "input_shape"),
    ("vit-patch", ViTConfig(patch_size=3), DIGITS, "patch_size"),
    ("cnn-lm", CNNConfig(), LM, "task"),
    ("cnn-rows", CNNConfig(), ROWS, "input_shape"),
    ("rnn-seq2seq", RNNConfig(), S2S, "task"),
    ("rnn-image", RNNConfig(), DIGITS, "input_shape"),
    ("rnn-table", RNNConfig(), TABLE, "not steps in time.*model.name=mlp"),
    ("rnn-bidirectional-lm", RNNConfig(bidirectional=True), LM, "bidirectional"),
    ("gpt-heads", GPTConfig.model_construct(n_head=3), LM, "divisible"),
    ("encoder-lm", EncoderConfig(), LM, "objective.name=mlm"),
    ("encoder-images", EncoderConfig(), DIGITS, "reads token ids"),
    ("encoder-block-size", EncoderConfig(block_size=8), MLM, "block_size"),
    ("clip-classify", ClipConfig(), DIGITS, "task"),
    ("clip-rows", ClipConfig(), replace(CAPTIONS, input_shape=(8, 8)), "images of shape"),
    ("simclr-gpt", GPTConfig(), SIMCLR, "projection head"),
    ("mlp-lm", MLPConfig(), LM, "task"),
    ("mlp-seq2seq", MLPConfig(), S2S, "task"),
    ("mlp-no-classes", MLPConfig(), replace(TABLE, num_classes=0), "num_classes"),
    ("mlp-no-shape", MLPConfig(), replace(TABLE, input_shape=()), "input_shape"),
]


@pytest.mark.parametrize("cfg,spec,match", [w[1:] for w in WRONG], ids=[w[0] for w in WRONG])
def test_builder_rejects_misfit(cfg: Any, spec: DataSpec, match: str) -> None:
    with pytest.raises(EmberError, match=match):
        build_model(cfg, spec)


@pytest.mark.parametrize(
    "cls,bad",
    [
        (GPTConfig, {"n_layer": 0}),
        (GPTConfig, {"n_head": 3}),  # 128 is not divisible by 3
        (GPTConfig, {"dropout": 1.0}),
        (GPTConfig, {"n_layers": 2}),  # misspelt key
        (Seq2SeqConfig, {"max_len": 0}),
        (ViTConfig, {"n_embd": 30, "n_head": 4}),
        (CNNConfig, {"stages": 0}),
        (RNNConfig, {"kind": "rnn"}),
        (RNNConfig, {"hidden_size": -1}),
        (EncoderConfig, {"n_head": 3}),
        (ClipConfig, {"text_heads": 3}),
        (MLPConfig, {"depth": 0}),
        (MLPConfig, {"depth": 65}),
        (MLPConfig, {"width": 0}),
        (MLPConfig, {"dropout": 1.0}),
        (MLPConfig, {"norm": "group"}),
    ],
)
def test_config_validation_rejects_bad_values(cls: Any, bad: dict) -> None:
    with pytest.raises(ValidationError):
        cls(**bad)


def test_registry_tables_agree_and_configs_round_trip() -> None:
    assert set(MODELS) == set(MODEL_CONFIGS) == set(REGISTRY)
    for name, cls in MODEL_CONFIGS.items():
        cfg = cls()
        assert cfg.name == name and next(iter(cls.model_fields)) == "name"
        assert MODEL_CONFIGS[cfg.model_dump()["name"]].model_validate(cfg.model_dump()) == cfg
        assert MODELS[name] is REGISTRY[name].build and cls is REGISTRY[name].config
    with pytest.raises(EmberError, match="Unknown model"):
        build_model(object(), LM)


BUILT = sorted(name for name, entry in REGISTRY.items() if not entry.given)  # custom: a module given in Python


def test_every_registered_model_has_an_example() -> None:
    missing = sorted(set(BUILT) - {c.cfg.name for c in CASES})
    assert not missing, (
        f"registered model(s) {missing} have no example: add a Case with a tiny config and a DataSpec "
        f"of a task it serves to CASES in tests/test_models.py, and the generic tests cover it"
    )
    for case in CASES:  # each example poses a task its model registered for
        assert case.spec.task in REGISTRY[case.cfg.name].tasks, case.id


def test_recipe_model_section_is_the_union_of_registered_configs() -> None:
    assert set(get_args(get_args(ModelConfig)[0])) == set(MODEL_CONFIGS.values())
    for case in CASES:
        assert Recipe.model_validate({"model": case.cfg.model_dump()}).model == case.cfg


@pytest.mark.parametrize("name", BUILT)
def test_model_refuses_the_tasks_it_does_not_register(name: str) -> None:
    cfg = next(c.cfg for c in CASES if c.cfg.name == name)
    for task, spec in TASK_SPECS.items():
        if task in REGISTRY[name].tasks:
            continue
        with pytest.raises(EmberError, match=rf"model {name}\b") as info:
            build_model(cfg, spec)
        assert "\n" not in str(info.value), "one paragraph"


def test_task_misfit_names_the_models_that_serve_the_task() -> None:
    with pytest.raises(
        EmberError, match=r"model gpt cannot serve the data's task 'classify'.*cnn, encoder, mlp, rnn or vit"
    ):
        build_model(GPTConfig(), DIGITS)
    with pytest.raises(EmberError, match=r"'seq2seq'.*\(for 'seq2seq': seq2seq\)"):
        build_model(RNNConfig(), S2S)


@pytest.mark.parametrize("name", SIMCLR_BODIES)
def test_simclr_bodies_build_under_the_projection_head(name: str) -> None:
    case = next(c for c in CASES if c.cfg.name == name and c.spec.task == "classify" and len(c.spec.input_shape) == 3)
    model = build_model(case.cfg, replace(case.spec, task="simclr"))
    assert isinstance(model, SimCLR)
    assert model(torch.randn(4, *case.spec.input_shape)).shape == (4, 4)


def test_attention_configs_share_the_base_fields_and_keep_their_defaults() -> None:
    shared = set(AttentionConfigBase.model_fields) - {"name"}
    for cls in (GPTConfig, Seq2SeqConfig, ViTConfig, EncoderConfig):
        assert issubclass(cls, AttentionConfigBase) and shared <= set(cls.model_fields)
    # Saved model.json files and recipes read back to these values: the defaults must not move.
    assert GPTConfig().model_dump() == {
        "name": "gpt",
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 256,
        "dropout": 0.0,
        "bias": False,
        "tie_weights": True,
        "activation": "gelu",
        "vocab_size": 0,
    }
    assert Seq2SeqConfig().model_dump() == {
        "name": "seq2seq",
        "n_encoder_layer": 2,
        "n_decoder_layer": 2,
        "n_head": 4,
        "n_embd": 128,
        "dropout": 0.0,
        "max_len": 64,
        "tie_weights": True,
    }
    assert ViTConfig().model_dump() == {
        "name": "vit",
        "patch_size": 2,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 64,
        "dropout": 0.0,
    }
    assert EncoderConfig().model_dump() == {
        "name": "encoder",
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 256,
        "dropout": 0.0,
    }


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("case", [case_of("gpt"), case_of("llama"), case_of("cnn-digits")], ids=lambda c: c.id)
def test_compiled_model_matches_eager(case: Case) -> None:
    model = make(case).eval()
    batch = make_batch(case.spec)
    compiled = torch.compile(model)
    with torch.no_grad():
        eager = forward(model, case.spec, batch)[0]
        torch.testing.assert_close(forward(compiled, case.spec, batch)[0], eager, rtol=1e-4, atol=1e-4)
    assert model_summary(compiled)["params"] == model.num_params()
