"""Calibration passes: collect what criteria need into :class:`Stats`.

Three passes exist and the runner picks the cheapest one that covers every requested need:
weights only (no data), a forward pass with input hooks (activation norms), and a forward+backward pass
whose gradients are reduced to the per-unit terms the criteria declare (:class:`GradientTerm`) as they arrive (``register_post_accumulate_grad_hook``)
and then freed, so the model's ``.grad`` tensors never exist all at once. Accumulation is float32 whatever
the model dtype.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

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
    # gradient term name -> (layer, kind) -> Σ over each index's elements of the term's formula (GradientTerm)
    gradient_terms: dict[str, dict[UnitKey, torch.Tensor]] = field(default_factory=dict)
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


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor | None, *, inputs_embeds: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[dict]]:
    """The hidden states entering the first block and the keyword arguments each block receives (one batch).

    Each block's own arguments are kept: models that mix sliding-window and full-attention layers pass them
    different masks. The blocks are stood in for by recorders during the pass, so it costs the embedding only.
    ``inputs_embeds`` (B, T, H) instead of ``batch``: the embedding lookup is done already (the offloaded pass
    gathers it slice by slice), the model's own scaling of it still applies.
    """
    kwargs: list[dict] = [{} for _ in blocks]
    first: list[torch.Tensor] = []
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _InputRecorder(block, i, kwargs, first, last=i == len(originals) - 1)
    try:
        with torch.no_grad():
            if inputs_embeds is None:
                model(input_ids=batch, use_cache=False)
            else:
                model(inputs_embeds=inputs_embeds, use_cache=False)
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


def activation_hooks(layers: nn.ModuleList, units: list[LayerUnits], stats: Stats, *, grams: bool = False) -> list:
    """Forward pre-hooks adding Σ x and Σ x² of every input feature of every sliced projection of ``units`` to
    ``stats`` (float32), and with ``grams`` the Gram matrix XᵀX of the projections whose input columns a unit owns
    (o_proj, down_proj); returns the handles to remove. Each module is hooked once even if two unit kinds name it.
    The activation pass (:func:`prunellm.offload.activation_stats`, in memory or offloaded) records through these."""
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

    handles, hooked = [], set()
    for unit in units:
        for s in unit.slices:
            key = module_key(unit.layer, s.module)
            if key not in hooked:
                hooked.add(key)
                handles.append(get_module(layers[unit.layer], s.module).register_forward_pre_hook(hook_for(key)))
    return handles


@contextlib.contextmanager
def only_sliced_params_require_grad(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
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


@dataclass(frozen=True)
class GradientTerm:
    """One per-element quantity of the sliced weights (and biases) that the gradient pass sums per unit index for a
    criterion, into ``Stats.gradient_terms[name]``. The formula lives in the criterion's file; the pass only
    delivers its raw inputs (float32):

    * ``over="batches"``: ``formula(w, g)`` on every micro-batch's gradient ``g``; the per-unit sums are averaged
      over the micro-batches (Σ_b reduce(formula) / n_batches);
    * ``over="means"``: ``formula(w, G, F)`` once per parameter, on the mean gradient ``G`` over all micro-batches
      and, when ``fisher``, the mean squared gradient ``F`` (the empirical Fisher diagonal; else ``None``).
    """

    name: str
    formula: Callable[..., torch.Tensor]
    over: Literal["batches", "means"]
    fisher: bool = False


class GradientReducer:
    """Reduces each micro-batch gradient of the sliced weights (and biases) of ``units`` to the per-unit sums of
    the requested :class:`GradientTerm` s in ``stats`` as it arrives, then frees it.

    The one reduction behind both gradient passes: the in-memory pass hooks every sliced parameter of the model,
    the offloaded pass (:mod:`prunellm.offload`) one decoder layer's at a time and calls :meth:`finish` for that
    layer before the next, so only one layer's accumulators exist at once. Terms over the means need the mean
    gradient: with more than one micro-batch a float32 accumulator per hooked parameter holds it until
    :meth:`finish`; with one micro-batch they are reduced at once and nothing is kept.

    Args:
        layers: the decoder layers (the parameters are looked up when hooked, so a layer may be loaded later).
        terms: what the criteria ask for (e.g. :data:`prunellm.criteria.taylor.FIRST`).
    """

    def __init__(self, layers: nn.ModuleList, units: list[LayerUnits], terms: Iterable[GradientTerm], n_batches: int, stats: Stats):
        self.layers, self.units, self.n_batches, self.stats = layers, units, n_batches, stats
        terms = {term.name: term for term in terms}.values()  # a term asked for by two criteria is summed once
        self.per_batch = [t for t in terms if t.over == "batches"]
        self.from_means = [t for t in terms if t.over == "means"]
        self.need_fisher = any(t.fisher for t in self.from_means)
        for term in terms:
            stats.gradient_terms.setdefault(term.name, {})
        self.grad_acc: dict[int, torch.Tensor] = {}
        self.fisher_acc: dict[int, torch.Tensor] = {}
        # id(param) -> (param, (layer, kind), unit, slice, is_bias) for the parameters hooked now
        self.by_param: dict[int, tuple[nn.Parameter, UnitKey, LayerUnits, object, bool]] = {}

    def parameters(self, layer: int | None = None) -> list[tuple[nn.Parameter, UnitKey, LayerUnits, object, bool]]:
        """(param, key, unit, slice, is_bias) of every sliced weight and bias (of one decoder layer when given)."""
        entries = []
        for unit in self.units:
            if layer is not None and unit.layer != layer:
                continue
            for s in unit.slices:
                linear = get_module(self.layers[unit.layer], s.module)
                entries.append((linear.weight, (unit.layer, unit.kind), unit, s, False))
                if s.dim == 0 and linear.bias is not None:
                    entries.append((linear.bias, (unit.layer, unit.kind), unit, s, True))
        return entries

    def hook(self, layer: int | None = None) -> list:
        """Register the reduction on the sliced parameters (of one layer); returns the hook handles."""
        entries = self.parameters(layer)
        self.by_param.update({id(p): (p, key, unit, s, is_bias) for p, key, unit, s, is_bias in entries})
        return [p.register_post_accumulate_grad_hook(self.on_grad) for p, *_ in entries]

    def _add(self, term: GradientTerm, key: UnitKey, value: torch.Tensor) -> None:
        table = self.stats.gradient_terms[term.name]
        value = value.cpu()
        table[key] = table[key] + value if key in table else value

    def _reduce_means(self, pid: int, w: torch.Tensor, mean_g: torch.Tensor, fisher: torch.Tensor | None) -> None:
        _, key, unit, s, is_bias = self.by_param[pid]
        for term in self.from_means:
            self._add(term, key, reduce_to_units(term.formula(w, mean_g, fisher), s, unit.count, is_bias))

    def on_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: fold ``p.grad`` (one micro-batch) into the terms, then free it."""
        _, key, unit, s, is_bias = self.by_param[id(p)]
        g = p.grad.detach().float()
        if not torch.isfinite(g).all():
            raise PrunellmError(
                f"non-finite gradient in layer {key[0]} ({s.module}): run in float32 (--dtype float32) or bfloat16"
            )
        w = p.detach().float()
        for term in self.per_batch:
            self._add(term, key, reduce_to_units(term.formula(w, g), s, unit.count, is_bias) / self.n_batches)
        if self.from_means and self.n_batches == 1:  # G is this gradient, F its square: reduce now, keep nothing
            self._reduce_means(id(p), w, g, g.pow(2) / self.n_batches if self.need_fisher else None)
        elif self.from_means:
            if id(p) in self.grad_acc:
                self.grad_acc[id(p)].add_(g)
            else:
                self.grad_acc[id(p)] = g.clone()
            if self.need_fisher:
                sq = g.pow(2)
                if id(p) in self.fisher_acc:
                    self.fisher_acc[id(p)].add_(sq)
                else:
                    self.fisher_acc[id(p)] = sq
        p.grad = None  # freed as soon as it is reduced

    def finish(self) -> None:
        """Reduce the terms over the means (G = accumulated gradient / micro-batches) for every parameter hooked so
        far, and free their accumulators (call once all micro-batches went through them)."""
        for pid, acc in self.grad_acc.items():
            p = self.by_param[pid][0]
            fisher = self.fisher_acc[pid] / self.n_batches if self.need_fisher else None
            self._reduce_means(pid, p.detach().float(), acc / self.n_batches, fisher)
        self.grad_acc.clear()
        self.fisher_acc.clear()
        self.by_param.clear()


