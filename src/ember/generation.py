"""Sampling from a trained language-model run, answering with a seq2seq run, and naming the likeliest
classes of a text with a labelled-text classifier.

A seq2seq run answers by greedy decoding (``beam=1``) or by beam search (``beam=N``: the N
likeliest hypotheses kept each step, the finished one with the best log-probability per token
wins). Runs on the addition task read a sum; runs on prepared pairs read text, encoded and decoded
with the run's own tokenizer (RUN/tokenizer.json).

Example::

    print(generate("runs/demo", prompt="def ", max_new_tokens=100, temperature=0.8, top_k=40))
    print(generate("runs/addition", prompt="123+456"))  # greedy decoding: 579
    print(generate("runs/numbers", prompt="4 0 2 7", beam=3))  # four thousand twenty seven
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ember.errors import EmberError
from ember.runs import load_trained_model, require_existing_run


@torch.no_grad()
def sample_tokens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    vocab: int | None = None,
) -> torch.Tensor:
    """Extend ``ids`` (Long[1,T]) by sampling one token at a time from the model's last logits, up to
    ``max_new_tokens`` or until ``stop_id`` is sampled (not kept); only among the first ``vocab`` ids when
    given (a Hugging Face model's embedding may have rows its tokenizer never uses)."""
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[:, -1, :vocab].float()
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        if stop_id is not None and next_id.item() == stop_id:
            break
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, src: torch.Tensor, bos: int, eos: int, max_len: int) -> list[int]:
    """Decode one source (Long[1,S]) token by token, taking the likeliest token, until eos."""
    memory, mask = model.encode(src)
    out = torch.tensor([[bos]], dtype=torch.long, device=src.device)
    for _ in range(max_len):
        next_id = model.decode(out, memory, mask)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, next_id], dim=1)
        if next_id.item() == eos:
            break
    return out[0, 1:].tolist()


