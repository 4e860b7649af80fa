"""Pin every declared dependency at its floor: the pip constraints file that ``make test-floor`` installs under.

pyproject.toml's ``>=`` floors claim the oldest versions ember runs on; a claim nobody installs
goes stale as the code picks up newer APIs. This reads the floors of the core dependencies and of
the extras ``ember[test]`` pulls in (``ember[all]`` and the test tools) and writes ``pkg==floor``
for each, so pip has to install exactly the oldest versions, or say that they cannot be installed
together (then a floor is wrong).

torch is left out unless ``--with-torch`` is given: a machine usually has one torch build at hand,
and ``make test-floor TORCH=torch==2.6.0`` installs the floor where that build can be had.

Example::

    python tools/floors.py pyproject.toml > floor-constraints.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
SELF_EXTRAS = re.compile(r"^\s*ember\s*\[([^\]]*)\]\s*$")


def floor_of(spec: str) -> str | None:
    """The version a ``>=X`` or ``==X`` specifier pins as the lowest one, else None."""
    for part in spec.split(","):
        match = re.match(r"^\s*(>=|==|~=)\s*([0-9][A-Za-z0-9.]*)\s*$", part)
        if match:
            return match.group(2)
    return None


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The core dependencies and those of ``extras``, following ``ember[...]`` references."""
    optional = project.get("optional-dependencies", {})
    found, seen, todo = list(project.get("dependencies", [])), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in optional[extra]:
            nested = SELF_EXTRAS.match(line)
            if nested:
                todo.extend(e.strip() for e in nested.group(1).split(","))
            else:
                found.append(line)
    return found


def floors(pyproject: Path, extras: list[str], with_torch: bool = False) -> dict[str, str]:
    """Distribution name (lower case) -> its highest declared floor over the core and ``extras``."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    pins: dict[str, str] = {}
    for line in requirements(project, extras):
        match = REQUIREMENT.match(line.split(";")[0])
        if not match:
            continue
        name, spec = match.group(1).lower().replace("_", "-"), match.group(3)
        version = floor_of(spec)
        if version is None or (name == "torch" and not with_torch):
            continue
        if name not in pins or _key(version) > _key(pins[name]):
            pins[name] = version  # an extra may raise a core floor (compress raises torch's)
    return pins


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extras", default="test", help="comma-separated extras whose floors are pinned too")
    parser.add_argument("--with-torch", action="store_true", help="pin torch at its floor too")
    args = parser.parse_args(argv)
    pins = floors(args.pyproject, [e for e in args.extras.split(",") if e], args.with_torch)
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
