"""Instruction data: prompt/response rows or chat conversations → token rows for supervised fine-tuning of a
language model, with the loss on the responses only (``ember data prepare chats.jsonl --kind instruct``).

Each row is either a prompt and a response (``data.prompt_field``, ``data.response_field``) or a list of
messages ``[{"role": ..., "content": ...}, ...]`` (``data.messages_field``), from JSONL, Parquet or Arrow
(CSV for prompt/response). A prompt/response row is the conversation user → assistant. Every message is
written with ``data.chat_template`` (``{role}`` and ``{content}``), after the tokenizer's own start ids
(Llama's ``<s>``). The tokens of each assistant message's content, the template's text after it and the
tokenizer's end-of-text id are *targets*: the loss counts them and nothing else — prompts, roles and
padding are never learnt, and since the loss is summed over targets and divided by the step's target
count, accumulation stays exact. A row longer than ``data.seq_len + 1`` tokens is cut at its end (counted);
a row left with no target (its prompt fills the length) is skipped and counted.

The shards hold ``tokens`` [n, W] (W: the longest row kept, at most seq_len + 1), ``targets`` [n, W] (1 where
the token is learnt) and ``lengths`` [n]; a batch is cut to its longest row. The task is ``lm``: gpt and
llama train on it, and ``ember generate`` writes a prompt in the same template and answers it.

Example::

    prepare(["chats.jsonl"], "data/chats", DataConfig(kind="instruct", tokenizer="llama/tokenizer.json"))
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ember.data import shards, sources
from ember.data.prepare_job import (
    TRAIN,
    PrepareJob,
    fit_codec,
    load_npz,
    pack_ids,
    pack_texts,
    save_npz,
    unpack_ids,
    unpack_texts,
    write_text,
)
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.data.config import DataConfig
    from ember.data.datasets import Datasets
    from ember.data.spec import DataSpec
    from ember.data.tokenizer import TextCodec

ASSISTANT = "assistant"  # the role whose messages are learnt


def template_parts(template: str) -> tuple[str, str]:
    """``data.chat_template`` split around ``{content}``: the header (with ``{role}``) and the tail."""
    if template.count("{content}") != 1:
        raise EmberError(
            f"data.chat_template must hold {{content}} exactly once (and may hold {{role}}); got {template!r}. "
            f"E.g. '<|{{role}}|>\\n{{content}}\\n'."
        )
    head, tail = template.split("{content}")
    return head, tail


def conversation(row: dict, cfg: DataConfig) -> list[tuple[str, str]] | str:
    """A row's (role, content) messages, or why it has none (a reason naming the field)."""
    messages = row.get(cfg.messages_field)
    if messages is None:
        prompt, response = row.get(cfg.prompt_field), row.get(cfg.response_field)
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            return f"no text {cfg.prompt_field!r} and non-empty {cfg.response_field!r}, nor {cfg.messages_field!r}"
        return [("user", prompt), (ASSISTANT, response)]
    if not isinstance(messages, list) or not messages:
        return f"{cfg.messages_field!r} is not a list of messages"
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"{cfg.messages_field!r} holds {m!r}, not {{'role': str, 'content': str}}"
        out.append((m["role"], m["content"]))
    if not any(role == ASSISTANT for role, _ in out):
        return f"no {ASSISTANT!r} message to learn"
    return out


def encode_conversation(
    codec: TextCodec, messages: list[tuple[str, str]], template: str, eos_id: int
) -> tuple[list[int], list[int]]:
    """(ids, targets) of one conversation: the tokenizer's start ids, then each message in the template;
    targets are 1 on an assistant's content, the template's tail and ``eos_id``, 0 elsewhere."""
    head, tail = template_parts(template)
    ids = list(codec.template()[0])
    targets = [0] * len(ids)
    for role, content in messages:
        header = codec.encode(head.format(role=role)) if head else []
        body = codec.encode(content + tail.format(role=role))
        learnt = role == ASSISTANT
        end = [eos_id] if learnt else []
        ids += header + body + end
        targets += [0] * len(header) + [int(learnt)] * (len(body) + len(end))
    return ids, targets


def prompt_ids(codec: TextCodec, prompt: str, template: str) -> list[int]:
    """What ``ember generate`` feeds an instruction-tuned model: the prompt as a user message, then the
    assistant's header, so the model writes the answer (and ends it with its end-of-text id)."""
    head, _ = template_parts(template)
    ids, _ = encode_conversation(codec, [("user", prompt)], template, -1)
    return ids + (codec.encode(head.format(role=ASSISTANT)) if head else [])


