"""Global structured pruning, top to bottom.

``load → units → calibrate → score → (priors) → select (Plan) → surgery → save → evaluate → report``.
Score, plan and surgery stay separate steps with the Plan in the middle, so a plan can be replayed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .analysis import analyze_model, compare_models, format_layer_table, write_analysis
from .api import collect_stats as api_collect_stats
from .calibration import Stats, UnitKey
from .checkpoint import save_model
from .criteria import CriterionOptions, get_criterion
from .data import describe_source, sample_calibration, tensor_hash
from .dtypes import torch_dtype
from .errors import PrunellmError
from .evaluation import evaluate, save_results
from .models import check_context, load_model, load_tokenizer
from .offload import load_lazy, offloaded_stats
from .layers import (
    allocate_rates,
    choose_layers_to_remove,
    layer_importance,
    layer_params,
    layer_removable,
    layers_for_ratio,
    parse_distribution,
    select_layerwise,
)
from .options import (
    AllocationOptions,
    BudgetOptions,
    CalibrationOptions,
    EvalOptions,
    FinetuneOptions,
    LayersRecipe,
    LoraOptions,
    PriorOptions,
    PruneRecipe,
    ReconstructionOptions,
    RunOptions,
    ScoringOptions,
    SelectionOptions,
    TrackingOptions,
    split_list,
)
from .paths import atomic_dir, check_output, write_json_atomic
from .plan import LayerPlan, Plan, RoundPlan, compose_rounds, kept_units_of, package_versions
from .priors import ablation_deltas, ablation_deltas_of, prior_multipliers, prior_spread, resolve_tau, resolve_temperature
from .selection import SelectionConstraints, normalized_values, removal_limit, select_global
from .specs import spec_for
from .sweep import IN_PLACE, Offload
from .reconstruction import SOLVER, added_bias_params, check_reselection, projection_biases, prune_plan_rounds, resolve_select
from .runs import StageClock, log_to_file, stage, write_command
from .surgery import remove_layers
from .units import UNIT_KINDS, LayerUnits, all_units, count_parameters, decoder_layers

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What a pruning run produced."""

    output_dir: Path
    plan: Plan
    model: nn.Module
    tokenizer: Any
    evaluation: dict[str, Any] = field(default_factory=dict)  # "base" / "pruned" -> results document
    timings: dict[str, Any] = field(default_factory=dict)  # prune_seconds, and logs/timings.json: seconds per stage


def default_output_name(recipe: PruneRecipe) -> str:
    """``<model>_<criterion>_p<ratio>`` when ``--output_name`` is not given."""
    model = Path(recipe.base_model).name or "model"
    return f"{model}_{recipe.scoring.importance_method}_p{round(recipe.budget.pruning_ratio * 100)}"


def check_output_dir(run: RunOptions, name: str, inputs: tuple[tuple[str, str | None], ...] = ()) -> Path:
    """The run folder, checked before any work by :func:`prunellm.paths.check_output` (the rule of every command):
    an existing non-empty one is refused unless ``--overwrite``; one that is, holds or sits inside an input
    (``(flag, path)`` pairs) always; so is one that cannot be written or that another live run is writing."""
    return check_output(Path(run.output_dir) / name, "--output_name", run.overwrite, inputs=inputs, value=name)


def eligible_layers(budget: BudgetOptions, num_layers: int) -> list[int]:
    """Layers that may be pruned under the layer range and the freeze flags."""
    end = num_layers if budget.layer_end is None else budget.layer_end
    if not 0 <= budget.layer_start < end <= num_layers:
        given = f"{budget.layer_end}" if budget.layer_end is not None else f"{num_layers} (the default: all)"
        raise PrunellmError(
            f"--layer_start {budget.layer_start} / --layer_end {given} is not a layer range of this model: it has "
            f"{num_layers} layers, so give 0 <= --layer_start < --layer_end <= {num_layers}"
        )
    first, last = budget.freeze_first_n_layers, num_layers - budget.freeze_last_n_layers
    layers = [i for i in range(budget.layer_start, end) if first <= i < last]
    if not layers:
        raise PrunellmError("--freeze_first_n_layers/--freeze_last_n_layers leave no layer that may be pruned")
    return layers


def unit_kinds(budget: BudgetOptions) -> tuple[str, ...]:
    """Validated ``--units``."""
    kinds = tuple(split_list(budget.units))
    bad = [k for k in kinds if k not in UNIT_KINDS]
    if bad or not kinds:
        raise PrunellmError(f"--units '{budget.units}' is not valid: use a comma-separated subset of {', '.join(UNIT_KINDS)}")
    return kinds


def check_deploy_target(selection: SelectionOptions, allocation: AllocationOptions, model: nn.Module | None = None) -> None:
    """Refuse flags (and, given ``model``, a model) the ``--deploy_target`` cannot serve: ``vllm`` serves whole attention
    blocks only, which per-layer rates do not keep, and runs only the head sizes of its attention kernel."""
    from .export.targets import deploy_target
    from .units import head_dim

    target = deploy_target(selection.deploy_target)
    if target.whole_attention and allocation.allocation == "layerwise":
        raise PrunellmError(
            f"--deploy_target {target.name} needs --allocation global (layerwise rates remove single KV groups, which vLLM cannot serve)"
        )
    if model is not None and target.head_dims is not None:
        d_h = head_dim(model.config, spec_for(model.config))
        if d_h not in target.head_dims:
            raise PrunellmError(
                f"--deploy_target {target.name}: this model's head_dim {d_h} is not one vLLM-CPU's attention runs "
                f"({', '.join(map(str, target.head_dims))}); pruning keeps it, so serve it elsewhere (--deploy_target llamacpp:f16, then "
                "prunellm export --format gguf)"
            )


@dataclass(frozen=True)
class Reach:
    """What selection can remove from a model under the flags, from its shapes alone (no calibration text read)."""

    total: int  # the model's parameters, embeddings included
    most: int  # parameters removed at most (every unit the flags allow)
    limit: int  # the largest target selection accepts: ``most`` plus what it may stop short of a target by
    least: int = 0  # parameters removed at least (layerwise: --min_pruning_rate of every pruned layer)


def frozen_for_allocation(units: list[LayerUnits], n_layers: int, allocation: AllocationOptions) -> set[int]:
    """Layers that per-layer allocation gives rate 0: those without eligible units and the top ``--freeze_top_n_layers``."""
    eligible = {u.layer for u in units}
    return {i for i in range(n_layers) if i not in eligible or i >= n_layers - allocation.freeze_top_n_layers}


def prunable_per_layer(units: list[LayerUnits], n_layers: int) -> list[int]:
    """Parameters of each layer's eligible units (blocks' own included), which per-layer rates are fractions of."""
    prunable = [0] * n_layers
    for u in units:
        prunable[u.layer] += u.removed_cost(u.count)
    return prunable


