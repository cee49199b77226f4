"""Forward-only calibration passes one decoder layer at a time: layer criteria and ablation priors for models
larger than memory (``--offload``).

The calibration windows go up the layers as in offloaded scoring (:mod:`prunellm.offload`): each layer is read
onto the device (from the shards of a :func:`~prunellm.offload.load_lazy` skeleton, or copied from host memory),
run on every micro-batch, and dropped. On top of that dense stream:

* :func:`ablated_losses` (H-GSP priors, ``ppl`` / ``removal``): the ablation of layer L (or of its attention or
  MLP block) starts a *branch* at L (the layer's input passed on, or the layer rerun with the block's output
  zeroed) that the later layers advance as they go by, so every layer is read once for all ablations (the
  attention and MLP priors share one sweep); at the top
  each branch's loss is HF's mean token loss through the final norm and the head read in vocabulary slices.
  This is the in-memory :func:`prunellm.priors.ablation_deltas`' computation, rerunning layers L+1.. from the
  modified hidden state, in another order.
* :func:`hidden_change` (``block_influence``, ``activation``): 1 − cos(h_in, h_out) and the relative update of
  each layer, from its input and output while it is on the device.

Memory: one layer, the dense hidden states of one boundary and every live branch's (N ablations: N boundaries'
worth at the top; two targets: 2N), in memory or, with ``Offload.folder``, on disk (one file per branch, removed
after).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import Stats, batches_of, check_loss, run_block
from .criteria.depth import change_sums
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
from .priors import Measure, Target, ablated, predicting, scored_positions
from .specs import spec_for
from .units import LayerUnits, decoder_layers, get_module


@dataclass(frozen=True)
class Offload:
    """How an offloaded pass runs: one decoder layer on ``device`` at a time, the hidden states it keeps in memory
    (``folder=None``) or in that folder (``--offload_dir``). The passes of the priors and the layer criteria
    (:class:`~prunellm.priors.LayerPasses`) run through it."""

    device: str | torch.device = "cpu"
    folder: str | Path | None = None

    def ablated_losses(self, model: nn.Module, input_ids: torch.Tensor, targets: tuple[Target, ...], batch_size: int, indices: list[int], measure: Measure = "loss", positions: int | None = None) -> tuple[float, dict[Target, list[float]]]:
        return ablated_losses(model, input_ids, targets, batch_size, indices, self, measure, positions)

    def hidden_change(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> dict[str, list[float]]:
        return hidden_change(model, input_ids, batch_size, self)

    def gradient_stats(self, model: nn.Module, input_ids: torch.Tensor, units: list[LayerUnits], criterion: str, batch_size: int) -> Stats:
        _, stats = offloaded_stats(model, input_ids, units, criterion, device=self.device, batch_size=batch_size, offload_dir=self.folder)
        return stats


class LayerSweep:
    """Micro-batches of calibration windows going up ``model``'s decoder layers, one layer on the device at a time.

    ``with sweep.running() as hidden:`` gives the layer-0 inputs (B, T, H) per micro-batch; ``with
    sweep.onloaded(i):`` holds layer i on the device, where :meth:`run` advances hidden states through it.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int, offload: Offload) -> None:
        self.model, self.spec = model, spec_for(model.config)
        self.layers = decoder_layers(model, self.spec)
        self.device = torch.device(offload.device)
        self.onloader = Onloader(model, self.device)
        self.batches = batches_of(input_ids, batch_size)
        self.kwargs: list[list[dict]] = []

    @contextlib.contextmanager
    def running(self) -> Iterator[list[torch.Tensor]]:
        with buffers_on(self.model, self.device):  # rotary frequencies on the compute device for the pass
            hidden, self.kwargs = layer_inputs(self.model, self.onloader, self.batches)
            yield hidden

    def onloaded(self, index: int):
        return self.onloader.onloaded(self.layers[index])

    @torch.no_grad()
    def run(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer ``index`` (on the device) applied to every micro-batch's hidden states."""
        return [run_block(self.layers[index], h.to(self.device), kw[index]) for h, kw in zip(hidden, self.kwargs)]

    @torch.no_grad()
    def loss(self, hidden: list[torch.Tensor]) -> float:
        """Token-weighted mean next-token loss of the last layer's outputs ``hidden`` (HF's per-micro-batch mean
        loss, weighted by its B·(T−1) tokens, as :func:`prunellm.priors.mean_loss` weighs them)."""
        norm, head = get_module(self.model, self.spec.final_norm), get_module(self.model, self.spec.lm_head)
        with self.onloader.onloaded(norm):
            normed = [norm(h.to(self.device)) for h in hidden]
        losses, _ = head_losses_and_grads(self.onloader, head, normed, self.batches, grads=False)
        sizes = [b[:, 1:].numel() for b in self.batches]
        total = sum(check_loss(loss, i) * n for i, (loss, n) in enumerate(zip(losses, sizes)))
        return total / sum(sizes)

    @torch.no_grad()
    def kl(self, reference: list[torch.Tensor], hidden: list[torch.Tensor], picked: torch.Tensor | None = None) -> float:
        """Token-weighted mean KL divergence of the next-token distributions of the last layer's outputs ``hidden``
        from those of ``reference`` (the dense model's) at the positions ``picked`` (None: all but the last), as
        :func:`prunellm.priors.mean_kl` weighs them."""
        norm, head = get_module(self.model, self.spec.final_norm), get_module(self.model, self.spec.lm_head)
        with self.onloader.onloaded(norm):
            normed = [[norm(predicting(h.to(self.device), picked)) for h in hs] for hs in (reference, hidden)]
        return head_kl(self.onloader, head, *normed)


def ablated_losses(
    model: nn.Module, input_ids: torch.Tensor, targets: tuple[Target, ...], batch_size: int, indices: list[int], offload: Offload,
    measure: Measure = "loss", positions: int | None = None,
) -> tuple[float, dict[Target, list[float]]]:
    """(dense loss, per target the loss with that block of each layer in ``indices`` ablated), one layer on the
    device at a time and every layer read once for all targets and layers; ``measure="kl"``: (0, per target the
    mean KL divergence of each ablation's next-token distributions from the dense model's at
    :func:`~prunellm.priors.scored_positions`).

    The same numbers as the in-memory :func:`prunellm.priors._ablated_losses` up to float rounding.
    """
    check_linear_head(model, "ablation")
    sweep = LayerSweep(model, input_ids, batch_size, offload)
    n = len(sweep.layers)
    wanted = set(indices)
    picked = scored_positions(input_ids.shape[1], positions)
    scratch = None if offload.folder is None else Path(tempfile.mkdtemp(prefix="prunellm-ablation-", dir=_made(offload.folder)))
    branches = HiddenStore(scratch)  # branch t·n + L (target t, layer L) -> its hidden states at the boundary reached
    try:
        with sweep.running() as hidden:
            for index in tqdm(range(n), desc=f"offloaded {'/'.join(targets)} ablation", unit="layer", leave=False):
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
    """Per layer, the token-weighted means of 1 − cos(h_in, h_out) and ‖h_out − h_in‖ / ‖h_in‖, one layer on the
    device at a time (:func:`prunellm.criteria.depth.hidden_change_scores`' numbers)."""
    sweep = LayerSweep(model, input_ids, batch_size, offload)
    n = len(sweep.layers)
    sums = {"block_influence": [0.0] * n, "activation": [0.0] * n}
    tokens = [0] * n
    with sweep.running() as hidden:
        for index in tqdm(range(n), desc="offloaded layer influence", unit="layer", leave=False):
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
