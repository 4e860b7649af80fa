"""Text cleaning for ``ember data prepare``: normalise, strip noise, mask personal data, filter.

``clean_document`` runs the transforms in a fixed order — normalize, strip_control,
whitespace, mask_emails, mask_ips — then the filters — length, repeated_lines,
alpha_fraction, digit_fraction. A document removed by one filter is not seen by
the next. Every step can be switched off in ``CleanConfig`` and is counted in
``CleanStats``: documents it changed (transforms) or removed (filters) and the
UTF-8 bytes that went with them, so ``ember data inspect`` can show what each
step cost.

The default corpus is source code (the standard library's ``.py`` files), so no
step touches leading indentation, and the defaults remove only broken or
degenerate documents.

This module runs in spawned worker processes: it imports nothing heavy (no torch).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from ember.schema import RecipeModel

TRANSFORMS = ("normalize", "strip_control", "whitespace", "mask_emails", "mask_ips")
FILTERS = ("length", "repeated_lines", "alpha_fraction", "digit_fraction")
STEPS: tuple[str, ...] = TRANSFORMS + FILTERS
MASKS = ("mask_emails", "mask_ips")
EMAIL_MASK = "<email>"
IP_MASK = "<ip>"


class CleanConfig(RecipeModel):
    """Which cleaning steps run, and the thresholds of the filters."""

    normalize: Literal["none", "NFC", "NFKC"] = Field(
        "NFC", description="Unicode normal form (NFKC also folds compatibility characters such as ligatures)."
    )
    strip_control: bool = Field(
        True, description="Drop control and invisible format characters (keeps tab, newlines, ZWJ, ZWNJ)."
    )
    whitespace: bool = Field(
        True, description="Unix newlines, no trailing spaces, at most 2 blank lines in a row; indentation kept."
    )
    mask_emails: bool = Field(True, description=f"Replace e-mail addresses with {EMAIL_MASK}.")
    mask_ips: bool = Field(True, description=f"Replace valid IPv4 and IPv6 addresses with {IP_MASK}.")
    min_chars: int = Field(1, ge=0, description="Remove documents shorter than this (characters, after transforms).")
    max_chars: int = Field(0, ge=0, description="Remove documents longer than this (characters); 0 = no limit.")
    max_repeated_line_fraction: float = Field(
        0.7, ge=0, le=1, description="Remove documents where more non-blank lines repeat an earlier one; 1 = off."
    )
    min_alpha_fraction: float = Field(
        0.0, ge=0, le=1, description="Remove documents with fewer letters per non-whitespace character; 0 = off."
    )
    max_digit_fraction: float = Field(
        1.0, ge=0, le=1, description="Remove documents with more digits per non-whitespace character; 1 = off."
    )


# --- statistics -------------------------------------------------------------------------


def _empty_steps() -> dict[str, dict[str, int]]:
    return {s: ({"docs": 0, "bytes": 0, "replacements": 0} if s in MASKS else {"docs": 0, "bytes": 0}) for s in STEPS}


@dataclass
class CleanStats:
    """Counts of one cleaning pass; worker results are summed with ``add``.

    ``steps[name]["docs"]`` is the documents a transform changed or a filter removed;
    ``["bytes"]`` the UTF-8 bytes that step removed (a whole document for a filter; for a
    transform, bytes before minus after, negative when a mask is longer than what it
    hid); masks also count ``["replacements"]``. So ``bytes_in - sum(bytes) == bytes_out``.
    """

    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    steps: dict[str, dict[str, int]] = field(default_factory=_empty_steps)

    def add(self, other: CleanStats) -> None:
        """Add ``other``'s counts to these."""
        self.docs_in += other.docs_in
        self.bytes_in += other.bytes_in
        self.docs_out += other.docs_out
        self.bytes_out += other.bytes_out
        for step, counts in other.steps.items():
            mine = self.steps.setdefault(step, {})
            for key, value in counts.items():
                mine[key] = mine.get(key, 0) + value

    def to_dict(self) -> dict:
        """A JSON-ready copy."""
        return {
            "docs_in": self.docs_in,
            "bytes_in": self.bytes_in,
            "docs_out": self.docs_out,
            "bytes_out": self.bytes_out,
            "steps": {s: dict(c) for s, c in self.steps.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> CleanStats:
        """The inverse of ``to_dict``; steps missing from ``d`` (an older file) count zero."""
        stats = cls(docs_in=d["docs_in"], bytes_in=d["bytes_in"], docs_out=d["docs_out"], bytes_out=d["bytes_out"])
        for step, counts in d["steps"].items():
            stats.steps.setdefault(step, {}).update({k: int(v) for k, v in counts.items()})
        return stats


def format_stats(stats: CleanStats) -> str:
    """A fixed-width table of what each step changed or removed, for ``ember data inspect``."""
    rows = [("input", "", stats.docs_in, stats.bytes_in, "")]
    for step, counts in stats.steps.items():
        kind = "removed" if step in FILTERS else "changed"
        masked = str(counts["replacements"]) if "replacements" in counts else ""
        rows.append((step, kind, counts["docs"], counts["bytes"], masked))
    rows.append(("output", "", stats.docs_out, stats.bytes_out, ""))
    lines = [f"{'step':<16} {'':<8} {'docs':>10} {'bytes':>14} {'masked':>9}"]
    lines += [f"{s:<16} {k:<8} {d:>10,} {b:>14,} {m:>9}" for s, k, d, b, m in rows]
    return "\n".join(lines)


# --- transforms -------------------------------------------------------------------------
# Each transform returns (text, replacements); it returns the very same object when it
# changes nothing, so "changed" is a cheap identity test in the common case.

# Characters strip_control removes: every Cc, Cf and Cs character except tab, LF and CR
# (CR is the whitespace step's business: dropping it would glue old-Mac lines together),
# ZWNJ and ZWJ (they change how Persian, Indic and emoji sequences render, so they carry
# meaning). Lone surrogates (Cs) cannot be written as UTF-8. U+FFFD stays: it marks
# bytes that failed to decode, which later filters and readers may want to see.
# Cc/Cf/Cs only occur below U+20000 and in plane 14; scanning just those is fast enough to do
# once, on first use (not at import: a training run that reads prepared data never cleans).
_KEEP_CONTROL = {0x09, 0x0A, 0x0D, 0x200C, 0x200D}


def _control_class() -> str:
    codes = [
        c
        for block in (range(0x20000), range(0xE0000, 0xE1000))
        for c in block
        if c not in _KEEP_CONTROL and unicodedata.category(chr(c)) in ("Cc", "Cf", "Cs")
    ]
    ranges, start = [], codes[0]
    for prev, cur in zip(codes, codes[1:] + [-1]):
        if cur != prev + 1:
            ranges.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
            start = cur
    return "[" + "".join(ranges) + "]+"


@functools.cache
def _control() -> tuple[re.Pattern, bytes]:
    """The pattern of the characters strip_control removes, and those of them that are ASCII."""
    pattern = re.compile(_control_class())
    return pattern, bytes(c for c in range(128) if pattern.match(chr(c)))


def _normalize(text: str, cfg: CleanConfig) -> tuple[str, int]:
    if cfg.normalize == "none" or text.isascii():  # ASCII is already in every normal form
        return text, 0
    return unicodedata.normalize(cfg.normalize, text), 0


def _strip_control(text: str, cfg: CleanConfig) -> tuple[str, int]:
    pattern, ascii_control = _control()
    if text.isascii():  # the common case: a C-speed byte deletion says whether there is work
        raw = text.encode("ascii")
        if len(raw.translate(None, ascii_control)) == len(raw):
            return text, 0
    return pattern.sub("", text), 0


# The lookbehind makes a match start only at the first blank of a run; without it the
# engine retries from every blank of an indentation run (quadratic in its length).
_TRAILING_BLANKS = re.compile(r"(?<![ \t])[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{4,}")  # 4 newlines in a row = 3 blank lines


def _whitespace(text: str, cfg: CleanConfig) -> tuple[str, int]:
    # Each regex runs only when a fast substring test says it has work to do.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING_BLANKS.sub("", text)
    if "\n\n\n\n" in text:
        text = _BLANK_RUN.sub("\n\n\n", text)
    if text.startswith("\n"):
        text = text.lstrip("\n")  # only newlines: the first line's indentation stays
    if text.endswith("\n\n"):
        text = text.rstrip("\n") + "\n"  # trailing blank lines go, the final newline stays
    return text, 0


# E-mail: the pattern starts at the literal "@", which re finds at memchr speed; a
# pattern starting with the local part would be tried at every letter of the text.
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]{1,64}\Z")


def _mask_emails(text: str, cfg: CleanConfig) -> tuple[str, int]:
    if "@" not in text:
        return text, 0
    parts, last, count = [], 0, 0
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        local = _EMAIL_LOCAL.search(text, max(last, at - 64), at)
        if local is None:
            continue  # "@decorator.name" in code: no local part
        start = local.start()
        while text[start] == ".":  # a local part does not start with a dot
            start += 1
        if start == at:
            continue
        parts += [text[last:start], EMAIL_MASK]
        last, count = m.end(), count + 1
    if not count:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), count


