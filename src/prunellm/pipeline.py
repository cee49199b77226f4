"""The whole pruning recipe in memory: ``prunellm.run(recipe, model, tokenizer)`` gives the model ``prunellm prune``
gives, by the same code (:mod:`prunellm.pruner`'s steps), without its files, logs and printing::

    import prunellm as pl

    model, tokenizer = pl.load("smollm2-135m")
    model, plan = pl.run(pl.Recipe(base_model="smollm2-135m", pruning_ratio=0.2), model, tokenizer)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PrunellmError
from .models import check_context, load_model, load_tokenizer
from .options import PruneRecipe, RunOptions
from .plan import Plan
from .pruner import WidthPruning, check_prune_recipe, prune_loaded

__all__ = ["run"]


def run(
    recipe: PruneRecipe | None = None, model: nn.Module | None = None, tokenizer: Any = None, *,
    options: RunOptions | None = None, **fields: Any,
) -> tuple[nn.Module, Plan]:  # fmt: skip
    """Prune with a whole recipe in memory, exactly as ``prunellm prune`` does: the recipe's defaults (criterion,
    units, normalisation, priors, rounds, refit), the same checks, the same code, the same weights.

    Args:
        recipe: what to run (default ``prunellm.Recipe()``, the CLI's defaults); ``fields`` change options of it by flag name
            (``pruning_ratio=0.3``, ``importance_method="wanda"``).
        model: the model to prune in place (default: ``recipe.base_model`` loaded with ``options``' dtype/device).
        tokenizer: its tokenizer (default: ``recipe.base_model``'s).
        options: seed, device and dtype (:class:`~prunellm.options.RunOptions`; output folders are not used:
            nothing is written, and ``--offload``, which streams the checkpoint's files, is the CLI's).

    Returns:
        ``(model, plan)``: the pruned model and the Plan it was pruned by (``plan.params_after`` is its count).
    """
    recipe = (recipe or PruneRecipe()).replace(**fields) if fields else (recipe or PruneRecipe())
    options = options or RunOptions()
    if options.offload:
        raise PrunellmError("prunellm.run prunes a model in memory: --offload streams a checkpoint's files; use prunellm prune --offload")
    check_prune_recipe(recipe)
    if model is None:
        model = load_model(recipe.base_model, dtype=options.dtype, device=options.device)
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe.base_model)
    workflow = WidthPruning(recipe, options)
    check_context(model, **workflow.context_lengths())
    workflow.check_model(model)
    torch.manual_seed(options.seed)  # as the CLI seeds before any work
    with tempfile.TemporaryDirectory(prefix="prunellm-run-") as out:  # the priors' files, not kept
        plan, _, _ = prune_loaded(workflow, model, tokenizer, Path(out))
    return model, plan

