"""Taylor criteria: first order |w·G|, second order with the empirical Fisher, and LLM-Pruner's mix.

The formulas are the :class:`~prunellm.calibration.GradientTerm` s below; the gradient pass (in memory or
offloaded) sums each over every unit index as gradients arrive, and the criteria combine the sums.
"""

from __future__ import annotations

from ..calibration import GradientTerm
from .registry import register

FIRST = GradientTerm("first", lambda w, mean_g, fisher: (w * mean_g).abs(), over="means")
"""Σ_e |w_e · G_e|, G the gradient averaged over the calibration micro-batches."""

SECOND = GradientTerm("second", lambda w, g: 0.5 * w.pow(2) * g.pow(2), over="batches")
"""½ Σ_e w_e² · F_e, F = mean over micro-batches of g² (the empirical Fisher diagonal)."""

MIX = GradientTerm("mix", lambda w, mean_g, fisher: (w * mean_g - 0.5 * w.pow(2) * fisher).abs(), over="means", fisher=True)
"""Σ_e |w_e G_e − ½ w_e² F_e| (LLM-Pruner's param_mix)."""


@register("taylor", {"gradients"}, "first-order Taylor: Σ|w·G| over the unit, G accumulated over calibration", gradient_terms=(FIRST,))
def taylor_first(model, units, stats, options):
    return {key: value.clone() for key, value in stats.gradient_terms["first"].items()}


@register(
    "taylor_2nd",
    {"gradients"},
    "second-order Taylor: Σ|w·G| + ½Σ w²·mean(g²) (empirical Fisher diagonal)",
    gradient_terms=(FIRST, SECOND),
)
def taylor_second(model, units, stats, options):
    first, second = stats.gradient_terms["first"], stats.gradient_terms["second"]
    return {key: first[key] + second[key] for key in first}


@register("taylor_mix", {"gradients"}, "mixed Taylor (LLM-Pruner param_mix): Σ|w·G − ½ w²·mean(g²)|", gradient_terms=(MIX,))
def taylor_mix(model, units, stats, options):
    return {key: value.clone() for key, value in stats.gradient_terms["mix"].items()}
