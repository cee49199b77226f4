"""Calibration passes: collect what criteria need into :class:`Stats`.

Three passes exist and the runner picks the cheapest one that covers every requested need:
weights only (no data), a forward pass with input hooks (activation norms), and a forward+backward pass
whose gradients are reduced to per-unit Taylor terms as they arrive (``register_post_accumulate_grad_hook``)
and then freed, so the model's ``.grad`` tensors never exist all at once. Accumulation is float32 whatever
the model dtype.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import PrunellmError
from .models import input_device
from .units import LayerUnits, decoder_layers, get_module, reduce_to_units

log = logging.getLogger(__name__)

UnitKey = tuple[int, str]  # (layer, kind)


@dataclass
class Stats:
    """What calibration collected, keyed by unit set ``(layer, kind)`` or by module path."""

    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.path" -> Σ x² per input feature
    act_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.path" -> Σ x per input feature
    act_gram: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.path" -> XᵀX (in, in), column-sliced only
    act_tokens: int = 0
    taylor_first: dict[UnitKey, torch.Tensor] = field(default_factory=dict)  # Σ_e |w_e · G_e|
    taylor_second: dict[UnitKey, torch.Tensor] = field(default_factory=dict)  # ½ Σ_e w_e² · F_e
    taylor_mix: dict[UnitKey, torch.Tensor] = field(default_factory=dict)  # Σ_e |w_e G_e − ½ w_e² F_e|
    grad_batches: int = 0
    grad_tokens: int = 0
    mean_loss: float | None = None


class StopForward(Exception):
    """Raised by a forward hook to end a model pass once it has seen what it needed."""


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer's output hidden states (layers return a tensor or a tuple led by it)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _InputRecorder(nn.Module):
    """Stands in for a decoder block during :func:`capture_block_inputs`: records the block's keyword arguments
    and passes the hidden states through unchanged (attributes the model's loop reads come from the block)."""

    def __init__(self, block: nn.Module, index: int, kwargs: list[dict], first: list[torch.Tensor], last: bool) -> None:
        super().__init__()
        self.block, self.index, self.kwargs, self.first, self.last = block, index, kwargs, first, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise PrunellmError("decoder blocks called with positional arguments besides the hidden states are not supported")
        self.kwargs[self.index] = kwargs
        if self.index == 0:
            self.first.append(hidden_states)
        if self.last:
            raise StopForward
        return hidden_states


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The hidden states entering the first block and the keyword arguments each block receives (one batch).

    Each block's own arguments are kept: models that mix sliding-window and full-attention layers pass them
    different masks. The blocks are stood in for by recorders during the pass, so it costs the embedding only.
    """
    kwargs: list[dict] = [{} for _ in blocks]
    first: list[torch.Tensor] = []
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _InputRecorder(block, i, kwargs, first, last=i == len(originals) - 1)
    try:
        with torch.no_grad():
            model(input_ids=batch, use_cache=False)
    except StopForward:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return first[0], kwargs


def batches_of(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an (N, L) calibration tensor into micro-batches."""
    if batch_size < 1:
        raise PrunellmError(f"--gradient_batch_size {batch_size} must be at least 1")
    return list(input_ids.split(batch_size))


def module_key(layer: int, path: str) -> str:
    return f"{layer}.{path}"


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, input_ids: torch.Tensor, units: list[LayerUnits], batch_size: int = 8, *, grams: bool = False
) -> Stats:
    """Forward pass recording Σ x and Σ x² of every input feature of every sliced projection (float32), and with
    ``grams`` the Gram matrix XᵀX of the projections whose input columns a unit owns (o_proj, down_proj)."""
    stats = Stats()
    layers = decoder_layers(model)
    handles = []
    gram_keys = {module_key(u.layer, s.module) for u in units for s in u.slices if s.dim == 1} if grams else set()

    def hook_for(key: str):
        def hook(module, args):
            x = args[0].detach().float()  # (B, T, in)
            dims = tuple(range(x.dim() - 1))
            for table, acc in ((stats.act_sq, x.pow(2).sum(dim=dims)), (stats.act_sum, x.sum(dim=dims))):
                table[key] = table[key] + acc.cpu() if key in table else acc.cpu()
            if key in gram_keys:
                flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
                gram = (flat.T @ flat).cpu()
                stats.act_gram[key] = stats.act_gram[key] + gram if key in stats.act_gram else gram

        return hook

    hooked: set[str] = set()  # each module is hooked once even if two unit kinds name it
    for unit in units:
        for s in unit.slices:
            key = module_key(unit.layer, s.module)
            if key not in hooked:
                hooked.add(key)
                handles.append(get_module(layers[unit.layer], s.module).register_forward_pre_hook(hook_for(key)))
    device = input_device(model)
    try:
        for batch in tqdm(batches_of(input_ids, batch_size), desc="activation statistics", leave=False):
            model(input_ids=batch.to(device), use_cache=False)
            stats.act_tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return stats


