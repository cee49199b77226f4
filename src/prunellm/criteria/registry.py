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


@dataclass(frozen=True)
class PrunedInputs:
    """One output projection (o_proj or down_proj) of a layer being pruned, and what the refit measured on its input
    on the pruned model (every earlier layer already cut and refitted): the data a re-selection chooses from."""

    linear: nn.Linear
    columns: object  # the units' input-column Slice of ``linear`` (``columns.width`` columns per unit)
    count: int  # units in the layer
    total: torch.Tensor  # Σ x per input column (in,), float64
    gram: torch.Tensor  # Σ x xᵀ (in, in), float64
    tokens: int
    intercept: bool  # the refit has a free intercept (--reconstruct lstsq_bias): the bias is refitted with the columns

    def augmented_gram(self) -> torch.Tensor:
        """The Gram matrix of [x, 1] (in + 1, in + 1), the system a refit with an intercept solves."""
        top = torch.cat([self.gram, self.total[:, None]], 1)
        last = torch.cat([self.total, torch.tensor([float(self.tokens)], dtype=self.total.dtype)])
        return torch.cat([top, last[None, :]], 0)


ReselectFn = Callable[[PrunedInputs, int], list[int]]  # (inputs, how many units to keep) -> the kept indices, sorted


@dataclass(frozen=True)
class Reselection:
    """A registered re-selection (``--reconstruct_select``): during surgery, layer by layer, it keeps the plan's count
    of units but chooses which, on the pruned model's inputs; the units it applied are written back into the Plan."""

    name: str
    choose: ReselectFn
    help: str
    rescores: str | None  # the criterion whose formula it measures again: --reconstruct_select auto picks it for it
    least_squares_only: bool  # chooses for a least-squares refit: needs --reconstruct lstsq or lstsq_bias


RESELECTIONS: dict[str, Reselection] = {}


def register_reselection(name: str, help: str, rescores: str | None = None, least_squares_only: bool = False):
    """Decorator: register ``fn(inputs: PrunedInputs, keep: int) -> kept indices`` as ``--reconstruct_select name``;
    ``rescores``: the criterion whose formula it applies again (``auto`` re-selects with it when that criterion made
    the plan)."""

    def wrap(fn: ReselectFn) -> ReselectFn:
        RESELECTIONS[name] = Reselection(name, fn, help, rescores, least_squares_only)
        return fn

    return wrap


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