def reach_of(model: nn.Module, budget: BudgetOptions, selection: SelectionOptions, allocation: AllocationOptions) -> Reach:
    """:class:`Reach` of ``model`` under the layer range, freeze flags, ``--units``, the selection constraints and, for
    ``--allocation layerwise``, the per-layer rate limits (the unit costs of :mod:`prunellm.units`, no scores)."""
    n_layers = len(decoder_layers(model))
    layers = set(eligible_layers(budget, n_layers))
    units = [u for u in all_units(model, unit_kinds(budget)) if u.layer in layers and u.count]
    total = count_parameters(model)
    constraints = selection_constraints(selection)
    if allocation.allocation == "global":
        most, slack = removal_limit(units, constraints)
        return Reach(total, most, most + slack)
    frozen = frozen_for_allocation(units, n_layers, allocation)
    prunable = prunable_per_layer(units, n_layers)
    active = [i for i in range(n_layers) if i not in frozen]
    share = parse_distribution(allocation.pruning_distribution)
    by_layer: dict[int, dict[str, LayerUnits]] = {}
    for u in units:
        by_layer.setdefault(u.layer, {})[u.kind] = u
    by_rate = sum(allocation.max_pruning_rate * prunable[i] for i in active)  # allocate_rates' bound, exactly
    by_units = sum(
        layer_removable(by_layer[i].get("kv_group"), by_layer[i].get("mlp_channel"), share, constraints.min_kv_groups, constraints.round_to)
        for i in active if i in by_layer
    )  # fmt: skip
    slack = min((u.cost for u in units if u.layer in active), default=0)  # select_layerwise ends within one unit
    return Reach(
        total, int(min(by_rate, by_units)), int(min(by_rate, by_units + slack)),
        math.ceil(sum(allocation.min_pruning_rate * prunable[i] for i in active)),
    )  # fmt: skip


def _relaxations(
    budget: BudgetOptions, selection: SelectionOptions, allocation: AllocationOptions, n_layers: int
) -> list[tuple[str, BudgetOptions, SelectionOptions, AllocationOptions]]:
    """The flags that could let selection remove more, each with the option groups it changes."""
    out = []
    if set(unit_kinds(budget)) != set(UNIT_KINDS):
        out.append((f"--units {','.join(UNIT_KINDS)}", budget.model_copy(update={"units": ",".join(UNIT_KINDS)}), selection, allocation))
    frozen = [f"--{flag} 0" for flag in ("freeze_first_n_layers", "freeze_last_n_layers") if getattr(budget, flag)]
    if frozen:
        changed = budget.model_copy(update={"freeze_first_n_layers": 0, "freeze_last_n_layers": 0})
        out.append((f"fewer frozen layers ({' '.join(frozen)})", changed, selection, allocation))
    if budget.layer_start or budget.layer_end not in (None, n_layers):
        changed = budget.model_copy(update={"layer_start": 0, "layer_end": None})
        out.append((f"the whole layer range (--layer_start 0 --layer_end {n_layers})", changed, selection, allocation))
    if selection.min_kv_groups:
        out.append(("--min_kv_groups 0", budget, selection.model_copy(update={"min_kv_groups": 0}), allocation))
    if selection.deploy_target != "any":
        out.append(("--deploy_target any", budget, selection.model_copy(update={"deploy_target": "any"}), allocation))
    if allocation.allocation == "layerwise":
        if selection.round_to > 1:
            out.append(("--round_to 1", budget, selection.model_copy(update={"round_to": 1}), allocation))
        if allocation.max_pruning_rate < 1:
            out.append(("--max_pruning_rate 1", budget, selection, allocation.model_copy(update={"max_pruning_rate": 1.0})))
        if allocation.freeze_top_n_layers:
            out.append(("--freeze_top_n_layers 0", budget, selection, allocation.model_copy(update={"freeze_top_n_layers": 0})))
        if parse_distribution(allocation.pruning_distribution) is not None:
            out.append(("--pruning_distribution auto", budget, selection, allocation.model_copy(update={"pruning_distribution": "auto"})))
        out.append(("--allocation global", budget, selection, allocation.model_copy(update={"allocation": "global"})))
    return out


def check_reachable(
    model: nn.Module, budget: BudgetOptions, selection: SelectionOptions, allocation: AllocationOptions, rounds: int = 1
) -> Reach:
    """Refuse, from the model's shapes alone and so before any calibration text is read, a ``--pruning_ratio`` that
    removing every unit the flags allow cannot reach (naming the most that can go and the flags that would allow
    more), or, layerwise, one below what ``--min_pruning_rate`` removes in the first of ``rounds``. Also refuses a bad
    layer range or freeze flags (:func:`eligible_layers`). Returns the :class:`Reach` of one round."""
    check_deploy_target(selection, allocation, model)
    reach = reach_of(model, budget, selection, allocation)
    ratio, total = budget.pruning_ratio, reach.total
    if round(ratio * total) > reach.limit:
        n_layers = len(decoder_layers(model))
        raises = []
        for flag, *groups in _relaxations(budget, selection, allocation, n_layers):
            more = reach_of(model, *groups).most
            if more > reach.most:
                raises.append(f"{flag} (up to {more / total:.4f})")
        fix = (f"more can go with {', '.join(raises)}; or lower --pruning_ratio" if raises
               else "width pruning keeps the rest (embeddings, norms, LM head): lower --pruning_ratio, or remove whole "
                    "layers with prunellm layers")  # fmt: skip
        where = [f"--units {budget.units}", f"{len(eligible_layers(budget, n_layers))} of {n_layers} layers"]
        if "kv_group" in unit_kinds(budget):
            where.append(f"--min_kv_groups {selection.min_kv_groups}")
        if allocation.allocation == "layerwise":
            where.append(f"--max_pruning_rate {allocation.max_pruning_rate:g} a layer")
        if selection.deploy_target != "any":
            where.append(f"--deploy_target {selection.deploy_target}")
        raise PrunellmError(
            f"--pruning_ratio {ratio:g} is out of reach: removing every unit these flags allow ({', '.join(where)}) takes at most "
            f"{reach.most / total:.4f} of all {total:,} parameters, embeddings included; {fix}"
        )
    first = round_goals(ratio, rounds, total)[0]
    if first < reach.least:
        step = f" in {rounds} rounds (--iterative_steps) takes {first / total:.4f} a round, which" if rounds > 1 else ""
        fewer = " or fewer --iterative_steps" if rounds > 1 else ""
        raise PrunellmError(
            f"--pruning_ratio {ratio:g}{step} is below the {reach.least / total:.4f} of all parameters that "
            f"--min_pruning_rate {allocation.min_pruning_rate:g} removes from every pruned layer: lower --min_pruning_rate{fewer}"
        )
    return reach


def collect_stats(
    model: nn.Module, ids: torch.Tensor | None, units: list[LayerUnits], scoring: ScoringOptions, calibration: CalibrationOptions
) -> Stats:
    """Run the one calibration pass the criterion needs."""
    return api_collect_stats(
        model, ids, units, scoring.importance_method, batch_size=calibration.gradient_batch_size,
        gradient_checkpointing=calibration.use_gradient_checkpointing,
    )  # fmt: skip


def check_offload(run: RunOptions, evaluate_what: list[str], finetune: FinetuneOptions | None, iterative_steps: int | str = 1) -> None:
    """``--offload`` streams the model layer by layer: refuse, before any work, the steps that still need it whole."""
    refuse_whole_model_steps(run, {
        "--run_evaluation/--metrics": bool(evaluate_what),
        "--finetune": finetune is not None and finetune.finetune,
        "--iterative_steps > 1": iterative_steps != "auto" and iterative_steps > 1,
    })  # fmt: skip


def refuse_whole_model_steps(run: RunOptions, whole: dict[str, bool]) -> None:
    """With ``--offload``, refuse ``--device auto`` and the steps of ``whole`` (flag -> asked) that load the model whole."""
    if not run.offload:
        return
    if run.device == "auto":
        raise PrunellmError("--offload runs one layer at a time on one device: use --device cpu, cuda or cuda:N, not auto")
    needing = [flag for flag, asked in whole.items() if asked]
    if needing:
        raise PrunellmError(
            f"--offload streams the model one layer at a time, but {', '.join(needing)} still load it whole: leave "
            "them out (evaluate or fine-tune the saved, smaller pruned model with prunellm eval / finetune) or run "
            "without --offload"
        )


def run_offload(run: RunOptions) -> Offload | None:
    """How ``--offload`` runs the forward passes of priors and layer criteria (``None``: in memory)."""
    return Offload(run.device, run.offload_dir) if run.offload else None


