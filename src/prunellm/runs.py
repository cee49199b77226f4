"""What every run writes beside its results: the exact command and a log file (one place for both)."""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
from pathlib import Path
from typing import Iterator

from .paths import write_text_atomic


def write_command(out: Path, argv: list[str] | None = None) -> None:
    """``<out>/logs/command.sh``: the command line that made this run (``argv`` default: this process's)."""
    command = shlex.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    write_text_atomic(Path(out) / "logs" / "command.sh", "#!/usr/bin/env bash\n" + command + "\n")


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Also send this package's log records to ``path`` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("prunellm")
    root.addHandler(handler)
    previous = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