# IP addresses: a literal-led hint rejects most documents at memchr speed; candidates
# are then checked by ipaddress, so octets above 255 and malformed groups stay.
# IPv4 must stand alone: "1.2.3.4.5" and "v1.2.3.4" (versions, OIDs) are not addresses.
_IPV4_HINT = re.compile(r"\.[0-9]{1,3}\.[0-9]{1,3}\.")
_IPV4 = re.compile(r"(?<![\w.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?!\w|\.[0-9])")
# A colon that starts ":h:" (h: 0-4 hex digits) — every IPv6 address has one within its
# first 5 characters, so the full pattern is tried only there (50x faster on code, where
# colons abound, than letting re try it at every position).
_IPV6_HINT = re.compile(r":(?=[0-9A-Fa-f]{0,4}:)")
_IPV6 = re.compile(
    r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
    r"(?:\.[0-9]{1,3}){0,3}(?![\w:])"
)
_HAS_DIGIT = re.compile(r"[0-9]")


def _is_ipv4(m: re.Match) -> bool:
    try:
        ipaddress.IPv4Address(m.group())
    except ValueError:
        return False
    return True


def _is_ipv6(m: re.Match) -> bool:
    # Code is full of strings that parse as IPv6: "add::dead" (a C++ path) has no digit;
    # numpy's "x[:, ::2]" and "1::2", reST's "less than 1000::" and C++'s "c10::" are
    # short forms. So a form with one group must be the loopback "::1", and one with two
    # must lead with a long group ("fe80::1", "2001::1", "::ffff:1.2.3.4"). Inside
    # brackets short forms are slices ("a[::1]", "a[1000::10]"), unless after a URL's "//".
    s, start, text = m.group(), m.start(), m.string
    if not _HAS_DIGIT.search(s):
        return False
    groups = [g for g in s.split(":") if g]
    if len(groups) < 3:
        slice_like = text[start - 1 : start] == "[" and text[max(0, start - 3) : start - 1] != "//"
        if slice_like or (len(groups) == 1 and s != "::1") or (len(groups) == 2 and len(groups[0]) < 3):
            return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _ipv6_candidates(text: str) -> Iterator[re.Match]:
    """Matches of ``_IPV6``, tried only within 4 characters before each hint."""
    end = 0
    for hint in _IPV6_HINT.finditer(text):
        for start in range(max(end, hint.start() - 4), hint.start() + 1):
            m = _IPV6.match(text, start)  # lookbehinds still see the text before start
            if m:
                yield m
                end = m.end()
                break