def offloaded_run_stats(
    base_model: str, scoring: ScoringOptions, calibration: CalibrationOptions, run: RunOptions, ids, units: list[LayerUnits],
    options: CriterionOptions,
):  # fmt: skip
    """``--offload``: score from the checkpoint's shards, one decoder layer on ``--device`` at a time."""
    if run.device == "auto":
        raise PrunellmError("--offload runs one layer at a time on one device: use --device cpu, cuda or cuda:N, not auto")
    lazy = load_lazy(base_model, dtype=run.dtype)
    return offloaded_stats(
        lazy, ids, units, scoring.importance_method, device=run.device, batch_size=calibration.gradient_batch_size,
        offload_dir=run.offload_dir, options=options,
    )  # fmt: skip


def ablation_windows(tokenizer, calibration: CalibrationOptions, seed: int, target: Literal["layer", "block"]) -> torch.Tensor:
    """Windows of the layer (seed + 1) or block (seed + 2) ablations: apart from the scoring calibration's (a
    different seed), from the same train part, never eval text."""
    num_samples = calibration.layer_importance_num_samples if target == "layer" else calibration.block_importance_num_samples
    return sample_calibration(
        tokenizer, calibration.dataset, num_samples, calibration.calibration_seq_len, seed + (1 if target == "layer" else 2),
        seq_len_flag="--calibration_seq_len", num_samples_flag=f"--{target}_importance_num_samples",
    )  # fmt: skip


def compute_priors(
    model: nn.Module, tokenizer, priors: PriorOptions, calibration: CalibrationOptions, seed: int, out: Path,
    offload: Offload | None = None, values: dict[UnitKey, torch.Tensor] | None = None,
    kinds: tuple[str, ...] = UNIT_KINDS,
) -> dict[UnitKey, float] | None:
    """Layer/block Δloss priors (skipped when ``--temperature 0``; ``offload``: one layer on the device at a time);
    writes both JSON files. ``values``: the normalised scores without priors, which ``--temperature auto`` matches.
    ``kinds``: the unit kinds pruned; a block kind none of them is in is not ablated (its Δ would multiply no unit's
    score) and its multipliers are 1. ``--prior_measure fisher`` estimates every Δ from one pass over the layer
    ablations' windows; the exact measures ablate layers and blocks on windows of their own."""
    if priors.temperature == 0:
        return None
    measure = priors.prior_measure
    layer_ids = ablation_windows(tokenizer, calibration, seed, "layer")
    batch = calibration.gradient_batch_size
    n_layers = len(decoder_layers(model))
    # --tau -inf takes every multiplier from its block's Δ and inf from its layer's: the other ablations decide nothing
    pure = {-math.inf: "block", math.inf: "layer"}.get(priors.tau) if priors.tau != "auto" else None
    targets = () if pure == "layer" else tuple(t for t, kind in (("attention", "kv_group"), ("mlp", "mlp_channel")) if kind in kinds)
    measured_layers = pure != "block"
    if priors.prior_dtype != "weights" and measure != "fisher":  # the ablations' layers compute in that dtype (cast per layer)
        offload = dataclasses.replace(offload or IN_PLACE, dtype=torch_dtype(priors.prior_dtype))
    if measure == "fisher":  # one forward and backward pass estimates every target: one set of windows
        blocks = ablation_deltas_of(model, layer_ids, ("layer",) * measured_layers + targets, batch, offload=offload, measure="fisher")
        layer_d = blocks.pop("layer", None)
    else:
        positions = priors.prior_positions
        layer_d, blocks = None, {}
        if measured_layers:
            with stage("layer ablations"):
                layer_d = ablation_deltas(model, layer_ids, "layer", batch, offload=offload, measure=measure, positions=positions)
        if targets:
            block_ids = ablation_windows(tokenizer, calibration, seed, "block")
            with stage("block ablations"):  # offloaded: one sweep for every kind
                blocks = ablation_deltas_of(model, block_ids, targets, batch, offload=offload, measure=measure, positions=positions)
    unmeasured = [math.e - 1.0] * n_layers  # ln(1 + Δ) = 1 at every T: the multiplier of a kind not pruned
    attn_d, mlp_d = blocks.get("attention", unmeasured), blocks.get("mlp", unmeasured)
    # not measured under --tau -inf: a stand-in never below tau, so every multiplier takes its block's Δ
    layer_in_use = [math.inf] * n_layers if layer_d is None else layer_d
    tau = resolve_tau(priors.tau, layer_in_use)
    temperature = resolve_temperature(priors.temperature, (layer_in_use, attn_d, mlp_d), tau, values)
    unit_spread = prior_spread(prior_multipliers(layer_in_use, attn_d, mlp_d, 1.0, tau), values) if values else None
    if priors.temperature == "auto":
        log.info("--temperature auto: T = %.3f (the prior's spread ×%.2f between the pruned blocks matched to the "
                 "scores' within-block spread)", temperature, unit_spread or 1.0)  # fmt: skip
    spread_field = {} if unit_spread is None else {"prior_spread_p90_over_p10": unit_spread}
    metric = {"loss": "delta_loss_zero_ablation", "kl": "kl_from_dense_zero_ablation",
              "fisher": "kl_from_dense_zero_ablation_fisher_estimate"}[measure]  # fmt: skip
    skipped = {"layers": None, "skipped": "--tau -inf: every multiplier is its block's Δ"} if layer_d is None else {"layers": layer_d}
    write_json_atomic(out / "layer_importance_loss.json",
                      {"metric": metric, **skipped, "tau": tau, "temperature": temperature, **spread_field})  # fmt: skip
    blocks_skipped = {"skipped": "--tau inf: every multiplier is its layer's Δ"} if pure == "layer" else {}
    write_json_atomic(out / "block_importance_loss.json", {"metric": metric, **blocks, **blocks_skipped})
    return prior_multipliers(layer_in_use, attn_d, mlp_d, temperature, tau)


def selection_constraints(selection: SelectionOptions) -> SelectionConstraints:
    """What every pruned layer must keep: ``--min_kv_groups``, and what ``--deploy_target`` needs (its row in
    :data:`prunellm.export.targets.DEPLOY_TARGETS`): kept MLP widths that are multiples of both ``--round_to`` and the
    target's quant block (their lcm), whole attention blocks for ``vllm``."""
    from .export.targets import deploy_target

    target = deploy_target(selection.deploy_target)
    return SelectionConstraints(min_kv_groups=selection.min_kv_groups, round_to=math.lcm(selection.round_to, target.mlp_multiple),
                                whole_attention=target.whole_attention)  # fmt: skip


def plan_from_selection(
    model: nn.Module, kept: dict[UnitKey, list[int]], recipe: PruneRecipe, params_before: int, params_after: int,
    calibration: dict[str, Any], seed: int, reconstruction: dict[str, Any] | None = None,
) -> Plan:
    """Record kept indices of every original layer (``None`` where a kind was not considered) and the reconstruction
    settings surgery will use."""
    layers = []
    for index in range(len(decoder_layers(model))):
        layers.append(LayerPlan(kv_groups=kept.get((index, "kv_group")), mlp_channels=kept.get((index, "mlp_channel"))))
    return Plan(
        base_model=recipe.base_model,
        method="global",
        criterion=recipe.scoring.importance_method,
        target_ratio=recipe.budget.pruning_ratio,
        params_before=params_before,
        params_after=params_after,
        layers=layers,
        recipe=recipe.flat(),  # flat, as the flags name the options: a replay reads it back the same way
        calibration=calibration,
        seed=seed,
        versions=package_versions(),
        reconstruction=reconstruction or {"mode": "none"},
    )


