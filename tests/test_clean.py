"""Text cleaning: each transform and filter on crafted input, and exact per-step counts."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ember.data.clean import STEPS, CleanConfig, CleanStats, clean_document, format_stats

# Every step off: each test switches on the one it is about.
OFF = dict(
    normalize="none",
    strip_control=False,
    whitespace=False,
    mask_emails=False,
    mask_ips=False,
    min_chars=0,
    max_chars=0,
    max_repeated_line_fraction=1.0,
    min_alpha_fraction=0.0,
    max_digit_fraction=1.0,
)


def only(**changes) -> CleanConfig:
    return CleanConfig(**{**OFF, **changes})


def run(texts: list[str], cfg: CleanConfig) -> tuple[list[str | None], CleanStats]:
    stats = CleanStats()
    return [clean_document(t, cfg, stats) for t in texts], stats


def changed(stats: CleanStats) -> dict[str, dict[str, int]]:
    """The steps that counted something."""
    return {s: c for s, c in stats.steps.items() if any(c.values())}


def test_steps_in_order():
    assert STEPS == (
        "normalize",
        "strip_control",
        "whitespace",
        "mask_emails",
        "mask_ips",
        "length",
        "repeated_lines",
        "alpha_fraction",
        "digit_fraction",
    )


def test_config_is_validated():
    with pytest.raises(ValidationError):
        CleanConfig(normalise="NFC")  # a typo is an error, not a silent default
    with pytest.raises(ValidationError):
        CleanConfig(normalize="NFD")
    cfg = CleanConfig()
    with pytest.raises(ValidationError):
        cfg.max_repeated_line_fraction = 1.5


def test_all_steps_off_changes_nothing():
    text = "\ufb01\x00 \r\n\n\n\n\na@b.com 10.0.0.1 \n"
    out, stats = run([text, ""], only())
    assert out == [text, ""] and changed(stats) == {}


# --- transforms -------------------------------------------------------------------------


def test_normalize_nfc_and_nfkc():
    texts = ["e\u0301t\u00e9", "\ufb01le", "plain"]  # combining accent; the "fi" ligature; ASCII
    out, stats = run(texts, only(normalize="NFC"))
    assert out == ["\u00e9t\u00e9", "\ufb01le", "plain"]  # NFC composes, keeps the ligature
    assert changed(stats) == {"normalize": {"docs": 1, "bytes": 1}}  # e + U+0301 (3 bytes) -> é (2)
    out, stats = run(texts, only(normalize="NFKC"))
    assert out == ["\u00e9t\u00e9", "file", "plain"]
    assert changed(stats) == {"normalize": {"docs": 2, "bytes": 1 + 1}}  # ﬁ: 3 bytes -> "fi": 2


def test_strip_control_keeps_tab_newlines_and_joiners():
    text = "a\x00b\x1bc\x7f\x85d\u200be\ufeff\u202ef\u200dg\u200ch\ti\r\nj\U000e0041\ud800\ufffd"
    out, stats = run([text, "clean\ttext\n"], only(strip_control=True))
    assert out == ["abcdef\u200dg\u200ch\ti\r\nj\ufffd", "clean\ttext\n"]
    # NUL, ESC, DEL: 1 byte each; NEL (C1): 2; ZWSP, BOM, RLO, a lone surrogate: 3 each; tag A: 4
    assert changed(stats) == {"strip_control": {"docs": 1, "bytes": 1 + 1 + 1 + 2 + 3 + 3 + 3 + 3 + 4}}


def test_whitespace_keeps_indentation():
    text = (
        "\n  \n"  # leading blank lines (one of spaces)
        "def f(x):  \r\n"  # trailing blanks, CRLF
        "    if x:\t\r\n"
        "        return 1\r"  # a lone CR
        "\n\n\n\n\n"  # 5 newlines: 4 blank lines
        "\treturn 2\n"  # leading tab stays
        "   \n\n"
    )  # trailing blank lines
    want = "def f(x):\n    if x:\n        return 1\n\n\n\treturn 2\n"
    out, stats = run([text, want], only(whitespace=True))
    assert out == [want, want]
    assert changed(stats) == {"whitespace": {"docs": 1, "bytes": len(text) - len(want)}}
    assert run(["  x = 1  "], only(whitespace=True))[0] == ["  x = 1"]
    assert run(["\n\n"], only(whitespace=True))[0] == [""]


def test_mask_emails():
    texts = [
        "Mail john.doe+x@mail.example.co.uk, or <a_b@python.org>.",
        "..a@b.io",  # shorter than its mask: -1 byte; a local part does not start with a dot
        "@property\ndef f(self): ...\n@functools.wraps(g)\n",  # decorators are not addresses
        "user@localhost and x@y.z are not masked",
    ]
    out, stats = run(texts, only(mask_emails=True))
    assert out == ["Mail <email>, or <<email>>.", "..<email>", texts[2], texts[3]]
    removed = len("john.doe+x@mail.example.co.uk") + len("a_b@python.org") - 2 * len("<email>") - 1
    assert changed(stats) == {"mask_emails": {"docs": 2, "bytes": removed, "replacements": 3}}


def test_mask_ips():
    text = (
        "host 192.168.1.10, loopback ::1 and 2001:db8::1 via http://[::1]:8080/ or ::ffff:192.0.2.1.\n"
        "fe80::1%eth0 is link-local; [2001:db8:0:1::5]:443 has a port.\n"
    )
    want = (
        "host <ip>, loopback <ip> and <ip> via http://[<ip>]:8080/ or <ip>.\n"
        "<ip>%eth0 is link-local; [<ip>]:443 has a port.\n"
    )
    out, stats = run([text, "at ::1"], only(mask_ips=True))
    assert out == [want, "at <ip>"]
    # "::1" -> "<ip>" adds a byte: a mask may count negative bytes
    assert changed(stats) == {"mask_ips": {"docs": 2, "bytes": len(text) - len(want) - 1, "replacements": 8}}


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.7",  # a 3-part version
        "release 1.2.3.4.5",  # 5 parts: a version or an OID, not an address
        "v1.2.3.4",  # glued to a word
        "999.1.1.1 and 1.2.3.256",  # octets above 255
        "01.02.03.04",  # leading zeros (ipaddress refuses them: ambiguous octal)
        "a[::2], b[1::2], c[:, ::2], c[:, 1::2], d[::-1], e[::1], f[1000::10]",  # slices
        "less than 1000::\n",  # reST literal marker after a number
        "c10::cuda and add::dead",  # C++ paths
        "12:30:45 and 00:1a:2b:3c:4d:5e",  # a time and a MAC address
    ],
)
def test_mask_ips_leaves_lookalikes(text):
    out, stats = run([text], only(mask_ips=True))
    assert out == [text] and changed(stats) == {}


# --- filters ----------------------------------------------------------------------------


def test_length_filter():
    texts = ["", "abc", "abcdef", "h\u00e9llo w\u00f6rld"]
    out, stats = run(texts, only(min_chars=3, max_chars=6))
    assert out == [None, "abc", "abcdef", None]  # characters count, not bytes
    assert changed(stats) == {"length": {"docs": 2, "bytes": 0 + 13}}


def test_repeated_lines_filter():
    # 6 non-blank lines, 3 repeat an earlier one (stripped): 0.5
    text = "a\nb\n  a\n\n\nb \nc\na\n"
    out, stats = run([text], only(max_repeated_line_fraction=0.5))
    assert out == [text]
    out, stats = run([text, "x\ny\n"], only(max_repeated_line_fraction=0.49))
    assert out == [None, "x\ny\n"]
    assert changed(stats) == {"repeated_lines": {"docs": 1, "bytes": len(text)}}


def test_alpha_and_digit_filters():
    words, numbers = "Hello, world!", "id 12345 678"  # letters 10/12; digits 8/10
    out, stats = run([words, numbers], only(min_alpha_fraction=0.5))
    assert out == [words, None]
    assert changed(stats) == {"alpha_fraction": {"docs": 1, "bytes": len(numbers)}}
    out, stats = run([words, numbers], only(max_digit_fraction=0.79))
    assert out == [words, None]
    assert changed(stats) == {"digit_fraction": {"docs": 1, "bytes": len(numbers)}}
    out, _ = run([numbers], only(max_digit_fraction=0.8))
    assert out == [numbers]
    # non-ASCII letters and digits count too: 4 letters, 3 Arabic-Indic digits
    out, _ = run(["h\u00e9\u00e9h \u0661\u0662\u0663"], only(min_alpha_fraction=0.58))
    assert out == [None]
    out, _ = run(["h\u00e9\u00e9h \u0661\u0662\u0663"], only(min_alpha_fraction=0.57))
    assert out != [None]


def test_a_removed_document_is_counted_by_the_first_filter_only():
    text = "1\n1\n1\n1\n"  # too short, all repeats, no letters, all digits
    cfg = only(min_chars=10, max_repeated_line_fraction=0.1, min_alpha_fraction=0.5, max_digit_fraction=0.5)
    out, stats = run([text], cfg)
    assert out == [None] and changed(stats) == {"length": {"docs": 1, "bytes": 8}}
    out, stats = run([text], cfg.model_copy(update={"min_chars": 1}))
    assert changed(stats) == {"repeated_lines": {"docs": 1, "bytes": 8}}


# --- the whole pipeline and its counts --------------------------------------------------

SOURCE = '''"""A module."""


class A:
    def f(self, x):
        # keep this indentation
        return x + 1
'''

CORPUS = [
    SOURCE,
    "\ufeffMail bob@example.com at 10.0.0.1  \r\n\r\n\r\n\r\n\r\nbye\r\n",
    "--- *** ---\n",  # no letters
    "\n\n  \n",  # empty after the whitespace step
    "x\n" * 9 + "y\n",  # 8 of 10 lines repeat
    "e\u0301\ufb01 1234567890",
    "ab 1234567890",  # 10 of 12 are digits
]


def test_default_config_keeps_ordinary_source_unchanged():
    stats = CleanStats()
    assert clean_document(SOURCE, CleanConfig(), stats) == SOURCE
    assert changed(stats) == {} and stats.bytes_out == stats.bytes_in == len(SOURCE)


def test_pipeline_counts_add_up():
    cfg = CleanConfig(normalize="NFKC", min_alpha_fraction=0.1, max_digit_fraction=0.8)
    out, stats = run(CORPUS, cfg)
    assert out == [SOURCE, "Mail <email> at <ip>\n\n\nbye\n", None, None, None, "\u00e9fi 1234567890", None]
    assert changed(stats) == {
        "normalize": {"docs": 1, "bytes": 2},  # e + U+0301 -> é, U+FB01 -> "fi": 1 byte each
        "strip_control": {"docs": 1, "bytes": 3},  # the BOM
        "whitespace": {"docs": 2, "bytes": 10 + 5},  # 6 CRs, 2 spaces, 2 of 5 newlines; a whole blank doc
        "mask_emails": {"docs": 1, "bytes": len("bob@example.com") - len("<email>"), "replacements": 1},
        "mask_ips": {"docs": 1, "bytes": len("10.0.0.1") - len("<ip>"), "replacements": 1},
        "length": {"docs": 1, "bytes": 0},
        "repeated_lines": {"docs": 1, "bytes": 20},
        "alpha_fraction": {"docs": 1, "bytes": 12},
        "digit_fraction": {"docs": 1, "bytes": 13},
    }
    assert (stats.docs_in, stats.docs_out) == (7, 3)
    assert stats.bytes_in == sum(len(t.encode()) for t in CORPUS)
    assert stats.bytes_out == sum(len(t.encode()) for t in out if t is not None)
    assert stats.bytes_in - sum(c["bytes"] for c in stats.steps.values()) == stats.bytes_out


def test_stats_add_equals_one_pass_and_round_trips():
    cfg = CleanConfig(normalize="NFKC", min_alpha_fraction=0.1, max_digit_fraction=0.8)
    _, whole = run(CORPUS, cfg)
    total = CleanStats()
    for part in (CORPUS[:2], CORPUS[2:3], CORPUS[3:]):
        total.add(run(part, cfg)[1])
    assert total == whole
    data = json.loads(json.dumps(whole.to_dict()))
    assert CleanStats.from_dict(data) == whole
    table = format_stats(whole)
    assert len(table.splitlines()) == len(STEPS) + 3  # header, input, steps, output
    assert "mask_emails" in table and f"{whole.bytes_in:,}" in table
