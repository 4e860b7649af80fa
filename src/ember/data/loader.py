"""Batches from in-memory datasets, with an exact, resumable order.

A dataset here is any small object with ``__len__`` and ``get(indices) -> dict``
that gathers a whole batch with one tensor index (no per-sample Python loop).
``BatchLoader`` decides which indices go in which batch:

- the order of epoch ``e`` is ``torch.randperm(n, generator=Generator().manual_seed(seed + e))``
  (or ``arange(n)`` without shuffling), so it never touches the global RNG;
- with ``world_size`` ranks, rank ``r`` takes the strided slice ``order[r::world_size]``.
  Step ``j`` of all ranks together therefore covers the contiguous chunk
  ``order[j*B*W : (j+1)*B*W]``: W ranks with batch B see exactly the samples one
  rank with batch B*W would see;
- ``drop_last=True`` (training) keeps every optimiser step whole by skipping the last
  ``n % G`` samples of each epoch's order, where ``G = B*W*accum`` is the global batch
  (``accum`` micro-batches per optimiser step) — at most ``G - 1``, and different ones
  each epoch when shuffling. Optimiser step ``s`` therefore covers
  ``order[s*G : (s+1)*G]`` whatever B, W and accum are, as long as their product is G:
  a run may resume with another number of ranks and the same global batch;
- ``drop_last=False`` (evaluation) sees every sample exactly once across ranks; the
  last batch may be smaller and nothing is padded or repeated. Ranks may then differ
  by one batch, so reduce evaluation sums after the loop, not per batch.

``next_batch()`` is endless (epochs roll over); ``for batch in loader`` is one pass.
``state_dict()`` / ``load_state_dict()`` resume at exactly the next batch; the position is
also kept in samples across all ranks, so a loader with another B*W continues at the same
sample (at an optimiser-step boundary, where checkpoints are taken).

With ``num_workers > 0`` batches are gathered ahead in worker processes by a
``torch.utils.data.DataLoader`` fed with this loader's index batches: worker k gathers
batches k, k+W, ... and the DataLoader hands them back in order, so the stream — and the
resume position, counted in batches handed out, not prefetched — is the same for any
number of workers. ``transform`` (e.g. image augmentation) runs on each batch after the
copy to the device, in the training process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ember.errors import EmberError

Batch = dict[str, Tensor]


class ArrayDataset:
    """Equal-length tensors, indexed together: ``ArrayDataset(x=X, y=Y).get(idx)``."""

    def __init__(self, **tensors: Tensor) -> None:
        if not tensors:
            raise ValueError("ArrayDataset needs at least one tensor")
        lengths = {k: len(t) for k, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArrayDataset tensors differ in length: {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def get(self, indices: Tensor) -> Batch:
        return {k: t[indices] for k, t in self.tensors.items()}


class BatchLoader:
    """Batches of ``dataset`` for one rank; see the module docstring for the order."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
        pin_memory: bool = False,
        num_workers: int = 0,
        transform: Callable[[Batch], Batch] | None = None,
        accum: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = pin_memory
        self.num_workers = num_workers
        self.transform = transform
        self._stream: Iterator[Batch] | None = None  # prefetching iterator (num_workers > 0)
        self.epoch = 0
        self.index = 0  # batches already returned by next_batch() in this epoch

        self.order = EpochOrder(len(dataset), batch_size, shuffle, seed, drop_last, rank, world_size, accum)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return self.order.num_samples

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _indices(self, epoch: int, index: int) -> Tensor:
        return self.order.batch(epoch, index)

    def _finish(self, batch: Batch, device: torch.device | None) -> Batch:
        batch = self._to_device(batch, device if device is not None else self.device)
        return self.transform(batch) if self.transform is not None else batch

    def _gathered(self, positions: Iterator[Tensor]) -> Iterator[Batch]:
        """The batches of ``positions``, gathered here or by worker processes, in order."""
        if self.num_workers == 0:
            return (self.dataset.get(idx) for idx in positions)
        from torch.utils.data import DataLoader

        # Its own generator: the DataLoader seeds its workers from it, and drawing that seed
        # from the global RNG would shift augmentation and dropout on resume.
        loader = DataLoader(
            _Gather(self.dataset),
            batch_size=None,
            sampler=_Once(positions),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def _to_device(self, batch: Batch, device: torch.device | None) -> Batch:
        if device is None:
            return batch
        device = torch.device(device)
        if device.type != "cuda":
            return {k: v.to(device) for k, v in batch.items()}
        # Pinned host memory lets the copy overlap with compute; non_blocking is safe
        # because later kernels on the same stream wait for it.
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def next_batch(self, device: str | torch.device | None = None) -> Batch:
        """The next batch of the endless stream; rolls over into the next epoch."""
        if self.batches_per_epoch == 0:
            raise EmberError(
                f"The loader has no batches: {len(self.dataset)} samples cannot fill one batch of "
                f"{self.batch_size} on each of {self.world_size} rank(s). Lower the batch size or use more data."
            )
        if self._stream is None:
            self._stream = self._gathered(self.order.positions(self.epoch, self.index, endless=True))
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        batch = next(self._stream)
        self.index += 1
        return self._finish(batch, torch.device(device) if device is not None else None)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch_batches()

    def epoch_batches(self, device: str | torch.device | None = None) -> Iterator[Batch]:
        """One pass over the current epoch's order, from its start, on ``device`` (default: the
        loader's); leaves the resume state alone."""
        device = torch.device(device) if device is not None else None
        for batch in self._gathered(self.order.positions(self.epoch, 0, endless=False)):
            yield self._finish(batch, device)

    def padding_batch(self, device: str | torch.device | None = None) -> Batch:
        """A batch of sample 0 alone, for a rank that must run a forward pass it does not count."""
        return self._finish(
            self.dataset.get(torch.zeros(1, dtype=torch.long)), torch.device(device) if device is not None else None
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "samples": self.index * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        if "samples" in state:  # counted over all ranks: valid for any batch size x ranks dividing it
            per_batch = self.batch_size * self.world_size
            if state["samples"] % per_batch:
                raise EmberError(
                    f"The saved data position ({state['samples']} samples into epoch {self.epoch}) is not a whole "
                    f"number of batches of {self.batch_size} x {self.world_size} rank(s). Resume with the same "
                    f"global batch (train.batch_size x train.grad_accum x data-parallel ranks) as the checkpoint."
                )
            self.index = state["samples"] // per_batch
        self._stream = None  # batches prefetched for the old position are dropped


class EpochOrder:
    """Which samples go in batch ``index`` of ``epoch`` on this rank (see the module docstring).

    Kept apart from BatchLoader on purpose: the index generator a worker DataLoader holds
    must not point back at the loader, or the two form a reference cycle, and a DataLoader
    iterator freed by the cycle collector waits seconds for its workers to exit.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        accum: int = 1,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.kept = n // (batch_size * world_size * accum) * batch_size * world_size * accum if drop_last else n
        self._cached: tuple[int, Tensor] | None = None  # (epoch, this rank's indices)

    @property
    def num_samples(self) -> int:
        return len(range(self.rank, self.kept, self.world_size))

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def rank_indices(self, epoch: int) -> Tensor:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.n)
        indices = order[: self.kept][self.rank :: self.world_size]
        self._cached = (epoch, indices)
        return indices

    def batch(self, epoch: int, index: int) -> Tensor:
        b = self.batch_size
        return self.rank_indices(epoch)[index * b : (index + 1) * b]

    def positions(self, epoch: int, index: int, endless: bool) -> Iterator[Tensor]:
        """Index batches from (epoch, index) on: to the end of the epoch, or forever."""
        while True:
            for i in range(index, self.batches_per_epoch):
                yield self.batch(epoch, i)
            if not endless:
                return
            epoch, index = epoch + 1, 0


class _Once:
    """A sampler that hands out one iterator of index batches (the DataLoader iterates it once)."""

    def __init__(self, positions: Iterator[Tensor]) -> None:
        self.positions = positions

    def __iter__(self) -> Iterator[Tensor]:
        return self.positions


class _Gather:
    """``dataset[indices]`` → ``dataset.get(indices)``: a whole batch per DataLoader item."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: Tensor) -> Batch:
        return self.dataset.get(indices)
