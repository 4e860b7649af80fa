"""``ember data inspect`` and ``ember data verify``: look at a prepared directory.

Example::

    print(describe("data/stdlib"))          # kind, splits, tokenizer, cleaning and dedup counts
    problems = verify_dir("data/stdlib")    # [] when every shard matches its sha256
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.data import shards


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def _split_lines(manifest: dict) -> list[str]:
    lines = []
    for split in shards.splits_of(manifest):
        s = manifest["splits"][split]
        nbytes = sum(e["bytes"] for r in s["shards"] for e in r["files"].values())
        if manifest["kind"] == "tokens":
            what = f"{s['tokens']:>13,} tokens  {s['documents']:>9,} docs  {_size(s['bytes']):>10} of text"
        else:
            nouns = {"table": "rows", "pairs": "pairs", "labelled-text": "texts", "instruct": "conversations"}
            noun = nouns.get(manifest["kind"], "images")
            what = f"{s['samples']:>13,} {noun}"
        lines.append(f"  {split:<5} {what}  {len(s['shards']):>4} shard(s), {_size(nbytes)} on disk")
    return lines


def _stats_lines(stats: dict) -> list[str]:
    read = stats["read"]
    lines = [
        f"read: {read.get('documents', read.get('samples', 0)):,} items, {_size(read['bytes'])}; "
        f"{read['skipped_files']} unreadable skipped"
    ]
    lines += [f"  skipped {name}" for name in read.get("skipped", [])[:5]]
    if "clean" in stats:
        from ember.data.clean import CleanStats, format_stats

        lines += [
            "cleaning:",
            *("  " + line for line in format_stats(CleanStats.from_dict(stats["clean"])).splitlines()),
        ]
    if "dedup" in stats:
        dd = stats["dedup"]
        lines.append(
            "dedup: "
            + ", ".join(
                f"{kind} removed {v['docs']:,} docs ({_size(v['bytes'])})"
                for kind, v in dd.items()
                if isinstance(v, dict) and "docs" in v
            )
        )
    return lines


def _sample_text(data_dir: Path, manifest: dict, chars: int = 300) -> str:
    from ember.data.tokenizer import data_codec

    first = manifest["splits"]["train"]["shards"][0]["files"]["tokens"]
    ids = np.memmap(data_dir / first["file"], dtype=manifest["dtype"], mode="r")[:chars]
    codec = data_codec(data_dir, manifest)
    return codec.decode([int(i) for i in ids])[:chars].replace("\x00", "␀")  # bytes sets separate by NUL


def _table_lines(m: dict) -> list[str]:
    classes = ", ".join(m["classes"][:10]) + (", ..." if len(m["classes"]) > 10 else "")
    lines = [f"table: label {m['label']!r} ({m['num_classes']} classes: {classes}), {len(m['features'])} features"]
    if m.get("target") == "values":
        t = m["target_stats"]
        what = f"numeric target (regress), training mean {t['mean']:.4g}, std {t['std']:.4g}"
        lines = [f"table: label {m['label']!r} ({what}), {len(m['features'])} features"]
    for col in m["columns"]:
        if col.get("dropped"):
            what = f"dropped ({col['dropped']})"
        elif col["type"] == "numeric":
            what = f"numeric, training mean {col['mean']:.4g}, std {col['std']:.4g}"
        else:
            what = f"categorical, {len(col['categories'])} categories" + (" + missing" if col["missing_slot"] else "")
        missing = m["stats"]["missing"].get(col["name"], 0)
        lines.append(f"  {col['name']}: {what}" + (f", {missing} missing" if missing else ""))
    return lines


def _tokenizer_line(m: dict) -> str:
    """The tokenizer's kind, vocabulary, special tokens and the ids that end a document and start one."""
    tok = m["tokenizer"]
    specials = ", ".join(
        f"{name} = {i}" for name, i in tok.get("special_tokens", {"<|endoftext|>": m["eot_id"]}).items()
    )
    roles = f"; documents end with {m['eot_id']}" + (f", start with {list(tok['prefix'])}" if tok.get("prefix") else "")
    return (
        f"tokenizer: {tok['kind']}, vocab {m['vocab_size']:,}, ids as {m['dtype']}, special tokens: {specials}{roles}"
        + (f", sha256 {tok['sha256'][:12]}" if tok.get("sha256") else "")
    )


def describe(data_dir: str | Path, sample: bool = True) -> str:
    """A readable summary of a prepared directory (what ``ember data inspect`` prints)."""
    data_dir = Path(data_dir)
    m = shards.load_manifest(data_dir)
    lines = [f"{data_dir}: {m['kind']} from {', '.join(m['settings']['sources'])}"]
    if m["kind"] == "tokens":
        lines.append(_tokenizer_line(m))
    elif m["kind"] == "table":
        lines += _table_lines(m)
    elif m["kind"] == "labelled-text":  # the classes, the lengths and cuts, the first text
        from ember.data import labelled_text

        lines += labelled_text.summary(m) + (labelled_text.first_text(data_dir, m) if sample else [])
    elif m["kind"] == "pairs":  # source/target texts: the tokenizer, the lengths, the cuts
        from ember.data import pairs

        lines += pairs.summary(m) + (pairs.first_pair(data_dir, m) if sample else [])
    elif m["kind"] == "instruct":  # conversations: the tokenizer, the template, the cuts, the first one
        from ember.data import instruct

        lines += [_tokenizer_line(m)] + instruct.summary(m) + (instruct.first_row(data_dir, m) if sample else [])
    else:
        mean = ", ".join(f"{v:.4f}" for v in m["mean"])
        std = ", ".join(f"{v:.4f}" for v in m["std"])
        pixels = m.get("image_dtype", "uint8")
        lines.append(
            f"images: shape {tuple(m['image_shape'])}, {pixels}, {m['num_classes']} classes, mean [{mean}], std [{std}]"
            + (" (of the values as given)" if pixels != "uint8" else " (of pixels / 255)")
        )
    if m["kind"] == "captions":  # image-caption pairs: the captions' tokenizer, length, skips
        from ember.data.caption_prepare import summary

        lines += summary(m)
    lines += _split_lines(m)
    lines += _stats_lines(m["stats"])
    if sample and m["kind"] == "tokens" and m["splits"]["train"]["shards"]:
        lines += ["first training text:", "  " + _sample_text(data_dir, m).replace("\n", "\n  ")]
    return "\n".join(lines)


def verify_dir(data_dir: str | Path, progress: bool = True) -> list[str]:
    """sha256 of every shard and the tokenizer against the manifest; returns the problems."""
    from rich.progress import Progress

    data_dir = Path(data_dir)
    total = shards.count_files(shards.load_manifest(data_dir))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("verify", total=total)
        return shards.verify(data_dir, on_file=lambda name: bar.advance(task))
