"""Datasets and the batch loader: exact epochs across ranks, exact resume, correct splits."""

from types import SimpleNamespace

import pytest
import torch

from ember.data import addition, digits, stdlib
from ember.data.build import build_data
from ember.data.loader import ArrayDataset, BatchLoader, LMWindows
from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError


def data_cfg(**kw) -> SimpleNamespace:
    """A stand-in for ember.config.DataConfig with its defaults."""
    base = dict(name="stdlib", seq_len=64, val_fraction=0.1, max_bytes=0, num_examples=2000, max_digits=3, seed=0)
    return SimpleNamespace(**{**base, **kw})


def ids_dataset(n: int) -> ArrayDataset:
    return ArrayDataset(i=torch.arange(n))


def drain(loader: BatchLoader, k: int) -> list[torch.Tensor]:
    return [loader.next_batch()["i"] for _ in range(k)]


# --- loader -------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_once_per_epoch_across_ranks(shuffle):
    n, world = 103, 2  # 103 is odd and not a multiple of the batch size
    ranks = [BatchLoader(ids_dataset(n), 10, shuffle, seed=3, drop_last=False, rank=r, world_size=world) for r in range(world)]
    seen = [torch.cat([b["i"] for b in loader]) for loader in ranks]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(n))
    assert [len(s) for s in seen] == [52, 51]
    assert [len(b["i"]) for b in ranks[1]][-1] == 1  # last batch smaller, nothing padded


def test_ranks_together_equal_one_big_batch():
    n = 100
    one = BatchLoader(ids_dataset(n), 8, True, seed=5, drop_last=True)
    two = [BatchLoader(ids_dataset(n), 4, True, seed=5, drop_last=True, rank=r, world_size=2) for r in range(2)]
    assert one.batches_per_epoch == two[0].batches_per_epoch == 12
    for _ in range(30):  # crosses epoch boundaries
        union = torch.cat([loader.next_batch()["i"] for loader in two])
        assert sorted(union.tolist()) == sorted(one.next_batch()["i"].tolist())


def test_drop_last_fixed_shape_and_skips_differ():
    n, b = 50, 8  # 2 samples skipped per epoch
    loader = BatchLoader(ids_dataset(n), b, True, seed=0, drop_last=True)
    assert loader.batches_per_epoch == 6
    skipped = []
    for _ in range(3):
        batches = drain(loader, loader.batches_per_epoch)
        assert all(len(x) == b for x in batches)
        skipped.append(set(range(n)) - set(torch.cat(batches).tolist()))
    assert all(len(s) == n % b for s in skipped)
    assert len({frozenset(s) for s in skipped}) > 1


def test_epochs_differ_and_seed_repeats():
    a = BatchLoader(ids_dataset(64), 64, True, seed=7, drop_last=True)
    b = BatchLoader(ids_dataset(64), 64, True, seed=7, drop_last=True)
    c = BatchLoader(ids_dataset(64), 64, True, seed=8, drop_last=True)
    e0, e1 = drain(a, 2)
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, b.next_batch()["i"])
    assert not torch.equal(e0, c.next_batch()["i"])
    assert a.epoch == 1


def test_shuffle_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    drain(BatchLoader(ids_dataset(40), 4, True, seed=1, drop_last=True), 25)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("k", [3, 7, 13])  # mid-epoch, the epoch's last batch, the next epoch
def test_resume_gives_identical_batches(k):
    def make() -> BatchLoader:
        return BatchLoader(ids_dataset(59), 8, True, seed=11, drop_last=True, rank=1, world_size=2)

    original = make()
    drain(original, k)
    restored = make()
    restored.load_state_dict(original.state_dict())
    for x, y in zip(drain(original, 10), drain(restored, 10)):
        assert torch.equal(x, y)
    assert restored.state_dict() == original.state_dict()


def test_eval_pass_is_ordered_and_repeatable():
    loader = BatchLoader(ids_dataset(10), 4, False, seed=0, drop_last=False)
    first = [b["i"].tolist() for b in loader]
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b["i"].tolist() for b in loader] == first
    assert len(loader) == 3 and loader.state_dict() == {"epoch": 0, "index": 0}


def test_no_batches_is_an_error():
    with pytest.raises(EmberError):
        BatchLoader(ids_dataset(5), 8, True, seed=0, drop_last=True).next_batch()


def test_lm_windows_shift_by_one():
    tokens = torch.arange(1000) % 251
    ds = LMWindows(tokens.to(torch.uint8), seq_len=20)
    assert len(ds) == 49  # 1000 tokens hold 49 windows of 21, not 50
    batch = ds.get(torch.tensor([0, 5, len(ds) - 1]))
    assert batch["x"].dtype == torch.int64 and batch["x"].shape == (3, 20)
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    assert torch.equal(batch["x"][1], tokens[100:120]) and torch.equal(batch["y"][1], tokens[101:121])