@contextlib.contextmanager
def _only_sliced_params_require_grad(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    wanted = {id(p) for p in params}
    before = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(before[id(p)])
            p.grad = None


def collect_gradient_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    units: list[LayerUnits],
    *,
    terms: set[str],
    batch_size: int = 4,
    gradient_checkpointing: bool = False,
) -> Stats:
    """Forward+backward over calibration data, reducing gradients to per-unit Taylor terms.

    Args:
        terms: any of ``first`` (Σ|w·G|, G the gradient averaged over micro-batches), ``second``
            (½Σ w²·mean(g²), the empirical Fisher diagonal) and ``mix`` (Σ|w·G − ½w²F|).
        batch_size: micro-batch size; gradients of micro-batches are accumulated in float32.
        gradient_checkpointing: trade compute for activation memory (big models).

    Memory: per-unit terms need no per-element state, except that the first-order and mixed terms need the
    *accumulated* gradient G; when there is more than one micro-batch a float32 accumulator per sliced weight
    holds it (the same size as one gradient of the prunable weights, the only model-sized state).
    """
    layers = decoder_layers(model)
    batches = batches_of(input_ids, batch_size)
    n_batches = len(batches)
    stats = Stats(grad_batches=n_batches)
    # (param, layer, kind, slice, is_bias) for every sliced weight and bias
    entries: list[tuple[nn.Parameter, UnitKey, LayerUnits, object, bool]] = []
    for unit in units:
        for s in unit.slices:
            linear = get_module(layers[unit.layer], s.module)
            entries.append((linear.weight, (unit.layer, unit.kind), unit, s, False))
            if s.dim == 0 and linear.bias is not None:
                entries.append((linear.bias, (unit.layer, unit.kind), unit, s, True))
    need_grad_acc = bool(terms & {"first", "mix"}) and n_batches > 1
    need_fisher_acc = "mix" in terms
    grad_acc: dict[int, torch.Tensor] = {}
    fisher_acc: dict[int, torch.Tensor] = {}
    by_param = {id(p): (p, key, unit, s, is_bias) for p, key, unit, s, is_bias in entries}

    def add(table: dict[UnitKey, torch.Tensor], key: UnitKey, value: torch.Tensor) -> None:
        value = value.cpu()
        table[key] = table[key] + value if key in table else value

    def reduce(values: torch.Tensor, unit: LayerUnits, s, is_bias: bool) -> torch.Tensor:
        return reduce_to_units(values, s, unit.count, is_bias)

    def on_grad(p: torch.Tensor) -> None:
        _, key, unit, s, is_bias = by_param[id(p)]
        g = p.grad.detach().float()
        if not torch.isfinite(g).all():
            raise PrunellmError(
                f"non-finite gradient in layer {key[0]} ({s.module}): run in float32 (--dtype float32) or bfloat16"
            )
        w = p.detach().float()
        if need_grad_acc:
            if id(p) in grad_acc:
                grad_acc[id(p)].add_(g)
            else:
                grad_acc[id(p)] = g.clone()
        elif "first" in terms or "mix" in terms:  # a single micro-batch: G is this gradient
            if "first" in terms:
                add(stats.taylor_first, key, reduce((w * g).abs(), unit, s, is_bias))
            if "mix" in terms:
                grad_acc[id(p)] = g.clone()
        if "second" in terms:
            add(stats.taylor_second, key, reduce(0.5 * w.pow(2) * g.pow(2), unit, s, is_bias) / n_batches)
        if need_fisher_acc:
            sq = g.pow(2)
            if id(p) in fisher_acc:
                fisher_acc[id(p)].add_(sq)
            else:
                fisher_acc[id(p)] = sq
        p.grad = None  # freed as soon as it is reduced

    params = [p for p, *_ in entries]
    device = input_device(model)
    was_training = model.training
    losses = []
    with _only_sliced_params_require_grad(model, params):
        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # transformers only checkpoints in training mode; dropout-free models are unaffected
        try:
            for index, batch in enumerate(tqdm(batches, desc="gradient statistics", leave=False)):
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise PrunellmError(
                        f"non-finite calibration loss at micro-batch {index}: run in float32 (--dtype float32)"
                    )
                losses.append(loss.item())
                loss.backward()
                stats.grad_tokens += batch.numel()
        finally:
            for handle in handles:
                handle.remove()
            if gradient_checkpointing:
                model.gradient_checkpointing_disable()
            model.train(was_training)
    stats.mean_loss = sum(losses) / len(losses)
    # finish the terms that needed the accumulated gradient G (mean over micro-batches)
    for pid, acc in grad_acc.items():
        p, key, unit, s, is_bias = by_param[pid]
        w = p.detach().float()
        mean_g = acc / n_batches if need_grad_acc else acc
        if "first" in terms and need_grad_acc:
            add(stats.taylor_first, key, reduce((w * mean_g).abs(), unit, s, is_bias))
        if "mix" in terms:
            fisher = fisher_acc[pid] / n_batches
            add(stats.taylor_mix, key, reduce((w * mean_g - 0.5 * w.pow(2) * fisher).abs(), unit, s, is_bias))
    grad_acc.clear()
    fisher_acc.clear()
    return stats
