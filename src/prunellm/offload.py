"""Scoring models larger than memory: one decoder layer on the compute device at a time.

The model is a skeleton whose parameters are meta tensors (:func:`load_lazy`, nothing read) or a model in host
memory; each decoder layer's tensors are put on the compute device when the layer is needed (read from the
safetensors shards with ``safe_open``, or copied from host memory) and dropped after it. The calibration windows
go through the layers one layer at a time, every layer's input hidden states kept (in memory or in
``offload_dir``):

* activation and weight criteria (``wanda``, ``magnitude``) record their statistics and score a layer while it is
  on the device, in the forward sweep;
* gradient criteria (``taylor``, ``taylor_2nd``, ``taylor_mix``) are exact: the loss is HF's mean token loss of
  each micro-batch (labels = inputs, shifted), computed at the top from the final norm and the LM head read in
  vocabulary slices, over the full logit rows of one chunk of tokens at a time (so neither the (tokens × vocab)
  logits nor the head exist whole; the embedding lookup is gathered from slices too); the backward sweep then goes
  down the layers, recomputing each layer from its stored input, propagating dL/dhidden for every micro-batch, and
  reducing the layer's weight gradients to per-unit terms with the in-memory pass's own reducer
  (:class:`~prunellm.calibration.GradientReducer`): G is the gradient averaged over all micro-batches, accumulated
  for one layer at a time, never for the whole model. With ``offload_dir`` the run is resumable
  (:class:`ScoringProgress`): a rerun of the same scoring after a crash restarts at the layer it stopped at.

Memory: one layer's weights and float32 gradient accumulators, one vocabulary slice and one chunk's logit rows at
the top, and the hidden states of every layer boundary (``offload_dir``: on disk instead).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import rss
from .calibration import (
    GradientReducer,
    Stats,
    UnitKey,
    activation_hooks,
    batches_of,
    capture_block_inputs,
    check_loss,
    run_block,
)
from .dtypes import DType, torch_dtype
from .errors import PrunellmError
from .specs import spec_for
from .units import LayerUnits, decoder_layers, get_module

if TYPE_CHECKING:
    from .criteria.registry import CriterionOptions

log = logging.getLogger(__name__)

VOCAB_SLICE_BYTES = 16 * 2**20  # one vocabulary slice of the embedding or LM head read at a time
# full float32 logit rows of one chunk of tokens at the top (× 2 with the softmax and its gradient); the head is
# read twice per chunk, so a device with room takes bigger chunks (Llama-3's 128 k words: 2 k tokens per GiB)
LOGITS_CHUNK_BYTES = 16 * 2**20
LOGITS_CHUNK_BYTES_ACCELERATOR = 2**30


class SafetensorsWeights:
    """The tensors of a model directory's safetensors shards, read lazily by name (``safe_open``: only the bytes
    asked for are read; each file is opened per read and closed, so no mapping outlives it)."""

    def __init__(self, folder: str | Path, flag: str = "--base_model") -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), folder / "model.safetensors")
        else:
            raise PrunellmError(
                f"{flag} '{folder}' has no model.safetensors(.index.json): --offload reads safetensors shards; "
                "re-save the model with save_pretrained (safe_serialization) or run without --offload"
            )
        self.folder = folder

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors on ``device`` (one ``safe_open`` per shard touched)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        target = "cpu" if device.type == "cpu" else str(device)
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt", device=target) as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def read_rows(self, name: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows ``start:stop`` of the named tensor on ``device``: only their bytes are read (``get_slice``)."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt", device="cpu") as f:
            rows = f.get_slice(name)[start:stop]
        return rows.to(device)


# lazily loaded skeletons -> where their weights are (no state on the modules themselves)
_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, SafetensorsWeights] = weakref.WeakKeyDictionary()


def load_lazy(ref: str, *, dtype: DType = "float32", flag: str = "--base_model") -> nn.Module:
    """A causal LM whose parameters stay in its safetensors shards (meta tensors) until a layer is needed.

    Units, parameter counts, :func:`prunellm.select` and Plans work on it as on the loaded model; scoring with
    ``prunellm.score(model, ids, offload=True)`` reads one decoder layer at a time. Buffers (rotary frequencies)
    are real. ``ref``: ``smollm2-135m`` (its converted cache folder), a local model directory or a cached hub id.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .checkpoint import model_class
    from .models import resolve_model_path

    path = resolve_model_path(ref, flag)
    if not Path(path).is_dir():
        raise PrunellmError(f"{flag} '{ref}' is not on this machine: --offload reads a local model directory; download it first")
    weights = SafetensorsWeights(path, flag)
    config = AutoConfig.from_pretrained(path)
    spec_for(config)  # refuse unknown families before any work
    with init_empty_weights(include_buffers=False):
        model = model_class(config)._from_config(config, dtype=torch_dtype(dtype))
    model.tie_weights()  # the skeleton counts a tied head once, as the loaded model does
    model.eval()
    _WEIGHTS[model] = weights
    return model


