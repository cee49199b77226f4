"""The criterion registry: what a criterion is and how it is looked up (apart from the criteria, so that each
criterion file imports only this and the registry imports none of them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..calibration import GradientTerm, Stats, UnitKey
from ..errors import PrunellmError
from ..units import LayerUnits

Need = Literal["weights", "activations", "gradients"]
ScoreFn = Callable[[nn.Module, list[LayerUnits], Stats, "CriterionOptions"], dict[UnitKey, torch.Tensor]]


@dataclass(frozen=True)
class CriterionOptions:
    """Knobs some criteria read."""

    seed: int = 0
    magnitude_norm: Literal["l1", "l2"] = "l2"


@dataclass(frozen=True)
class Criterion:
    """A registered criterion."""

    name: str
    needs: frozenset[Need]
    gradient_terms: tuple[GradientTerm, ...]  # what the gradient pass sums per unit index (formulas in the criterion)
    score: ScoreFn
    help: str
    activation_terms: frozenset[str] = frozenset()  # "gram": the activation pass also collects XᵀX of o/down inputs


REGISTRY: dict[str, Criterion] = {}

SliceScoreFn = Callable[[LayerUnits, object, nn.Linear], "torch.Tensor | None"]


def sum_over_slices(model: nn.Module, units: list[LayerUnits], slice_score: SliceScoreFn) -> dict[UnitKey, torch.Tensor]:
    """Per-unit scores as the sum over each unit's slices of ``slice_score(unit, slice, linear)`` — a ``(count,)``
    tensor for that slice, or ``None`` to skip it — the loop every slice-wise criterion shares (float32, no grad)."""
    from ..units import decoder_layers, get_module

    layers = decoder_layers(model)
    scores = {}
    with torch.no_grad():
        for unit in units:
            total = torch.zeros(unit.count)
            for s in unit.slices:
                part = slice_score(unit, s, get_module(layers[unit.layer], s.module))
                if part is not None:
                    total += part.cpu()
            scores[(unit.layer, unit.kind)] = total
    return scores


def register(
    name: str, needs: set[Need], help: str, *, gradient_terms: tuple[GradientTerm, ...] = (),
    activation_terms: set[str] = frozenset(),
):  # fmt: skip
    """Decorator: register a score function under ``name``; a gradient criterion declares the
    :class:`~prunellm.calibration.GradientTerm` s (its formulas) that it reads from ``stats.gradient_terms``."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        if "gradients" in needs and not gradient_terms:
            raise ValueError(f"criterion '{name}' needs gradients: declare the gradient_terms it reads")
        REGISTRY[name] = Criterion(name, frozenset(needs), tuple(gradient_terms), fn, help, frozenset(activation_terms))
        return fn

    return wrap


def get_criterion(name: str, flag: str = "--importance_method") -> Criterion:
    """Look a criterion up by name; an unknown name lists the valid ones."""
    if name not in REGISTRY:
        raise PrunellmError(f"{flag} '{name}' is not a criterion: use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


LayerScoreFn = Callable[..., list[float]]  # (model, input_ids, batch_size[, offload]) -> one float per layer


@dataclass(frozen=True)
class LayerCriterion:
    """A registered layer (depth) criterion: one importance per decoder layer from calibration windows."""

    name: str
    score: LayerScoreFn  # (model, input_ids, batch_size[, offload]) -> one float per layer, higher = more important
    help: str
    rescorable: bool  # meaningful to re-score after each removal (--iterative)
    offloadable: bool = False  # takes offload= (an Offload): scores with one decoder layer on the device at a time


LAYER_REGISTRY: dict[str, LayerCriterion] = {}


def register_layer(name: str, help: str, rescorable: bool = True, offloadable: bool = False):
    """Decorator: register a layer criterion under ``name`` (``prunellm layers --layer_importance_method``);
    ``offloadable``: its function takes ``offload`` (:class:`~prunellm.offload.Offload` or ``None``), so that
    ``--offload`` runs may use it."""

    def wrap(fn: LayerScoreFn) -> LayerScoreFn:
        LAYER_REGISTRY[name] = LayerCriterion(name, fn, help, rescorable, offloadable)
        return fn

    return wrap


def get_layer_criterion(name: str, flag: str = "--layer_importance_method") -> LayerCriterion:
    """Look a layer criterion up by name; an unknown name lists the valid ones."""
    if name not in LAYER_REGISTRY:
        raise PrunellmError(f"{flag} '{name}' is not valid: use one of {', '.join(LAYER_REGISTRY)}")
    return LAYER_REGISTRY[name]
