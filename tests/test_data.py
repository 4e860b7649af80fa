"""Datasets and the batch loader: exact epochs across ranks, exact resume, correct splits."""

import numpy as np
import pytest
import torch

from ember.config import DataConfig
from ember.data import addition, shards
from ember.data.build import build_data
from ember.data.loader import ArrayDataset, BatchLoader
from ember.data.mapped import PackedTokens
from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError


def data_cfg(**kw) -> DataConfig:
    base = dict(name="stdlib", seq_len=64, num_examples=2000, max_digits=3, vocab_size=300)
    return DataConfig(**{**base, **kw})


def ids_dataset(n: int) -> ArrayDataset:
    return ArrayDataset(i=torch.arange(n))


def drain(loader: BatchLoader, k: int) -> list[torch.Tensor]:
    return [loader.next_batch()["i"] for _ in range(k)]


# --- loader -------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_once_per_epoch_across_ranks(shuffle):
    n, world = 103, 2  # 103 is odd and not a multiple of the batch size
    ranks = [
        BatchLoader(ids_dataset(n), 10, shuffle, seed=3, drop_last=False, rank=r, world_size=world)
        for r in range(world)
    ]
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


def test_optimizer_steps_cover_the_same_samples_for_any_split_of_the_global_batch():
    """Global batch 12 as 1 rank x 12, 1 rank x 4 x 3 accumulation, or 2 ranks x 3 x 2: the same
    samples in every optimiser step, across epochs (100 % 12 = 4 skipped), and after a resume
    that changes the split mid-epoch."""
    n = 100

    def steps(batch, accum, world, k, resume_from=None):
        loaders = [
            BatchLoader(ids_dataset(n), batch, True, seed=5, drop_last=True, rank=r, world_size=world, accum=accum)
            for r in range(world)
        ]
        if resume_from is not None:
            for loader in loaders:
                loader.load_state_dict(resume_from)
        out = [
            sorted(torch.cat([loader.next_batch()["i"] for loader in loaders for _ in range(accum)]).tolist())
            for _ in range(k)
        ]
        return out, loaders[0].state_dict()

    one, _ = steps(12, 1, 1, 20)
    assert steps(4, 3, 1, 20)[0] == one and steps(3, 2, 2, 20)[0] == one
    first, state = steps(3, 2, 2, 5)  # 5 steps on 2 ranks, then resume on 1 rank with batch 12
    rest, _ = steps(12, 1, 1, 15, resume_from=state)
    assert first + rest == one
    with pytest.raises(EmberError, match="same global batch"):
        BatchLoader(ids_dataset(n), 8, True, seed=5, drop_last=True).load_state_dict(state)


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
    assert len(loader) == 3 and loader.state_dict() == {"epoch": 0, "index": 0, "samples": 0}


def test_no_batches_is_an_error():
    with pytest.raises(EmberError):
        BatchLoader(ids_dataset(5), 8, True, seed=0, drop_last=True).next_batch()


def token_shards(tmp_path, n_tokens: int, shard_size: int) -> tuple:
    """A prepared-style directory whose token stream is 0, 1, 2, ... (uint32)."""
    writer = shards.ShardWriter(tmp_path, "train", shard_size, {"tokens": "uint32"})
    for start in range(0, n_tokens, 777):  # uneven writes
        writer.write(tokens=np.arange(start, min(n_tokens, start + 777), dtype=np.uint32))
    manifest = {
        "format": shards.FORMAT,
        "kind": "tokens",
        "dtype": "uint32",
        "splits": {"train": {"shards": writer.close()}},
    }
    return tmp_path, manifest


def test_packed_windows_cross_shard_boundaries(tmp_path):
    path, manifest = token_shards(tmp_path, 10_000, shard_size=1024)
    ds = PackedTokens(path, manifest, "train", seq_len=20)
    assert len(manifest["splits"]["train"]["shards"]) == 10 and len(ds) == 499  # 10,000 tokens hold 499 windows of 21
    idx = torch.tensor([0, 51, len(ds) - 1])  # window 51 spans tokens 1020..1040: two shards
    batch = ds.get(idx)
    assert batch["x"].dtype == torch.int64 and batch["x"].shape == (3, 20)
    for row, i in enumerate(idx.tolist()):
        assert torch.equal(batch["x"][row], torch.arange(i * 20, i * 20 + 20))
        assert torch.equal(batch["y"][row], torch.arange(i * 20 + 1, i * 20 + 21))