@torch.no_grad()
def greedy_decode_batch(model: torch.nn.Module, src: torch.Tensor, bos: int, eos: int, max_len: int) -> list[list[int]]:
    """Greedy decoding of a batch of sources (Long[B,S], padded): each row's ids up to and with its eos."""
    memory, mask = model.encode(src)
    out = torch.full((src.size(0), 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        next_id = model.decode(out, memory, mask)[:, -1].argmax(-1)
        out = torch.cat([out, next_id[:, None]], dim=1)
        done |= next_id == eos
        if bool(done.all()):
            break
    return [until_eos(row, eos) for row in out[:, 1:].tolist()]


def until_eos(ids: list[int], eos: int) -> list[int]:
    """``ids`` up to and with the first eos (all of them when there is none)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def beam_search(
    model: torch.nn.Module, src: torch.Tensor, bos: int, eos: int, max_len: int, beam: int = 4
) -> list[int]:
    """Beam search for one source (Long[1,S]): each step the ``beam`` likeliest extensions of the live
    hypotheses are taken; one ending in eos is finished. Hypotheses are ranked by their mean
    log-probability per token (length-normalised, eos included). The search stops when none is live,
    after ``max_len`` tokens, or once the best finished one beats what any live one could still reach
    (its log-probability spread over ``max_len`` tokens). ``beam=1`` is greedy decoding."""
    if beam < 1:
        raise EmberError(f"--beam must be at least 1 (1 = greedy decoding), got {beam}.")
    memory, mask = model.encode(src)
    seqs = torch.tensor([[bos]], dtype=torch.long, device=src.device)
    scores = torch.zeros(1, device=src.device, dtype=torch.float64)
    finished: list[tuple[float, list[int]]] = []
    for step in range(1, max_len + 1):
        logits = model.decode(seqs, memory.expand(len(seqs), -1, -1), mask.expand(len(seqs), -1, -1, -1))
        total = scores[:, None] + torch.log_softmax(logits[:, -1].double(), dim=-1)
        top, flat = total.flatten().topk(min(beam, total.numel()))
        rows, ids = flat // total.size(1), flat % total.size(1)
        live = [(s, r) for s, r, t in zip(top.tolist(), rows.tolist(), ids.tolist()) if t != eos]
        finished += [
            (s / step, seqs[r, 1:].tolist() + [eos])
            for s, r, t in zip(top.tolist(), rows.tolist(), ids.tolist())
            if t == eos
        ]
        if not live:
            break
        keep = [i for i, t in enumerate(ids.tolist()) if t != eos]
        seqs = torch.cat([seqs[rows[keep]], ids[keep, None]], dim=1)
        scores = top[keep]
        if finished and max(f[0] for f in finished) >= float(scores.max()) / max_len:
            break  # no live hypothesis can overtake the best finished one
    if not finished:  # none reached eos within max_len: the likeliest unfinished one
        return seqs[int(scores.argmax()), 1:].tolist()
    return max(finished, key=lambda f: f[0])[1]


def decode_one(model: torch.nn.Module, src: torch.Tensor, spec: dict, beam: int = 1) -> list[int]:
    """The answer ids (eos included when reached) to one source by ``spec``'s bos, eos and target length."""
    if beam == 1:
        return greedy_decode(model, src, spec["bos_id"], spec["eos_id"], spec["seq_len"])
    return beam_search(model, src, spec["bos_id"], spec["eos_id"], spec["seq_len"], beam)


def _answer(model: torch.nn.Module, info: dict, run_dir: str | Path, problem: str, device: str, beam: int = 1) -> str:
    """The answer a trained seq2seq model gives: to a sum ("123+456") for the addition task, else to text."""
    from ember.config import load_recipe
    from ember.data import addition

    data_cfg = load_recipe(Path(run_dir) / "recipe.yaml").data.model_dump()
    if data_cfg["name"] != "addition":
        return _translate(model, info, run_dir, problem, device, beam)
    src = torch.tensor([addition.problem_ids(problem, data_cfg["max_digits"])], device=device)
    return addition.decode_tgt(decode_one(model, src, info["data"], beam))


def _translate(model: torch.nn.Module, info: dict, run_dir: str | Path, text: str, device: str, beam: int) -> str:
    """A seq2seq run on prepared pairs: ``text`` encoded with the run's tokenizer, the answer decoded with it."""
    spec = info["data"]
    if not (Path(run_dir) / "tokenizer.json").is_file():
        raise EmberError(
            f"{run_dir} has no tokenizer.json, so its text cannot be encoded. Copy the tokenizer.json of the "
            f"prepared pairs it was trained on there, or train it again on data prepared with `ember data prepare`."
        )
    codec = run_codec(run_dir)
    ids = codec.encode(text)
    if not ids or len(ids) > spec["src_len"]:
        raise EmberError(
            f"--prompt has {len(ids)} tokens; {run_dir} was trained on sources of 1 to {spec['src_len']} tokens. "
            f"Give a non-empty prompt of at most {spec['src_len']} tokens."
        )
    answer = decode_one(model, torch.tensor([ids], device=device), spec, beam)
    return codec.decode([i for i in answer if i < spec["pad_id"]])  # ember's pad, bos, eos follow the codec's ids


def generate(
    run_dir: str | Path,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: str = "cpu",
    beam: int = 1,
) -> str:
    """Continue ``prompt`` with text sampled from the language model in ``run_dir``, or answer it with the
    seq2seq model there (``beam``: 1 = greedy decoding, N = beam search over N hypotheses)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise EmberError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}.")
    if top_k is not None and top_k < 0:
        raise EmberError(f"--top-k must be >= 0 (0 = sample among all tokens), got {top_k}.")
    if max_new_tokens < 0:
        raise EmberError(f"--max-new-tokens must be >= 0, got {max_new_tokens}.")
    if beam < 1:
        raise EmberError(f"--beam must be at least 1 (1 = greedy decoding), got {beam}.")
    require_existing_run(run_dir, "ember generate")
    model, info = load_trained_model(run_dir, device)
    if info["data"]["task"] == "seq2seq":
        return _answer(model, info, run_dir, prompt, device, beam)
    if info["data"]["task"] == "classify" and info["data"].get("vocab_size"):  # labelled text
        return classify_text(model, info, run_dir, prompt, device)
    if info["data"]["task"] in ("classify", "regress") and len(info["data"]["input_shape"]) == 1:  # a table row
        return predict_row(model, info, run_dir, prompt, device)
    if info["data"]["task"] == "classify" and len(info["data"]["input_shape"]) == 3:  # an image file
        return classify_image(model, info, run_dir, prompt, device)
    if beam > 1:
        raise EmberError(
            f"--beam searches the answers of a seq2seq run; {run_dir} is a language model, which samples "
            f"(--temperature, --top-k). Leave out --beam for it."
        )
    if info["data"]["task"] != "lm":
        raise EmberError(
            f"{run_dir} holds a {info['data']['task']} model; `ember generate` samples from language-model and seq2seq runs."
        )
    codec = run_codec(run_dir)
    head, body, stop = lm_prompt(codec, info["data"], prompt)
    x = torch.tensor([head + body], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    context, vocab = info["data"]["seq_len"], codec.vocab_size
    out = sample_tokens(model, x, max_new_tokens, context, temperature, top_k, generator, stop, vocab)
    return codec.decode(out[0, len(head) :].tolist())


def lm_prompt(codec, spec: dict, prompt: str) -> tuple[list[int], list[int], int | None]:
    """A language model's prompt as (ids not printed, ids printed, the id that stops sampling or None).
    It starts as a training document did: the tokenizer's template ids (Llama's <s>) first, and an empty
    one after a document's end, so the model samples a new document; an instruction-tuned model gets the
    prompt as a user message in its template and answers until its end-of-text id."""
    eos = spec.get("eos_id", 0)
    if spec.get("template"):
        from ember.data.instruct import prompt_ids

        return prompt_ids(codec, prompt, spec["template"]), [], eos
    return ([] if prompt else [eos]) + list(codec.template()[0]), codec.encode(prompt), None


@torch.no_grad()
def classify_text(model: torch.nn.Module, info: dict, run_dir: str | Path, text: str, device: str, top: int = 5) -> str:
    """The likeliest classes of ``text`` by a labelled-text run, by name with their probabilities, one per line."""
    from ember.data.spec import DataSpec

    spec = DataSpec.from_dict(info["data"])
    ids = run_codec(run_dir).encode(text)[: spec.input_shape[0]]  # cut as prepare cut the training texts
    if not ids:
        raise EmberError(f"{run_dir} classifies texts; give one with --prompt TEXT (it was empty).")
    probs = model.eval()(torch.tensor([ids], device=device)).float().softmax(-1)[0]
    return ranked_classes(probs, spec, top)


@torch.no_grad()
def predict_row(model: torch.nn.Module, info: dict, run_dir: str | Path, row: str, device: str) -> str:
    """A table run's answer for one row given as ``col=value,col=value`` or a JSON object: the likeliest
    classes by name (classification) or the predicted value (regression). Columns left out are missing
    cells, imputed as in training; the row is encoded by the recipes prepare stored in the manifest."""
    from ember.data.spec import DataSpec
    from ember.data.tables import encode

    columns = _table_columns(run_dir)
    cells = _parse_row(row, [c["name"] for c in columns])
    x = torch.from_numpy(encode(columns, {c["name"]: [cells.get(c["name"])] for c in columns})).to(device)
    out = model.eval()(x).float()
    spec = DataSpec.from_dict(info["data"])
    if spec.task == "regress":
        return f"{out.reshape(-1)[0].item():.6g}"
    probs = out.softmax(-1)[0]
    return ranked_classes(probs, spec)


@torch.no_grad()
def classify_image(model: torch.nn.Module, info: dict, run_dir: str | Path, path: str, device: str) -> str:
    """The likeliest classes of the image file ``path`` by an image classifier run: the image read as prepare
    reads a folder's (its grey or RGB mode, resized to the training images' size), normalised as in training."""
    from ember.config import load_recipe
    from ember.data.augment import build_image_transform
    from ember.data.build import prepared_dir
    from ember.data.shards import load_manifest
    from ember.data.sources import ReadReport, Unit, _read_image_folder
    from ember.data.spec import DataSpec

    spec = DataSpec.from_dict(info["data"])
    if not Path(path).is_file():
        raise EmberError(f"{run_dir} classifies images; give an image file with --prompt PATH ({path!r} is not one).")
    report = ReadReport()
    c, h, w = spec.input_shape
    x, _ = _read_image_folder(Unit(0, "folder", (path,)), report, (h, w), c)
    if report.skipped:
        raise EmberError(f"{path} is not a readable image ({report.skipped[0][1]}). Give a PNG, JPEG or similar file.")
    manifest = load_manifest(prepared_dir(load_recipe(Path(run_dir) / "recipe.yaml").data))
    transform = build_image_transform(manifest["mean"], manifest["std"], None, "uint8").eval()
    probs = model.eval()(transform(torch.from_numpy(x).to(device))).float().softmax(-1)[0]
    return ranked_classes(probs, spec)


def ranked_classes(probs: torch.Tensor, spec, top: int = 5) -> str:
    """The ``top`` likeliest classes by name with their probabilities, one per line, likeliest first."""
    best = probs.topk(min(top, probs.numel()))
    return "\n".join(f"{spec.class_name(i):>24}  {p:.3f}" for p, i in zip(best.values.tolist(), best.indices.tolist()))


def _table_columns(run_dir: str | Path) -> list[dict]:
    """The column recipes of the table a run was trained on (its data directory's manifest)."""
    from ember.config import load_recipe
    from ember.data.shards import load_manifest

    data = load_recipe(Path(run_dir) / "recipe.yaml").data
    manifest = load_manifest(data.path) if data.name == "prepared" else {}
    if manifest.get("kind") != "table":
        raise EmberError(
            f"{run_dir} classifies {'images' if data.name != 'prepared' else manifest.get('kind')}; `ember generate` "
            f"answers language-model, seq2seq, labelled-text and table runs."
        )
    return manifest["columns"]


def _parse_row(row: str, names: list[str]) -> dict:
    """``{"a": 1, "b": "x"}`` or ``a=1,b=x`` as {column: cell}; an unknown column is an EmberError."""
    import json

    try:
        cells = json.loads(row) if row.strip().startswith("{") else dict(p.split("=", 1) for p in row.split(",") if p)
    except ValueError:
        cells = None
    if not isinstance(cells, dict):
        raise EmberError(f"--prompt {row!r} is not a row: give col=value,col=value or a JSON object of cells.")
    unknown = sorted(set(map(str.strip, cells)) - set(names))
    if unknown:
        raise EmberError(f"--prompt names {unknown}, which are not the table's columns: {names}.")
    return {k.strip(): v for k, v in cells.items()}


def run_codec(run_dir: str | Path):
    """The tokenizer a language-model run was trained with (RUN/tokenizer.json; bytes if absent)."""
    from ember.atomic import read_json
    from ember.data.tokenizer import TextCodec, codec_from_json

    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        return TextCodec(None)
    fix = f"Copy the tokenizer.json of the data {run_dir} was trained on there, or re-run its training."
    read_json(path, fix)  # JSON or a message; tokenizers' own parser would only say "expected value"
    try:
        return codec_from_json(path.read_text(encoding="utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception on a file it cannot read
        raise EmberError(
            f"{path} is not a tokenizer ember or tokenizers wrote ({str(err).splitlines()[0]:.200}). {fix}"
        ) from None
