"""Random scores (a seeded baseline every informed criterion must beat).

Scores are scaled by the unit's cost so that importance per parameter is uniform random: otherwise the
global importance/cost ranking would remove the expensive attention groups first, which is not random.
"""

from __future__ import annotations

import torch

from .registry import register


@register("random", {"weights"}, "uniform random scores from --seed (baseline)")
def random_scores(model, units, stats, options):
    generator = torch.Generator().manual_seed(options.seed)
    return {(unit.layer, unit.kind): torch.rand(unit.count, generator=generator) * unit.cost for unit in units}
