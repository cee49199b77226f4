"""The process's resident memory on Linux, read from ``/proc/self`` (the one RSS reader: the evaluator's
memory metric and the benchmarks' scoring-cost figures both use it)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def available() -> bool:
    """Whether RSS and a resettable high-water mark can be read here (Linux)."""
    return _STATUS.is_file() and _CLEAR_REFS.exists()


def _status_kib(field: str) -> int | None:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def rss_bytes() -> int | None:
    """Current resident set size (``VmRSS``), or ``None`` where unreadable."""
    kib = _status_kib("VmRSS") if _STATUS.is_file() else None
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Resident high-water mark (``VmHWM``) since the process started or the last :func:`reset_peak`."""
    kib = _status_kib("VmHWM") if _STATUS.is_file() else None
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux ≥ 4.0: write ``5`` to ``clear_refs``); False if refused."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so RSS holds live memory only; a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
