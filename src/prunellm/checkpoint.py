"""The one checkpoint format: a Hugging Face model directory that any transformers tool loads.

Uniform widths give a standard config (no remote code). Per-layer widths are written to ``config.json``
(``prunellm_layers``) with ``auto_map`` pointing at ``modeling_prunellm.py`` saved beside the weights, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without prunellm installed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
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


# ---------------------------------------------------------------------------------------------------------
# safetensors shards written tensor by tensor (the streamed save of a model that never exists whole in memory)

SHARD_BYTES = 2 * 2**30  # an output shard is closed once it holds this much (HF names and index)
HEADER_ROOM = 2**20  # bytes reserved for a shard's JSON header (~10 k tensor names); a full header closes the shard
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}  # fmt: skip


class _ShardFile:
    """One safetensors file written tensor by tensor: the data goes straight to disk, the header (names, dtypes,
    shapes, offsets) is written at the front on :meth:`close` into room reserved for it (padded with spaces, as
    safetensors itself pads), so no shard is ever held in memory."""

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, open(path, "wb")
        self.file.write(b"\0" * (8 + HEADER_ROOM))
        self.entries: dict[str, dict] = {}
        self.size = 0

    def header(self, extra: dict | None = None) -> bytes:
        entries = {**self.entries, **(extra or {})}
        return json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()

    def fits(self, name: str, tensor: torch.Tensor) -> bool:
        entry = {name: {"dtype": "BOOL", "shape": list(tensor.shape), "data_offsets": [self.size, self.size + 2**62]}}
        return len(self.header(entry)) <= HEADER_ROOM

    def add(self, name: str, parts: list[torch.Tensor] | Iterator[torch.Tensor], dtype: torch.dtype, shape: list[int]) -> None:
        """Write a tensor of ``shape`` from ``parts``, consecutive row slices (or the whole tensor), as they come."""
        start = self.size
        for part in parts:
            data = part.detach().to("cpu", dtype).contiguous()
            if data.numel():
                self.file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            self.size += data.numel() * data.element_size()
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.size - start != expected:
            raise RuntimeError(f"tensor '{name}': {self.size - start} bytes written, its shape {shape} needs {expected}")
        self.entries[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [start, self.size]}

    def close(self) -> None:
        header = self.header()
        self.file.seek(0)
        self.file.write(HEADER_ROOM.to_bytes(8, "little") + header + b" " * (HEADER_ROOM - len(header)))
        self.file.close()


class ShardWriter:
    """Tensors written to safetensors shards of about ``shard_bytes`` as they come (straight to disk), named and
    indexed as ``save_pretrained`` names them (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + index)."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.current: _ShardFile | None = None
        self.shards: list[list[str]] = []  # the tensor names of each closed shard
        self.names: set[str] = set()
        self.total = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and self.current is not None:
            # an open shard file would keep its temporary folder from being removed (NFS, Windows)
            self.current.file.close()
            self.current = None

    def add(self, name: str, tensor: torch.Tensor, parts: Iterator[torch.Tensor] | None = None) -> None:
        """Write ``tensor``, or a tensor of its shape and dtype (a meta one will do) from ``parts``, its row slices."""
        if name in self.names:
            raise RuntimeError(f"tensor '{name}' written twice")
        self.names.add(name)
        if self.current is not None and not self.current.fits(name, tensor):
            self.flush()
        if self.current is None:
            self.current = _ShardFile(self.folder / f".shard-{len(self.shards):05d}.tmp")
        self.current.add(name, [tensor] if parts is None else parts, tensor.dtype, list(tensor.shape))
        self.total += tensor.numel() * tensor.element_size()
        if self.current.size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.current is not None:
            self.current.close()
            self.shards.append(sorted(self.current.entries))
            self.current = None

    def close(self) -> None:
        """Close the open shard, give the shards their final names and write the index when there are several."""
        self.flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, name in enumerate(names):
            (self.folder / f".shard-{k:05d}.tmp").replace(self.folder / name)
        if n > 1:
            weight_map = {tensor: name for name, shard in zip(names, self.shards) for tensor in shard}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
