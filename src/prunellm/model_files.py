"""What a model folder must hold, checked before anything loads: a ``config.json`` that parses and names a known
family, weights whose safetensors headers, shards and sizes agree, a tokenizer's files, a usable device; and the
loading errors transformers raises, turned into one line that names the file (:mod:`prunellm.models` and
:mod:`prunellm.checkpoint` both use these)."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig
from transformers import __version__ as transformers_version
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from .assets import EMBEDDED_MODELS
from .errors import PrunellmError, one_line

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# a vocabulary that some tokenizer class reads: without one, AutoTokenizer builds an empty tokenizer and says nothing
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
REFETCH = "re-download or re-save the model (save_pretrained)"


def check_model_folder(path: Path, flag: str = "--base_model", ref: str | None = None) -> None:
    """Refuse a damaged model folder before anything is loaded: ``config.json`` first, then the weights.

    Cheap: the config is parsed, and of each safetensors file only the 8-byte header length and the JSON header are
    read (then ``safe_open`` checks dtypes, shapes and that the tensors tile the file). ``.bin`` weights are
    pickles, checked when loaded. Tokenizer files are checked by :func:`load_tokenizer`, since not every use needs one.

    Raises:
        PrunellmError: One line naming ``flag``, the file, what is wrong with it and what to do.
    """
    where = f"{flag} '{path if ref is None else ref}'"
    config = read_json(path / CONFIG_FILE, where)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise PrunellmError(
            f"{where}: {path / CONFIG_FILE} names no model_type (got {_kind(config)}): a transformers config is a JSON "
            'object with "model_type" (e.g. "llama") and the sizes; restore the config.json saved with the weights'
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        raise PrunellmError(
            f"{where}: {path / CONFIG_FILE} has model_type '{model_type}', which transformers {transformers_version} "
            "does not know: restore the config.json saved with the weights, or upgrade transformers"
        )
    try:
        AutoConfig.from_pretrained(path)  # fields of the wrong type, inconsistent sizes
    except (ValueError, TypeError, KeyError, OSError, StrictDataclassError) as exc:
        # huggingface_hub puts the field on the first line and the reason on the next: keep both, on one line
        detail = " ".join(str(exc).split())[:240]
        raise PrunellmError(f"{where}: {path / CONFIG_FILE} is not a valid '{model_type}' config ({type(exc).__name__}: {detail})") from None
    _check_weights(path, where)


def _kind(value: Any) -> str:
    """What a JSON value is, for messages: ``a list``, ``an object without model_type`` …"""
    if isinstance(value, dict):
        return "an object without a model_type string" if value else "an empty object"
    return f"a JSON {type(value).__name__}"


def read_json(file: Path, where: str) -> Any:
    """The parsed JSON of ``file``; a missing, unreadable, non-UTF-8 or malformed file is a one-line PrunellmError."""
    try:
        text = file.read_bytes().decode("utf-8")
        return json.loads(text)
    except FileNotFoundError:
        raise PrunellmError(f"{where}: {file} is missing: {REFETCH}") from None
    except OSError as exc:
        raise PrunellmError(f"{where}: {file} cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise PrunellmError(f"{where}: {file} is not UTF-8 text (bad byte at offset {exc.start}), so it is damaged: {REFETCH}") from None
    except json.JSONDecodeError as exc:
        raise PrunellmError(
            f"{where}: {file} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}), so it is damaged "
            f"or truncated: {REFETCH}"
        ) from None


def _check_weights(path: Path, where: str) -> None:
    """The weights beside ``config.json``: ``model.safetensors`` and/or an index whose shards all exist and parse."""
    single, index = path / SAFETENSORS_FILE, path / SAFETENSORS_INDEX
    if single.is_file():
        _safetensors_names(single, where)
    if index.is_file():
        weight_map = read_json(index, where)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise PrunellmError(f"{where}: {index} has no \"weight_map\" of tensor name -> shard file: {REFETCH}")
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise PrunellmError(f"{where}: {index} names the shard '{shard}', which is not in {path}: copy every shard the index names")
            held = _safetensors_names(path / shard, where)
            missing = [name for name, file in weight_map.items() if file == shard and name not in held]
            if missing:
                raise PrunellmError(f"{where}: {index} puts '{missing[0]}' in '{shard}', which does not hold it: {REFETCH}")
    if not (single.is_file() or index.is_file() or any((path / name).is_file() for name in PICKLE_WEIGHTS)):
        raise PrunellmError(
            f"{where}: {path} has {CONFIG_FILE} but no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} with its "
            f"shards, or {PICKLE_WEIGHTS[0]}; copy the weights beside {CONFIG_FILE}"
        )


def _safetensors_names(file: Path, where: str) -> set[str]:
    """The tensor names in a safetensors file, after checking that its header parses and its data fits the file."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)  # little-endian length of the JSON header that follows
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if length is None or not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            got = "too short for a safetensors header" if length is None else f"and announces a {length:,}-byte header"
            raise PrunellmError(f"{where}: {file} is {size:,} bytes {got}: the file is truncated or not safetensors; {REFETCH}")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        end = 8 + length + max(ends, default=0)
    except (ValueError, AttributeError, KeyError, IndexError, TypeError) as exc:  # not UTF-8 JSON, or entries without offsets
        raise PrunellmError(f"{where}: {file} has a damaged header ({one_line(exc)}): {REFETCH}") from None
    if end > size:
        raise PrunellmError(
            f"{where}: {file} is {size:,} bytes but its header describes {end:,}: the file is truncated (an interrupted "
            f"download or copy?); {REFETCH}"
        )
    try:
        with safe_open(file, framework="pt"):  # dtypes, shapes, and tensors tiling the data exactly
            pass
    except SafetensorError as exc:
        raise PrunellmError(f"{where}: {file} is not a valid safetensors file ({one_line(exc)}): {REFETCH}") from None
    return set(header) - {"__metadata__"}


