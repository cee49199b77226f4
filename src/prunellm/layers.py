"""Layer-aware pruning: layer importance, depth pruning (remove whole layers) and per-layer rate allocation.

Layer importance comes from the registered layer criteria (``criteria/depth.py``: ``block_influence``, ``ppl``,
``taylor``, and for allocation ``removal``, ``activation``).

``iterative`` re-scores after each removal (SLEB style) for ``block_influence`` and ``ppl``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .criteria import LAYER_REGISTRY, get_layer_criterion
from .errors import PrunellmError
from .sweep import Offload
from .units import count_parameters, decoder_layers

LayerCriterion = Literal["block_influence", "ppl", "taylor", "activation", "removal"]


def check_in_memory(model: nn.Module) -> None:
    """An in-memory pass needs the weights: refuse a :func:`~prunellm.offload.load_lazy` skeleton (meta tensors)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise PrunellmError("the model's weights are on disk (a load_lazy skeleton): pass offload=prunellm.sweep.Offload(device)")


def layer_importance(model: nn.Module, input_ids: torch.Tensor, method: str, batch_size: int = 4, offload: Offload | None = None) -> list[float]:
    """One importance score per decoder layer (higher = more important), by a registered layer criterion
    (``offload``, :class:`prunellm.sweep.Offload`: the same scores with one decoder layer on the device at a time;
    needed for a :func:`~prunellm.offload.load_lazy` skeleton)."""
    criterion = get_layer_criterion(method)
    if offload is None:
        check_in_memory(model)
        return criterion.score(model, input_ids, batch_size)
    if not criterion.offloadable:
        offloadable = [name for name, c in LAYER_REGISTRY.items() if c.offloadable]
        raise PrunellmError(
            f"--layer_importance_method '{method}' scores in memory only: with --offload use one of {', '.join(offloadable)}, "
            "or leave --offload out"
        )
    return criterion.score(model, input_ids, batch_size, offload=offload)


