"""The in-memory public API: one call per stage, no files unless asked.

``load → calibrate → score → select (Plan) → prune → save_pruned → evaluate``::

    import prunellm as pl

    model, tokenizer = pl.load("smollm2-135m")
    ids = pl.calibrate(tokenizer, "shakespeare", num_samples=32, seq_len=128)
    scores = pl.score(model, ids, criterion="fluctuation", units=("mlp_channel",))  # the CLI default, less its prior
    plan = pl.select(model, scores, ratio=0.2, normalization="uniform")
    pl.prune(model, plan, calibration=pl.calibrate(tokenizer, "shakespeare", 64, 128, seed=45), reconstruct="lstsq_bias")
    pl.save_pruned(model, tokenizer, "out/model", plan)
    results = pl.evaluate(model, tokenizer, metrics="ppl", ppl_max_windows=16)

The CLI (``prunellm prune``) runs the same stages from a :class:`Recipe` and owns files, logs and printing;
:func:`prunellm.run` (:mod:`prunellm.pipeline`) is that composition in memory (the CLI's defaults and model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from .calibration import Stats, UnitKey, collect_gradient_stats
from .criteria import CriterionOptions, get_criterion
from .data import sample_calibration, tensor_hash
from .errors import PrunellmError
from .models import DType, load_model, load_tokenizer
from .offload import activation_stats, is_lazy, offloaded_stats
from .options import EvalOptions, PruneRecipe
from .plan import LayerPlan, Plan, package_versions
from .selection import Normalization, SelectionConstraints, normalized_values, select_global
from .specs import spec_for
from .units import UNIT_KINDS, LayerUnits, all_units, count_parameters, decoder_layers

Recipe = PruneRecipe
"""What to prune and how: the typed recipe the CLI is generated from (``prunellm prune --help``)."""

__all__ = [
    "Recipe",
    "Scores",
    "calibrate",
    "evaluate",
    "load",
    "load_pruned",
    "prune",
    "save_pruned",
    "score",
    "select",
]


@dataclass
class Scores:
    """Per-index importance of every unit set that may be pruned, and how it was measured."""

    units: list[LayerUnits]
    scores: dict[UnitKey, torch.Tensor]  # (layer, kind) -> (count,) float32 importance, higher = keep
    criterion: str
    calibration: dict[str, Any] = field(default_factory=dict)  # needs, num_samples, seq_len, hash, seconds
    stats: Stats | None = None


def load(model: str = "smollm2-135m", *, dtype: DType = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        model: ``smollm2-135m`` (the embedded model, no hub needed), a local model or results folder, or a hub id.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (accelerate's ``device_map="auto"``).
    """
    return load_model(model, dtype=dtype, device=device), load_tokenizer(model)


def calibrate(
    tokenizer: Any, dataset: str = "shakespeare", num_samples: int = 32, seq_len: int = 128, *, seed: int = 42
) -> torch.Tensor:
    """``(num_samples, seq_len)`` token windows drawn at random from the train part of ``dataset`` (never its
    evaluation part). ``dataset``: ``shakespeare``, ``wikitext2``, ``ptb``, ``c4``, a local file/folder or ``a+b``."""
    return sample_calibration(tokenizer, dataset, num_samples, seq_len, seed)


def _unit_sets(model: nn.Module, units: Sequence[str], layers: Sequence[int] | None) -> list[LayerUnits]:
    bad = [k for k in units if k not in UNIT_KINDS]
    if bad or not units:
        raise PrunellmError(f"units {list(units)} is not valid: use a non-empty subset of {', '.join(UNIT_KINDS)}")
    spec_for(model.config)  # refuse unknown families before any work
    n_layers = len(decoder_layers(model))
    chosen = set(range(n_layers)) if layers is None else set(layers)
    if not chosen or not chosen <= set(range(n_layers)):
        raise PrunellmError(f"layers {sorted(chosen)} is not valid: use indices in 0..{n_layers - 1}")
    return [u for u in all_units(model, tuple(units)) if u.layer in chosen]


