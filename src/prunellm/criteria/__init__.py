"""Importance criteria, registered by name with what they need from calibration.

A criterion maps the model, its unit sets and :class:`~prunellm.calibration.Stats` to one float32 score per
unit index (higher = more important). It never runs its own data loop and never stores state on modules:
the runner reads ``needs`` and runs the calibration pass that provides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..calibration import Stats, UnitKey
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
    taylor_terms: frozenset[str]  # which gradient terms the gradient pass must produce
    score: ScoreFn
    help: str


REGISTRY: dict[str, Criterion] = {}


def register(name: str, needs: set[Need], help: str, taylor_terms: set[str] = frozenset()):
    """Decorator: register a score function under ``name``."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        REGISTRY[name] = Criterion(name, frozenset(needs), frozenset(taylor_terms), fn, help)
        return fn

    return wrap


def get_criterion(name: str, flag: str = "--importance_method") -> Criterion:
    """Look a criterion up by name; an unknown name lists the valid ones."""
    if name not in REGISTRY:
        raise PrunellmError(f"{flag} '{name}' is not a criterion: use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


from . import magnitude, random_, taylor, wanda  # noqa: E402,F401  (registration side effect)

CRITERIA: tuple[str, ...] = tuple(REGISTRY)