class _LayerDropped:
    """Temporarily make some decoder layers pass their input through (for iterative re-scoring)."""

    def __init__(self, model: nn.Module, dropped: list[int]):
        self.layers = decoder_layers(model)
        self.dropped = dropped
        self.handles: list = []

    def __enter__(self):
        def identity(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        self.handles = [self.layers[i].register_forward_hook(identity, with_kwargs=True) for i in self.dropped]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def choose_layers_to_remove(
    model: nn.Module,
    input_ids: torch.Tensor,
    method: str,
    n_remove: int,
    *,
    iterative: bool = False,
    batch_size: int = 4,
    candidates: list[int] | None = None,
    offload: Offload | None = None,
) -> tuple[list[int], list[float]]:
    """The ``n_remove`` least important layers (and the first-round scores of every layer); ``offload``: scored with
    one decoder layer on the device at a time."""
    n_layers = len(decoder_layers(model))
    if not 1 <= n_remove < n_layers:
        raise PrunellmError(f"--n_remove_layers {n_remove} must be between 1 and {n_layers - 1} (the model has {n_layers} layers)")
    allowed = list(range(n_layers)) if candidates is None else candidates
    scores = layer_importance(model, input_ids, method, batch_size, offload)
    if not iterative or not get_layer_criterion(method).rescorable:
        order = sorted(allowed, key=lambda i: scores[i])
        if len(order) < n_remove:
            raise PrunellmError(f"only {len(order)} layers may be removed under the freeze flags, not {n_remove}")
        return sorted(order[:n_remove]), scores
    removed: list[int] = []
    for _ in range(n_remove):
        with _LayerDropped(model, removed):
            current = layer_importance(model, input_ids, method, batch_size, offload)
        left = [i for i in allowed if i not in removed]
        if not left:
            raise PrunellmError(f"only {len(removed)} layers may be removed under the freeze flags, not {n_remove}")
        removed.append(min(left, key=lambda i: current[i]))
    return sorted(removed), scores


def layer_params(model: nn.Module) -> list[int]:
    """Parameters of each decoder layer."""
    return [count_parameters(layer) for layer in decoder_layers(model)]


def layers_for_ratio(model: nn.Module, ratio: float, total: int) -> int:
    """Number of layers whose removal comes nearest to ``ratio`` of the total parameters."""
    per_layer = sum(layer_params(model)) / len(decoder_layers(model))
    n = max(1, round(ratio * total / per_layer))
    return min(n, len(decoder_layers(model)) - 1)


# ---------------------------------------------------------------------------------------------------------
# per-layer rate allocation

Strategy = Literal["inverse", "proportional", "uniform"]
STRATEGIES: tuple[str, ...] = ("inverse", "proportional", "uniform")


def allocate_rates(
    importance: list[float],
    prunable: list[int],
    budget: int,
    *,
    strategy: str,
    weight: float = 1.0,
    min_rate: float = 0.0,
    max_rate: float = 0.9,
    frozen: set[int] = frozenset(),
    total_params: int | None = None,
) -> list[float]:
    """Per-layer pruning rates (fraction of each layer's prunable parameters) that remove ``budget`` in total.

    ``inverse``: rate ∝ (1 / normalised importance)^weight — less important layers lose more;
    ``proportional``: rate ∝ (normalised importance)^weight; ``uniform``: one rate for all. Rates are clamped
    to [min_rate, max_rate] (frozen layers: 0) and a common scale is found by bisection. Messages give ratios of
    ``total_params`` (the model's total parameters, as ``--pruning_ratio`` does; default: the prunable ones).
    """
    if strategy not in STRATEGIES:
        raise PrunellmError(f"--pruning_strategy '{strategy}' is not valid: use one of {', '.join(STRATEGIES)}")
    if min_rate > max_rate:
        raise PrunellmError(f"--min_pruning_rate {min_rate} is larger than --max_pruning_rate {max_rate}")
    if not 0 <= min_rate <= 1 or not 0 <= max_rate <= 1:
        raise PrunellmError("--min_pruning_rate and --max_pruning_rate must lie in [0, 1]")
    n = len(importance)
    values = torch.tensor(importance, dtype=torch.float64)
    lo, hi = float(values.min()), float(values.max())
    normalised = (values - lo) / (hi - lo) if hi > lo else torch.ones(n, dtype=torch.float64)
    normalised = normalised * 0.9 + 0.1  # in [0.1, 1]: no layer gets an infinite or zero share
    if strategy == "uniform":
        shares = torch.ones(n, dtype=torch.float64)
    elif strategy == "inverse":
        shares = normalised.pow(-weight)
    else:
        shares = normalised.pow(weight)
    active = [i for i in range(n) if i not in frozen]

    def rates_for(scale: float) -> list[float]:
        return [0.0 if i in frozen else min(max(scale * float(shares[i]), min_rate), max_rate) for i in range(n)]

    def removed(scale: float) -> float:
        return sum(r * p for r, p in zip(rates_for(scale), prunable))

    reachable_low, reachable_high = removed(0.0), removed(1e12)
    if not active or not reachable_low <= budget <= reachable_high:
        total = total_params or sum(prunable)
        raise PrunellmError(
            f"--pruning_ratio {budget / total:.3f} cannot be met with --min_pruning_rate {min_rate} / --max_pruning_rate "
            f"{max_rate} and {len(frozen)} frozen layers: reachable are {reachable_low / total:.3f}–{reachable_high / total:.3f} "
            "of the total parameters"
        )
    a, b = 0.0, 1.0
    while removed(b) < budget:
        b *= 2
    for _ in range(100):
        mid = (a + b) / 2
        if removed(mid) < budget:
            a = mid
        else:
            b = mid
    return rates_for(b)


def split_layer_budget(
    removed_params: float,
    kv_cost: int,
    n_kv: int,
    mlp_cost: int,
    n_mlp: int,
    attention_share: float,
    min_kv_groups: int,
    round_to: int = 1,
) -> tuple[int, int]:
    """How many KV groups and MLP channels to remove from one layer.

    The attention share is rounded to whole KV groups; the rounding error moves to the MLP budget, which is
    rounded to whole channels (multiples of ``round_to`` in the kept width).
    """
    kv_remove = round(removed_params * attention_share / kv_cost) if kv_cost else 0
    kv_remove = max(0, min(kv_remove, n_kv - min_kv_groups))
    mlp_budget = removed_params - kv_remove * kv_cost
    mlp_remove = max(0, min(round(mlp_budget / mlp_cost), n_mlp)) if mlp_cost else 0
    if round_to > 1:
        kept = n_mlp - mlp_remove
        kept = max(round_to, int(math.floor(kept / round_to + 0.5)) * round_to)
        mlp_remove = max(0, n_mlp - kept)
    return kv_remove, mlp_remove


def _split_layer(kv, mlp, budget: float, attention_share: float | None, min_kv_groups: int, round_to: int) -> tuple[int, int, int]:
    """:func:`split_layer_budget` of one layer's units (``kv``/``mlp``: its :class:`~prunellm.units.LayerUnits` or
    ``None``): KV groups and MLP channels to remove, and the parameters that takes."""
    kv_cost, n_kv = (kv.cost, kv.count) if kv is not None and kv.count else (0, 0)
    mlp_cost, n_mlp = (mlp.cost, mlp.count) if mlp is not None and mlp.count else (0, 0)
    prunable = kv_cost * n_kv + mlp_cost * n_mlp
    share = attention_share if attention_share is not None else (kv_cost * n_kv / prunable if prunable else 0.0)
    kv_remove, mlp_remove = split_layer_budget(
        budget, kv_cost, n_kv, mlp_cost, n_mlp, share if kv_cost else 0.0, min_kv_groups, round_to
    )
    # removing a block's last index also removes its own parameters (e.g. down_proj's bias)
    got = sum(u.removed_cost(n) for u, n in ((kv, kv_remove), (mlp, mlp_remove)) if u is not None and u.count)
    return kv_remove, mlp_remove, got


def layer_removable(kv, mlp, attention_share: float | None, min_kv_groups: int, round_to: int) -> int:
    """The parameters :func:`select_layerwise` can take from one layer at most, whatever its rate (``--min_kv_groups``
    kept, an MLP kept at ``round_to`` channels or more, the attention:MLP split): its split of a budget far larger
    than the layer."""
    return _split_layer(kv, mlp, 1e18, attention_share, min_kv_groups, round_to)[2]


def parse_distribution(text: str) -> float | None:
    """``"A:M"`` -> attention share A/(A+M); ``"auto"`` -> None (each layer's own attention:MLP parameter split)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        a, m = (float(x) for x in str(text).split(":"))
    except ValueError:
        raise PrunellmError(f"--pruning_distribution '{text}' is not valid: use A:M like 1:3, or auto") from None
    if a < 0 or m < 0 or a + m == 0:
        raise PrunellmError(f"--pruning_distribution '{text}' needs non-negative parts, not both zero")
    return a / (a + m)


def select_layerwise(
    units: list,
    values: dict,
    scores: dict,
    rates: list[float],
    attention_share: float | None,
    min_kv_groups: int,
    round_to: int,
):
    """Per-layer selection: each layer removes ``rate × its prunable parameters``, lowest-value units first.

    Rounding errors are carried from layer to layer, so the total ends within one unit of the budget.
    """
    from .selection import Selection

    by_layer: dict[int, dict[str, object]] = {}
    for u in units:
        by_layer.setdefault(u.layer, {})[u.kind] = u
    kept: dict = {}
    removed_params = 0
    target = 0.0
    carry = 0.0
    for layer in sorted(by_layer):
        kv, mlp = by_layer[layer].get("kv_group"), by_layer[layer].get("mlp_channel")
        want = rates[layer] * sum(u.cost * u.count for u in (kv, mlp) if u is not None)
        target += want
        kv_remove, mlp_remove, got = _split_layer(kv, mlp, want + carry, attention_share, min_kv_groups, round_to)
        carry = want + carry - got
        removed_params += got
        for unit, n_remove in ((kv, kv_remove), (mlp, mlp_remove)):
            if unit is None or unit.count == 0:
                continue
            key = (unit.layer, unit.kind)
            order = torch.argsort(values[key], stable=True)
            gone = set(order[:n_remove].tolist())
            kept[key] = [i for i in range(unit.count) if i not in gone]
    table = [
        {"layer": u.layer, "unit": u.kind, "index": i, "score": float(scores[(u.layer, u.kind)][i]), "cost": u.cost,
         "value": float(values[(u.layer, u.kind)][i]), "removed": i not in set(kept.get((u.layer, u.kind), range(u.count)))}
        for u in units if u.count
        for i in range(u.count)
    ]  # fmt: skip
    return Selection(kept=kept, removed_params=removed_params, target_params=round(target), table=table)
