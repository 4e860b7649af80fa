"""What a dataset tells the model builder: the task and the shapes it implies."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Task = Literal["lm", "classify", "seq2seq", "mlm", "simclr", "clip", "loss"]


@dataclass(frozen=True)
class DataSpec:
    """Shape facts a model needs from its data.

    task: "lm" batches are {"x": Long[B,T], "y": Long[B,T]};
          "classify" batches are {"x": Float[B,...], "y": Long[B]};
          "seq2seq" batches are {"src": Long[B,S], "tgt_in": Long[B,T], "tgt_out": Long[B,T]};
          "clip" batches are {"x": Float[B,C,H,W], "y": Long[B], "text": Long[B,L]} (+ "prompts": Long[K,L]
          in validation). "mlm" and "simclr" are objectives over lm and image data (ember.objectives);
          "loss" batches are whatever a user's module, which returns its own summed loss, reads.
    Targets equal to ``ignore_index`` (-100) do not count in the loss.
    """

    task: Task
    vocab_size: int = 0  # lm, seq2seq
    num_classes: int = 0  # classify
    input_shape: tuple[int, ...] = ()  # classify: (C, H, W) for images, (T, F) for row sequences
    seq_len: int = 0  # lm: context length; seq2seq: max target length
    src_len: int = 0  # seq2seq: max source length
    pad_id: int = 0  # seq2seq padding token in src/tgt_in
    bos_id: int = 0
    eos_id: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        d = dict(d)
        d["input_shape"] = tuple(d.get("input_shape", ()))
        return cls(**d)


IGNORE_INDEX = -100
