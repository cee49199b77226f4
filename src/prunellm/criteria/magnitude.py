"""Magnitude: Σ|w| (L1) or Σw² (L2) over every weight and bias of the unit; needs no data."""

from __future__ import annotations


from ..units import reduce_to_units
from .registry import register, sum_over_slices


@register("magnitude", {"weights"}, "weight magnitude of the unit (--magnitude_norm l1|l2)")
def magnitude(model, units, stats, options):
    power = 1 if options.magnitude_norm == "l1" else 2

    def slice_score(unit, s, linear):
        total = reduce_to_units(linear.weight.float().abs().pow(power), s, unit.count)
        if s.dim == 0 and linear.bias is not None:
            total = total + reduce_to_units(linear.bias.float().abs().pow(power), s, unit.count, True)
        return total

    return sum_over_slices(model, units, slice_score)
