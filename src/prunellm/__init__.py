"""prunellm: structured pruning, recovery and honest evaluation of Hugging Face causal LMs.

The public API (see :mod:`prunellm.api` for the walk-through)::

    load, calibrate, score, select, prune, save_pruned, load_pruned, evaluate, FineTuner, Recipe, Plan, Scores,
    export_model, and run (the whole recipe in memory: the CLI's model)

Names are imported on first use, so ``import prunellm`` stays cheap (the CLI's ``--help`` does not load torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load": "api",
    "calibrate": "api",
    "score": "api",
    "select": "api",
    "prune": "api",
    "run": "pipeline",
    "save_pruned": "api",
    "load_pruned": "api",
    "evaluate": "api",
    "Recipe": "api",
    "Scores": "api",
    "Plan": "plan",
    "FineTuner": "finetune",
    "export_model": "export",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prunellm' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