class InstructPrepare(PrepareJob):
    """Phases, each unit's work file atomic under ``OUT/.ember-work/`` so a killed prepare resumes: read
    (parallel, per file: each row's messages as JSON), split, tokenizer (a BPE trains on the training
    split's messages), tokenise (parallel), shards. The output does not depend on the number of workers."""

    def rows_path(self, i: int) -> Path:
        return self.work / f"chats_{i:06d}.npz"

    def ids_path(self, i: int) -> Path:
        return self.work / f"chat_ids_{i:06d}.npz"

    def run(self) -> tuple[dict, int, int]:
        from ember.data.pairs import random_split

        template_parts(self.cfg.chat_template)  # a bad template fails before any work
        reused = self.read()
        records = [json.loads(self.rows_path(u.index).with_suffix(".json").read_text()) for u in self.units]
        n = sum(r["rows"] for r in records)
        if not n:
            raise EmberError(
                f"No row holds a conversation: each needs {self.cfg.prompt_field!r} and {self.cfg.response_field!r} "
                f"texts, or {self.cfg.messages_field!r} messages with an {ASSISTANT!r} one. First problem: "
                f"{next((r['skipped'][0] for r in records if r['skipped']), 'the files are empty')}. Name the "
                f"fields with --set prompt_field=... / response_field=... / messages_field=..."
            )
        split = random_split(n, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.seed)
        done = self.work / "tokenizer.done"
        codec, entry = fit_codec(self.cfg, self.out, lambda: self.train_texts(split), self.phases, done.is_file())
        write_text(done, "")
        dtype = shards.token_dtype(codec.vocab_size)
        self.tokenize(codec, dtype, entry["eos_id"])
        return self.manifest(split, codec, entry, dtype, records), reused, 0

    def manifest(self, split: np.ndarray, codec: TextCodec, entry: dict, dtype: str, records: list) -> dict:
        lengths = np.concatenate(
            [np.diff(load_npz(self.ids_path(u.index), ("ids_offsets",))["ids_offsets"]) for u in self.units]
        )
        width = int(min(self.cfg.seq_len + 1, lengths.max()))
        info, no_target = self.write_shards(split, width, dtype, entry["pad_id"])
        skipped = [s for r in records for s in r["skipped"]][:50]
        return {
            "kind": "instruct",
            "dtype": dtype,
            "vocab_size": codec.vocab_size,
            "eot_id": entry["eos_id"],
            "bos_id": entry["bos_id"],
            "pad_id": entry["pad_id"],
            "seq_len": width - 1,
            "chat_template": self.cfg.chat_template,
            "arrays": {
                "tokens": {"dtype": dtype, "shape": [width]},
                "targets": {"dtype": "uint8", "shape": [width]},
                "lengths": {"dtype": "int32", "shape": []},
            },
            "tokenizer": entry,
            "shard_size": self.cfg.shard_size,
            "splits": info,
            "stats": {
                "read": {
                    "samples": len(lengths) + sum(r["skipped_rows"] for r in records),
                    "bytes": sum(os.path.getsize(p) for u in self.units for p in u.paths),
                    "skipped_files": 0,
                    "skipped": skipped,  # the first rows without a conversation, and why
                },
                "no_conversation": sum(r["skipped_rows"] for r in records),
                "truncated": int((lengths > width).sum()),
                "no_target": no_target,
                "tokens": {"median": int(np.median(lengths)), "max": int(lengths.max())},
            },
        }

    def read(self) -> int:
        done = lambda u: self.rows_path(u.index).with_suffix(".json")  # noqa: E731
        return self.each_unit("read", done, _read_unit, lambda u: (u, self.cfg, str(self.rows_path(u.index))))

    def train_texts(self, split: np.ndarray) -> Iterator[str]:
        start = 0
        for u in self.units:
            chats = unpack_texts(load_npz(self.rows_path(u.index)))
            for k, chat in enumerate(chats, start=start):
                if split[k] == TRAIN:
                    yield from (content for _, content in json.loads(chat))
            start += len(chats)

    def tokenize(self, codec: TextCodec, dtype: str, eos_id: int) -> None:
        codec_json, template = codec.to_json(), self.cfg.chat_template
        job = lambda u: (str(self.rows_path(u.index)), codec_json, template, eos_id, dtype, str(self.ids_path(u.index)))  # noqa: E731
        self.each_unit("tokenise", lambda u: self.ids_path(u.index), _tokenize_unit, job)

    def write_shards(self, split: np.ndarray, width: int, dtype: str, pad_id: int) -> tuple[dict, int]:
        """The rows cut to ``width`` into each split's shards; a row left without a target is dropped (counted)."""
        dtypes = {"tokens": dtype, "targets": "uint8", "lengths": "int32"}
        writers = {name: shards.ShardWriter(self.out, name, self.cfg.shard_size, dtypes) for name in self.splits}
        start, kept, no_target = 0, {name: 0 for name in self.splits}, 0
        for u in self.units:
            arrays = load_npz(self.ids_path(u.index))
            ids, targets = unpack_ids(arrays, "ids"), unpack_ids(arrays, "targets")
            tokens = np.full((len(ids), width), pad_id, dtype=dtype)
            learnt = np.zeros((len(ids), width), dtype=np.uint8)
            lengths = np.array([min(len(i), width) for i in ids], dtype=np.int32)
            for r, (row, t) in enumerate(zip(ids, targets)):
                tokens[r, : lengths[r]], learnt[r, : lengths[r]] = row[:width], t[:width]
            useful = learnt[:, 1:].any(axis=1)  # the first token is never predicted
            no_target += int((~useful).sum())
            for name, writer in writers.items():
                mine = np.flatnonzero((split[start : start + len(ids)] == shards.SPLITS.index(name)) & useful)
                writer.write(tokens=tokens[mine], targets=learnt[mine], lengths=lengths[mine])
                kept[name] += len(mine)
            start += len(ids)
        return {name: {"samples": kept[name], "shards": w.close()} for name, w in writers.items()}, no_target


