"""Where prunellm keeps converted models and installed corpora, and how outputs are written safely.

Every output goes through a hidden temporary sibling that is renamed into place only when the work succeeds
(:func:`atomic_dir`, :func:`atomic_file`, :func:`write_text_atomic`). The temporary name records its owner,
``.NAME.tmp-<pid>-<start>-<host>-<boot>-<random>`` (process id, the process's start time in clock ticks from
``/proc/<pid>/stat``, hashes of the host and pid namespace and of the boot), so a later run can prove that the
process which left it is dead (killed with ``kill -9``, out of memory, power loss) and remove it; a live owner's
folder is left alone. :func:`check_output` is the one check every command runs on its output before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from .errors import PrunellmError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache folder: ``$PRUNELLM_CACHE`` or ``~/.cache/prunellm``."""
    root = os.environ.get("PRUNELLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prunellm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- owners of temporary folders ---------------------------------------------------------------------------

_UNKNOWN = "0" * 8
_TAG = re.compile(r"^(?P<pid>\d+)-(?P<start>\d+)-(?P<host>[0-9a-f]{8})-(?P<boot>[0-9a-f]{8})-")
_LEGACY_TMP = re.compile(r"^[a-z0-9_]{8}$")  # mkdtemp's suffix, from before owners were recorded


def _hash8(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


@cache
def _host() -> str:
    # host name and pid namespace: a process id means something only inside both
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return _hash8(f"{socket.gethostname()}|{namespace}")


@cache
def _boot() -> str:
    boot_id = _read("/proc/sys/kernel/random/boot_id")
    return _hash8(boot_id.strip()) if boot_id else _UNKNOWN


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; ``None`` when it is gone or a zombie; -1 without ``/proc``."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None if os.path.isdir("/proc/self") else -1
    fields = stat.rpartition(")")[2].split()  # after "pid (comm)": field 3 (state) is index 0, 22 (starttime) index 19
    if not fields or fields[0] in ("Z", "X", "x"):
        return None  # a zombie has finished; only its exit status is left to collect
    return int(fields[19])


@dataclass(frozen=True)
class Owner:
    """The process that made a temporary folder."""

    pid: int
    start: int  # clock ticks since boot (0: unknown)
    host: str
    boot: str

    @classmethod
    def me(cls) -> Owner:
        start = _proc_start(os.getpid())
        return cls(os.getpid(), max(start or 0, 0), _host(), _boot())

    @property
    def tag(self) -> str:
        return f"{self.pid}-{self.start}-{self.host}-{self.boot}"

    def state(self) -> Literal["self", "alive", "dead", "unknown"]:
        """``dead`` only when provably so: same host and pid namespace, and another boot, or no such process, or a
        process of that id started at another time (the id was reused)."""
        me = Owner.me()
        if self == me:
            return "self"
        if self.host != me.host:
            return "unknown"  # another machine (a shared file system) or another container
        if self.boot != _UNKNOWN and me.boot != _UNKNOWN and self.boot != me.boot:
            return "dead"  # the machine has rebooted since
        start = _proc_start(self.pid)
        if start is None:
            return "dead"
        if start == -1:  # no /proc: only whether the id exists
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return "dead"
            except OSError:
                pass
            return "alive"
        return "alive" if start == self.start or self.start == 0 else "dead"


def _leftovers(final: Path) -> Iterator[tuple[Path, str, Owner | None]]:
    """Hidden siblings ``.NAME.tmp-*`` / ``.NAME.old-*`` of ``final``: (path, "tmp" or "old", owner or None if unrecorded)."""
    parent = final.parent
    if not parent.is_dir():
        return
    for kind in ("old", "tmp"):  # old ones first: one may have to be put back before the temporary is removed
        prefix = f".{final.name}.{kind}-"
        for entry in sorted(parent.iterdir()):
            if not entry.name.startswith(prefix):
                continue
            rest = entry.name[len(prefix):]
            match = _TAG.match(rest)
            if match:
                owner = Owner(int(match["pid"]), int(match["start"]), match["host"], match["boot"])
                yield entry, kind, owner
            elif (kind == "tmp" and _LEGACY_TMP.match(rest)) or (kind == "old" and rest.isdigit()):
                yield entry, kind, None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clear_leftovers(final: str | Path) -> list[tuple[Path, Owner]]:
    """Remove what killed runs left beside ``final``; return the temporary folders of live processes writing it.

    A dead owner's ``.NAME.tmp-*`` is removed. Its ``.NAME.old-*`` (the previous output, set aside during the final
    swap) is put back when ``final`` is missing, otherwise removed. What was done is logged in one line; folders
    without an owner record (older prunellm) or of another host are left alone and named in one warning.
    """
    final = Path(final)
    removed: list[str] = []
    restored: str | None = None
    unknown: list[str] = []
    failed: list[str] = []
    live: list[tuple[Path, Owner]] = []
    for entry, kind, owner in _leftovers(final):
        state = owner.state() if owner is not None else "unknown"
        if state == "alive":
            live.append((entry, owner))
        elif state == "unknown":
            unknown.append(entry.name)
        elif state == "dead":
            if kind == "old" and not os.path.lexists(final):
                with _signals_deferred():
                    entry.rename(final)
                restored = entry.name
            else:
                with _signals_deferred():
                    _remove(entry)
                (failed if os.path.lexists(entry) else removed).append(entry.name)
    if removed or restored:
        what = [f"removed {', '.join(removed)}"] if removed else []
        what += [f"restored {final.name} from {restored}"] if restored else []
        log.warning("%s beside %s (left by a killed run)", "; ".join(what), final.parent)
    if failed:
        log.warning("could not remove %s beside %s (left by a killed run): delete it by hand", ", ".join(failed), final.parent)
    if unknown:
        log.warning(
            "left alone beside %s: %s (no owner this machine can check; delete it if no run is writing %s)",
            final.parent, ", ".join(unknown), final.name,
        )  # fmt: skip
    return live


# --- the one output check ----------------------------------------------------------------------------------


def _nonempty(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() and path.stat().st_size > 0


def check_output(
    path: str | Path,
    flag: str,
    overwrite: bool = False,
    *,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
    kind: Literal["dir", "file"] = "dir",
    value: str | None = None,
) -> Path:
    """The one check of a command's output, run before any work; returns the output path.

    Refused with one line naming ``flag`` (``value``: what was given for it, default the path):

    * an output that is one of ``inputs`` (``(flag, path)`` pairs; paths that do not exist here, such as hub ids,
      are skipped), or lies inside one, or holds one: even with ``overwrite``, since replacing it would destroy
      what is read;
    * an output whose nearest existing parent is not a writable folder;
    * an output that another live prunellm process is writing (its temporary sibling exists);
    * an existing non-empty output without ``overwrite``.

    Leftovers of killed runs beside the output are removed first (:func:`clear_leftovers`).
    """
    out = Path(path).expanduser()
    shown = f"{flag} '{value if value is not None else out}'" + (f" ({out})" if value is not None and value != str(out) else "")
    resolved = out.resolve()
    for input_flag, given in inputs:
        if given is None or str(given) == "" or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            where = "is" if resolved == source else ("is inside" if source in resolved.parents else "holds")
            raise PrunellmError(
                f"{shown} {where} the input {input_flag} '{given}': an output never replaces, holds or goes inside an "
                f"input, even with --overwrite; choose another {flag}"
            )
    parent = resolved.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PrunellmError(f"{shown} cannot be created: '{parent}' is a file, not a folder; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PrunellmError(f"{shown} cannot be written: no write permission in '{parent}'; choose another {flag}")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise PrunellmError(f"{shown} is a file, not a folder; choose another {flag}")
    if kind == "file" and out.is_dir():
        raise PrunellmError(f"{shown} is a folder, not a file; choose another {flag}")
    live = clear_leftovers(out)
    if live:
        entry, owner = live[0]
        raise PrunellmError(
            f"{shown} is being written by another running process (pid {owner.pid}, {entry.name}); wait for it to "
            f"finish or choose another {flag}"
        )
    if _nonempty(out) and not overwrite:
        raise PrunellmError(f"{shown} already exists; pass --overwrite to replace it or choose another {flag}")
    return out


# --- writing -----------------------------------------------------------------------------------------------

_CATCHABLE = {getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)}
_state = threading.local()
_discarded: list[Path] = []  # outermost outputs whose temporary folder an exception removed (for the CLI's message)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT/SIGHUP until the block is done (a rename pair or a removal is not cut in half)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _CATCHABLE)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def discarded_outputs() -> list[Path]:
    """Outputs whose unfinished temporary folder was removed by an exception since :func:`forget_discarded`."""
    return list(_discarded)


def forget_discarded() -> None:
    _discarded.clear()


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{Owner.me().tag}-"


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is set aside and removed only once ``tmp`` is in place."""
    with _signals_deferred():
        if not os.path.lexists(final):
            tmp.rename(final)
            return
        old = final.with_name(f".{final.name}.old-{Owner.me().tag}-{secrets.token_hex(4)}")
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)
            raise
    with _signals_deferred():
        _remove(old)


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` whose name records its owner (leftovers of dead owners are cleared
    first); removed, and ``final`` noted as discarded, if the block fails or is interrupted."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield tmp
    except BaseException:
        with _signals_deferred():
            _remove(tmp)
        if depth == 0:
            _discarded.append(final)
        raise
    finally:
        _state.depth = depth


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` only if the block succeeds.

    An interrupted or failed block leaves ``final`` as it was (absent or old) and no half-written folder; what a
    killed process (``kill -9``) left is removed by the next one (see :func:`clear_leftovers`).
    """
    final = Path(final)
    with _staging(final) as tmp:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp creates 0700; the result is an ordinary folder
        _install(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a path to write ``final``'s content to, inside a temporary folder beside ``final``; the file replaces
    ``final`` only if the block succeeds (an interrupted or failed block leaves ``final`` as it was)."""
    final = Path(final)
    with _staging(final) as staging:
        yield staging / final.name
        os.chmod(staging / final.name, 0o644)
        with _signals_deferred():
            os.replace(staging / final.name, final)
            _remove(staging)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def final_path(path: str | Path) -> Path:
    """Where ``path``, written inside an :func:`atomic_dir` temporary folder, will be once that folder is renamed."""
    parts = list(Path(path).parts)
    for i, part in enumerate(parts):
        match = re.match(r"^\.(?P<name>.+)\.tmp-\d+-\d+-[0-9a-f]{8}-[0-9a-f]{8}-[a-z0-9_]+$", part)
        if match:
            parts[i] = match["name"]
    return Path(*parts)