@pytest.mark.parametrize("shuffle", [False, True])
def test_exactly_once_across_two_ranks_and_two_workers(tmp_path, shuffle):
    path, manifest = token_shards(tmp_path, 20_001, shard_size=4096)
    ds = PackedTokens(path, manifest, "train", seq_len=10)  # 2000 windows
    seen = []
    for rank in range(2):
        loader = BatchLoader(ds, 7, shuffle, seed=1, drop_last=False, rank=rank, world_size=2, num_workers=2)
        seen += [int(x) // 10 for b in loader for x in b["x"][:, 0]]
    assert sorted(seen) == list(range(2000))
    train = [BatchLoader(ds, 8, True, seed=1, drop_last=True, rank=r, world_size=2, num_workers=2) for r in range(2)]
    epoch = [int(x) // 10 for _ in range(train[0].batches_per_epoch) for t in train for x in t.next_batch()["x"][:, 0]]
    assert len(epoch) == len(set(epoch)) == 2000  # 2000 = 125 steps x 8 x 2 ranks: nothing dropped


def test_resumed_loader_with_workers_continues_at_the_next_sample(tmp_path):
    path, manifest = token_shards(tmp_path, 5_001, shard_size=2048)
    ds = PackedTokens(path, manifest, "train", seq_len=10)
    first = BatchLoader(ds, 16, True, seed=3, drop_last=True, num_workers=2)
    for _ in range(45):  # into the second epoch (31 batches each)
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch()["x"] for _ in range(20)]
    resumed = BatchLoader(ds, 16, True, seed=3, drop_last=True, num_workers=2)
    resumed.load_state_dict(state)
    assert state == {"epoch": 1, "index": 14, "samples": 224}
    assert all(torch.equal(resumed.next_batch()["x"], e) for e in expected)
    in_process = BatchLoader(ds, 16, True, seed=3, drop_last=True)  # workers change nothing
    in_process.load_state_dict(state)
    assert torch.equal(in_process.next_batch()["x"], expected[0])


def test_transform_runs_after_the_device_copy():
    loader = BatchLoader(ids_dataset(10), 4, False, seed=0, drop_last=True, transform=lambda b: {"i": b["i"] * 10})
    assert loader.next_batch("cpu")["i"].tolist() == [0, 10, 20, 30]
    assert [b["i"].tolist() for b in loader][1] == [40, 50, 60, 70]


# --- datasets -----------------------------------------------------------------


def test_stdlib_build_data_and_errors():
    data = build_data(data_cfg(max_bytes=200_000, seq_len=32), batch_size=4, eval_batch_size=8, seed=0)
    assert data.spec.task == "lm" and data.spec.vocab_size == 300 and data.items_per_sample == 32
    assert 1.2 < data.bytes_per_token() < 2.0 and '"model"' in data.codec_json  # a trained BPE
    batch = data.train.next_batch()
    assert batch["x"].shape == (4, 32) and torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    with pytest.raises(EmberError, match="seq_len"):
        build_data(data_cfg(max_bytes=200_000, seq_len=100_000), 1, 1, seed=0)
    with pytest.raises(EmberError, match="batch_size"):
        build_data(data_cfg(max_bytes=200_000, seq_len=32), 100_000, 8, seed=0)


@pytest.mark.parametrize("name", ["digits", "digits-rows"])
def test_digits_normalised_on_the_device_side(name):
    data = build_data(data_cfg(name=name, val_fraction=0.2), batch_size=16, eval_batch_size=400, seed=0)
    shape = (8, 8) if name == "digits-rows" else (1, 8, 8)
    assert data.spec.task == "classify" and data.spec.num_classes == 10 and data.spec.input_shape == shape
    assert sum(len(b["y"]) for b in data.val) == len(data.val.dataset) == 360
    x = torch.cat([b["x"] for b in BatchLoader(data.train.dataset, 500, False, 0, False, transform=data.val.transform)])
    assert x.dtype == torch.float32 and x.shape[1:] == shape
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_digits_augmentation_only_in_training():
    cfg = data_cfg(name="digits", val_fraction=0.2)
    cfg.augment.rotation = 20
    data = build_data(cfg, batch_size=64, eval_batch_size=64, seed=0)
    raw = data.train.dataset.get(data.train._indices(0, 0))["x"]
    plain = data.val.transform({"x": raw})["x"]
    assert not torch.allclose(data.train.next_batch()["x"], plain)
    assert torch.equal(next(iter(data.val))["x"], data.val.transform(data.val.dataset.get(torch.arange(64)))["x"])


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
