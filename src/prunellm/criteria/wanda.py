"""Wanda (structured): Σ |W_ij| · ‖X_j‖ over the unit's weights, X the input of each projection.

Rows (q/k/v, gate/up) weigh each input feature by its calibration norm; columns (o, down) are the unit's own
input feature, so the column's |W| sum is weighted by that feature's norm. Norms are float32 sums of squares
over calibration tokens (no padding).
"""

from __future__ import annotations


from ..calibration import module_key
from ..units import reduce_to_units
from .registry import register, sum_over_slices


@register("wanda", {"activations"}, "Wanda: Σ|W|·‖X‖ with input activation norms from calibration")
def wanda(model, units, stats, options):
    def slice_score(unit, s, linear):
        norm = stats.act_sq[module_key(unit.layer, s.module)].sqrt().to(linear.weight.device)  # (in,)
        return reduce_to_units(linear.weight.float().abs() * norm[None, :], s, unit.count)  # (out, in) -> (count,)

    return sum_over_slices(model, units, slice_score)