def score_and_plan(
    model: nn.Module, tokenizer, recipe: PruneRecipe, run: RunOptions, out: Path, reconstruction: dict[str, Any] | None = None,
    target_params: int | None = None, measured_prior: MeasuredPrior | None = None,
) -> tuple[Plan, list[dict]]:
    """Score every eligible unit, rank globally and return the complete Plan (with ``reconstruction``, the settings of
    :func:`reconstruction_settings`) plus the per-unit table (no surgery). ``target_params``: parameters to remove
    (default: the recipe's ratio of the model's). ``measured_prior``: where an earlier round's prior is kept for reuse
    (``--prior_rounds first``): measured here if it holds none yet, else reused."""
    spec_for(model.config)  # refuse unknown families before any work
    kinds = unit_kinds(recipe.budget)
    check_deploy_target(recipe.selection, recipe.allocation)
    calib = recipe.calibration
    criterion = get_criterion(recipe.scoring.importance_method)
    layers = eligible_layers(recipe.budget, len(decoder_layers(model)))
    units = [u for u in all_units(model, kinds) if u.layer in layers]
    total = count_parameters(model)
    calibration_info: dict[str, Any] = {"needs": sorted(criterion.needs)}
    rechosen = scores_rechosen(recipe)
    if rechosen:  # only the counts matter: ranks in index order stand in for the scores, the refit chooses the units
        log.info("%s: each block's count comes from the prior alone and the refit re-chooses its units, so the dense "
                 "scoring pass is skipped", rechosen)  # fmt: skip
        calibration_info.update(needs=[], scoring=f"skipped: {rechosen}")
        scores = {(u.layer, u.kind): torch.zeros(u.count) for u in units}
    else:
        with stage("score"):
            scores = score_units(model, tokenizer, recipe, run, units, calibration_info)
    normalization = recipe.selection.normalization
    values = normalized_values(units, scores, normalization)
    with stage("priors"):
        if measured_prior is not None and measured_prior.multipliers is not None:
            priors = measured_prior.reuse(out)
        else:
            priors = compute_priors(model, tokenizer, recipe.priors, calib, run.seed, out, run_offload(run), values, kinds)
            if measured_prior is not None:
                measured_prior.keep(priors, out)
    with stage("select"):
        if priors is not None:
            values = normalized_values(units, scores, normalization, priors)
        target = round(recipe.budget.pruning_ratio * total) if target_params is None else target_params
        constraints = selection_constraints(recipe.selection)
        if recipe.allocation.allocation == "layerwise":
            layer_ids = ablation_windows(tokenizer, calib, run.seed, "layer")
            selection = select_by_layer_rates(
                model, layer_ids, units, values, scores, recipe.allocation, target, constraints, calib.gradient_batch_size, out, total,
                run_offload(run),
            )
        else:
            selection = select_global(units, values, {} if rechosen else scores, target, constraints, total)
            if rechosen:  # the table's per-index values were stand-ins: only the removed column (as applied) holds
                selection.table[:] = [{**row, "value": float("nan")} for row in selection.table]
    plan = plan_from_selection(
        model, selection.kept, recipe, total, total - selection.removed_params, calibration_info, run.seed,
        reconstruction or {"mode": "none"},
    )  # fmt: skip
    return plan, selection.table


@dataclass
class MeasuredPrior:
    """The prior measured in one round and reused by the later ones (``--prior_rounds first``)."""

    multipliers: dict[UnitKey, float] | None = None
    folder: Path | None = None  # where the measuring round wrote its files

    def keep(self, multipliers: dict[UnitKey, float] | None, folder: Path) -> None:
        self.multipliers, self.folder = multipliers, folder

    def reuse(self, out: Path) -> dict[UnitKey, float] | None:
        """The kept multipliers; ``out`` gets the measuring round's files, each saying where it was measured."""
        assert self.folder is not None, "reuse() follows keep()"
        log.info("--prior_rounds first: the prior measured in %s is reused", self.folder.name)
        for name in ("layer_importance_loss.json", "block_importance_loss.json"):
            source = self.folder / name
            if source.is_file():
                write_json_atomic(out / name, {**json.loads(source.read_text()), "measured_in": f"rounds/{self.folder.name}"})
        return self.multipliers


def scores_rechosen(recipe: PruneRecipe) -> str | None:
    """Why the criterion's dense scores cannot change the pruned model (``None`` where they can): ``uniform``
    normalisation turns them into ranks within each block, so every block's count under the global ranking comes from
    the prior and the block's size alone, and a re-selecting refit (``--reconstruct_select fluctuation``/``obs``)
    chooses each block's units again on the pruned model's inputs (the default recipe)."""
    reconstruction = recipe.reconstruction
    select = resolve_select(reconstruction.reconstruct_select, recipe.scoring.importance_method, reconstruction.reconstruct)
    if recipe.selection.normalization == "uniform" and select != "plan" and recipe.allocation.allocation == "global":
        return f"--normalization uniform with --reconstruct_select {select}"
    return None


def score_units(
    model: nn.Module, tokenizer, recipe: PruneRecipe, run: RunOptions, units: list[LayerUnits], calibration_info: dict[str, Any]
) -> dict[UnitKey, torch.Tensor]:
    """The criterion's scores of ``units`` from the calibration pass it needs (what it read goes into
    ``calibration_info``)."""
    calib, scoring = recipe.calibration, recipe.scoring
    criterion = get_criterion(scoring.importance_method)
    ids = None
    if criterion.needs & {"gradients", "activations"}:
        ids = sample_calibration(tokenizer, calib.dataset, calib.calibration_num_samples, calib.calibration_seq_len, run.seed,
                                 seq_len_flag="--calibration_seq_len", num_samples_flag="--calibration_num_samples")  # fmt: skip
        calibration_info.update(
            source=describe_source(calib.dataset, "train"),
            num_samples=calib.calibration_num_samples,
            seq_len=calib.calibration_seq_len,
            hash=tensor_hash(ids),
        )
    started = time.perf_counter()
    options = CriterionOptions(seed=run.seed, magnitude_norm=scoring.magnitude_norm)
    if run.offload:  # the same scores with one layer of the checkpoint on the device at a time
        scores, _ = offloaded_run_stats(recipe.base_model, scoring, calib, run, ids, units, options)
    else:
        stats = collect_stats(model, ids, units, scoring, calib)
        scores = criterion.score(model, units, stats, options)
    calibration_info["scoring_seconds"] = round(time.perf_counter() - started, 3)
    return scores


def reconstruction_settings(reconstruction: ReconstructionOptions, dataset: str, seed: int, criterion: str) -> dict[str, Any]:
    """What the plan records so that a replay reconstructs from the same calibration windows (``dataset``: the
    scoring calibration's text, used when ``--reconstruct_dataset`` is empty)."""
    if reconstruction.reconstruct == "none":
        return {"mode": "none"}
    return {
        "mode": reconstruction.reconstruct,
        "dataset": reconstruction.reconstruct_dataset or dataset,
        "num_samples": reconstruction.reconstruct_num_samples,
        "seq_len": reconstruction.reconstruct_seq_len,
        "damp": reconstruction.reconstruct_damp,
        "target": reconstruction.reconstruct_target,
        "select": resolve_select(reconstruction.reconstruct_select, criterion, reconstruction.reconstruct),
        "solver": SOLVER,
        "seed": seed + 3,  # windows apart from the scoring calibration, same train part (never eval text)
    }


def reconstruction_calibration(tokenizer, settings: dict[str, Any], flag: str = "--reconstruct_dataset") -> torch.Tensor | None:
    """The calibration windows that :func:`reconstruction_settings` names (``None`` when it reconstructs nothing).

    ``flag`` is the option that named the text: ``--reconstruct_dataset``, or ``--dataset`` when that was left empty.
    """
    if settings["mode"] == "none":
        return None
    return sample_calibration(
        tokenizer, settings["dataset"], settings["num_samples"], settings["seq_len"], settings["seed"], flag=flag,
        seq_len_flag="--reconstruct_seq_len", num_samples_flag="--reconstruct_num_samples",
    )  # fmt: skip