def _mask_valid(text: str, matches: Iterable[re.Match], valid: Callable[[re.Match], bool]) -> tuple[str, int]:
    """``text`` with each valid match replaced by the IP mask, and how many were."""
    parts, last = [], 0
    for m in matches:
        if valid(m):
            parts += [text[last : m.start()], IP_MASK]
            last = m.end()
    if not parts:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), len(parts) // 2


def _mask_ips(text: str, cfg: CleanConfig) -> tuple[str, int]:
    # IPv6 first: masking the IPv4 tail of "::ffff:1.2.3.4" first would leave "::ffff:<ip>".
    count6 = count4 = 0
    if ":" in text and _IPV6_HINT.search(text):
        text, count6 = _mask_valid(text, _ipv6_candidates(text), _is_ipv6)
    if _IPV4_HINT.search(text):
        text, count4 = _mask_valid(text, _IPV4.finditer(text), _is_ipv4)
    return text, count6 + count4


_TRANSFORM_FUNCS: dict[str, Callable[[str, CleanConfig], tuple[str, int]]] = {
    "normalize": _normalize,
    "strip_control": _strip_control,
    "whitespace": _whitespace,
    "mask_emails": _mask_emails,
    "mask_ips": _mask_ips,
}


def _enabled(step: str, cfg: CleanConfig) -> bool:
    if step == "normalize":
        return cfg.normalize != "none"
    return getattr(cfg, step)


