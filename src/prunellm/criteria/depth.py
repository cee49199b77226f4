"""Layer (depth) criteria: one importance per decoder layer, for depth pruning and per-layer rate allocation.

* ``block_influence`` (ShortGPT): 1 − cos(h_in, h_out) per token, token-weighted over calibration windows; a
  forward hook reduces each batch to a sum, so memory is O(tokens), never O(tokens²).
* ``ppl`` / ``removal``: calibration loss increase when the layer is removed, by true zero-output ablation (the
  layer passes its input on), as in Shortened-LLaMA.
* ``taylor``: the sum of the layer's first-order Taylor saliency Σ|w·G| over its prunable projections.
* ``activation``: the relative size of the layer's update ‖h_out − h_in‖ / ‖h_in‖.

Each takes ``offload`` (:class:`~prunellm.priors.LayerPasses`, i.e. :class:`prunellm.sweep.Offload`): the same
scores with one decoder layer on the device at a time (``taylor`` from the offloaded exact gradients).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import batches_of, collect_gradient_stats
from ..models import input_device
from ..priors import LayerPasses, ablation_deltas
from ..units import UNIT_KINDS, all_units, decoder_layers
from .registry import register_layer


def change_sums(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, float, int]:
    """(Σ 1 − cos(h_in, h_out), Σ ‖h_out − h_in‖ / ‖h_in‖, tokens) over the tokens of one (B, T, H) batch (float32)."""
    h_in, h_out = h_in.float(), h_out.float()
    cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # (B, T)
    rel = (h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-6)
    return float((1 - cos).sum()), float(rel.sum()), cos.numel()


@torch.no_grad()
def hidden_change_scores(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: LayerPasses | None = None) -> dict[str, list[float]]:
    """Per layer, token-weighted means of 1 − cos(h_in, h_out) and ‖h_out − h_in‖ / ‖h_in‖ (``offload``: one layer
    on the device at a time, :func:`prunellm.sweep.hidden_change`)."""
    if offload is not None:
        return offload.hidden_change(model, input_ids, batch_size)
    layers = decoder_layers(model)
    n = len(layers)
    sums = {"block_influence": [0.0] * n, "activation": [0.0] * n}
    tokens = [0] * n
    handles = []

    def hook_for(index: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            influence, update, count = change_sums(h_in, output[0] if isinstance(output, tuple) else output)
            sums["block_influence"][index] += influence
            sums["activation"][index] += update
            tokens[index] += count

        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook_for(index), with_kwargs=True))
    device = input_device(model)
    try:
        for batch in tqdm(batches_of(input_ids, batch_size), desc="layer influence", leave=False):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {key: [value / max(t, 1) for value, t in zip(values, tokens)] for key, values in sums.items()}


def taylor_layer_scores(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: LayerPasses | None = None) -> list[float]:
    """Σ|w·G| over every prunable projection of each layer (``offload``: the exact offloaded gradients)."""
    from .taylor import FIRST  # here, so that the criteria register in the import order of criteria/__init__.py

    units = list(all_units(model, UNIT_KINDS))
    if offload is None:
        stats = collect_gradient_stats(model, input_ids, units, terms=(FIRST,), batch_size=batch_size)
    else:  # the taylor criterion's terms: FIRST among them
        stats = offload.gradient_stats(model, input_ids, units, "taylor", batch_size)
    scores = [0.0] * len(decoder_layers(model))
    for (layer, _), value in stats.gradient_terms[FIRST.name].items():
        scores[layer] += float(value.sum())
    return scores


@register_layer("block_influence", "ShortGPT block influence: token-weighted 1 − cos(h_in, h_out)", offloadable=True)
def block_influence(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: LayerPasses | None = None) -> list[float]:
    return hidden_change_scores(model, input_ids, batch_size, offload)["block_influence"]


@register_layer("activation", "relative update size ‖h_out − h_in‖ / ‖h_in‖ (allocation)", offloadable=True)
def activation(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: LayerPasses | None = None) -> list[float]:
    return hidden_change_scores(model, input_ids, batch_size, offload)["activation"]


@register_layer("ppl", "calibration loss increase when the layer is zero-ablated (Shortened-LLaMA)", offloadable=True)
def ppl(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: LayerPasses | None = None) -> list[float]:
    return ablation_deltas(model, input_ids, "layer", batch_size, offload=offload)


register_layer("removal", "the same loss increase as ppl (allocation's name for it)", offloadable=True)(ppl)
register_layer("taylor", "Σ|w·G| of the layer's prunable projections", rescorable=False, offloadable=True)(taylor_layer_scores)