def is_lazy(model: nn.Module) -> bool:
    """Whether ``model`` is a skeleton from :func:`load_lazy` (its weights are on disk)."""
    return model in _WEIGHTS


class Onloader:
    """Puts one module's parameters on the compute device, and takes them off again.

    From disk (a :func:`load_lazy` skeleton) the tensors are read from the shards and the meta parameters are
    put back after; from host memory they are copied to the device (or used as they are when already there).
    Either way the module holds fresh ``Parameter`` objects while on the device and its own ones after.
    ``device=None`` (a model in memory, in place): every module is used where it is and nothing is moved.
    ``dtype``: the modules compute in this dtype (their parameters copied in it while on the device); None: their own.
    """

    def __init__(self, model: nn.Module, device: torch.device | None, dtype: torch.dtype | None = None) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.weights = _WEIGHTS.get(model)
        self.names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        spec = spec_for(model.config)
        # a tied head has no tensor of its own in the shards: it reads the embedding's
        self.aliases = {f"{spec.lm_head}.weight": f"{spec.embed}.weight"}
        tied = getattr(model, "_tied_weights_keys", None)
        if isinstance(tied, dict):
            self.aliases.update(tied)
        if device is None and self.weights is not None:
            raise PrunellmError("the model's weights are on disk (a load_lazy skeleton): pass offload=prunellm.sweep.Offload(device) (activation_stats: device=; the command line: --offload)")

    def device_of(self, module: nn.Module) -> torch.device:
        """Where ``module`` runs: the compute device, or in place the device of its first parameter."""
        if self.device is not None:
            return self.device
        return next(module.parameters()).device

    def _key(self, name: str) -> str:
        if self.weights is None or name in self.weights:
            return name
        alias = self.aliases.get(name)
        if alias is not None and alias in self.weights:
            return alias
        raise PrunellmError(f"'{self.weights.folder}' holds no tensor '{name}': the shards do not match config.json")

    def rows(self, module: nn.Module, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``module``'s parameter ``name`` on the compute device in the model's dtype, read
        from the shards (only those rows) or sliced from host memory; the module keeps its own parameter."""
        p = module._parameters[name]
        if self.device is None:
            return p.detach()[start:stop]
        if self.weights is None:
            return p.detach()[start:stop].to(self.device)
        full = f"{self.names[id(module)]}.{name}".lstrip(".")
        return self.weights.read_rows(self._key(full), start, stop, self.device).to(p.dtype)

    def _fresh(self, modules: tuple[nn.Module, ...]) -> list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]]:
        """(module, parameter name, its own parameter, a fresh one on the device) for every parameter of ``modules``."""
        slots = []  # (module, parameter name, its own parameter, full name)
        for module in modules:
            for sub in module.modules():
                for pname, p in sub._parameters.items():
                    if p is not None:
                        slots.append((sub, pname, p, f"{self.names[id(sub)]}.{pname}".lstrip(".")))
        if self.weights is not None:
            keys = {full: self._key(full) for *_, full in slots}
            loaded = self.weights.read(sorted(set(keys.values())), self.device)
        fresh = []
        for sub, pname, p, full in slots:
            data = loaded[keys[full]] if self.weights is not None else p.detach()
            device = self.device if self.device is not None else p.device
            fresh.append((sub, pname, p, nn.Parameter(data.to(device, self.dtype or p.dtype), requires_grad=False)))
        return fresh

    @contextlib.contextmanager
    def onloaded(self, *modules: nn.Module) -> Iterator[None]:
        """The parameters of ``modules`` on the compute device for the duration of the block."""
        if self.device is None and self.dtype is None:
            yield
            return
        slots = self._fresh(modules)
        try:
            for sub, pname, _, new in slots:
                sub._parameters[pname] = new
            yield
        finally:
            for sub, pname, p, _ in slots:
                sub._parameters[pname] = p
            del slots
            if self.device is not None and self.device.type == "cpu":
                rss.trim_heap()  # freed layers go back to the OS, not to the next layer's peak

    def materialize(self, module: nn.Module) -> None:
        """Put ``module``'s parameters on the compute device for good (surgery may replace them); :func:`to_meta`
        drops them again."""
        if self.device is None:
            return
        for sub, pname, _, new in self._fresh((module,)):
            sub._parameters[pname] = new


def to_meta(module: nn.Module) -> None:
    """Replace every parameter of ``module`` by a meta tensor of its shape (the skeleton keeps the pruned shapes)."""
    for sub in module.modules():
        for pname, p in sub._parameters.items():
            if p is not None:
                sub._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    rss.trim_heap()


class HiddenStore:
    """The hidden states entering each layer, one tensor per micro-batch: in memory, or one safetensors file per
    layer under ``folder`` (written through a temporary name and renamed)."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.memory: dict[int, list[torch.Tensor]] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, layer: int) -> Path:
        return self.folder / f"hidden_{layer:05d}.safetensors"

    def put(self, layer: int, hidden: list[torch.Tensor]) -> None:
        if self.folder is None:
            self.memory[layer] = [h.cpu() for h in hidden]
            return
        from safetensors.torch import save_file

        tmp = self._file(layer).with_suffix(".tmp")
        save_file({str(i): h.detach().cpu().contiguous() for i, h in enumerate(hidden)}, str(tmp))
        tmp.replace(self._file(layer))

    def has(self, layer: int) -> bool:
        return layer in self.memory if self.folder is None else self._file(layer).is_file()

    def get(self, layer: int) -> list[torch.Tensor]:
        """The stored inputs of ``layer`` (from memory they are handed over: :meth:`drop` after is a no-op)."""
        if self.folder is None:
            return self.memory.pop(layer)
        from safetensors.torch import load

        tensors = load(self._file(layer).read_bytes())  # read into memory; the file stays until drop()
        return [tensors[str(i)] for i in range(len(tensors))]

    def drop(self, layer: int) -> None:
        if self.folder is not None:
            self._file(layer).unlink(missing_ok=True)


class ScoringProgress:
    """What an offloaded gradient scoring run has finished, kept in its ``--offload_dir`` folder so that a rerun of
    the same scoring (same model, calibration, criterion, units, batch size, dtype) restarts where it stopped: after
    the backward sweep finished layer k, dL/dhidden at k's input, the per-unit terms and scores of the layers above
    and the loss are written (one safetensors file, through a temporary name), then k's stored input is deleted.
    Without a progress file the forward sweep restarts from the highest layer input stored."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / "progress.safetensors"

    def load(self) -> dict | None:
        if not self.file.is_file():
            return None
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            meta = json.loads(f.metadata()["progress"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        tables: dict[str, dict[UnitKey, torch.Tensor]] = {}
        for name, value in tensors.items():
            table, layer, kind = name.split("|")
            if table != "upstream":
                tables.setdefault(table, {})[(int(layer), kind)] = value
        meta["upstream"] = [tensors[f"upstream|{b}|"] for b in range(meta["n_batches"])]
        meta["tables"] = tables
        return meta

    def save(self, next_layer: int, upstream: list[torch.Tensor], stats: Stats, scores: dict, losses: list[float]) -> None:
        from safetensors.torch import save_file

        tensors = {f"upstream|{b}|": g.detach().cpu().contiguous() for b, g in enumerate(upstream)}
        # the scores done so far and every gradient term's per-unit sums (Stats.gradient_terms), by term name
        tables = {"scores": scores} | {f"term:{name}": values for name, values in stats.gradient_terms.items()}
        for table, values in tables.items():
            tensors.update({f"{table}|{layer}|{kind}": v.detach().cpu().contiguous() for (layer, kind), v in values.items()})
        meta = {"next": next_layer, "n_batches": len(upstream), "losses": losses, "grad_tokens": stats.grad_tokens}
        tmp = self.file.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"progress": json.dumps(meta)})
        tmp.replace(self.file)


def _scoring_folder(model: nn.Module, calibration: torch.Tensor, units: list[LayerUnits], criterion: str, batch_size: int, offload_dir: str | Path) -> Path:
    """``offload_dir/prunellm-scoring-<hash of what the scores depend on>``: a rerun of the same scoring finds it."""
    import hashlib

    from .data import tensor_hash

    weights = _WEIGHTS.get(model)
    key = {
        "model": str(weights.folder.resolve()) if weights is not None else f"host:{getattr(model.config, '_name_or_path', '')}",
        "config": model.config.to_json_string(use_diff=False), "dtype": str(next(model.parameters()).dtype),
        "criterion": criterion, "batch_size": batch_size, "calibration": tensor_hash(calibration),
        "units": sorted((u.layer, u.kind, u.count) for u in units),
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(offload_dir) / f"prunellm-scoring-{digest}"


def logits_budget(onloader: Onloader, device: torch.device) -> int:
    """Bytes of one chunk's logit rows at the top: small on a CPU that offloads (host memory is what offloading
    saves), an accelerator's or an in-memory model's larger (fewer, bigger products with the head)."""
    return LOGITS_CHUNK_BYTES if device.type == "cpu" and onloader.device is not None else LOGITS_CHUNK_BYTES_ACCELERATOR


def vocab_rows(vocab: int, width: int, element_bytes: int = 4) -> int:
    """Rows of the embedding or LM head per vocabulary slice read (at most ``VOCAB_SLICE_BYTES``)."""
    return max(1, min(VOCAB_SLICE_BYTES // (element_bytes * width), vocab))


def _input_embeddings(onloader: Onloader, embed: nn.Module, batches: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each micro-batch's input embeddings (B, T, H), gathered from the embedding read one vocabulary slice at a
    time, so the whole (vocab × H) table never exists on the device (a plain lookup: rows are copied exactly)."""
    vocab, width = embed.weight.shape
    device = onloader.device_of(embed)
    out = [torch.empty(*b.shape, width, dtype=dtype, device=device) for b in batches]
    ids = [b.to(device) for b in batches]
    rows = vocab_rows(vocab, width, embed.weight.element_size())
    for start in range(0, vocab, rows):
        weight = onloader.rows(embed, "weight", start, min(start + rows, vocab))  # (rows, H)
        for e, i in zip(out, ids):
            inside = (i >= start) & (i < start + weight.shape[0])
            if inside.any():
                e[inside] = weight[i[inside] - start].to(dtype)
        del weight
    return out


