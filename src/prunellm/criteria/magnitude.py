"""Magnitude: Σ|w| (L1) or Σw² (L2) over every weight and bias of the unit; needs no data."""

from __future__ import annotations

import torch

from ..units import decoder_layers, get_module, reduce_to_units
from .registry import register


@register("magnitude", {"weights"}, "weight magnitude of the unit (--magnitude_norm l1|l2)")
def magnitude(model, units, stats, options):
    power = 1 if options.magnitude_norm == "l1" else 2
    layers = decoder_layers(model)
    scores = {}
    with torch.no_grad():
        for unit in units:
            total = torch.zeros(unit.count)
            for s in unit.slices:
                linear = get_module(layers[unit.layer], s.module)
                total += reduce_to_units(linear.weight.float().abs().pow(power), s, unit.count).cpu()
                if s.dim == 0 and linear.bias is not None:
                    total += reduce_to_units(linear.bias.float().abs().pow(power), s, unit.count, True).cpu()
            scores[(unit.layer, unit.kind)] = total
    return scores
