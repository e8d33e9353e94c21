"""What the lab's written runs share (the installer's transcript, the technician's guide):
Markdown fences, long outputs cut to a readable length, private files, the ``--keep``
directory check."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Cut:
    """How a long output is shown: at most *lines* lines (the first *head* and the last
    *tail*, when longer) of at most *chars* characters each."""

    lines: int
    chars: int
    head: int
    tail: int

    def apply(self, text: str, *, whole: bool = False) -> str:
        """*text* cut (lines too long shortened; too many lines, the middle left out, unless
        *whole*), each cut said."""
        lines = [line if len(line) <= self.chars else
                 f"{line[:self.chars]} […{len(line) - self.chars} more characters]"
                 for line in text.rstrip("\n").splitlines()]
        if len(lines) > self.lines and not whole:
            left = len(lines) - self.head - self.tail
            lines = [*lines[:self.head], f"[… {left} lines left out …]", *lines[-self.tail:]]
        return "\n".join(lines)


def fence(text: str, lang: str = "") -> str:
    """*text* in a Markdown code fence longer than any run of backticks inside it."""
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text}\n{ticks}"


def write_private(path: Path, text: str) -> None:
    """A new file of mode 0600 holding *text* (its directory made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def keep_dir_problem(keep: Path | None) -> str | None:
    """Why *keep* (a ``--keep DIR`` option) cannot be used, or None: a run needs a new or
    empty directory."""
    if keep is not None and keep.exists() and any(keep.iterdir()):
        return f"--keep {keep}: not empty: give a new or empty directory"
    return None