def collect_stats(
    model: nn.Module,
    calibration: torch.Tensor | None,
    units: list[LayerUnits],
    criterion: str,
    *,
    batch_size: int = 4,
    gradient_checkpointing: bool = False,
) -> Stats:
    """The one calibration pass ``criterion`` needs (gradients, activations or none)."""
    needs = get_criterion(criterion).needs
    if needs & {"gradients", "activations"} and calibration is None:
        raise PrunellmError(f"criterion '{criterion}' needs calibration windows: pass calibration=calibrate(tokenizer, ...)")
    if "gradients" in needs:
        return collect_gradient_stats(
            model, calibration, units, terms=get_criterion(criterion).gradient_terms,
            batch_size=batch_size, gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
    if "activations" in needs:
        grams = "gram" in get_criterion(criterion).activation_terms
        return activation_stats(model, calibration, units, batch_size=batch_size, grams=grams)
    return Stats()


def score(
    model: nn.Module,
    calibration: torch.Tensor | None,
    criterion: str = "taylor",
    *,
    units: Sequence[str] = ("kv_group", "mlp_channel"),
    layers: Sequence[int] | None = None,
    batch_size: int = 4,
    seed: int = 42,
    magnitude_norm: Literal["l1", "l2"] = "l2",
    gradient_checkpointing: bool = False,
    offload: bool = False,
    device: str = "cpu",
    offload_dir: str | Path | None = None,
) -> Scores:
    """Score every index of every unit set of the chosen layers.

    Args:
        calibration: token windows from :func:`calibrate` (``None`` for weight-only criteria).
        criterion: a registered criterion (``taylor``, ``taylor_2nd``, ``taylor_mix``, ``magnitude``, ``wanda``,
            ``random`` …).
        units: unit kinds that may be pruned.
        layers: decoder layers that may be pruned (default: all).
        batch_size: calibration windows per forward(+backward) pass.
        offload: one decoder layer on ``device`` at a time (:mod:`prunellm.offload`; the same scores, exact Taylor
            gradients), for a model in host memory or one from ``prunellm.offload.load_lazy`` (always offloaded).
        device: the compute device of the offloaded pass (``cpu``, ``cuda``, ``cuda:N``).
        offload_dir: keep the offloaded pass's per-layer hidden states in this folder instead of memory.
    """
    crit = get_criterion(criterion, flag="criterion")
    unit_sets = _unit_sets(model, units, layers)
    info: dict[str, Any] = {"needs": sorted(crit.needs)}
    if calibration is not None and crit.needs & {"gradients", "activations"}:
        info.update(num_samples=int(calibration.shape[0]), seq_len=int(calibration.shape[1]), hash=tensor_hash(calibration))
    started = time.perf_counter()
    options = CriterionOptions(seed=seed, magnitude_norm=magnitude_norm)
    if offload or is_lazy(model):
        values, stats = offloaded_stats(
            model, calibration, unit_sets, criterion, device=device, batch_size=batch_size, offload_dir=offload_dir,
            options=options,
        )  # fmt: skip
    else:
        stats = collect_stats(
            model, calibration, unit_sets, criterion, batch_size=batch_size, gradient_checkpointing=gradient_checkpointing
        )
        values = crit.score(model, unit_sets, stats, options)
    info["scoring_seconds"] = round(time.perf_counter() - started, 3)
    return Scores(units=unit_sets, scores=values, criterion=criterion, calibration=info, stats=stats)


def plan_from_kept(
    model: nn.Module, kept: dict[UnitKey, list[int]], *, criterion: str, target_ratio: float | None, removed_params: int,
    recipe: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None, seed: int = 0,
    base_model: str = "", reconstruction: dict[str, Any] | None = None,
) -> Plan:
    """A complete global-pruning Plan: kept indices of every original layer (``None`` where a kind was not considered)."""
    total = count_parameters(model)
    layers = [
        LayerPlan(kv_groups=kept.get((index, "kv_group")), mlp_channels=kept.get((index, "mlp_channel")))
        for index in range(len(decoder_layers(model)))
    ]
    return Plan(
        base_model=base_model or str(getattr(model.config, "_name_or_path", "") or ""),
        method="global", criterion=criterion, target_ratio=target_ratio, params_before=total,
        params_after=total - removed_params, layers=layers, recipe=recipe or {}, calibration=calibration or {},
        seed=seed, versions=package_versions(), reconstruction=reconstruction or {"mode": "none"},
    )  # fmt: skip


def select(
    model: nn.Module,
    scores: Scores,
    ratio: float,
    *,
    normalization: Normalization = "block",
    min_kv_groups: int = 1,
    round_to: int = 1,
    priors: dict[UnitKey, float] | None = None,
) -> Plan:
    """Rank every index by importance per parameter across the whole model and keep the best, removing
    ``ratio`` of the model's TOTAL parameters (embeddings included, never pruned); within one unit of the target."""
    if not 0.0 < ratio < 1.0:
        raise PrunellmError(f"ratio {ratio} is not valid: use a fraction of the total parameters strictly between 0 and 1")
    total = count_parameters(model)
    values = normalized_values(scores.units, scores.scores, normalization, priors)
    constraints = SelectionConstraints(min_kv_groups=min_kv_groups, round_to=round_to)
    selection = select_global(scores.units, values, scores.scores, round(ratio * total), constraints, total)
    return plan_from_kept(
        model, selection.kept, criterion=scores.criterion, target_ratio=ratio, removed_params=selection.removed_params,
        calibration=scores.calibration,
    )  # fmt: skip


def prune(
    model: nn.Module,
    plan: Plan,
    *,
    calibration: torch.Tensor | None = None,
    reconstruct: Literal["none", "bias", "lstsq", "lstsq_bias"] = "none",
    damp: float | Literal["auto"] = "auto",
    batch_size: int = 8,
    target: Literal["pruned", "dense", "residual"] = "pruned",
    select: Literal["plan", "fluctuation", "obs"] = "plan",
) -> dict[str, Any]:
    """Apply ``plan`` to ``model`` in place: slice the weights (layer by layer, compensating o_proj/down_proj by
    ``reconstruct`` on ``calibration`` windows), then drop the plan's removed layers. Returns the reconstruction
    report; the model's parameter count then equals the plan's plus the report's ``added_params`` (biases that
    compensation adds where the family builds none). ``target`` is what each refit preserves (pruned, dense or
    residual: see :mod:`prunellm.reconstruction`). ``select="fluctuation"`` keeps the plan's count of units per
    layer but chooses them by fluctuation on each layer's pruned-model inputs (re-scored in sequence: the CLI's
    default with the fluctuation criterion), ``select="obs"`` by greedy OBS on those inputs (lstsq modes); ``plan``
    is then updated in place to the units applied, so replaying it gives the same model. A plan made in rounds
    (``--iterative_steps``) is applied round by round, each with its own reconstruction."""
    from .reconstruction import prune_plan_rounds
    from .surgery import remove_layers

    if reconstruct != "none" and calibration is None:
        raise PrunellmError(f"reconstruct='{reconstruct}' needs calibration windows: pass calibration=calibrate(...)")
    report = prune_plan_rounds(model, plan, calibration, reconstruct, damp, batch_size, target=target, select=select)
    remove_layers(model, plan.removed_layers)
    return {"mode": reconstruct, "added_params": report.added_params, "layers": report.layers}


def save_pruned(model: nn.Module, tokenizer: Any, path: str | Path, plan: Plan | None = None) -> Path:
    """Write a checkpoint any Hugging Face tool loads (per-layer widths in config.json, with the modeling file
    when widths vary), atomically; ``plan.json`` beside it when a plan is given."""
    from .checkpoint import save_model

    out = save_model(model, tokenizer, path)
    if plan is not None:
        plan.save(out / "plan.json")
    return out


def load_pruned(path: str | Path, *, dtype: DType = "float32", device: str = "cpu") -> tuple[nn.Module, Any | None]:
    """Load a checkpoint written by :func:`save_pruned`, ``prunellm prune`` or ``prunellm finetune`` (its model
    folder or the results folder holding ``model/``): always ``(model, tokenizer)``, the tokenizer ``None`` when the
    folder has none."""
    from .checkpoint import load_checkpoint
    from .models import resolve_model_path

    path = Path(resolve_model_path(str(path), flag="path"))
    model = load_checkpoint(path, dtype=dtype, device=device)
    has_tokenizer = any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    return model, (load_tokenizer(str(path), flag="path") if has_tokenizer else None)


def evaluate(model: nn.Module, tokenizer: Any, options: EvalOptions | None = None, **fields: Any) -> dict[str, Any]:
    """Evaluate in memory; returns the results document (``evaluation_results.json`` schema).

    ``options`` or keyword fields of :class:`prunellm.options.EvalOptions` (``metrics="ppl,speed"``,
    ``ppl_datasets``, ``ppl_protocols``, ``ppl_max_windows`` …) choose what is measured."""
    from .evaluation import evaluate as run_evaluation

    options = EvalOptions(**{**(options or EvalOptions()).model_dump(), **fields})  # validates the fields
    name = str(getattr(model.config, "_name_or_path", "") or "in-memory")
    return run_evaluation(model, tokenizer, options, model_path=name, progress=False)

