"""What every run writes beside its results: the exact command, a log file and where the time went."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator

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


class StageClock:
    """Wall seconds per stage of a run (summed over repeats, e.g. rounds), in the order the stages were first
    entered. Stages are timed where the work is, with :func:`stage`, while the clock is :meth:`running`. A stage
    entered inside another counts for the outer one and is itemised under it (``"outer/inner"`` in ``parts``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.parts: dict[str, float] = {}
        self.started = time.perf_counter()
        self.path: list[str] = []  # the stages entered and not yet left, outermost first

    @contextlib.contextmanager
    def running(self) -> Iterator["StageClock"]:
        """Make this the clock that :func:`stage` reports to for the duration of the block."""
        token = _CLOCK.set(self)
        try:
            yield self
        finally:
            _CLOCK.reset(token)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def report(self) -> dict[str, Any]:
        """``{"stages": {name: s}, "parts": {"outer/inner": s}, "other_seconds": …, "total_seconds": …}``: other is
        what no stage claimed; parts itemise a stage (they need not add up to it)."""
        total = time.perf_counter() - self.started
        stages = {name: round(s, 3) for name, s in self.seconds.items()}
        parts = {"parts": {name: round(s, 3) for name, s in self.parts.items()}} if self.parts else {}
        return {"stages": stages, **parts, "other_seconds": round(max(total - sum(self.seconds.values()), 0.0), 3),
                "total_seconds": round(total, 3)}  # fmt: skip


_CLOCK: contextvars.ContextVar[StageClock | None] = contextvars.ContextVar("prunellm_stage_clock", default=None)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` of the running :class:`StageClock` (nothing when none runs). A stage
    entered inside another counts for the outer one only, so the stages never add up to more than the run; it is
    itemised as ``"outer/name"`` in the report's ``parts``."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    clock.path.append(name)
    key = "/".join(clock.path)
    started = time.perf_counter()
    try:
        yield
    finally:
        clock.path.pop()
        seconds = time.perf_counter() - started
        if clock.path:
            clock.parts[key] = clock.parts.get(key, 0.0) + seconds
        else:
            clock.add(name, seconds)