def _read_unit(unit: sources.Unit, cfg: DataConfig, path: str) -> int:
    """Worker: one file's conversations, as JSON texts, into ``path``; rows without one are named in the record."""
    from ember.data.tables import read_table

    table = read_table(list(unit.paths), allow_empty=True)
    names = list(table.columns)
    chats, skipped = [], []
    for i in range(len(table.origins)):
        found = conversation({k: table.columns[k][i] for k in names}, cfg)
        if isinstance(found, str):
            skipped.append(f"{table.where(i)}: {found}")
        else:
            chats.append(json.dumps(found, ensure_ascii=False))
    save_npz(Path(path), pack_texts(chats))
    record = {"rows": len(chats), "skipped_rows": len(skipped), "skipped": skipped[:50]}
    write_text(Path(path).with_suffix(".json"), json.dumps(record))
    return len(chats)


def _tokenize_unit(rows_path: str, codec_json: str, template: str, eos_id: int, dtype: str, path: str) -> None:
    """Worker: ids and target flags of one unit's conversations."""
    from ember.data.tokenizer import codec_from_json

    codec = codec_from_json(codec_json)
    ids, targets = [], []
    for chat in unpack_texts(load_npz(Path(rows_path))):
        i, t = encode_conversation(codec, [tuple(m) for m in json.loads(chat)], template, eos_id)
        ids.append(i)
        targets.append(t)
    save_npz(Path(path), {**pack_ids(ids, dtype, "ids"), **pack_ids(targets, "uint8", "targets")})


def summary(manifest: dict) -> list[str]:
    s = manifest["stats"]
    return [
        f"instruct: rows of up to {manifest['seq_len'] + 1} tokens (median {s['tokens']['median']}, longest "
        f"{s['tokens']['max']}); loss on the assistant's tokens only; template {manifest['chat_template']!r}",
        f"cut at the end: {s['truncated']} row(s); without a target after the cut (dropped): {s['no_target']}; "
        f"rows without a conversation (skipped): {s['no_conversation']}",
    ]


def first_row(data_dir: Path, manifest: dict) -> list[str]:
    """The first training row as text, its learnt part in [[ ]], for ``ember data inspect``."""
    from ember.data.shards import open_split
    from ember.data.tokenizer import data_codec

    if not manifest["splits"]["train"]["shards"]:
        return []
    _, arrays = open_split(data_dir, manifest, "train", "size")[0]
    n, ids, learnt = int(arrays["lengths"][0]), arrays["tokens"][0], arrays["targets"][0]
    codec, text, start = data_codec(data_dir, manifest), "", 0
    for k in range(1, n + 1):  # one piece per run of learnt or unlearnt tokens
        if k == n or learnt[k] != learnt[start]:
            piece = codec.decode([int(i) for i in ids[start:k]])
            text += f"[[{piece}]]" if learnt[start] else piece
            start = k
    return ["first training row ([[learnt]]):", "  " + text.replace("\n", "\n  ")]


def instruct_spec(manifest: dict, seq_len: int) -> DataSpec:
    from ember.data.spec import DataSpec

    return DataSpec(
        task="lm",
        vocab_size=manifest["vocab_size"],
        seq_len=seq_len,
        eos_id=manifest["eot_id"],
        bos_id=manifest["bos_id"],
        pad_id=manifest["pad_id"],
        template=manifest["chat_template"],
    )


def instruct_sets(cfg: DataConfig, path: Path, manifest: dict) -> Datasets:
    """A prepared instruct directory's splits as ``InstructRows``; ``data.seq_len`` must hold its rows."""
    from ember.data.datasets import Datasets
    from ember.data.mapped import InstructRows
    from ember.data.shards import has_split
    from ember.data.tokenizer import data_codec_json

    if cfg.seq_len < manifest["seq_len"]:
        raise EmberError(
            f"{path} holds rows of up to {manifest['seq_len'] + 1} tokens, but data.seq_len is {cfg.seq_len}: a "
            f"row would not fit the model's input. Set data.seq_len >= {manifest['seq_len']}, or prepare again "
            f"with --set seq_len={cfg.seq_len} (longer rows are then cut at their end)."
        )
    train, val, test = (
        InstructRows(path, manifest, split, cfg.verify) if has_split(manifest, split) else None
        for split in ("train", "val", "test")
    )
    spec = instruct_spec(manifest, cfg.seq_len)
    return Datasets(spec, train, val, codec_json=data_codec_json(path, manifest), test=test)
