"""Importance criteria, registered by name with what they need from calibration.

A criterion maps the model, its unit sets and :class:`~prunellm.calibration.Stats` to one float32 score per
unit index (higher = more important). It never runs its own data loop and never stores state on modules:
the runner reads ``needs`` and runs the calibration pass that provides it. A new criterion is one file here
that decorates its score function with :func:`register` (a layer criterion: :func:`register_layer`) and one
line below.
"""

from __future__ import annotations

from . import depth, fluctuation, magnitude, obs, random_, taylor, wanda  # noqa: F401  (registration side effect)
from .registry import (
    LAYER_REGISTRY,
    REGISTRY,
    RESELECTIONS,
    Criterion,
    CriterionOptions,
    LayerCriterion,
    Need,
    ScoreFn,
    PrunedInputs,
    Reselection,
    get_criterion,
    get_layer_criterion,
    register,
    register_layer,
    register_reselection,
)

__all__ = [
    "CRITERIA", "LAYER_REGISTRY", "REGISTRY", "RESELECTIONS", "Criterion", "PrunedInputs", "Reselection", "CriterionOptions", "LayerCriterion", "Need", "ScoreFn",
    "get_criterion", "get_layer_criterion", "register", "register_layer", "register_reselection",
]  # fmt: skip

CRITERIA: tuple[str, ...] = tuple(REGISTRY)
