"""Offline BIG-bench task files (PyPI sdist ``bigbench==1.0.0``, Apache-2.0), installed once into the cache.

The sdist is 358 MB and must not be pip-installed (TensorFlow dependencies); only the ``task.json`` files we
use are extracted, in one streaming pass, into ``cache_dir()/bigbench/<task>/task.json``. Used for offline
multiple-choice evaluation (``strategyqa``, ``goal_step_wikihow/step_inference``, ``social_iqa``,
``winowhy``) and a real instruction set (``natural_instructions/*``) for recovery tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from .errors import PrunellmError
from .paths import atomic_dir, cache_dir

log = logging.getLogger(__name__)

PACKAGE, VERSION = "bigbench", "1.0.0"
# every task folder we extract (relative to bigbench/benchmark_tasks/); natural_instructions/* is matched by prefix
TASKS: tuple[str, ...] = (
    "strategyqa",
    "goal_step_wikihow/step_inference",
    "social_iqa",
    "winowhy",
    "natural_instructions",
)
_MEMBER = re.compile(r"^bigbench-1\.0\.0/bigbench/benchmark_tasks/(?P<task>[A-Za-z0-9_/]+)/task\.json$")


def _wanted(task: str) -> bool:
    return any(task == t or task.startswith(t + "/") for t in TASKS)


def _download_sdist(dest: Path) -> Path:
    """Fetch the sdist from PyPI's simple index (PEP 691 JSON: file URL and sha256).

    ``pip download`` is not used first: recent pips refuse this sdist's metadata (a direct URL dependency).
    """
    filename = f"{PACKAGE}-{VERSION}.tar.gz"
    try:
        request = urllib.request.Request(
            f"https://pypi.org/simple/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            index = json.load(response)
        sdist = next(f for f in index["files"] if f["filename"] == filename)
        sdist["digests"] = sdist["hashes"]
        target = dest / filename
        digest = hashlib.sha256()
        with urllib.request.urlopen(sdist["url"], timeout=600) as response, open(target, "wb") as handle:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                handle.write(chunk)
        if digest.hexdigest() != sdist["digests"]["sha256"]:
            raise PrunellmError(f"the downloaded {filename} does not match PyPI's sha256")
        return target
    except PrunellmError:
        raise
    except Exception as exc:  # fall back to pip (pips before 24 accept this sdist's metadata)
        log.info("PyPI JSON download failed (%s); trying pip download", type(exc).__name__)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(dest)],
            capture_output=True, text=True,
        )  # fmt: skip
        found = sorted(dest.glob(filename))
        if done.returncode != 0 or not found:
            raise PrunellmError(
                f"the BIG-bench task files could not be installed from PyPI ({PACKAGE}=={VERSION}): "
                "check access to pypi.org, or pass local task/data files instead"
            ) from exc
        return found[0]


def bigbench_dir() -> Path:
    """The folder holding the extracted task files, installing them on first use."""
    target = cache_dir() / "bigbench"
    if (target / "strategyqa" / "task.json").is_file():
        return target
    log.info("installing BIG-bench task files from PyPI (%s==%s, 358 MB download, once) into %s", PACKAGE, VERSION, target)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as download, atomic_dir(target) as tmp:
        archive = _download_sdist(Path(download))
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if not match or not member.isfile() or not _wanted(match["task"]):
                    continue
                out = tmp / match["task"] / "task.json"  # the path is built from a validated pattern only
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
    return target


def load_task(task: str) -> dict:
    """The parsed ``task.json`` of a BIG-bench task, e.g. ``strategyqa`` or ``goal_step_wikihow/step_inference``."""
    path = bigbench_dir() / task / "task.json"
    if not path.is_file():
        available = sorted(str(p.parent.relative_to(bigbench_dir())) for p in bigbench_dir().rglob("task.json"))
        raise PrunellmError(f"BIG-bench task '{task}' is not installed: available are {', '.join(available[:12])} ...")
    return json.loads(path.read_text(encoding="utf-8"))