def check_loss(loss: torch.Tensor, index: int) -> float:
    """The micro-batch loss as a float; a non-finite one is refused with the fix."""
    if not torch.isfinite(loss):
        raise PrunellmError(f"non-finite calibration loss at micro-batch {index}: run in float32 (--dtype float32)")
    return loss.item()


def collect_gradient_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    units: list[LayerUnits],
    *,
    terms: Iterable[GradientTerm],
    batch_size: int = 4,
    gradient_checkpointing: bool = False,
) -> Stats:
    """Forward+backward over calibration data, reducing gradients to the per-unit sums of ``terms``.

    Args:
        terms: the :class:`GradientTerm` s the criteria ask for (``Criterion.gradient_terms``), e.g. the first-order
            Taylor Σ|w·G| of :mod:`prunellm.criteria.taylor`.
        batch_size: micro-batch size; gradients of micro-batches are accumulated in float32.
        gradient_checkpointing: trade compute for activation memory (big models).

    Memory: per-unit terms need no per-element state, except that terms over the means need the *accumulated*
    gradient G; when there is more than one micro-batch a float32 accumulator per sliced weight
    holds it (the same size as one gradient of the prunable weights, the only model-sized state; the offloaded
    pass, :mod:`prunellm.offload`, holds one layer's at a time).
    """
    batches = batches_of(input_ids, batch_size)
    stats = Stats(grad_batches=len(batches))
    reducer = GradientReducer(decoder_layers(model), units, terms, len(batches), stats)
    params = [p for p, *_ in reducer.parameters()]
    device = input_device(model)
    was_training = model.training
    losses = []
    with only_sliced_params_require_grad(model, params):
        handles = reducer.hook()
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # transformers only checkpoints in training mode; dropout-free models are unaffected
        try:
            for index, batch in enumerate(tqdm(batches, desc="gradient statistics", leave=False)):
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                losses.append(check_loss(loss, index))
                loss.backward()
                stats.grad_tokens += batch.numel()
        finally:
            for handle in handles:
                handle.remove()
            if gradient_checkpointing:
                model.gradient_checkpointing_disable()
            model.train(was_training)
    stats.mean_loss = sum(losses) / len(losses)
    reducer.finish()
    return stats
