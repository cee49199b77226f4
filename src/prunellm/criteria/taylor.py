"""Taylor criteria: first order |w·G|, second order with the empirical Fisher, and LLM-Pruner's mix."""

from __future__ import annotations

from .registry import register


@register("taylor", {"gradients"}, "first-order Taylor: Σ|w·G| over the unit, G accumulated over calibration", {"first"})
def taylor_first(model, units, stats, options):
    return {key: value.clone() for key, value in stats.taylor_first.items()}


@register(
    "taylor_2nd",
    {"gradients"},
    "second-order Taylor: Σ|w·G| + ½Σ w²·mean(g²) (empirical Fisher diagonal)",
    {"first", "second"},
)
def taylor_second(model, units, stats, options):
    return {key: stats.taylor_first[key] + stats.taylor_second[key] for key in stats.taylor_first}


@register("taylor_mix", {"gradients"}, "mixed Taylor (LLM-Pruner param_mix): Σ|w·G − ½ w²·mean(g²)|", {"mix"})
def taylor_mix(model, units, stats, options):
    return {key: value.clone() for key, value in stats.taylor_mix.items()}
