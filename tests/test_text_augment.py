"""Text augmentation: the padding invariant, ordinary ids only, seeded and resumable draws,
each operation's rate as configured, refusal on the wrong data, and speed."""

import time

import pytest
import torch
from pydantic import ValidationError

from ember.data.config import DataConfig
from ember.data.text_augment import TextAugmentConfig, build_text_transform, check_augment_fits
from ember.errors import EmberError

V, FIRST = 1000, 5  # ids 1..4 stand for special tokens: never inserted
EVERYTHING = TextAugmentConfig(dropout=0.15, swap=0.1, insert=0.1, span=0.2, span_max=6, p=0.8)


def texts(b: int = 64, length: int = 32, seed: int = 0, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ordinary ids (in [FIRST, V)) of random lengths 1..length, then zeros."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, length + 1, (b,), generator=g) if lengths is None else lengths
    x = torch.randint(FIRST, V, (b, length), generator=g)
    return torch.where(torch.arange(length) < n.unsqueeze(1), x, 0)


def distinct(b: int, length: int) -> torch.Tensor:
    """Full rows whose tokens are all different, to count what moved."""
    return torch.arange(FIRST, FIRST + length).repeat(b, 1)


def apply(cfg: TextAugmentConfig, x: torch.Tensor, seed: int | None = 0) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    return build_text_transform(cfg, V, FIRST)({"x": x, "y": torch.zeros(len(x), dtype=torch.long)})["x"]


def assert_padded(x: torch.Tensor) -> None:
    """Tokens first, then only zeros; no row empty."""
    n = (x != 0).sum(1)
    assert (n > 0).all(), "an empty row"
    assert torch.equal(x != 0, torch.arange(x.shape[1]) < n.unsqueeze(1)), "a 0 inside a row"


CONFIGS = [
    EVERYTHING,
    TextAugmentConfig(dropout=0.9),
    TextAugmentConfig(span=0.9, span_mode="delete"),
    TextAugmentConfig(span=0.5, span_mode="replace"),
    TextAugmentConfig(insert=1.0),
    TextAugmentConfig(swap=1.0),
    TextAugmentConfig(dropout=0.5, insert=0.5, span=0.5, span_mode="delete", swap=0.5),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_padding_invariant_and_ordinary_ids(cfg, seed):
    x = texts(128, 24, seed)
    x[:8] = 0
    x[:8, 0] = FIRST + 3  # one-token rows
    y = apply(cfg, x, seed)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_padded(y)
    assert ((y == 0) | (y >= FIRST)).all() and (y < V).all(), "a special or out-of-vocabulary id"
    assert not torch.equal(y, x)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_a_nonzero_padding_id_keeps_the_invariant(cfg):
    """A given tokenizer's padding (GPT-2: its last id) with id 0 an ordinary token: rows keep tokens then
    padding, padding never inside a row nor drawn."""
    pad = V - 1
    x = texts(128, 24, 3)
    exchanged = torch.where(x == 0, pad, torch.where(x == pad, 0, x))
    torch.manual_seed(3)
    y = build_text_transform(cfg, V - 1, 0, pad)({"x": exchanged, "y": torch.zeros(128, dtype=torch.long)})["x"]
    n = (y != pad).sum(1)
    assert (n > 0).all() and torch.equal(y != pad, torch.arange(24) < n.unsqueeze(1)), "padding inside a row"
    assert (y < V).all() and (y >= 0).all()
    with pytest.raises(EmberError, match="padding id"):
        build_text_transform(cfg, V, 0, pad)  # the draws would hold the padding id


def test_everything_off_leaves_rows_unchanged_and_draws_nothing():
    x = texts()
    assert not TextAugmentConfig().enabled() and not TextAugmentConfig(dropout=0.5, p=0).enabled()
    state = torch.get_rng_state()
    for cfg in (TextAugmentConfig(), TextAugmentConfig(dropout=0.5, p=0)):
        assert torch.equal(apply(cfg, x, seed=None), x)
    assert torch.equal(torch.get_rng_state(), state)


def test_p_zero_rows_of_the_gate_are_untouched():
    x = distinct(4000, 16)
    y = apply(TextAugmentConfig(dropout=0.5, p=0.3), x)
    changed = (y != x).any(1).float().mean().item()
    assert abs(changed - 0.3) < 0.03  # a 16-token row at dropout 0.5 is changed almost surely


def test_same_generator_state_same_output_and_fresh_draws_per_step():
    x = texts(64, 32)
    torch.manual_seed(7)
    first, second = apply(EVERYTHING, x, None), apply(EVERYTHING, x, None)
    assert not torch.equal(first, second)  # a fresh draw each step (each epoch)
    assert torch.equal(apply(EVERYTHING, x, 7), first)
    assert not torch.equal(apply(EVERYTHING, x, 8), first)


def test_resume_from_saved_rng_state_is_identical():
    # What ember's checkpoints do: save the torch RNG state, restore it, go on.
    x = texts(64, 32)
    torch.manual_seed(3)
    apply(EVERYTHING, x, None)
    state = torch.get_rng_state()
    uninterrupted = [apply(EVERYTHING, x, None) for _ in range(3)]
    torch.manual_seed(99)  # the resumed process starts elsewhere, then loads the state
    torch.set_rng_state(state)
    assert all(torch.equal(a, apply(EVERYTHING, x, None)) for a in uninterrupted)


def test_draws_do_not_depend_on_the_data():
    """The generator advances by the batch shape only, so a resume lines up whatever the rows hold."""
    torch.manual_seed(0)
    apply(EVERYTHING, texts(32, 16, 0), None)
    after_one = torch.get_rng_state()
    torch.manual_seed(0)
    apply(EVERYTHING, texts(32, 16, 1), None)
    assert torch.equal(torch.get_rng_state(), after_one)


def test_dropout_rate():
    x = distinct(2000, 64)
    y = apply(TextAugmentConfig(dropout=0.2), x)
    kept = (y != 0).sum().item() / x.numel()
    assert abs(kept - 0.8) < 0.01
    for row_in, row_out in zip(x[:20], y[:20], strict=True):  # survivors keep their order
        kept_row = row_out[row_out != 0]
        assert torch.equal(kept_row, row_in[torch.isin(row_in, kept_row)])


def test_insert_rate_and_truncation():
    x = texts(2000, 96, lengths=torch.full((2000,), 48))
    y = apply(TextAugmentConfig(insert=0.25), x)
    grown = ((y != 0).sum(1) - 48).float().mean().item()
    assert abs(grown / 48 - 0.25) < 0.01
    full = apply(TextAugmentConfig(insert=1.0), distinct(8, 10))
    assert (full != 0).all()  # twice as long: cut at L
    assert torch.equal(full[:, 1::2], distinct(8, 10)[:, :5])  # the originals, each after its insertion


def test_swap_count():
    x = distinct(2000, 100)
    y = apply(TextAugmentConfig(swap=0.02), x)  # 2 swaps per row: about 4 positions moved
    moved = (y != x).sum(1).float().mean().item()
    assert 3.6 < moved < 4.0  # a little under 4: two picks may coincide or undo each other
    assert torch.equal(y.sort(1).values, x)  # a permutation of each row


@pytest.mark.parametrize("mode", ["replace", "delete"])
def test_span_length_and_contiguity(mode):
    x = distinct(500, 40)
    y = apply(TextAugmentConfig(span=0.25, span_mode=mode), x)
    if mode == "delete":
        assert ((y != 0).sum(1) == 30).all()
        assert ((y[:, 1:] - y[:, :-1]) > 1).sum(1).le(1).all()  # one gap per row (ids were consecutive)
    else:
        replaced = y != x
        assert (replaced.sum(1) <= 10).all() and replaced.sum().item() > 0.95 * 500 * 10
        first = replaced.float().argmax(1, keepdim=True)
        window = (torch.arange(40) >= first) & (torch.arange(40) < first + 10)
        assert (~replaced | window).all()  # every replaced position lies inside one 10-token window
    capped = apply(TextAugmentConfig(span=0.5, span_max=3, span_mode="delete"), x)
    assert ((capped != 0).sum(1) == 37).all()


def test_span_starts_are_spread_over_the_row():
    x = distinct(4000, 20)
    y = apply(TextAugmentConfig(span=0.1, span_mode="replace"), x)
    start = (y != x).float().argmax(1)
    counts = torch.bincount(start, minlength=20)[:19]  # a 2-token span starts at 0..18
    assert counts.min() > 0.6 * counts.float().mean()


def test_runs_on_the_batch_device_and_dtype():
    x = texts(16, 12).to(torch.int32)
    y = apply(EVERYTHING, x)
    assert y.dtype == torch.int32 and y.device == x.device
    assert_padded(y)
    with pytest.raises(TypeError):
        apply(EVERYTHING, x.float())


def test_runs_in_deterministic_mode():
    x, before = texts(32, 16), torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(apply(EVERYTHING, x, 5), apply(EVERYTHING, x, 5))
    finally:
        torch.use_deterministic_algorithms(before)


def test_speed_of_a_256_by_128_batch():
    x = texts(256, 128)
    transform = build_text_transform(EVERYTHING, V, FIRST)
    batch = {"x": x, "y": torch.zeros(256, dtype=torch.long)}
    # One thread, the fastest of 20 calls: the transform's own cost. With two OpenMP threads on a
    # CPU shared with other jobs, every parallel op waits for a busy core (tens of ms, not ours).
    threads, times = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        for _ in range(20):
            start = time.perf_counter()
            transform(batch)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 0.02, f"{min(times) * 1000:.1f} ms per [256, 128] batch"


def test_config_ranges_and_recipe_field():
    assert DataConfig().text_augment == TextAugmentConfig()
    assert DataConfig(text_augment={"dropout": 0.1}).text_augment.enabled()
    for bad in ({"dropout": 1.0}, {"insert": -0.1}, {"span_mode": "mask"}, {"p": 2}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            TextAugmentConfig(**bad)


def test_bad_vocabulary_is_refused():
    for vocab, first in ((100, 0), (5, 5), (5, 9)):
        with pytest.raises(EmberError, match="ordinary ids"):
            build_text_transform(EVERYTHING, vocab, first)


def test_each_kind_refuses_the_others_augmentation():
    text_on = DataConfig(text_augment={"swap": 0.1})
    image_on = DataConfig(augment={"rotation": 10})
    with pytest.raises(EmberError, match="data.text_augment"):
        check_augment_fits(text_on, text=False, where="data/digits")
    with pytest.raises(EmberError, match="data.augment transforms images"):
        check_augment_fits(image_on, text=True, where="data/reviews")
    check_augment_fits(text_on, text=True, where="data/reviews")
    check_augment_fits(image_on, text=False, where="data/digits")