def check_reconstruction_settings(settings: dict[str, Any]) -> None:
    """Refuse a plan whose reconstruction this version would not reproduce."""
    if settings.get("mode") in ("lstsq", "lstsq_bias") and settings.get("solver") != SOLVER:
        raise PrunellmError(
            f"the plan's lstsq reconstruction was made by an earlier solver ({settings.get('solver', 'ridge toward zero')}); "
            f"this version refits with {SOLVER} and would not reproduce its weights: prune again without --plan "
            "to make a new plan"
        )


def removed_as_applied(table: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """The selection table with its ``removed`` column as ``plan`` was applied: a reconstruction ``select`` other
    than ``plan`` re-chooses units within each layer's count (the scores stay the dense model's)."""
    kept = {key: set(indices) for key, indices in plan.kept_units().items()}
    return [
        {**row, "removed": row["index"] not in kept[(row["layer"], row["unit"])]} if (row["layer"], row["unit"]) in kept else row
        for row in table
    ]


def apply_plan_with_reconstruction(
    model: nn.Module, tokenizer, plan: Plan, *, stream_to: Path | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Surgery as the plan says, with the plan's reconstruction; returns the reconstruction report.

    The plan's reconstruction settings carry the hash of their calibration windows, which must tokenize to the
    same windows here. The plan is read, and changed only by ``select: obs`` or ``fluctuation``, which choose each layer's units
    (the plan's counts) during the refit: the plan then records the units applied (a replay chooses them again,
    from the same weights and windows, identically). ``stream_to`` (``--offload``): ``model`` is a lazy skeleton,
    sliced (and refitted) one layer at a time on ``device`` and written into that checkpoint folder as it goes.
    """
    settings = plan.reconstruction or {"mode": "none"}
    check_reconstruction_settings(settings)
    ids = reconstruction_calibration(tokenizer, settings, "--reconstruct_dataset" if plan.recipe.get("reconstruct_dataset") else "--dataset")
    if ids is not None and settings.get("hash") and settings["hash"] != tensor_hash(ids):
        raise PrunellmError(
            f"the plan's reconstruction calibration ({settings['dataset']}) tokenizes differently here "
            f"(hash {tensor_hash(ids)} != {settings['hash']}): use the same tokenizer and corpus"
        )
    started = time.perf_counter()
    if stream_to is not None:
        from .streaming import save_pruned_streamed

        if plan.rounds:
            raise PrunellmError(
                f"--offload streams the checkpoint through one pass, but the plan was made in {len(plan.rounds)} rounds "
                "(--iterative_steps): apply it without --offload"
            )

        streamed = save_pruned_streamed(
            model, plan, tokenizer, stream_to, calibration=ids, reconstruct=settings["mode"],
            damp=settings.get("damp", "auto"), device=device, select=settings.get("select", "plan"),
            target=settings.get("target", "pruned"),
        )  # fmt: skip
        return {
            "settings": settings, "seconds": round(time.perf_counter() - started, 3),
            "added_params": streamed["added_params"], "layers": streamed["layers"],
        }  # fmt: skip
    report = prune_plan_rounds(
        model, plan, ids, settings["mode"], settings.get("damp", "auto"), target=settings.get("target", "pruned"),
        select=settings.get("select", "plan"),
    )  # fmt: skip
    remove_layers(model, plan.removed_layers)
    return {
        "settings": settings, "seconds": round(time.perf_counter() - started, 3), "added_params": report.added_params,
        "layers": report.layers,
    }  # fmt: skip


def select_by_layer_rates(
    model: nn.Module, layer_ids: torch.Tensor, units: list[LayerUnits], values, scores, allocation: AllocationOptions,
    target_params: int, constraints: SelectionConstraints, batch_size: int, out: Path, total: int,
    offload: Offload | None = None,
):  # fmt: skip
    """Per-layer allocation: layer importance (on ``layer_ids``, :func:`ablation_windows`; ``offload``: one layer on
    the device at a time) -> per-layer rates meeting the budget -> lowest units per layer."""
    importance = layer_importance(model, layer_ids, allocation.layer_importance_method, batch_size, offload)
    n_layers = len(importance)
    frozen = frozen_for_allocation(units, n_layers, allocation)
    prunable = prunable_per_layer(units, n_layers)
    rates = allocate_rates(
        importance, prunable, target_params, strategy=allocation.pruning_strategy,
        weight=allocation.layer_importance_weight, min_rate=allocation.min_pruning_rate, max_rate=allocation.max_pruning_rate,
        frozen=frozen, total_params=total,
    )  # fmt: skip
    write_layer_importance(out, allocation.layer_importance_method, importance, rates=rates)
    return select_layerwise(
        units, values, scores, rates, parse_distribution(allocation.pruning_distribution), constraints.min_kv_groups,
        constraints.round_to,
    )  # fmt: skip


def write_layer_importance(out: Path, method: str, scores: list[float], rates: list[float] | None = None, removed: list[int] | None = None) -> None:
    """``layer_importance.json`` and its chart."""
    from .analysis import plot_layer_importance

    data: dict[str, Any] = {"method": method, "scores": scores}
    if rates is not None:
        data["pruning_rates"] = rates
    if removed is not None:
        data["removed_layers"] = removed
    write_json_atomic(out / "layer_importance.json", data)
    plot_layer_importance(scores, method, out / "visualization" / "layer_importance.png", highlight=removed)


def check_depth_budget(recipe: LayersRecipe) -> None:
    """``prunellm layers`` removes a number of layers given one way: ``--n_remove_layers`` or ``--pruning_ratio``."""
    if recipe.n_remove_layers is not None and recipe.pruning_ratio is not None:
        raise PrunellmError(
            f"give --n_remove_layers or --pruning_ratio, not both (got --n_remove_layers {recipe.n_remove_layers} and "
            f"--pruning_ratio {recipe.pruning_ratio:g}): the ratio only chooses the number of layers"
        )
    if recipe.n_remove_layers is None and recipe.pruning_ratio is None:
        raise PrunellmError("give --n_remove_layers N or --pruning_ratio r")


def layers_to_remove(model: nn.Module, recipe: LayersRecipe) -> tuple[int, list[int]]:
    """How many decoder layers depth pruning removes and which may go (the freeze flags), from the model's shapes
    alone: refused before any calibration text is read."""
    check_depth_budget(recipe)
    n_layers = len(decoder_layers(model))
    if recipe.n_remove_layers is not None:
        n_remove = recipe.n_remove_layers
    else:
        n_remove = layers_for_ratio(model, recipe.pruning_ratio, count_parameters(model))
    if not 1 <= n_remove < n_layers:
        raise PrunellmError(f"--n_remove_layers {n_remove} must be between 1 and {n_layers - 1} (the model has {n_layers} layers)")
    candidates = list(range(recipe.freeze_first_n_layers, n_layers - recipe.freeze_last_n_layers))
    if len(candidates) < n_remove:
        asked = (f"--n_remove_layers {n_remove}" if recipe.n_remove_layers is not None
                 else f"--pruning_ratio {recipe.pruning_ratio:g} ({n_remove} layers)")  # fmt: skip
        raise PrunellmError(
            f"{asked} is more than the {len(candidates)} of {n_layers} layers that --freeze_first_n_layers "
            f"{recipe.freeze_first_n_layers} / --freeze_last_n_layers {recipe.freeze_last_n_layers} leave removable: "
            "freeze fewer layers or remove fewer"
        )
    return n_remove, candidates


def depth_plan(model: nn.Module, tokenizer, recipe: LayersRecipe, run: RunOptions, out: Path) -> tuple[Plan, list[dict]]:
    """Depth pruning's complete Plan: the decoder layers to remove, ranked by the layer criterion (writes
    ``layer_importance.json`` into ``out``); no per-unit table."""
    n_layers = len(decoder_layers(model))
    total = count_parameters(model)
    n_remove, candidates = layers_to_remove(model, recipe)
    with stage("score"):
        ids = sample_calibration(tokenizer, recipe.dataset, recipe.num_samples, recipe.seq_len, run.seed)
        removed, scores = choose_layers_to_remove(
            model, ids, recipe.layer_importance_method, n_remove, iterative=recipe.iterative,
            batch_size=recipe.batch_size, candidates=candidates, offload=run_offload(run),
        )  # fmt: skip
    write_layer_importance(out, recipe.layer_importance_method, scores, removed=removed)
    per_layer = layer_params(model)
    plan = Plan(
        base_model=recipe.base_model, method="layers", criterion=recipe.layer_importance_method,
        target_ratio=recipe.pruning_ratio, params_before=total,
        params_after=total - sum(per_layer[i] for i in removed),
        layers=[LayerPlan() for _ in range(n_layers)], removed_layers=removed, recipe=recipe.model_dump(),
        calibration={"source": describe_source(recipe.dataset, "train"), "num_samples": recipe.num_samples,
                     "seq_len": recipe.seq_len, "hash": tensor_hash(ids)},
        seed=run.seed, versions=package_versions(), reconstruction={"mode": "none"},
    )  # fmt: skip
    return plan, []


def width_plan(model: nn.Module, tokenizer, recipe: PruneRecipe, run: RunOptions, out: Path) -> tuple[Plan, list[dict]]:
    """Width pruning's complete Plan (``--plan`` replayed, or scored and selected) and its per-unit table.

    The reconstruction settings go into the plan before scoring: a bad ``--reconstruct_dataset`` or too short a
    text fails now, not after scoring.
    """
    if recipe.plan:
        return load_plan_for(model, recipe.plan), []
    return score_and_plan(model, tokenizer, recipe, run, out, checked_reconstruction_settings(tokenizer, recipe, run))


def checked_reconstruction_settings(tokenizer, recipe: PruneRecipe, run: RunOptions) -> dict[str, Any]:
    """:func:`reconstruction_settings` with the source and hash of their windows (a bad text fails here)."""
    settings = reconstruction_settings(recipe.reconstruction, recipe.calibration.dataset, run.seed, recipe.scoring.importance_method)
    if settings["mode"] != "none":
        flag = "--reconstruct_dataset" if recipe.reconstruction.reconstruct_dataset else "--dataset"
        settings["source"] = describe_source(settings["dataset"], "train", flag=flag)
        with stage("surgery and refit"):  # the refit's windows, read here once to check them
            settings["hash"] = tensor_hash(reconstruction_calibration(tokenizer, settings, flag))
    return settings


def round_goals(ratio: float, steps: int, total: int) -> list[int]:
    """Parameters removed in all after each of ``steps`` rounds: equal steps of ``ratio`` of ``total``."""
    return [round(ratio * total * step / steps) for step in range(1, steps + 1)]


def prune_in_rounds(model: nn.Module, tokenizer, recipe: PruneRecipe, run: RunOptions, out: Path) -> tuple[Plan, list[dict], dict]:
    """``--iterative_steps N``: N rounds, each scoring the model the previous round left (priors and T measured
    again, or with ``--prior_rounds first`` the first round's reused; ``out/rounds/<k>/`` holds their files), selecting its step of the budget and applying it with the
    reconstruction. Returns the plan of all rounds (original indices in ``layers``), the per-unit table (each unit
    once: the row of the round that removed it, the last round's for the kept) and the reconstruction report."""
    settings = checked_reconstruction_settings(tokenizer, recipe, run)
    total = count_parameters(model)
    rounds: list[RoundPlan] = []
    tables: list[dict] = []
    reports: list[dict] = []
    removed = 0
    native = projection_biases(model)
    goals = round_goals(recipe.budget.pruning_ratio, recipe.budget.rounds(run.offload), total)
    reach = reach_of(model, recipe.budget, recipe.selection, recipe.allocation)  # of one round, on the original model
    measured_prior = MeasuredPrior() if recipe.priors.prior_rounds == "first" else None
    for step, goal in enumerate(goals, 1):
        log.info("--iterative_steps: round %d of %d, %d parameters to remove in all", step, len(goals), goal)
        try:
            plan, table = score_and_plan(model, tokenizer, recipe, run, out / "rounds" / str(step), settings, goal - removed,
                                         measured_prior)  # fmt: skip
        except PrunellmError as exc:  # exc names this round's share; say the user's ratio and which round refused
            # the hint only where one round on the original model could remove it all
            if reach.least <= goals[-1] <= reach.limit:
                hint = "; one round can reach it: try --iterative_steps 1"
            else:
                hint = (f"; --pruning_ratio {recipe.budget.pruning_ratio:g} is out of reach in any number of rounds: at "
                        f"most {reach.most / total:.4f} of all parameters can be removed under these flags")  # fmt: skip
            raise PrunellmError(
                f"--pruning_ratio {recipe.budget.pruning_ratio:g} in {len(goals)} rounds (--iterative_steps): "
                f"round {step} could not remove its step: {exc}{hint}"
            ) from exc
        with stage("surgery and refit"):
            reports.append(apply_plan_with_reconstruction(model, tokenizer, plan, device=run.device))
        # (layer, kind) -> original index of each unit the model had when this round started
        original = kept_units_of(compose_rounds([r.layers for r in rounds])) if rounds else {}
        for row in removed_as_applied(table, plan):
            if row.get("removed") or step == len(goals):
                key = (row["layer"], row["unit"])
                tables.append({**row, "index": original[key][row["index"]] if key in original else row["index"], "round": step})
        # what the rounds removed, compensation biases apart: a round that removes a whole block also removes the
        # bias an earlier round gave it, which the base model never had
        removed = total - (count_parameters(model) - added_bias_params(model, native))
        rounds.append(RoundPlan(layers=plan.layers, params_before=plan.params_before, params_after=plan.params_after))
        if step == 1:
            calibration = dict(plan.calibration)
        calibration[f"round_{step}_scoring_seconds"] = plan.calibration.get("scoring_seconds")
    whole = Plan(**{
        **{name: getattr(plan, name) for name in plan.__dataclass_fields__},
        "target_ratio": recipe.budget.pruning_ratio, "params_before": total, "params_after": total - removed,
        "layers": compose_rounds([r.layers for r in rounds]), "calibration": calibration, "rounds": rounds,
    })  # fmt: skip
    report = {
        "settings": settings, "seconds": round(sum(r["seconds"] for r in reports), 3),
        "added_params": added_bias_params(model, native),  # a later round may remove a block an earlier one gave a bias
        "layers": [{**entry, "round": step} for step, r in enumerate(reports, 1) for entry in r["layers"]],
    }  # fmt: skip
    return whole, tables, report


def plan_then_apply(
    made: tuple[Plan, list[dict]], model: nn.Module, tokenizer, run: RunOptions, out: Path
) -> tuple[Plan, list[dict], dict]:
    """Apply a made plan with its reconstruction (``--offload``: streamed into ``out/model``); the table as applied."""
    plan, table = made
    with stage("surgery and refit"):  # with --offload the pruned checkpoint is written here, layer by layer
        reconstruction = apply_plan_with_reconstruction(
            model, tokenizer, plan, stream_to=out / "model" if run.offload else None, device=run.device
        )
    return plan, removed_as_applied(table, plan), reconstruction


@dataclass(frozen=True)
class WidthPruning:
    """``prunellm prune``: kv groups and MLP channels, ranked globally or per layer, optionally fine-tuned after."""

    recipe: PruneRecipe
    run: RunOptions
    finetune: FinetuneOptions | None = None

    @property
    def base_model(self) -> str:
        return self.recipe.base_model

    @property
    def name(self) -> str:
        return self.recipe.output_name or default_output_name(self.recipe)

    @property
    def run_evaluation(self) -> str:
        return self.recipe.run_evaluation

    def inputs(self) -> tuple[tuple[str, str | None], ...]:
        """(flag, path) of what the run reads: its output may not be, hold or sit inside any of them."""
        return (("--base_model", self.recipe.base_model), ("--plan", self.recipe.plan))

    def context_lengths(self) -> dict[str, int]:
        """Flag -> tokens the loaded model's context must hold (checked before any work)."""
        lengths = {"calibration_seq_len": self.recipe.calibration.calibration_seq_len}
        if self.recipe.reconstruction.reconstruct != "none":
            lengths["reconstruct_seq_len"] = self.recipe.reconstruction.reconstruct_seq_len
        if self.finetune is not None and self.finetune.finetune:
            lengths["finetune_seq_len"] = self.finetune.data.seq_len
        return lengths

    def check_model(self, model: nn.Module) -> None:
        """Input that only the loaded model can refuse, before any calibration text is read: the layer range and
        freeze flags, and a ratio out of reach (a ``--plan`` is checked against the model when it is read)."""
        if not self.recipe.plan:
            budget = self.recipe.budget
            check_reachable(model, budget, self.recipe.selection, self.recipe.allocation, budget.rounds(self.run.offload))

    def prune_model(self, model: nn.Module, tokenizer, out: Path) -> tuple[Plan, list[dict], dict]:
        """Make the plan and apply it (round by round with ``--iterative_steps``): plan, table, reconstruction."""
        if self.recipe.budget.rounds(self.run.offload) > 1 and not self.recipe.plan:
            return prune_in_rounds(model, tokenizer, self.recipe, self.run, out)
        return plan_then_apply(width_plan(model, tokenizer, self.recipe, self.run, out), model, tokenizer, self.run, out)


@dataclass(frozen=True)
class DepthPruning:
    """``prunellm layers``: whole decoder layers removed."""

    recipe: LayersRecipe
    run: RunOptions
    finetune: None = None  # depth runs are not fine-tuned in the same process

    @property
    def base_model(self) -> str:
        return self.recipe.base_model

    @property
    def name(self) -> str:
        return self.recipe.output_name or f"{Path(self.recipe.base_model).name}_layers_{self.recipe.layer_importance_method}"

    @property
    def run_evaluation(self) -> str:
        return self.recipe.run_evaluation

    def inputs(self) -> tuple[tuple[str, str | None], ...]:
        return (("--base_model", self.recipe.base_model),)

    def context_lengths(self) -> dict[str, int]:
        return {"seq_len": self.recipe.seq_len}

    def check_model(self, model: nn.Module) -> None:
        """The number of layers to remove against the model's, before any calibration text is read."""
        layers_to_remove(model, self.recipe)

    def prune_model(self, model: nn.Module, tokenizer, out: Path) -> tuple[Plan, list[dict], dict]:
        return plan_then_apply(depth_plan(model, tokenizer, self.recipe, self.run, out), model, tokenizer, self.run, out)


Workflow = WidthPruning | DepthPruning
"""What differs between the two runs: the recipe, how the Plan is made and applied, what the model's context must hold."""


def prune_layers(recipe: LayersRecipe, run: RunOptions, eval_options: EvalOptions | None = None, argv: list[str] | None = None) -> PruneResult:
    """Depth pruning: remove whole decoder layers, into ``<output_dir>/<output_name>/`` (standard HF checkpoint)."""
    check_depth_budget(recipe)  # before loading anything
    refuse_whole_model_steps(run, {"--run_evaluation/--metrics": bool(evaluation_metrics(recipe.run_evaluation, eval_options))})
    return execute_run(DepthPruning(recipe, run), eval_options, argv)


def load_plan_for(model: nn.Module, path: str) -> Plan:
    """Read ``--plan`` and check it was made for this model's original weights."""
    plan = Plan.load(path)
    total = count_parameters(model)
    if plan.params_before != total or len(plan.layers) != len(decoder_layers(model)):
        raise PrunellmError(
            f"--plan '{path}' was made for a model with {plan.params_before} parameters and {len(plan.layers)} "
            f"layers, but --base_model has {total} and {len(decoder_layers(model))}"
        )
    check_reconstruction_settings(plan.reconstruction or {"mode": "none"})  # before any work
    return plan


def print_summary(console, plan: Plan, comparison: dict, evaluation: dict[str, Any], timings: dict[str, Any] | None = None) -> None:
    """Final table: parameters, achieved ratio, PPL before/after and where the time went; then per-layer widths."""
    from rich.table import Table

    table = Table(title=f"prunellm: {plan.criterion}, target {plan.target_ratio}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("parameters before", f"{plan.params_before:,}")
    table.add_row("parameters after", f"{plan.params_after:,}")  # the model as saved, as the layer table and report count
    if plan.added_params:
        table.add_row("  of which compensation biases", f"{plan.added_params:,}")
    table.add_row("achieved ratio", f"{plan.achieved_ratio:.4f}")
    for label in ("base", "pruned", "recovered"):
        for row in (evaluation.get(label) or {}).get("metrics", {}).get("ppl", []):
            table.add_row(f"PPL {label} {row['dataset']} ({row['protocol']}, {row['scored_tokens']} tok)", f"{row['ppl']:.3f}")
    if timings and "stages" in timings:  # where the time went (logs/timings.json)
        for name, seconds in timings["stages"].items():
            table.add_row(f"time: {name}", f"{seconds:.1f} s")
            for part, part_seconds in timings.get("parts", {}).items():
                if part.rpartition("/")[0] == name:
                    table.add_row(f"  {part.rpartition('/')[2]}", f"{part_seconds:.1f} s")
        table.add_row("time: other", f"{timings['other_seconds']:.1f} s")
        table.add_row("time: total", f"{timings['total_seconds']:.1f} s")
    console.print(table)
    console.print(format_layer_table(comparison))


def evaluation_metrics(run_evaluation: str, eval_options: EvalOptions | None) -> list[str]:
    """What a prune/layers run evaluates: ``--run_evaluation``, or ``--metrics`` when only that was given.

    Both given and different is refused (one would silently win over the other).
    """
    from .evaluation.metrics import get_metrics

    asked = split_list(run_evaluation)
    get_metrics(asked, "--run_evaluation")  # an unknown metric lists the valid ones
    if eval_options is None or "metrics" not in eval_options.model_fields_set:
        return asked
    metrics = split_list(eval_options.metrics)
    get_metrics(metrics, "--metrics")
    if asked and asked != metrics:
        raise PrunellmError(
            f"--run_evaluation {run_evaluation} and --metrics {eval_options.metrics} disagree: give one of them "
            "(on prune and layers both name what is evaluated before and after pruning)"
        )
    return metrics


def prune_loaded(workflow: Workflow, model: nn.Module, tokenizer, out: Path) -> tuple[Plan, list[dict], dict]:
    """Make the plan and apply it to the loaded ``model`` (the step both ``prunellm prune`` and
    :func:`prunellm.run` take; ``out`` receives the priors' and layer files): plan, table as applied, refit report.

    Bias compensation may add biases the family does not build: the plan's count becomes the pruned model's
    (summary, plan.json, layer table and report then agree); what selection removed stays as planned."""
    plan, table, reconstruction = workflow.prune_model(model, tokenizer, out)  # surgery changes only what select chooses
    plan.record_added_params(reconstruction["added_params"])
    actual = count_parameters(model)
    if actual != plan.params_after:
        raise RuntimeError(
            f"surgery left {actual} parameters, the plan accounts for {plan.params_after} "
            f"({plan.added_params} of them compensation biases)"
        )
    log.info(
        "pruned %s: %d -> %d parameters (%.4f removed%s)", workflow.base_model, plan.params_before, actual,
        plan.achieved_ratio, f"; {plan.added_params} of them compensation biases" if plan.added_params else "",
    )  # fmt: skip
    return plan, table, reconstruction


def execute_run(
    workflow: Workflow,
    eval_options: EvalOptions | None,
    argv: list[str] | None,
    *,
    lora: LoraOptions | None = None,
    tracking: TrackingOptions | None = None,
) -> PruneResult:
    """The shared run: load, evaluate dense, make the plan, apply it, save, analyse, evaluate pruned.

    Everything is written into a temporary folder that becomes ``<output_dir>/<name>/`` only when the run
    succeeds, so an interrupted run leaves no half-written model.
    """
    from rich.console import Console

    console = Console(stderr=True)
    run = workflow.run
    evaluate_what = evaluation_metrics(workflow.run_evaluation, eval_options)  # disagreeing flags fail before any work
    out = check_output_dir(run, workflow.name, inputs=workflow.inputs())
    torch.manual_seed(run.seed)
    clock = StageClock()  # where the time went: timings.json and the summary
    with clock.running():
        return _execute(workflow, out, evaluate_what, eval_options, argv, clock, console, lora=lora, tracking=tracking)


def _execute(
    workflow: Workflow, out: Path, evaluate_what: list[str], eval_options: EvalOptions | None, argv: list[str] | None,
    clock: StageClock, console, *, lora: LoraOptions | None, tracking: TrackingOptions | None,
) -> PruneResult:  # fmt: skip
    """:func:`execute_run` once its flags and output are checked, each stage timed on ``clock``."""
    run, base_model, finetune = workflow.run, workflow.base_model, workflow.finetune
    with stage("load"):
        tokenizer = load_tokenizer(base_model)
        if run.offload:  # a meta skeleton: scoring, surgery and save read one layer of the shards at a time
            model = load_lazy(base_model, dtype=run.dtype)
        else:
            model = load_model(base_model, dtype=run.dtype, device=run.device)
    check_context(model, **workflow.context_lengths())  # input that only the loaded model can refuse, before any work
    workflow.check_model(model)  # ... from its shapes alone: before calibration text is read or anything is scored
    eval_options = (eval_options or EvalOptions()).model_copy(update={"metrics": ",".join(evaluate_what) or "ppl"})
    timings: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}
    with atomic_dir(out) as tmp, log_to_file(tmp / "logs" / "prune.log"):
        write_command(tmp, argv)
        with stage("analysis"):
            original = analyze_model(model)
        if evaluate_what:
            with stage("evaluate dense"):
                evaluation["base"] = evaluate(model, tokenizer, eval_options, model_path=base_model)
            save_results(evaluation["base"], tmp / "evaluation_results_base.json")
        started = time.perf_counter()
        plan, table, reconstruction = prune_loaded(workflow, model, tokenizer, tmp)
        if reconstruction["layers"]:
            write_json_atomic(tmp / "analysis" / "reconstruction.json", reconstruction)
        timings["prune_seconds"] = round(time.perf_counter() - started, 3)
        with stage("save"):
            plan.save(tmp / "plan.json")
            if not run.offload:
                save_model(model, tokenizer, tmp / "model")
        with stage("analysis"):
            pruned = analyze_model(model)
            comparison = compare_models(original, pruned, plan.removed_layers)
            write_analysis(tmp, original, pruned, table, plan.removed_layers)
        if evaluate_what:
            with stage("evaluate pruned"):
                evaluation["pruned"] = evaluate(model, tokenizer, eval_options, model_path=str(out / "model"))
            save_results(evaluation["pruned"], tmp / "evaluation_results.json")
        if finetune is not None and finetune.finetune:  # recovery in the same process (model trained in place)
            from .finetune import checkpoint_dir_after_pruning, finetune_after_pruning, move_checkpoints

            started = time.perf_counter()
            checkpoints = checkpoint_dir_after_pruning(out)  # outside the atomic run folder: survives an interruption
            with stage("finetune"):
                recovered = finetune_after_pruning(
                    model, tokenizer, tmp, finetune, eval_options if evaluate_what else None, base_model=base_model,
                    seed=run.seed, lora=lora, tracking=tracking, checkpoint_dir=checkpoints,
                )  # fmt: skip
            move_checkpoints(checkpoints, tmp / "finetuned" / "checkpoints")  # the run succeeded: they move into it
            timings["finetune_seconds"] = round(time.perf_counter() - started, 3)
            if recovered["evaluation"]:
                evaluation["recovered"] = recovered["evaluation"]
        timings.update(clock.report())
        write_json_atomic(tmp / "logs" / "timings.json", timings)
    print_summary(console, plan, comparison, evaluation, timings)
    console.print(f"results: {out}")
    return PruneResult(output_dir=out, plan=plan, model=model, tokenizer=tokenizer, evaluation=evaluation, timings=timings)


def check_prune_recipe(recipe: PruneRecipe) -> None:
    """Refuse, before anything is loaded, recipe options that contradict each other."""
    if recipe.allocation.allocation == "layerwise":
        parse_distribution(recipe.allocation.pruning_distribution)
    check_deploy_target(recipe.selection, recipe.allocation)
    if recipe.priors.prior_dtype != "weights" and recipe.priors.prior_measure == "fisher":
        raise PrunellmError(f"--prior_dtype {recipe.priors.prior_dtype} sets the dtype of the ablations (--prior_measure kl or loss); "
                            "--prior_measure fisher runs in the weights' dtype: leave --prior_dtype out")
    reconstruction = recipe.reconstruction
    mode = reconstruction.reconstruct
    check_reselection(resolve_select(reconstruction.reconstruct_select, recipe.scoring.importance_method, mode), mode)


def prune(
    recipe: PruneRecipe,
    run: RunOptions,
    eval_options: EvalOptions | None = None,
    argv: list[str] | None = None,
    finetune: FinetuneOptions | None = None,
    *,
    lora: LoraOptions | None = None,
    tracking: TrackingOptions | None = None,
) -> PruneResult:
    """Structured pruning (global ranking or per-layer allocation) end to end into ``<output_dir>/<output_name>/``.

    With ``finetune.finetune`` the pruned model is then fine-tuned into ``<run>/finetuned/`` and evaluated again
    ("recovered"); the returned ``model`` is then the recovered one. ``lora`` and ``tracking`` are the same
    option groups as ``prunellm finetune``'s.
    """
    check_prune_recipe(recipe)
    check_offload(run, evaluation_metrics(recipe.run_evaluation, eval_options), finetune, recipe.budget.iterative_steps)
    workflow = WidthPruning(recipe, run, finetune)
    if finetune is not None and finetune.finetune:  # bad fine-tuning options fail before pruning, not after
        from .finetune import checkpoint_dir_after_pruning
        from .finetune.engine import report_to, resolve_checkpoint

        report_to(tracking or TrackingOptions())
        resolve_checkpoint(
            finetune.finetune_resume_from_checkpoint, checkpoint_dir_after_pruning(Path(run.output_dir) / workflow.name),
            flag="--finetune_resume_from_checkpoint",
        )  # fmt: skip
    return execute_run(workflow, eval_options, argv, lora=lora, tracking=tracking)
