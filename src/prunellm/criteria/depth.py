"""Layer (depth) criteria: one importance per decoder layer, for depth pruning and per-layer rate allocation.

* ``block_influence`` (ShortGPT): 1 − cos(h_in, h_out) per token, token-weighted over calibration windows; each
  layer's input and output are reduced to a sum as the windows go up the layers, so memory is O(tokens), never
  O(tokens²).
* ``ppl`` / ``removal``: calibration loss increase when the layer is removed, by true zero-output ablation (the
  layer passes its input on), as in Shortened-LLaMA.
* ``taylor``: the sum of the layer's first-order Taylor saliency Σ|w·G| over its prunable projections.
* ``activation``: the relative size of the layer's update ‖h_out − h_in‖ / ‖h_in‖.

Each takes ``offload`` (:class:`prunellm.sweep.Offload`): the same scores with one decoder layer on the device at a
time (``taylor`` from the offloaded exact gradients); without it the layers are used where they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import collect_gradient_stats
from ..priors import ablation_deltas
from ..sweep import IN_PLACE, Offload
from ..units import UNIT_KINDS, all_units, decoder_layers
from .registry import register_layer


def hidden_change_scores(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: Offload | None = None) -> dict[str, list[float]]:
    """Per layer, token-weighted means of 1 − cos(h_in, h_out) and ‖h_out − h_in‖ / ‖h_in‖ (:func:`prunellm.sweep.hidden_change`:
    the layers where they are, or placed by ``offload``)."""
    return (offload or IN_PLACE).hidden_change(model, input_ids, batch_size)


def taylor_layer_scores(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: Offload | None = None) -> list[float]:
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
def block_influence(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: Offload | None = None) -> list[float]:
    return hidden_change_scores(model, input_ids, batch_size, offload)["block_influence"]


@register_layer("activation", "relative update size ‖h_out − h_in‖ / ‖h_in‖ (allocation)", offloadable=True)
def activation(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: Offload | None = None) -> list[float]:
    return hidden_change_scores(model, input_ids, batch_size, offload)["activation"]


@register_layer("ppl", "calibration loss increase when the layer is zero-ablated (Shortened-LLaMA)", offloadable=True)
def ppl(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, offload: Offload | None = None) -> list[float]:
    return ablation_deltas(model, input_ids, "layer", batch_size, offload=offload)


register_layer("removal", "the same loss increase as ppl (allocation's name for it)", offloadable=True)(ppl)
register_layer("taylor", "Σ|w·G| of the layer's prunable projections", rescorable=False, offloadable=True)(taylor_layer_scores)
