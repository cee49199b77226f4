"""The layer-by-layer engine of the forward-only passes: layer criteria and ablation priors, in memory or offloaded.

The calibration windows go up the decoder layers one layer at a time, every micro-batch through a layer before the
next. Where the layers' weights are is a placement (:class:`Offload`): used where they are (``device=None``, a
model in memory, the default of every caller), or put on one compute device one layer at a time (``--offload``:
read from the shards of a :func:`~prunellm.offload.load_lazy` skeleton, or copied from host memory) and dropped
after; the computation is the same code either way. On top of the dense stream:

* :func:`ablated_losses` (H-GSP priors, ``ppl`` / ``removal``): the ablation of layer L (or of its attention or
  MLP block) starts a *branch* at L (the layer's input passed on, or the layer rerun with the block's output
  zeroed) that the later layers advance as they go by, so every layer is read once for all ablations (the
  attention and MLP priors share one sweep); at the top each branch's loss is HF's mean token loss (or its KL
  from the dense model's next-token distributions) through the final norm and the head read in vocabulary slices.
* :func:`hidden_change` (``block_influence``, ``activation``): 1 − cos(h_in, h_out) and the relative update of
  each layer, from its input and output while it is on the device.

Memory: one layer (offloaded), the dense hidden states of one boundary and every live branch's (N ablations: N
boundaries' worth at the top; two targets: 2N), in memory or, with ``Offload.folder``, on disk (one file per
branch, removed after).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import Stats, batches_of, check_loss, run_block
from .offload import (
    HiddenStore,
    Onloader,
    buffers_on,
    check_linear_head,
    head_kl,
    head_losses_and_grads,
    layer_inputs,
    offloaded_stats,
)
from .models import input_device
from .specs import spec_for
from .units import LayerUnits, decoder_layers, get_module

Target = Literal["layer", "attention", "mlp"]
Measure = Literal["loss", "kl", "fisher"]
MEASURES = ("loss", "kl", "fisher")
REFERENCE_BYTES = 2**30  # the dense model's log-probabilities at the scored positions, kept for every branch's KL below this


def _zero_output_hook(module, args, kwargs, output):
    if isinstance(output, tuple):  # attention returns (output, weights)
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


def _identity_layer_hook(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


@contextlib.contextmanager
def ablated(model: nn.Module, layer: int, target: Target) -> Iterator[None]:
    """Within the block, ``target`` of decoder layer ``layer`` outputs zero (a layer: passes its input on)."""
    spec = spec_for(model.config)
    block = decoder_layers(model, spec)[layer]
    if target == "layer":
        handle = block.register_forward_hook(_identity_layer_hook, with_kwargs=True)
    else:
        path = spec.attention.module if target == "attention" else spec.mlp.module
        handle = get_module(block, path).register_forward_hook(_zero_output_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()




def scored_positions(seq_len: int, count: int | None) -> torch.Tensor | None:
    """The positions of a ``seq_len``-token window at which the prior's KL is measured: ``count`` evenly spaced ones
    of the ``seq_len − 1`` that predict a next token, the last of them included; None (all of them) where ``count``
    is None or 0 or not below ``seq_len − 1``."""
    predicting_count = seq_len - 1
    if not count or count >= predicting_count:
        return None
    return (torch.arange(1, count + 1) * predicting_count) // count - 1


def predicting(hidden: torch.Tensor, picked: torch.Tensor | None) -> torch.Tensor:
    """The hidden states (B, T, H) at the positions whose next-token distributions are compared: ``picked``, or every
    position but the last."""
    return hidden[:, :-1] if picked is None else hidden[:, picked.to(hidden.device)]


def change_sums(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, float, int]:
    """(Σ 1 − cos(h_in, h_out), Σ ‖h_out − h_in‖ / ‖h_in‖, tokens) over the tokens of one (B, T, H) batch (float32)."""
    h_in, h_out = h_in.float(), h_out.float()
    cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # (B, T)
    rel = (h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-6)
    return float((1 - cos).sum()), float(rel.sum()), cos.numel()


@dataclass(frozen=True)
class Offload:
    """Where the layer-by-layer passes keep the weights: ``device=None`` uses every layer where it is (a model in
    memory, also one that accelerate spread over several devices); a device puts one decoder layer on it at a time
    (``--offload``). The hidden states stay in memory (``folder=None``) or go to that folder (``--offload_dir``).
    The priors and the layer criteria run their passes through it."""

    device: str | torch.device | None = "cpu"
    folder: str | Path | None = None
    dtype: torch.dtype | None = None  # the layers compute in this dtype (--prior_dtype bfloat16); None: the weights' own

    def ablated_losses(self, model: nn.Module, input_ids: torch.Tensor, targets: tuple[Target, ...], batch_size: int, indices: list[int], measure: Measure = "loss", positions: int | None = None) -> tuple[float, dict[Target, list[float]]]:
        return ablated_losses(model, input_ids, targets, batch_size, indices, self, measure, positions)

    def hidden_change(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> dict[str, list[float]]:
        return hidden_change(model, input_ids, batch_size, self)

    def gradient_stats(self, model: nn.Module, input_ids: torch.Tensor, units: list[LayerUnits], criterion: str, batch_size: int) -> Stats:
        _, stats = offloaded_stats(model, input_ids, units, criterion, device=self.device if self.device is not None else input_device(model), batch_size=batch_size, offload_dir=self.folder)
        return stats


IN_PLACE = Offload(device=None)
"""The placement of a model in memory: every layer used where it is, the hidden states in memory."""


class LayerSweep:
    """Micro-batches of calibration windows going up ``model``'s decoder layers, one layer at a time.

    ``with sweep.running() as hidden:`` gives the layer-0 inputs (B, T, H) per micro-batch; ``with
    sweep.onloaded(i):`` holds layer i on the device (in place: where it is), where :meth:`run` advances hidden
    states through it.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int, offload: Offload) -> None:
        self.model, self.spec = model, spec_for(model.config)
        self.layers = decoder_layers(model, self.spec)
        self.onloader = Onloader(model, None if offload.device is None else torch.device(offload.device), offload.dtype)
        self.batches = batches_of(input_ids, batch_size)
        self.kwargs: list[list[dict]] = []
        self._reference: dict[int, torch.Tensor] | None = None  # the dense log-probabilities per chunk, for every KL

    @contextlib.contextmanager
    def running(self) -> Iterator[list[torch.Tensor]]:
        placed = contextlib.ExitStack()
        if self.onloader.device is not None:  # rotary frequencies on the compute device for the pass
            placed.enter_context(buffers_on(self.model, self.onloader.device))
        with placed:
            hidden, self.kwargs = layer_inputs(self.model, self.onloader, self.batches)
            yield hidden

    def onloaded(self, index: int):
        return self.onloader.onloaded(self.layers[index])

    @torch.no_grad()
    def run(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer ``index`` (on the device) applied to every micro-batch's hidden states."""
        layer = self.layers[index]
        device = self.onloader.device_of(layer)
        return [run_block(layer, h.to(device), kw[index]) for h, kw in zip(hidden, self.kwargs)]

    @torch.no_grad()
    def loss(self, hidden: list[torch.Tensor]) -> float:
        """Token-weighted mean next-token loss of the last layer's outputs ``hidden`` (HF's per-micro-batch mean
        loss, weighted by its B·(T−1) tokens)."""
        norm, head = get_module(self.model, self.spec.final_norm), get_module(self.model, self.spec.lm_head)
        with self.onloader.onloaded(norm):
            device = self.onloader.device_of(norm)
            normed = [norm(h.to(device)).to(head.weight.dtype) for h in hidden]
        losses, _ = head_losses_and_grads(self.onloader, head, normed, self.batches, grads=False)
        sizes = [b[:, 1:].numel() for b in self.batches]
        total = sum(check_loss(loss, i) * n for i, (loss, n) in enumerate(zip(losses, sizes)))
        return total / sum(sizes)

    @torch.no_grad()
    def kl(self, reference: list[torch.Tensor], hidden: list[torch.Tensor], picked: torch.Tensor | None = None) -> float:
        """Token-weighted mean KL divergence of the next-token distributions of the last layer's outputs ``hidden``
        from those of ``reference`` (the dense model's, the same in every call of a sweep) at the positions
        ``picked`` (None: all but the last). The dense log-probabilities are computed once and kept while they
        take at most ``REFERENCE_BYTES``, else recomputed for every call."""
        norm, head = get_module(self.model, self.spec.final_norm), get_module(self.model, self.spec.lm_head)
        with self.onloader.onloaded(norm):
            device = self.onloader.device_of(norm)
            normed = [[norm(predicting(h.to(device), picked)).to(head.weight.dtype) for h in hs] for hs in (reference, hidden)]
        if self._reference is None:
            rows = sum(h.shape[0] * h.shape[1] for h in normed[0])
            self._reference = {} if rows * head.weight.shape[0] * 4 <= REFERENCE_BYTES else None
        return head_kl(self.onloader, head, *normed, cache=self._reference)


def ablated_losses(
    model: nn.Module, input_ids: torch.Tensor, targets: tuple[Target, ...], batch_size: int, indices: list[int], offload: Offload,
    measure: Measure = "loss", positions: int | None = None,
) -> tuple[float, dict[Target, list[float]]]:
    """(dense loss, per target the loss with that block of each layer in ``indices`` ablated), every layer run
    once (placed by ``offload``) for all targets and layers; ``measure="kl"``: (0, per target the mean KL divergence
    of each ablation's next-token distributions from the dense model's at :func:`scored_positions`)."""
    check_linear_head(model, "ablation")
    sweep = LayerSweep(model, input_ids, batch_size, offload)
    n = len(sweep.layers)
    wanted = set(indices)
    picked = scored_positions(input_ids.shape[1], positions)
    scratch = None if offload.folder is None else Path(tempfile.mkdtemp(prefix="prunellm-ablation-", dir=_made(offload.folder)))
    branches = HiddenStore(scratch)  # branch t·n + L (target t, layer L) -> its hidden states at the boundary reached
    try:
        with sweep.running() as hidden:
            for index in tqdm(range(n), desc=f"{'/'.join(targets)} ablation", unit="layer", leave=False):
                with sweep.onloaded(index):
                    for t in range(len(targets)):  # branches from below go through this layer
                        for started in sorted(i for i in wanted if i < index):
                            branches.put(t * n + started, sweep.run(index, branches.get(t * n + started)))
                    if index in wanted:
                        for t, target in enumerate(targets):
                            if target == "layer":  # the layer passes its input on
                                branches.put(t * n + index, hidden)
                            else:
                                with ablated(model, index, target):
                                    branches.put(t * n + index, sweep.run(index, hidden))
                    hidden = sweep.run(index, hidden)
            base = sweep.loss(hidden) if measure == "loss" else 0.0
            reference = hidden if measure == "kl" else None  # the dense model's last hidden states, for KL only
            del hidden
            losses: dict[Target, list[float]] = {}
            for t, target in enumerate(targets):
                losses[target] = []
                for index in indices:
                    branch = branches.get(t * n + index)
                    losses[target].append(sweep.loss(branch) if reference is None else sweep.kl(reference, branch, picked))
                    branches.drop(t * n + index)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return base, losses


def hidden_change(model: nn.Module, input_ids: torch.Tensor, batch_size: int, offload: Offload) -> dict[str, list[float]]:
    """Per layer, the token-weighted means of 1 − cos(h_in, h_out) and ‖h_out − h_in‖ / ‖h_in‖ (the layers placed by
    ``offload``)."""
    sweep = LayerSweep(model, input_ids, batch_size, offload)
    n = len(sweep.layers)
    sums = {"block_influence": [0.0] * n, "activation": [0.0] * n}
    tokens = [0] * n
    with sweep.running() as hidden:
        for index in tqdm(range(n), desc="layer influence", unit="layer", leave=False):
            with sweep.onloaded(index):
                out = sweep.run(index, hidden)
            for h_in, h_out in zip(hidden, out):
                influence, update, count = change_sums(h_in.to(h_out.device), h_out)
                sums["block_influence"][index] += influence
                sums["activation"][index] += update
                tokens[index] += count
            hidden = out
    return {key: [value / max(t, 1) for value, t in zip(values, tokens)] for key, values in sums.items()}


def _made(folder: str | Path) -> Path:
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)
