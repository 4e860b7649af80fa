"""What an export returns (``ExportResult``), in a module of its own: ``ember.interop.export`` imports
each format's module, and each format builds this result, so it cannot live in either without a cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the format, the directory, its files, and the check made on them
    (``check`` says what was compared, ``max_abs_diff`` the largest difference found; None = not checked)."""

    format: str
    out: Path
    files: tuple[str, ...] = ()
    check: str = ""
    max_abs_diff: float | None = None
    notes: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        """The summary ``ember export`` prints."""
        out = [f"exported {self.format} to {self.out}: {', '.join(self.files)}"]
        if self.check:
            diff = "" if self.max_abs_diff is None else f" (max abs difference {self.max_abs_diff:.2e})"
            out.append(f"checked: {self.check}{diff}")
        return out + list(self.notes)
