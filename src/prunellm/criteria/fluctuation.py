"""Fluctuation (FLAP's WIFV): how much a unit's output varies over calibration tokens.

A unit feeds the output projection (o_proj for a KV group, down_proj for an MLP channel) through input columns
j. Removing column j and adding ``W[:, j]·mean(x_j)`` to the bias (``--reconstruct bias``) leaves an output error
whose expected squared size is ``Var(x_j)·‖W[:, j]‖²``: the unit's score is that sum over its columns
(An et al., "Fluctuation-based Adaptive Structured Pruning for LLMs", AAAI 2024). The variance is the population
variance over calibration tokens (no padding), in float32 from Σx and Σx² of one forward pass.
"""

from __future__ import annotations

import torch

from ..calibration import module_key
from ..units import reduce_to_units
from .registry import register, sum_over_slices


def input_variance(stats, key: str) -> torch.Tensor:
    """Per input feature variance over calibration tokens, ``(in,)`` float32, never negative."""
    n = max(stats.act_tokens, 1)
    mean = stats.act_sum[key].double() / n
    return (stats.act_sq[key].double() / n - mean.pow(2)).clamp_min(0).float()


@register("fluctuation", {"activations"}, "FLAP fluctuation: Var(x_j)·‖W[:, j]‖² over the unit's o_proj/down_proj inputs")
def fluctuation(model, units, stats, options):
    def slice_score(unit, s, linear):
        if s.dim != 1:  # only the output projection's input columns fluctuate into the residual stream
            return None
        variance = input_variance(stats, module_key(unit.layer, s.module)).to(linear.weight.device)  # (in,)
        return reduce_to_units(linear.weight.float().pow(2) * variance[None, :], s, unit.count)  # (out, in) -> (count,)

    return sum_over_slices(model, units, slice_score)