# --- filters ----------------------------------------------------------------------------

_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.split() splits on, in ASCII
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ASCII_DIGITS = b"0123456789"
_NOT_LETTERS = re.compile(r"[\W\d_]+")  # what is left: letters, and a few numerics such as "½"
_NOT_DIGITS = re.compile(r"\D+")


def _char_counts(text: str) -> tuple[int, int, int]:
    """(non-whitespace characters, letters, decimal digits) of ``text``."""
    if text.isascii():  # bytes.translate deletes at C speed: no per-character Python
        raw = text.encode("ascii")
        solid = len(raw.translate(None, _ASCII_WHITESPACE))
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
        return solid, letters, len(raw) - len(raw.translate(None, _ASCII_DIGITS))
    solid = sum(map(len, text.split()))
    return solid, len(_NOT_LETTERS.sub("", text)), len(_NOT_DIGITS.sub("", text))


def repeated_line_fraction(text: str) -> float:
    """Share of the non-blank lines (stripped) that repeat an earlier line of ``text``."""
    lines = [line.strip() for line in text.split("\n")]
    distinct = set(lines)
    blank = lines.count("")
    total = len(lines) - blank
    if total == 0:
        return 0.0
    return (total - (len(distinct) - (1 if blank else 0))) / total


def _failed_filter(text: str, cfg: CleanConfig) -> str | None:
    """The first filter that removes ``text``, or None when it stays."""
    n = len(text)
    if n < cfg.min_chars or (cfg.max_chars and n > cfg.max_chars):
        return "length"
    if cfg.max_repeated_line_fraction < 1 and repeated_line_fraction(text) > cfg.max_repeated_line_fraction:
        return "repeated_lines"
    if cfg.min_alpha_fraction > 0 or cfg.max_digit_fraction < 1:
        solid, letters, digits = _char_counts(text)
        if solid and letters / solid < cfg.min_alpha_fraction:
            return "alpha_fraction"
        if solid and digits / solid > cfg.max_digit_fraction:
            return "digit_fraction"
    return None


# --- the pipeline -----------------------------------------------------------------------


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (lone surrogates count as their 3-byte encoding)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def clean_document(text: str, cfg: CleanConfig, stats: CleanStats | None = None) -> str | None:
    """The cleaned text, or None when a filter removes it; counts into ``stats`` when given."""
    size = utf8_len(text)
    if stats is not None:
        stats.docs_in += 1
        stats.bytes_in += size
    for step in TRANSFORMS:
        if not _enabled(step, cfg):
            continue
        new, replaced = _TRANSFORM_FUNCS[step](text, cfg)
        if new is text or new == text:
            continue
        new_size = utf8_len(new)
        if stats is not None:
            counts = stats.steps[step]
            counts["docs"] += 1
            counts["bytes"] += size - new_size
            if step in MASKS:
                counts["replacements"] += replaced
        text, size = new, new_size
    failed = _failed_filter(text, cfg)
    if failed is not None:
        if stats is not None:
            stats.steps[failed]["docs"] += 1
            stats.steps[failed]["bytes"] += size
        return None
    if stats is not None:
        stats.docs_out += 1
        stats.bytes_out += size
    return text
