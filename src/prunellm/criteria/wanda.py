"""Wanda (structured): Σ |W_ij| · ‖X_j‖ over the unit's weights, X the input of each projection.

Rows (q/k/v, gate/up) weigh each input feature by its calibration norm; columns (o, down) are the unit's own
input feature, so the column's |W| sum is weighted by that feature's norm. Norms are float32 sums of squares
over calibration tokens (no padding).
"""

from __future__ import annotations

import torch

from ..calibration import module_key
from ..units import decoder_layers, get_module, reduce_to_units
from .registry import register


@register("wanda", {"activations"}, "Wanda: Σ|W|·‖X‖ with input activation norms from calibration")
def wanda(model, units, stats, options):
    layers = decoder_layers(model)
    scores = {}
    with torch.no_grad():
        for unit in units:
            total = torch.zeros(unit.count)
            for s in unit.slices:
                linear = get_module(layers[unit.layer], s.module)
                norm = stats.act_sq[module_key(unit.layer, s.module)].sqrt().to(linear.weight.device)  # (in,)
                weighted = linear.weight.float().abs() * norm[None, :]  # (out, in)
                total += reduce_to_units(weighted, s, unit.count).cpu()
            scores[(unit.layer, unit.kind)] = total
    return scores
