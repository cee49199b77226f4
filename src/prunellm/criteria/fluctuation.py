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
from .registry import PrunedInputs, register, register_reselection, sum_over_slices


def population_variance(total: torch.Tensor, squares: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per feature variance from Σx and Σx² over ``tokens`` tokens, ``(in,)`` float32, never negative."""
    n = max(tokens, 1)
    mean = total.double() / n
    return (squares.double() / n - mean.pow(2)).clamp_min(0).float()


def input_variance(stats, key: str) -> torch.Tensor:
    """Per input feature variance over calibration tokens, ``(in,)`` float32, never negative."""
    return population_variance(stats.act_sum[key], stats.act_sq[key], stats.act_tokens)


def slice_fluctuation(linear, variance: torch.Tensor, s, count: int) -> torch.Tensor:
    """Σ Var(x_j)·‖W[:, j]‖² over each unit's input columns of one output projection, ``(count,)``."""
    weight = linear.weight.detach().float()
    return reduce_to_units(weight.pow(2) * variance.to(weight.device)[None, :], s, count)  # (out, in) -> (count,)


@register("fluctuation", {"activations"}, "FLAP fluctuation: Var(x_j)·‖W[:, j]‖² over the unit's o_proj/down_proj inputs")
def fluctuation(model, units, stats, options):
    def slice_score(unit, s, linear):
        if s.dim != 1:  # only the output projection's input columns fluctuate into the residual stream
            return None
        return slice_fluctuation(linear, input_variance(stats, module_key(unit.layer, s.module)), s, unit.count)

    return sum_over_slices(model, units, slice_score)


@register_reselection(
    "fluctuation", "the plan's count per layer, the units of lowest fluctuation re-measured on the pruned model's inputs",
    rescores="fluctuation",
)
def reselect_by_fluctuation(inputs: PrunedInputs, keep: int) -> list[int]:
    """The ``keep`` units of highest fluctuation on the pruned model's inputs: this criterion's formula, which the
    plan applied to the dense model's inputs, measured again on the inputs the layer sees after the cuts below it."""
    variance = population_variance(inputs.total, torch.diagonal(inputs.gram), inputs.tokens)
    score = slice_fluctuation(inputs.linear, variance, inputs.columns, inputs.count).cpu()
    return sorted(torch.topk(score, keep).indices.tolist())

