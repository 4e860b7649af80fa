"""Datasets over memory-mapped shards: LM windows over a token stream, labelled images, labelled token rows,
source/target pairs.

Both follow the loader's dataset protocol (``__len__`` and ``get(indices) -> batch``) and
read only the rows a batch needs. They open their memory maps lazily, once per process,
so loader worker processes receive a few paths, not the data.

``PackedTokens`` packs documents: the shards hold every document followed by the
separator (id 0), back to back, and sample i is the window
``stream[i*T : i*T + T + 1]`` of the whole stream across shard boundaries, so no token is
padding and every token of the split is a target exactly once per epoch (the last,
incomplete window is dropped).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ember.data import shards
from ember.data.spec import IGNORE_INDEX


class _Mapped:
    """Shards of one split, verified once in the constructing process, mapped lazily."""

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, verify: str = "full") -> None:
        opened = shards.open_split(data_dir, manifest, split, verify)  # refuses bad shards here, by name
        self.counts = np.array([count for count, _ in opened], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._files = [
            {name: (Path(data_dir) / r["files"][name]["file"], a.dtype, a.shape) for name, a in arrays.items()}
            for r, (_, arrays) in zip(manifest["splits"][split]["shards"], opened)
        ]
        self._maps = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = None  # a worker maps the files itself instead of receiving a copy
        return state

    @property
    def maps(self) -> list[dict[str, np.ndarray]]:
        if self._maps is None:
            self._maps = [
                {name: np.memmap(path, dtype=dtype, mode="r", shape=shape) for name, (path, dtype, shape) in f.items()}
                for f in self._files
            ]
        return self._maps

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def gather(self, indices: Tensor, names: tuple[str, ...]) -> list[np.ndarray]:
        """The rows ``indices`` of each array in ``names``, with one read per shard."""
        idx = indices.numpy() if isinstance(indices, Tensor) else np.asarray(indices)
        shard_of = np.searchsorted(self.starts, idx, side="right") - 1
        first = self.maps[0]
        out = [np.empty((len(idx), *first[n].shape[1:]), dtype=first[n].dtype) for n in names]
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            local = idx[where] - self.starts[s]
            for array, name in zip(out, names):
                array[where] = self.maps[s][name][local]
        return out


class PackedTokens(_Mapped):
    """Non-overlapping LM windows over the packed token stream of one split."""

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, seq_len: int, verify: str = "full") -> None:
        super().__init__(data_dir, manifest, split, verify)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (self.rows - 1) // self.seq_len)

    def read(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens of the stream from ``start``, across shard boundaries."""
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, need, offset = [], length, start - int(self.starts[shard])
        while need:
            tokens = self.maps[shard]["tokens"]
            piece = tokens[offset : offset + need]
            pieces.append(piece)
            need -= len(piece)
            shard, offset = shard + 1, 0
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        t = self.seq_len
        windows = np.stack([self.read(int(i) * t, t + 1) for i in indices.tolist()]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return {"x": windows[:, :-1], "y": windows[:, 1:]}


class ImageShards(_Mapped):
    """Labelled images (uint8, or float32) of one split; ``get`` gathers a batch with one index per shard."""

    def __len__(self) -> int:
        return self.rows

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        # uint8 or float32 images; int64 classes, or float32 values (regress)
        x, y = self.gather(indices, ("images", "labels"))
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}


class TokenRows(_Mapped):
    """Labelled token rows of one split (``tokens`` [n, L], the pad id after each text, and ``labels``); a batch
    is cut to its longest text, so padding costs only up to the batch's own longest row."""

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, verify: str = "full") -> None:
        super().__init__(data_dir, manifest, split, verify)
        self.pad_id = manifest.get("pad_id", 0)  # sets prepared before it was recorded pad with 0

    def __len__(self) -> int:
        return self.rows

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        x, y = self.gather(indices, ("tokens", "labels"))
        used = int((x != self.pad_id).any(axis=0).nonzero()[0].max(initial=0)) + 1  # the longest row's length
        return {"x": torch.from_numpy(x[:, :used].astype(np.int64)), "y": torch.from_numpy(y)}


class PairRows(_Mapped):
    """Source/target pairs of one split (``src`` [n, S]; ``tgt`` [n, T + 1]: bos, ids, eos, then ``pad_id``):
    batches ``{"src", "tgt_in", "tgt_out"}`` with padding in ``tgt_out`` as IGNORE_INDEX."""

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, verify: str = "full") -> None:
        super().__init__(data_dir, manifest, split, verify)
        self.pad = manifest["pad_id"]

    def __len__(self) -> int:
        return self.rows

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        src, tgt = (a.astype(np.int64) for a in self.gather(indices, ("src", "tgt")))
        tgt_out = np.where(tgt[:, 1:] == self.pad, IGNORE_INDEX, tgt[:, 1:])
        return {
            "src": torch.from_numpy(src),
            "tgt_in": torch.from_numpy(np.ascontiguousarray(tgt[:, :-1])),
            "tgt_out": torch.from_numpy(tgt_out),
        }


class InstructRows(_Mapped):
    """Instruction rows of one split (``tokens``, ``targets`` [n, W] and ``lengths``): a batch ``{"x", "y"}``
    cut to its longest row, ``y`` the next token where that token is learnt (an answer's) and IGNORE_INDEX
    elsewhere (prompts, roles, padding), so the loss counts answers only."""

    def __len__(self) -> int:
        return self.rows

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        tokens, targets, lengths = self.gather(indices, ("tokens", "targets", "lengths"))
        used = max(2, int(lengths.max(initial=2)))
        tokens, targets = tokens[:, :used].astype(np.int64), targets[:, :used]
        y = np.where(targets[:, 1:] == 1, tokens[:, 1:], IGNORE_INDEX)
        return {"x": torch.from_numpy(tokens[:, :-1]), "y": torch.from_numpy(y)}
