"""What a dataset tells the model builder: the task and the shapes it implies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Task = Literal["lm", "classify", "regress", "seq2seq", "mlm", "simclr", "clip", "loss"]


@dataclass(frozen=True)
class DataSpec:
    """Shape facts a model needs from its data.

    task: "lm" batches are {"x": Long[B,T], "y": Long[B,T]};
          "classify" batches are {"x": Float[B,...], "y": Long[B]}, or for labelled text (vocab_size > 0,
          ``reads_tokens``) {"x": Long[B, L] token ids, ``pad_id`` after each text, "y": Long[B]};
          "regress" batches are {"x": Float[B, F], "y": Float[B]} (a table's numeric target; the model
          outputs [B] or [B, 1]);
          "seq2seq" batches are {"src": Long[B,S], "tgt_in": Long[B,T], "tgt_out": Long[B,T]};
          "clip" batches are {"x": Float[B,C,H,W], "y": Long[B], "text": Long[B,L]} (+ "prompts": Long[K,L]
          in validation). "mlm" and "simclr" are objectives over lm and image data (ember.objectives);
          "loss" batches are whatever a user's module, which returns its own summed loss, reads.
    Targets equal to ``ignore_index`` (-100) do not count in the loss.
    """

    task: Task
    vocab_size: int = 0  # lm, seq2seq
    num_classes: int = 0  # classify
    input_shape: tuple[int, ...] = ()  # classify, regress (F,): (C, H, W) for images, (T, F) for row sequences
    seq_len: int = 0  # lm: context length; seq2seq: max target length
    src_len: int = 0  # seq2seq: max source length
    pad_id: int = 0  # seq2seq padding in src/tgt_in; labelled text: what fills a row after its text
    bos_id: int = 0  # seq2seq: starts a target; lm: the tokenizer's start-of-text id (its eos_id if none)
    eos_id: int = 0  # seq2seq: ends a target; lm: ends each document of the stream (the tokenizer's end-of-text)
    # classify: the classes' names in label order, when the data names them (a prepared table's label
    # values, an image folder's class directories); () when they are only numbers. Not part of equality:
    # specs compare shapes (init.from_run, distill); replay checks the names itself (data/build.py).
    class_names: tuple[str, ...] = field(default=(), compare=False)
    # regress/classify table rows: (feature position, number of codes) of each categorical column given as
    # the index of its category (1 .. K; 0 = missing or unseen) into an embedding the model learns.
    embeddings: tuple[tuple[int, int], ...] = ()
    # lm trained on instruction data: the chat template its conversations were written in ({role}, {content}),
    # so that `ember generate` writes a prompt the same way; "" for plain text.
    template: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        if self.class_names:
            d["class_names"] = list(self.class_names)
        else:  # model.json stays as it was for data without names
            del d["class_names"]
        if self.embeddings:
            d["embeddings"] = [list(e) for e in self.embeddings]
        else:  # and for tables without index columns
            del d["embeddings"]
        if not self.template:
            del d["template"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        d = dict(d)
        d["input_shape"] = tuple(d.get("input_shape", ()))
        d["class_names"] = tuple(d.get("class_names", ()))  # model.json before names: none
        d["embeddings"] = tuple(tuple(e) for e in d.get("embeddings", ()))
        return cls(**d)

    @property
    def reads_tokens(self) -> bool:
        """Classification of token ids (labelled text): ``x`` is Long[B, L], each row a text's ids followed
        by ``pad_id`` (a special id, never inside a text, so a row's length is ``(x != pad_id).sum(1)``)."""
        return self.task == "classify" and self.vocab_size > 0

    def class_name(self, label: int) -> str:
        """The name of class ``label``, or the number itself when the data names none."""
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)


def named_classes(names: list[str] | None, num_classes: int) -> tuple[str, ...]:
    """A manifest's class names, or () when they are only the labels' numbers ("0", "1", ...)."""
    names = list(names or [])
    if len(names) != num_classes or names == [str(i) for i in range(num_classes)]:
        return ()
    return tuple(str(n) for n in names)


IGNORE_INDEX = -100
