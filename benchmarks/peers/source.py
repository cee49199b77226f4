"""Pinned checkouts of the peers' public repositories, outside this repository, and imports from them.

Each peer is run from its own code at a pinned commit, checked out once into
``~/.cache/prunellm/peers/<name>-<commit>`` (``PRUNELLM_PEER_CACHE`` overrides the parent folder) by ``git clone``
of its public GitHub URL, or of a local mirror (``--peer_source DIR`` / ``PRUNELLM_PEER_MIRROR=DIR``: a folder
holding ``<owner>+<name>/repo`` bare mirrors, or one repository). A peer's patch file
(``benchmarks/peers/<name>.patch``) is applied with ``git apply`` in the checkout; a marker file records its hash,
so an edited patch re-checks-out the clean commit first. Their code is never copied into this repository.

Imports: a peer package is loaded with :func:`import_package` (``importlib`` spec of the checkout's folder,
registered under a name of our choice in ``sys.modules``); ``sys.path`` is never changed, so nothing of the
checkout can shadow an installed module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Peer:
    """A peer method: its public repository, the commit we run and the patch that adapts it (or none)."""

    name: str
    github: str  # owner/name
    commit: str
    patch: str | None = None  # file name under benchmarks/peers/
    paths: tuple[str, ...] = ()  # sparse checkout of these paths only (none: everything)

    @property
    def url(self) -> str:
        return f"https://github.com/{self.github}"

    def patch_text(self) -> str:
        return (HERE / self.patch).read_text() if self.patch else ""


PEERS = {
    # main at the time of writing (2024-01-06, "Add alternative code for dataset loading ...")
    "flap": Peer("flap", "CASIA-IVA-Lab/FLAP", "3bb57db3449dd2fa04a5c2192de80e87e33be2b1", "flap.patch"),
    # main at the time of writing (2024-10-07), the commit with llama3.py (GQA) and the vendored torch_pruning
    # only its package and the script: the repository also vendors lm-evaluation-harness with large data files
    "llm_pruner": Peer("llm_pruner", "horseee/LLM-Pruner", "128a07d977f9b205d60ab14cfbc6a78f8a8e39d2",
                       paths=("/LLMPruner/", "/llama3.py", "/LICENSE", "/README.md")),
}


def cache_root() -> Path:
    return Path(os.environ.get("PRUNELLM_PEER_CACHE", Path.home() / ".cache" / "prunellm" / "peers"))


def clone_source(peer: Peer, mirror: str | os.PathLike | None = None) -> str:
    """What ``git clone`` reads: a local mirror when given (argument, else ``PRUNELLM_PEER_MIRROR``), else GitHub."""
    mirror = mirror or os.environ.get("PRUNELLM_PEER_MIRROR")
    if not mirror:
        return peer.url
    folder = Path(mirror)
    nested = folder / peer.github.replace("/", "+") / "repo"  # a folder of mirrors, as /work/.mirror lays them out
    return str(nested if nested.is_dir() else folder)


def _git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd or '.'}: {done.stderr.strip()[-500:]}")
    return done.stdout


def checkout(name: str, mirror: str | os.PathLike | None = None) -> Path:
    """The peer's pinned commit, patched, in the cache; cloned on first use. Returns the checkout folder.

    Raises:
        KeyError: ``name`` is not a known peer (the error lists them).
        RuntimeError: git failed (no network and no mirror, the commit is not in the source, the patch does not apply).
    """
    if name not in PEERS:
        raise KeyError(f"unknown peer '{name}': known peers are {', '.join(PEERS)} (benchmarks/peers/source.py)")
    peer = PEERS[name]
    folder = cache_root() / f"{peer.name}-{peer.commit}"
    marker = folder / ".prunellm-patch"
    wanted = hashlib.sha256(peer.patch_text().encode()).hexdigest()
    if (folder / ".git").is_dir() and marker.is_file() and marker.read_text() == wanted:
        return folder
    if not (folder / ".git").is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _git("clone", "--quiet", "--no-checkout", clone_source(peer, mirror), str(folder))
    if peer.paths:
        _git("sparse-checkout", "set", "--no-cone", *peer.paths, cwd=folder)
    _git("checkout", "--quiet", "--force", peer.commit, cwd=folder)
    _git("clean", "-fdq", cwd=folder)  # an older patch's new files
    if peer.patch:
        _git("apply", str(HERE / peer.patch), cwd=folder)
    marker.write_text(wanted)
    return folder


def stub_module(name: str, **attributes) -> types.ModuleType:
    """Register an empty module (a package if it is given ``__path__``) under ``name``: keeps a peer's module that
    needs the network or an incompatible library (its data loaders, its copies of old modeling files) from loading."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def import_package(name: str, folder: Path) -> types.ModuleType:
    """Import the package in ``folder`` as ``name`` (its own absolute imports of ``name.…`` resolve inside it).

    A folder without ``__init__.py`` (a namespace package, as FLAP's ``lib``) is registered as an empty package.
    """
    if name in sys.modules and getattr(sys.modules[name], "__path__", None) == [str(folder)]:
        return sys.modules[name]
    init = folder / "__init__.py"
    if not init.is_file():
        return stub_module(name, __path__=[str(folder)], __package__=name)
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_module(name: str) -> types.ModuleType:
    """``importlib.import_module`` of a module of a package registered by :func:`import_package`."""
    return importlib.import_module(name)