def check_device(device: str, flag: str = "--device") -> str:
    """Refuse a device this machine does not have, before anything is loaded; returns ``device`` unchanged.

    Valid: ``cpu``, ``auto``, ``cuda`` and ``cuda:N`` (N below the number of GPUs torch sees), ``mps`` where available.
    """
    if device in ("auto", "cpu"):
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise PrunellmError(f"{flag} '{device}' is not a device: use cpu, cuda, cuda:N, mps or auto")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PrunellmError(f"{flag} '{device}': torch {torch.__version__} sees no CUDA GPU on this machine: use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise PrunellmError(f"{flag} '{device}': torch sees {count} GPU(s): use cuda:0 … cuda:{count - 1}, cuda, cpu or auto")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise PrunellmError(f"{flag} '{device}': MPS (Apple GPU) is not available in this torch: use cpu")
    return device


@contextlib.contextmanager
def loading_errors(ref: str, path: str, flag: str) -> Iterator[None]:
    """Turn what ``from_pretrained`` raises on a damaged or unsafe model into a one-line :class:`PrunellmError`."""
    try:
        yield
    except pickle.UnpicklingError as exc:  # torch's weights_only loader refused code in a .bin
        found = sorted(Path(path).glob("*.bin")) if Path(path).is_dir() else []
        file = found[0] if found else f"the .bin weights of {path}"
        raise PrunellmError(
            f"{flag} '{ref}': {file} is a pickle that runs code from the file when loaded, so it is not loaded for "
            "safety; if you trust its source, convert it once to safetensors (torch.load(file, weights_only=False), then "
            "save_pretrained), or give the .bin file itself to prunellm eval/finetune with --trust_pickle"
        ) from exc
    except SafetensorError as exc:
        raise PrunellmError(f"{flag} '{ref}': a safetensors file in {path} cannot be read ({one_line(exc)}): {REFETCH}") from exc
    except OSError as exc:
        if Path(path).exists():
            raise PrunellmError(f"{flag} '{ref}' could not be loaded: {exc}".splitlines()[0]) from exc
        raise hub_failure(ref, flag, exc) from exc
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise PrunellmError(
            f"{flag} '{ref}': the weights in {path} do not have the shapes its {CONFIG_FILE} describes: restore the "
            f"{CONFIG_FILE} saved with these weights"
        ) from exc


def hub_failure(ref: str, flag: str, exc: Exception) -> PrunellmError:
    """One line for a hub id that could not be loaded, with the offline remedies."""
    return PrunellmError(
        f"{flag} '{ref}' could not be loaded from the Hugging Face hub ({type(exc).__name__}); offline, download it "
        f"elsewhere and pass its local directory, or use the embedded model '{next(iter(EMBEDDED_MODELS))}'"
    )