def layer_inputs(model: nn.Module, onloader: Onloader, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The hidden states entering the first decoder layer (B, T, H) and every layer's keyword arguments, per
    micro-batch, without the whole embedding on the device (a plain lookup is gathered one vocabulary slice at a
    time; an embedding module with its own forward is on the device whole while it runs)."""
    spec = spec_for(model.config)
    layers, embed = decoder_layers(model, spec), get_module(model, spec.embed)
    with torch.no_grad():
        if type(embed) is nn.Embedding:
            embeds = _input_embeddings(onloader, embed, batches, onloader.dtype or next(layers[0].parameters()).dtype)
            captured = [capture_block_inputs(model, layers, None, inputs_embeds=e) for e in embeds]
            del embeds
        else:
            with onloader.onloaded(embed):
                captured = [capture_block_inputs(model, layers, batch.to(onloader.device_of(embed))) for batch in batches]
    return [first.detach() for first, _ in captured], [per_layer for _, per_layer in captured]


def head_losses_and_grads(onloader: Onloader, head: nn.Linear, normed: list[torch.Tensor], batches: list[torch.Tensor], grads: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """HF's causal-LM loss of every micro-batch (mean over its B·(T−1) shifted tokens, logits upcast to float32)
    and its gradient with respect to the final-norm output, with the LM head read one vocabulary slice at a time.

    The tokens of all micro-batches go through in chunks; a chunk's full logit rows (chunk × vocab, at most
    ``LOGITS_CHUNK_BYTES``) are filled slice by slice, HF's own float32 cross-entropy and its backward run on them,
    and dL/dx = dL/dz · W is summed slice by slice again: the head is read twice per chunk and never whole, the
    logits of one chunk only. Why full rows and not an online logsumexp over slices (the head read once): that is
    closer to float64 than HF's float32 kernel (relative error of dL/dx 1e-6 against HF's 6.5e-6 on SmolLM2, whose
    logsumexp over 49 k words carries ~1e-5), but scores must equal the in-memory pass's, and that difference,
    grown over 30 layers, exceeds rtol 1e-4 on some units; on the full rows the rounding is HF's.
    normed: (B, T, H) per micro-batch (detached); returns (losses, dL/dnormed per micro-batch); without ``grads``
    the losses only (the head read once per chunk; no gradients returned).
    """
    device = onloader.device_of(head)
    vocab, width = head.weight.shape
    dtype = normed[0].dtype
    sizes = [ids[:, 1:].numel() for ids in batches]
    x = torch.cat([h[:, :-1].reshape(-1, width) for h in normed])  # (N, H): position t predicts token t + 1
    y = torch.cat([ids[:, 1:].reshape(-1) for ids in batches]).to(device)
    # each token's weight in its micro-batch's mean (float32 1/n, as HF's mean reduction divides)
    weights = torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float32, device=device) for n in sizes])
    budget = logits_budget(onloader, device)
    chunk = max(1, budget // (4 * vocab))
    rows = vocab_rows(vocab, width, head.weight.element_size())
    slices = [(start, min(start + rows, vocab)) for start in range(0, vocab, rows)]

    def head_slices() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        for start, stop in slices:
            bias = onloader.rows(head, "bias", start, stop) if head.bias is not None else None
            yield start, stop, onloader.rows(head, "weight", start, stop), bias  # (rows, H), the model's dtype

    per_token = torch.empty(x.shape[0], dtype=torch.float32, device=device)
    grad_x = torch.empty_like(x) if grads else None
    for first in range(0, x.shape[0], chunk):
        last = min(first + chunk, x.shape[0])
        xc = x[first:last]
        logits = torch.empty(last - first, vocab, dtype=dtype, device=device)  # (chunk, V): as HF, the model's dtype
        for start, stop, weight, bias in head_slices():
            logits[:, start:stop] = F.linear(xc, weight, bias)
        # HF's float32 cross-entropy, forward and backward by hand so that the rows exist twice at most, not ~5
        # times under autograd: log_softmax is the very kernel, and its backward for a loss −w·out[y] is
        # exp(out)·w − w·onehot(y), the same operations in the same order as torch's log_softmax backward
        out = torch.log_softmax(logits.float(), dim=1)  # (chunk, V) float32
        del logits
        tokens, wc = torch.arange(last - first, device=device), weights[first:last]
        per_token[first:last] = -out[tokens, y[first:last]]
        if not grads:
            del out
            continue
        grad = out.exp_().mul_(wc[:, None])  # in place: the softmax, weighted
        grad[tokens, y[first:last]] -= wc
        grad_z = grad.to(dtype)  # as the backward of HF's .float()
        del out, grad
        acc = torch.zeros(last - first, width, dtype=dtype, device=device)
        for start, stop, weight, _ in head_slices():
            acc += grad_z[:, start:stop] @ weight
        grad_x[first:last] = acc
        del grad_z, acc
    if device.type == "cpu":
        rss.trim_heap()  # the chunks' freed rows go back to the OS before the backward sweep
    losses, upstream, offset = [], [], 0
    for h, n in zip(normed, sizes):
        losses.append(per_token[offset : offset + n].sum() / n)
        offset += n
        if not grads:
            continue
        grad = torch.zeros_like(h)
        grad[:, :-1] = grad_x[offset - n : offset].view(h.shape[0], h.shape[1] - 1, width)
        upstream.append(grad)
    return losses, upstream


def head_kl(
    onloader: Onloader, head: nn.Linear, reference: list[torch.Tensor], normed: list[torch.Tensor],
    cache: dict[int, torch.Tensor] | None = None,
) -> float:  # fmt: skip
    """Token-weighted mean KL(p_reference ‖ p) of the next-token distributions at the positions given, from two
    final-norm outputs (B, P, H) per micro-batch (``reference``: the dense model's), with the LM head read one vocabulary
    slice at a time: each chunk's full logit rows are filled slice by slice, in float32 as
    :func:`prunellm.priors.mean_kl` computes them. ``cache`` (a dict, empty at first): the reference's
    log-probabilities of each chunk are kept there and reused by the next call with the same ``reference``,
    instead of recomputed (the head read twice per chunk)."""
    device = onloader.device_of(head)
    vocab, width = head.weight.shape
    xs = [torch.cat([h.reshape(-1, width) for h in hs]) for hs in (reference, normed)]
    budget = logits_budget(onloader, device)
    chunk = max(1, budget // (8 * vocab))  # two chunks of rows at a time
    rows = vocab_rows(vocab, width, head.weight.element_size())
    slices = [(start, min(start + rows, vocab)) for start in range(0, vocab, rows)]
    total = 0.0
    for first in range(0, xs[0].shape[0], chunk):
        last = min(first + chunk, xs[0].shape[0])
        p = None if cache is None else cache.get(first)
        todo = xs if p is None else xs[1:]
        filled = [torch.empty(last - first, vocab, dtype=x.dtype, device=device) for x in todo]
        for start, stop in slices:
            weight = onloader.rows(head, "weight", start, stop)
            bias = onloader.rows(head, "bias", start, stop) if head.bias is not None else None
            for logits, x in zip(filled, todo):
                logits[:, start:stop] = F.linear(x[first:last].to(device), weight, bias)
        *new_p, q = (torch.log_softmax(logits.float(), dim=1) for logits in filled)
        del filled
        if p is None:
            p = new_p[0]
            if cache is not None:
                cache[first] = p
        total += float((p.exp() * (p - q)).sum())
        del p, q
    return total / xs[0].shape[0]


def check_linear_head(model: nn.Module, what: str) -> None:
    """The offloaded loss is ``lm_head(final_norm(h))``: refuse a head that transforms its logits further."""
    head = get_module(model, spec_for(model.config).lm_head)
    if not isinstance(head, nn.Linear) or getattr(model.config, "final_logit_softcapping", None):
        raise PrunellmError(
            f"offloaded {what} computes the loss as lm_head(final_norm(h)) with a linear head; {type(model).__name__} "
            "transforms its logits further: run it in memory (leave --offload out)"
        )


@contextlib.contextmanager
def buffers_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Every buffer (rotary frequencies) on ``device`` while the block runs, put back where it was after it."""
    before = {}
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                before[(module, name)] = buf
                module._buffers[name] = buf.to(device)
    try:
        yield
    finally:
        for (module, name), buf in before.items():
            module._buffers[name] = buf


def activation_stats(
    model: nn.Module, calibration: torch.Tensor, units: list[LayerUnits], *, batch_size: int = 4, grams: bool = False,
    device: str | torch.device | None = None, stats: Stats | None = None, on_layer: Callable[[int], None] | None = None,
) -> Stats:  # fmt: skip
    """The activation pass: Σ x and Σ x² of every input feature of every sliced projection of ``units`` (float32),
    with ``grams`` the Gram matrix XᵀX of the projections whose input columns a unit owns (o_proj, down_proj), as
    the calibration windows go up the decoder layers one layer at a time (every micro-batch through a layer before
    the next; :func:`~prunellm.calibration.activation_hooks` record). It stops after the highest layer with units.

    ``device=None``: every layer used where it is (a model in memory); a device: one layer on it at a time, read
    from the shards of a :func:`load_lazy` skeleton or copied from host memory: the same code, the same sums in the
    same order. ``stats``: the Stats to fill (default a new one); ``on_layer(i)`` runs while layer i is on the device,
    after its statistics are in (an offloaded criterion that reads the layer's weights scores there).
    """
    stats = stats if stats is not None else Stats()
    layers = decoder_layers(model)
    onloader = Onloader(model, None if device is None else torch.device(device))
    batches = batches_of(calibration, batch_size)
    stats.act_tokens += sum(b.numel() for b in batches)
    top = max((unit.layer for unit in units), default=-1)
    placed = contextlib.ExitStack()
    if onloader.device is not None:  # rotary frequencies on the compute device for the pass
        placed.enter_context(buffers_on(model, onloader.device))
    with placed, torch.no_grad():
        hidden, kwargs = layer_inputs(model, onloader, batches)
        for index in tqdm(range(top + 1), desc="activation statistics", unit="layer", leave=False):
            layer = layers[index]
            with onloader.onloaded(layer):
                handles = activation_hooks(layers, [unit for unit in units if unit.layer == index], stats, grams=grams)
                try:
                    at = onloader.device_of(layer)
                    hidden = [run_block(layer, h.to(at), kw[index]) for h, kw in zip(hidden, kwargs)]
                finally:
                    for handle in handles:
                        handle.remove()
                if on_layer is not None:
                    on_layer(index)
    return stats


def offloaded_stats(
    model: nn.Module,
    calibration: torch.Tensor | None,
    units: list[LayerUnits],
    criterion: str,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    offload_dir: str | Path | None = None,
    options: CriterionOptions | None = None,
) -> tuple[dict[UnitKey, torch.Tensor], Stats]:
    """Score ``units`` by ``criterion`` with one decoder layer on ``device`` at a time; returns (scores, Stats).

    ``model`` is a :func:`load_lazy` skeleton (weights read from its shards) or a model in host memory (layers
    copied to ``device`` one at a time). Scores equal the in-memory pass's up to float rounding.
    """
    # here, not at the top: the criteria package registers the depth criteria, which run on sweep.py, built on this
    from .criteria.registry import CriterionOptions, get_criterion

    crit = get_criterion(criterion, flag="criterion")
    options = options or CriterionOptions()
    device = torch.device(device)
    needs = crit.needs
    if needs & {"gradients", "activations"} and calibration is None:
        raise PrunellmError(f"criterion '{criterion}' needs calibration windows: pass calibration=calibrate(tokenizer, ...)")
    spec = spec_for(model.config)
    if "gradients" in needs:
        check_linear_head(model, "gradient scoring")
    layers = decoder_layers(model, spec)
    onloader = Onloader(model, device)
    by_layer: dict[int, list[LayerUnits]] = {}
    for unit in units:
        by_layer.setdefault(unit.layer, []).append(unit)
    stats = Stats()
    scores: dict[UnitKey, torch.Tensor] = {}

    def score_layer(index: int) -> None:  # while the layer is on the device: criteria may read its weights
        layer_units = by_layer.get(index, [])
        if layer_units:
            values = crit.score(model, layer_units, stats, options)
            scores.update({key: value for key, value in values.items() if key[0] == index})

    if not needs & {"gradients", "activations"}:  # weights only: no data
        for index in tqdm(range(len(layers)), desc="offloaded scoring", unit="layer", leave=False):
            if index in by_layer:
                with onloader.onloaded(layers[index]):
                    score_layer(index)
        return scores, stats

    if "gradients" not in needs:  # activations: the forward sweep scores each layer while it is on the device
        activation_stats(model, calibration, units, batch_size=batch_size, grams="gram" in crit.activation_terms, device=device,
                         stats=stats, on_layer=score_layer)  # fmt: skip
        return scores, stats

    batches = batches_of(calibration, batch_size)
    placed = contextlib.ExitStack()
    placed.enter_context(buffers_on(model, device))
    scratch = progress = None
    if offload_dir is not None:  # this scoring's folder: removed when it succeeds, resumed if not
        scratch = _scoring_folder(model, calibration, units, criterion, batch_size, offload_dir)
        progress = ScoringProgress(scratch)
    store = HiddenStore(scratch)
    resumed = progress.load() if progress is not None else None
    if resumed is not None:
        log.info("offloaded scoring resumes in %s: the backward sweep restarts at layer %d", scratch, resumed["next"])
    finished = False
    try:
        log.info("offloaded %s scoring: %d layers one at a time on %s, %d micro-batches", criterion, len(layers), device, len(batches))
        hidden, kwargs = layer_inputs(model, onloader, batches)
        lowest = min(by_layer, default=0)  # the backward sweep stops at the lowest scored layer
        start = 0
        if scratch is not None and resumed is None:  # an interrupted forward sweep restarts at the last input stored
            stored = lowest
            while stored < len(layers) and store.has(stored):
                stored += 1
            if stored > lowest:
                start = stored - 1
                hidden = [h.to(device) for h in store.get(start)]
        # forward sweep: each layer's input kept for the backward sweep
        for index in tqdm(range(start, len(layers) if resumed is None else 0), desc="offloaded forward", unit="layer", leave=False):
            if index >= lowest and not store.has(index):
                store.put(index, hidden)
            with onloader.onloaded(layers[index]), torch.no_grad():
                hidden = [run_block(layers[index], h.to(device), kw[index]) for h, kw in zip(hidden, kwargs)]
        if resumed is not None:
            for table, values in resumed["tables"].items():
                if table == "scores":
                    scores.update(values)
                else:
                    stats.gradient_terms.setdefault(table.removeprefix("term:"), {}).update(values)
        _backward_sweep(model, spec, layers, onloader, store, hidden, kwargs, batches, units, crit, stats, score_layer,
                        device, progress, scores, resumed)  # fmt: skip
        finished = True
    finally:
        placed.close()
        if scratch is not None and finished:
            shutil.rmtree(scratch, ignore_errors=True)
    return scores, stats


def _loss_at_top(onloader: Onloader, norm: nn.Module, head: nn.Module, hidden: list[torch.Tensor], batches, stats: Stats, device) -> tuple[list[float], list[torch.Tensor]]:
    """Each micro-batch's loss and dL/dhidden at the last layer's output (through the final norm and the head)."""
    upstream = []
    with onloader.onloaded(norm):
        with torch.no_grad():
            normed = [norm(h.to(device)) for h in hidden]  # (B, T, H) per micro-batch
        losses, grads = head_losses_and_grads(onloader, head, normed, batches)
        del normed
        for index, (h, batch, grad) in enumerate(zip(hidden, batches, grads)):
            losses[index] = check_loss(losses[index], index)
            h = h.to(device).requires_grad_()
            with torch.enable_grad():
                norm(h).backward(grad)
            upstream.append(h.grad)
            stats.grad_tokens += batch.numel()
        del grads
    return losses, upstream


def _backward_sweep(model, spec, layers, onloader: Onloader, store: HiddenStore, hidden, kwargs, batches, units, crit, stats: Stats, score_layer, device,
                    progress: ScoringProgress | None = None, scores: dict | None = None, resumed: dict | None = None) -> None:  # fmt: skip
    """The loss at the top, then down the layers: recompute each from its stored input, propagate dL/dhidden per
    micro-batch, reduce the layer's weight gradients (accumulated over all micro-batches) to per-unit terms.
    With ``progress`` each finished layer is recorded (:class:`ScoringProgress`); ``resumed``: what it recorded,
    the top and the layers above ``resumed["next"]`` done."""
    n_batches = len(batches)
    stats.grad_batches = n_batches
    reducer = GradientReducer(layers, units, crit.gradient_terms, n_batches, stats)
    norm, head = get_module(model, spec.final_norm), get_module(model, spec.lm_head)
    if resumed is None:
        losses, upstream = _loss_at_top(onloader, norm, head, hidden, batches, stats, device)
        top = len(layers) - 1
    else:
        losses, upstream, top = resumed["losses"], [g.to(device) for g in resumed["upstream"]], resumed["next"]
        stats.grad_tokens = resumed["grad_tokens"]
    hidden.clear()  # the last layer's outputs are not needed below the top
    stats.mean_loss = sum(losses) / len(losses)
    lowest = min((u.layer for u in units), default=0)
    for index in tqdm(range(top, lowest - 1, -1), desc="offloaded backward", unit="layer", leave=False):
        inputs = store.get(index)
        with onloader.onloaded(layers[index]):
            for p, *_ in reducer.parameters(index):
                p.requires_grad_(True)
            handles = reducer.hook(index)
            try:
                for b, (h, kw) in enumerate(zip(inputs, kwargs)):
                    h = h.to(device)
                    if index > lowest:
                        h.requires_grad_()
                    with torch.enable_grad():
                        out = run_block(layers[index], h, kw[index])
                        if out.requires_grad:
                            out.backward(upstream[b])
                    upstream[b] = h.grad if index > lowest else None
                    del out
            finally:
                for handle in handles:
                    handle.remove()
            reducer.finish()
            score_layer(index)
        del inputs
        if progress is not None and index > lowest:  # recorded before its input goes: a crash from here resumes below
            progress.save(index - 1, upstream, stats, scores, losses)
        store.drop(index)
