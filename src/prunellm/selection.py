"""Global selection: rank every unit of every layer by importance per parameter and remove from the bottom.

Values compared across layers are ``score / cost``, optionally normalised per block or per layer and scaled
by a layer/block prior. Removal is greedy over a heap of per-unit-set candidates, so constraints (minimum KV
groups per layer, MLP widths that stay multiples of ``round_to``) shape the candidates instead of being
repaired afterwards. The removed parameter count ends within one candidate's cost of the target.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .calibration import UnitKey
from .errors import PrunellmError
from .units import LayerUnits

Normalization = Literal["none", "block", "layer", "standard", "block_standard", "uniform"]


@dataclass(frozen=True)
class SelectionConstraints:
    """What selection must respect."""

    min_kv_groups: int = 1
    round_to: int = 1
    whole_attention: bool = False  # a layer's KV groups go all together or not at all (vLLM keeps every query head)


@dataclass
class Selection:
    """Result of selection: kept indices per unit set and the per-index table behind the decision."""

    kept: dict[UnitKey, list[int]]
    removed_params: int
    target_params: int
    table: list[dict]  # one row per unit index: layer, kind, index, score, cost, value, removed


def normalized_values(
    units: list[LayerUnits],
    scores: dict[UnitKey, torch.Tensor],
    normalization: Normalization,
    priors: dict[UnitKey, float] | None = None,
) -> dict[UnitKey, torch.Tensor]:
    """Importance per parameter for every index, normalised and scaled by priors (float64)."""
    per_param = {
        (u.layer, u.kind): scores[(u.layer, u.kind)].double() / u.cost for u in units if u.count > 0
    }
    for key, value in per_param.items():
        if not torch.isfinite(value).all():
            raise PrunellmError(
                f"non-finite importance scores in layer {key[0]} ({key[1]}): run scoring in float32 (--dtype float32)"
            )
    if normalization == "block":
        # parameter-weighted mean of the block = Σscore / Σcost
        denominators = {key: value.mean() for key, value in per_param.items()}
    elif normalization == "layer":
        totals: dict[int, list[float]] = {}
        for u in units:
            if u.count > 0:
                entry = totals.setdefault(u.layer, [0.0, 0.0])
                entry[0] += float(scores[(u.layer, u.kind)].double().sum())
                entry[1] += u.cost * u.count
        denominators = {key: torch.tensor(totals[key[0]][0] / totals[key[0]][1]) for key in per_param}
    elif normalization == "standard":
        return _standardized(per_param, priors, lambda key: key[1])
    elif normalization == "block_standard":
        return _standardized(per_param, priors, lambda key: key)
    elif normalization == "uniform":
        # percentile of each index within its block: one threshold removes about the same share of every block
        # (a prior m then scales the block's percentiles: one threshold θ cuts about θ/m of the block)
        ranks = {key: torch.argsort(torch.argsort(value, stable=True)).double() for key, value in per_param.items()}
        return {key: (rank + 0.5) / len(rank) * (priors.get(key, 1.0) if priors else 1.0) for key, rank in ranks.items()}
    elif normalization == "none":
        denominators = {key: torch.tensor(1.0) for key in per_param}
    else:
        raise PrunellmError(
            f"--normalization '{normalization}' is not valid: use one of none, block, layer, standard, block_standard, uniform"
        )
    out = {}
    for key, value in per_param.items():
        denom = float(denominators[key])
        value = value / denom if denom > 0 else value
        if priors is not None:
            value = value * priors.get(key, 1.0)
        out[key] = value
    return out


def _standardized(
    per_param: dict[UnitKey, torch.Tensor], priors: dict[UnitKey, float] | None, pool_of
) -> dict[UnitKey, torch.Tensor]:
    """z-score of every index within its pool (``standard``: its unit kind over ALL layers; ``block_standard``: its
    own block, FLAP's AL-AM), so one threshold compares heads with channels on how unusual each is in its pool
    (cost still counts in the budget, not in the rank).

    A prior p (> 0) shifts the z-score by ln p: a scale has no meaning for values centred on zero."""
    out = {}
    for pool in sorted({pool_of(key) for key in per_param}, key=str):
        keys = [key for key in per_param if pool_of(key) == pool]
        pooled = torch.cat([per_param[key] for key in keys])
        mean, std = pooled.mean(), pooled.std(unbiased=False)
        std = std if float(std) > 0 else torch.tensor(1.0, dtype=pooled.dtype)
        for key in keys:
            value = (per_param[key] - mean) / std
            if priors is not None and priors.get(key, 1.0) > 0:
                value = value + math.log(priors.get(key, 1.0))
            out[key] = value
    return out


def _chunks(unit: LayerUnits, order: torch.Tensor, constraints: SelectionConstraints) -> list[torch.Tensor]:
    """Removal candidates of one unit set, cheapest-value first, honouring minimum width and rounding."""
    if unit.kind == "kv_group" and constraints.whole_attention:
        return [order] if constraints.min_kv_groups == 0 else []
    if unit.kind == "kv_group":
        removable = max(unit.count - constraints.min_kv_groups, 0)
        return [order[i : i + 1] for i in range(removable)]
    step = max(constraints.round_to, 1)
    removable = unit.count  # an MLP may lose every channel (a zero-output block); kept widths stay multiples of step
    chunks: list[torch.Tensor] = []
    first = unit.count % step  # bring the width onto a multiple of step first
    position = 0
    if step > 1 and first:
        if first > removable:
            return []
        chunks.append(order[:first])
        position = first
    while position + step <= removable:
        chunks.append(order[position : position + step])
        position += step
    return chunks


def removable_indices(unit: LayerUnits, constraints: SelectionConstraints) -> int:
    """How many of ``unit``'s indices global selection may remove under ``constraints``."""
    return sum(len(chunk) for chunk in _chunks(unit, torch.arange(unit.count), constraints))


def removal_limit(units: list[LayerUnits], constraints: SelectionConstraints) -> tuple[int, int]:
    """What global selection can remove from ``units``, from their shapes alone (no scores): the parameters of every
    candidate together, and the cost of the smallest first candidate, by which selection may stop short of a target."""
    most, smallest = 0, None
    for unit in units:
        chunks = _chunks(unit, torch.arange(unit.count), constraints) if unit.count else []
        if chunks:
            most += unit.removed_cost(sum(len(chunk) for chunk in chunks))
            cost = unit.cost * len(chunks[0])
            smallest = cost if smallest is None else min(smallest, cost)
    return most, smallest or 0


def select_global(
    units: list[LayerUnits],
    values: dict[UnitKey, torch.Tensor],
    scores: dict[UnitKey, torch.Tensor],
    target_params: int,
    constraints: SelectionConstraints,
    total_params: int,
) -> Selection:
    """Remove the lowest-value candidates across all unit sets until ``target_params`` are gone."""
    candidates: dict[UnitKey, list[torch.Tensor]] = {}
    heap: list[tuple[float, int, UnitKey, int]] = []
    unit_of = {(u.layer, u.kind): u for u in units}
    for u in units:
        key = (u.layer, u.kind)
        if u.count == 0:
            continue
        order = torch.argsort(values[key], stable=True)
        candidates[key] = _chunks(u, order, constraints)
        if candidates[key]:
            chunk = candidates[key][0]
            heapq.heappush(heap, (float(values[key][chunk].mean()), len(heap), key, 0))
    removed: dict[UnitKey, list[int]] = {key: [] for key in candidates}
    removed_params = 0
    tiebreak = len(heap)
    while heap and removed_params < target_params:
        value, _, key, position = heapq.heappop(heap)
        chunk = candidates[key][position]
        # the chunk that takes a block's last index also takes the block's own parameters (e.g. down_proj's bias)
        done = len(removed[key])
        cost = unit_of[key].removed_cost(done + len(chunk)) - unit_of[key].removed_cost(done)
        if removed_params + cost > target_params:
            # overshooting: take it only if that lands closer to the target, then stop; else let smaller
            # candidates of other unit sets fill the gap
            if removed_params + cost - target_params < target_params - removed_params:
                removed[key].extend(chunk.tolist())
                removed_params += cost
                break
            continue
        removed[key].extend(chunk.tolist())
        removed_params += cost
        if position + 1 < len(candidates[key]):
            nxt = candidates[key][position + 1]
            tiebreak += 1
            heapq.heappush(heap, (float(values[key][nxt].mean()), tiebreak, key, position + 1))
    if removed_params < target_params:  # the runner refuses this before scoring (pruner.check_reachable): a safety net
        max_removable, smallest = removal_limit(units, constraints)
        if target_params - removed_params > smallest:
            raise PrunellmError(
                f"--pruning_ratio {target_params / total_params:.4f} is unreachable under the constraints "
                f"(frozen layers, --min_kv_groups, --round_to, --units): at most "
                f"{max_removable / total_params:.4f} of the parameters can be removed"
            )
    table = []
    kept: dict[UnitKey, list[int]] = {}
    for u in units:
        key = (u.layer, u.kind)
        gone = set(removed.get(key, []))
        kept[key] = [i for i in range(u.count) if i not in gone]
        for i in range(u.count):
            table.append(
                {
                    "layer": u.layer,
                    "unit": u.kind,
                    "index": i,
                    "score": float(scores[key][i]) if key in scores else float("nan"),
                    "cost": u.cost,
                    "value": float(values[key][i]) if key in values else float("nan"),
                    "removed": i in gone,
                }
            )
    return Selection(kept=kept, removed_params=removed_params, target_params=target_params, table=table)
