"""User-facing errors.

Anything the user can fix (bad data, contradictory flags, a missing file) is raised as a
`VlftError`; the CLI prints its message and exits with status 2 instead of a traceback.
"""
from __future__ import annotations

from dataclasses import dataclass


class VlftError(Exception):
    """An error the user can act on; its message says what is wrong and what to do."""


@dataclass(frozen=True)
class Problem:
    """One defect in one record of a data file."""

    file: str
    index: int | None  # 0-based record index (JSONL: the non-empty lines, counted from 0); None for file-level problems
    field: str  # e.g. "conversations[2].value", "image[1]", "" for the whole record
    message: str  # what is wrong
    hint: str = ""  # what to do about it
    record_id: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.index is not None:
            where += f": record {self.index}"
            if self.record_id is not None:
                where += f" (id {self.record_id!r})"
        if self.field:
            where += f", field '{self.field}'"
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" -> {self.hint}"
        return text


class DataError(VlftError):
    """One or more records are unusable; lists every problem found, not only the first.

    `advice` is the closing line(s), what the user can do about the whole list; the raiser writes it from the flags
    of the run (data/prepare.py: only a run without --skip_bad_samples is told to pass it, and only for problems it
    would skip). The default names no flag: a file that cannot be read at all is not helped by any."""

    def __init__(self, problems: list[Problem], header: str = "", max_shown: int = 50,
                 advice: str = "Fix the records above."):
        self.problems = list(problems)
        lines = [header or f"{len(self.problems)} problem(s) in the training data:"]
        lines += [f"  - {p}" for p in self.problems[:max_shown]]
        if len(self.problems) > max_shown:
            lines.append(f"  ... and {len(self.problems) - max_shown} more")
        if advice:
            lines.append(advice)
        super().__init__("\n".join(lines))
