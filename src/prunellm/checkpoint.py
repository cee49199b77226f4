"""The one checkpoint format: a Hugging Face model directory that any transformers tool loads.

Uniform widths give a standard config (no remote code). Per-layer widths are written to ``config.json``
(``prunellm_layers``) with ``auto_map`` pointing at ``modeling_prunellm.py`` saved beside the weights, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without prunellm installed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from . import hf_modeling
from .errors import PrunellmError
from .hf_modeling import PRUNED_LAYERS_KEY, pruned_class
from .dtypes import DType, torch_dtype
from .paths import atomic_dir

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_prunellm.py"
LOADING_NOTE_KEY = "prunellm_loading"
LOADING_NOTE = (
    "per-layer widths: load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) or "
    "prunellm.load_pruned(path); without trust_remote_code transformers reports a size mismatch "
    "(never pass ignore_mismatched_sizes=True: it would load random weights)"
)


def is_pruned_checkpoint(path: str | Path, flag: str = "path") -> bool:
    """True when ``path`` is a local directory whose config carries per-layer widths.

    Raises:
        PrunellmError: ``config.json`` is there but damaged (not UTF-8 JSON, or not an object).
    """
    from .model_files import read_json

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = read_json(config_file, f"{flag} '{path}'")
    if not isinstance(config, dict):
        raise PrunellmError(f"{flag} '{path}': {config_file} is a JSON {type(config).__name__}, not an object: restore the config.json saved with the weights")
    return bool(config.get(PRUNED_LAYERS_KEY))


def _base_class_name(model: PreTrainedModel) -> str:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__.endswith("ForCausalLM"):
            return cls.__name__
    raise PrunellmError(f"{type(model).__name__} is not a transformers *ForCausalLM model")


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path) -> Path:
    """Save ``model`` (and tokenizer) to ``out_dir`` atomically, with remote code when widths vary per layer."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        finish_checkpoint(model, tokenizer, tmp)
    return out_dir


def finish_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: Path) -> None:
    """Beside the weights and ``config.json`` in ``folder``: the tokenizer, the architecture name, and with per-layer
    widths the modeling file that ``auto_map`` names (:func:`save_model`, and the streamed save of
    :mod:`prunellm.streaming`)."""
    non_uniform = bool(getattr(model.config, PRUNED_LAYERS_KEY, None))
    base_name = _base_class_name(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("auto_map", None)
    config["architectures"] = [base_name]
    if non_uniform:
        source = Path(hf_modeling.__file__).read_text()
        source += (
            f"\n\nfrom transformers import {base_name} as _Base  # noqa: E402\n\n"
            f"Pruned{base_name} = pruned_class(_Base)\n"
        )
        (folder / MODELING_FILE).write_text(source)
        config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.Pruned{base_name}"}
        config["architectures"] = [f"Pruned{base_name}"]
        # transformers builds its own uniform-width class for a known model_type and never reads auto_map, so a
        # plain from_pretrained fails with a size mismatch: the remedy is written where a reader of the config looks
        config[LOADING_NOTE_KEY] = LOADING_NOTE
    else:
        config.pop(LOADING_NOTE_KEY, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_class(config, path: str | Path = "") -> type[PreTrainedModel]:
    """The class that builds ``config``: its transformers architecture, with per-layer widths when it has them."""
    base_name = (config.architectures or [""])[0].removeprefix("Pruned")
    base = getattr(transformers, base_name, None)
    if base is None:
        raise PrunellmError(f"'{path}' names architecture '{base_name}', which this transformers does not have")
    return pruned_class(base) if getattr(config, PRUNED_LAYERS_KEY, None) else base


def load_checkpoint(path: str | Path, dtype: DType = "float32", device: str = "cpu", flag: str = "path") -> PreTrainedModel:
    """Load a prunellm checkpoint (per-layer widths or standard) with prunellm's own copy of the modeling code.

    Raises:
        PrunellmError: ``device`` is not on this machine, or the folder is damaged (``flag`` names where it came from).
    """
    from .model_files import check_device, check_model_folder, loading_errors

    check_device(device)
    path = Path(path)
    check_model_folder(path, flag)
    with loading_errors(str(path), str(path), flag):
        config = AutoConfig.from_pretrained(path)
        cls = model_class(config, path)
        kwargs: dict = {"dtype": torch_dtype(dtype)}
        if device == "auto":
            kwargs["device_map"] = "auto"
        model = cls.from_pretrained(path, config=config, **kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    return model


def import_legacy_pickle(path: str | Path, trust_pickle: bool = False):
    """Load an LLM-Pruner style ``pruned_model.bin`` ({'model': ..., 'tokenizer': ...}) pickle.

    Unpickling runs arbitrary code, so this refuses unless ``trust_pickle`` is set by the user.
    """
    path = Path(path)
    if not trust_pickle:
        raise PrunellmError(
            f"'{path}' is a pickle (loading it runs code from the file): pass --trust_pickle only if you trust "
            "its source, then save it once with prunellm to get a safe safetensors checkpoint"
        )
    if not path.is_file():
        raise PrunellmError(f"legacy checkpoint '{path}' does not exist")
    log.warning("unpickling %s with weights_only=False because --trust_pickle was given", path)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and "model" in payload:
        return payload["model"], payload.get("tokenizer")
    if isinstance(payload, PreTrainedModel):
        return payload, None
    raise PrunellmError(f"'{path}' holds {type(payload).__name__}, not an LLM-Pruner {{'model', 'tokenizer'}} dict")