# --- datasets -----------------------------------------------------------------


def test_stdlib_split_disjoint_and_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    cfg = data_cfg(max_bytes=50_000)
    train, val = stdlib.load_corpus(cfg)
    assert len(train) == 50_000 and 0 < len(val) <= stdlib.MIN_VAL_BYTES
    assert "building" in capsys.readouterr().err
    def docs(tokens: torch.Tensor) -> set[bytes]:
        return set(bytes(tokens.tolist()).split(stdlib.SEPARATOR)[:-1])  # the last one may be cut

    assert docs(train) and docs(val) and not docs(train) & docs(val)
    again = stdlib.load_corpus(cfg)
    assert capsys.readouterr().err == "" and torch.equal(again[0], train)
    assert len(list(tmp_path.glob("*.npy"))) == 2 and not list(tmp_path.glob("*.tmp"))


def test_stdlib_build_data_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    data = build_data(data_cfg(max_bytes=20_000, seq_len=32), batch_size=4, eval_batch_size=8, seed=0)
    assert data.spec.task == "lm" and data.spec.vocab_size == 256 and data.items_per_sample == 32
    batch = data.train.next_batch()
    assert batch["x"].shape == (4, 32) and torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    with pytest.raises(EmberError, match="max_bytes"):
        build_data(data_cfg(max_bytes=100, seq_len=128), 1, 1, seed=0)
    with pytest.raises(EmberError, match="batch_size"):
        build_data(data_cfg(max_bytes=20_000, seq_len=32), 10_000, 8, seed=0)


def test_encode_decode_round_trip():
    text = "naïve café — 数学 🚀\n"
    assert stdlib.decode(stdlib.encode(text)) == text
    assert all(0 <= i < 256 for i in stdlib.encode(text))
    assert stdlib.decode(stdlib.encode(text)[:-3]).endswith("\ufffd")  # a cut character is replaced


@pytest.mark.parametrize("rows", [False, True])
def test_digits_stratified_and_normalised(rows):
    x_tr, y_tr, x_va, y_va = digits.load_split(data_cfg(val_fraction=0.2), rows=rows)
    assert x_tr.shape[1:] == ((8, 8) if rows else (1, 8, 8)) and x_tr.dtype == torch.float32
    assert len(x_tr) + len(x_va) == 1797
    assert abs(x_tr.mean().item()) < 1e-4 and abs(x_tr.std().item() - 1) < 1e-2
    share_tr = torch.bincount(y_tr, minlength=10) / len(y_tr)
    share_va = torch.bincount(y_va, minlength=10) / len(y_va)
    assert (share_tr - share_va).abs().max() < 0.01


def test_digits_build_data():
    data = build_data(data_cfg(name="digits-rows"), batch_size=16, eval_batch_size=100, seed=0)
    assert data.spec.task == "classify" and data.spec.num_classes == 10 and data.spec.input_shape == (8, 8)
    assert sum(len(b["y"]) for b in data.val) == len(data.val.dataset)


@pytest.mark.parametrize("max_digits, n_val", [(1, 10), (3, 500)])  # 1 digit: only 100 pairs exist
def test_addition_targets_are_sums_and_splits_disjoint(max_digits, n_val):
    cfg = data_cfg(num_examples=300, max_digits=max_digits, seed=4)
    train, val = addition.load_split(cfg)
    assert len(train["src"]) == 300 and len(val["src"]) == n_val
    pairs = {}
    for name, split in (("train", train), ("val", val)):
        pairs[name] = set()
        for src, tgt_in, tgt_out in zip(split["src"], split["tgt_in"], split["tgt_out"]):
            a, b = addition.decode_src(src).split("+")
            assert addition.decode_tgt(tgt_out) == str(int(a) + int(b))
            assert tgt_in[0] == addition.BOS
            n = len(str(int(a) + int(b)))
            assert torch.equal(tgt_in[1 : n + 1], tgt_out[:n]) and tgt_out[n] == addition.EOS
            assert (tgt_out[n + 1 :] == IGNORE_INDEX).all() and (tgt_in[n + 1 :] == addition.PAD).all()
            pairs[name].add((int(a), int(b)))
    assert not pairs["train"] & pairs["val"]
    again, _ = addition.load_split(cfg)
    assert torch.equal(again["src"], train["src"])  # deterministic from cfg.seed


def test_addition_spec_and_encode():
    data = build_data(data_cfg(name="addition", max_digits=2, num_examples=200), 8, 8, seed=0)
    s = data.spec
    assert (s.task, s.src_len, s.seq_len, s.vocab_size) == ("seq2seq", 5, 4, addition.VOCAB_SIZE)
    assert data.items_per_sample == 4
    assert addition.encode_src("1+2", 5) == [4, 13, 5, 0, 0]
    with pytest.raises(EmberError):
        addition.encode_src("1-2")
