"""The ``ember data ...`` commands a recipe file's leading comment gives.

A shipped recipe that trains on prepared data says, in its first comment lines, how to make
that data (``ember data sample ...``, ``ember data prepare ...``). The test suite and the GPU
suite run exactly those lines, so a recipe's instructions cannot drift from what works.

    >>> header_commands("# ember data prepare stdlib --out data/x  (a remark)\\nmodel: {}")
    [['data', 'prepare', 'stdlib', '--out', 'data/x']]
"""

from __future__ import annotations

import re
import shlex


def header_commands(text: str) -> list[list[str]]:
    """The ``ember data ...`` command lines of a recipe's leading comment (a line continued by a
    backslash joins the next), each without what follows it after two spaces (a remark), as
    argument lists for ``ember.cli.main``."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    joined = re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))
    return [
        shlex.split(re.split(r"\s{2,}[#(]", line)[0])[1:]
        for line in joined.splitlines()
        if line.startswith("ember data ")
    ]
