"""Quality of global structured pruning on SmolLM2-135M: criteria × ratio grid, priors, reconstruction, allocation.

Every run scores with the library's own calibration pass and criteria (the defaults of ``prunellm prune`` unless
a row says otherwise: block normalisation, ``--calibration_num_samples 128``, ``--calibration_seq_len 128``, seed 42,
Shakespeare train plays) and is evaluated by :func:`benchmarks.common.evaluate_ppl` (WikiText-2 test and the
held-out Shakespeare plays; the dense model is measured in the same run; which protocols a row gets is its
``tier``, see :data:`benchmarks.common.TIERS`). One calibration pass serves both
Taylor criteria, every ratio and the other sections of the run (:class:`benchmarks.common.Shared`). Rows:

* ``grid``: taylor, taylor_2nd, wanda, magnitude, random × 10/20/30 % of total parameters, no prior, no
  reconstruction (what the criterion alone does);
* ``prior``: taylor with layer/block priors (T = 1, tau auto) at the three ratios;
* ``reconstruct``: taylor with ``--reconstruct lstsq`` at the three ratios (``bias`` is compared on the MLP budget);
* ``reconstruct_mlp``: 20 % of every layer's MLP channels (Taylor, MLP only) with none / bias / lstsq — the
  reconstruction issue's first budget (its second is 20 % of all parameters, the rows above);
* ``reconstruct_mix``: both budgets again with lstsq reconstruction calibrated on the mixture
  ``shakespeare+<WikiText-2 validation>`` (``--reconstruct_dataset``; the same Taylor selection): calibration on one
  narrow text specialises the refit to it, a two-domain calibration carries over to both held-out texts;
* ``layerwise``: ``--allocation layerwise`` (layer_pruning.py defaults: removal importance, inverse strategy) at 20 %;
* ``calibration``: taylor at 20 % scored on 8 and 32 windows (128 is the grid's).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.common import CALIBRATION, MIXED_CALIBRATION_LABEL, MODEL, evaluate_ppl, mixed_calibration, protocol_text, pruned_key, shared
from benchmarks.headline import SINGLE_TEXT_CALIBRATION

log = logging.getLogger("benchmarks.quality")

CRITERIA = ("taylor", "taylor_2nd", "wanda", "magnitude", "random")
RATIOS = (0.1, 0.2, 0.3)
SENSITIVITY_SAMPLES = (8, 32)
RECONSTRUCTION_GOALS = {"mlp_20pct_channels": 1.3, "total_20pct": 2.0}  # held-out PPL ÷ dense


def run(criteria: tuple[str, ...] = CRITERIA, ratios: tuple[float, ...] = RATIOS) -> dict:
    """Measure every row; returns a JSON-able dict (``rows`` plus the dense model's perplexities)."""
    import torch

    from prunellm.criteria import CriterionOptions, get_criterion
    from prunellm.data import sample_calibration
    from prunellm.options import PruneRecipe, RunOptions
    from prunellm.pruner import ablation_windows, collect_stats, compute_priors, select_by_layer_rates, selection_constraints
    from prunellm.reconstruction import prune_with_reconstruction
    from prunellm.selection import normalized_values, select_global
    from prunellm.units import count_parameters

    torch.manual_seed(0)
    defaults, run_options = PruneRecipe(base_model=MODEL, dataset=CALIBRATION), RunOptions()
    calib = defaults.calibration
    bench = shared()
    tokenizer, base, total, units = bench.tokenizer, bench.base, bench.total, bench.units
    constraints = selection_constraints(defaults.selection)
    rows: list[dict] = []
    started = time.perf_counter()
    dense = bench.dense_ppl()
    log.info("dense: %s", dense)

    def scores_for(criterion: str, num_samples: int):
        if "gradients" in get_criterion(criterion).needs:
            gradient = tuple(c for c in criteria if "gradients" in get_criterion(c).needs) if num_samples == calib.calibration_num_samples else (criterion,)
            return bench.gradient_scores(gradient or (criterion,), num_samples, calib.calibration_seq_len, run_options.seed, calib.gradient_batch_size)[criterion]
        t0 = time.perf_counter()
        recipe = defaults.replace(importance_method=criterion, calibration_num_samples=num_samples)
        ids = sample_calibration(tokenizer, CALIBRATION, num_samples, calib.calibration_seq_len, run_options.seed) if get_criterion(criterion).needs else None
        stats = collect_stats(base, ids, units, recipe.scoring, recipe.calibration)
        return get_criterion(criterion).score(base, units, stats, CriterionOptions(seed=run_options.seed)), round(time.perf_counter() - t0, 1)

    def measure(group: str, label: str, kept, ratio: float, reconstruct: str = "none", share: str | None = None,
                reconstruct_dataset: str | None = None, tier: str = "128", **extra) -> None:  # fmt: skip
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        recipe = defaults.replace(reconstruct=reconstruct, reconstruct_dataset=reconstruct_dataset)
        prune_with_reconstruction(model, kept, bench.reconstruction_ids(recipe, run_options.seed), reconstruct,
                                  defaults.reconstruction.reconstruct_damp)  # fmt: skip
        if reconstruct != "none":
            extra["reconstruct_calibration"] = MIXED_CALIBRATION_LABEL if reconstruct_dataset else SINGLE_TEXT_CALIBRATION
        row = {
            "group": group, "label": label, "target_ratio": ratio, "reconstruct": reconstruct,
            "achieved_ratio": round(1 - count_parameters(model) / total, 4), "params": count_parameters(model),
            "reconstruct_seconds": round(time.perf_counter() - t0, 1) if reconstruct != "none" else 0.0,
            "ppl": evaluate_ppl(model, bench.token_sets, tier), **extra,
        }  # fmt: skip
        row["ratio_to_dense"] = {k: round(v / dense[k], 3) for k, v in row["ppl"].items()}  # the keys its tier measured
        log.info("%s %s @%.2f (%s): %s", group, label, ratio, reconstruct, row["ppl"])
        rows.append(row)
        if share is not None:  # the recovery section starts from this model (what `prunellm prune` gives)
            bench.cache[pruned_key(share, ratio, reconstruct)] = (model, row)
        del model

    def kept_global(values, scores, ratio: float, subset=None):
        pool = units if subset is None else subset
        return select_global(pool, values, scores, round(ratio * total), constraints, total).kept

    taylor = None
    for criterion in criteria:
        scores, seconds = scores_for(criterion, calib.calibration_num_samples)
        values = normalized_values(units, scores, defaults.selection.normalization)
        for ratio in ratios:
            budget = {"budget": "total_20pct"} if criterion == "taylor" and ratio == 0.2 else {}
            measure("grid", criterion, kept_global(values, scores, ratio), ratio, scoring_seconds=seconds,
                    tier="full" if ratio == 0.2 else "wikitext128", **budget)  # fmt: skip
        if criterion == "taylor":
            taylor = (scores, values, seconds)
    if taylor is not None:
        scores, values, seconds = taylor
        with tempfile.TemporaryDirectory(prefix="prunellm-bench-") as tmp:
            t0 = time.perf_counter()
            priors = compute_priors(base, tokenizer, defaults.priors.model_copy(update={"temperature": 1.0}), calib, run_options.seed, Path(tmp))
            prior_seconds = round(time.perf_counter() - t0, 1)
        prior_values = normalized_values(units, scores, defaults.selection.normalization, priors)
        for ratio in ratios:
            measure("prior", "taylor T=1", kept_global(prior_values, scores, ratio), ratio, prior_seconds=prior_seconds,
                    tier="full" if ratio == 0.2 else "wikitext128")  # fmt: skip
        for ratio in ratios:
            budget = {"budget": "total_20pct"} if ratio == 0.2 else {}
            share = "taylor" if ratio == 0.2 else None  # only the model the recovery section starts from stays in memory
            measure("reconstruct", "taylor + lstsq", kept_global(values, scores, ratio), ratio, reconstruct="lstsq", share=share,
                    tier="full" if ratio == 0.2 else "128", **budget)  # fmt: skip
        mlp_units = [u for u in units if u.kind == "mlp_channel"]
        mlp_scores = {key: value for key, value in scores.items() if key[1] == "mlp_channel"}
        mlp_values = normalized_values(mlp_units, mlp_scores, defaults.selection.normalization)
        mlp_ratio = 0.2 * sum(u.cost * u.count for u in mlp_units) / total  # as many parameters as 20 % of all MLP channels, ranked globally
        kept_mlp = kept_global(mlp_values, mlp_scores, mlp_ratio, mlp_units)
        for mode in ("none", "bias", "lstsq"):
            measure("reconstruct_mlp", "taylor, 20 % of MLP channels", kept_mlp, round(mlp_ratio, 4), reconstruct=mode,
                    budget="mlp_20pct_channels")  # fmt: skip
        mixture = mixed_calibration()
        if mixture:  # the same selections, reconstructed on two domains (32 + 32 windows)
            measure("reconstruct_mix", "taylor, 20 % of MLP channels", kept_mlp, round(mlp_ratio, 4), reconstruct="lstsq",
                    reconstruct_dataset=mixture, budget="mlp_20pct_channels")  # fmt: skip
            measure("reconstruct_mix", "taylor + lstsq", kept_global(values, scores, 0.2), 0.2, reconstruct="lstsq",
                    reconstruct_dataset=mixture, budget="total_20pct", tier="full")  # fmt: skip
        for num_samples in SENSITIVITY_SAMPLES:
            few_scores, few_seconds = scores_for("taylor", num_samples)
            few_values = normalized_values(units, few_scores, defaults.selection.normalization)
            measure("calibration", f"taylor, {num_samples} windows", kept_global(few_values, few_scores, 0.2), 0.2,
                    scoring_seconds=few_seconds, num_samples=num_samples)  # fmt: skip
        rows.append({**next(r for r in rows if r["group"] == "grid" and r["label"] == "taylor" and r["target_ratio"] == 0.2),
                     "group": "calibration", "label": f"taylor, {calib.calibration_num_samples} windows",
                     "num_samples": calib.calibration_num_samples, "scoring_seconds": seconds})  # fmt: skip
        rows[-1].pop("budget", None)
        with tempfile.TemporaryDirectory(prefix="prunellm-bench-") as tmp:
            layer_ids = ablation_windows(tokenizer, calib, run_options.seed, "layer")
            selection = select_by_layer_rates(
                base, layer_ids, units, values, scores, defaults.allocation.model_copy(update={"allocation": "layerwise"}),
                round(0.2 * total), constraints, calib.gradient_batch_size, Path(tmp), total,
            )  # fmt: skip
        measure("layerwise", "taylor, layerwise (removal, inverse)", selection.kept, 0.2, tier="full")
    return {
        "protocol": protocol_text(),
        "calibration": f"Shakespeare train plays, {calib.calibration_num_samples}×{calib.calibration_seq_len} tokens, seed {run_options.seed}",
        "dense": dense,
        "params": total,
        "rows": rows,
        "reconstruction_goals": RECONSTRUCTION_GOALS,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _ppl_keys(section: dict) -> list[str]:
    return list(section["dense"])


def render(section: dict) -> str:
    """Markdown tables of the section: the grid (criteria × ratio) and every other group."""
    from prunellm.report import markdown_table

    keys = _ppl_keys(section)
    main_key = keys[0]
    lines = [
        "## Quality: criteria × ratio, priors, reconstruction, allocation (SmolLM2-135M, no fine-tuning)",
        "",
        f"{section['protocol']}. Calibration: {section['calibration']} (never evaluation text). Dense: "
        + ", ".join(f"{k} {v}" for k, v in section["dense"].items()) + f". Section time {section['seconds']} s.",
        "",
    ]
    grid = [r for r in section["rows"] if r["group"] == "grid"]
    ratios = sorted({r["target_ratio"] for r in grid})
    criteria = list(dict.fromkeys(r["label"] for r in grid))
    by = {(r["label"], r["target_ratio"]): r for r in grid}
    lines += [f"**{main_key}** by criterion and share of all parameters removed (no prior, no reconstruction):", ""]
    table = [[c] + [str(by[(c, ratio)]["ppl"][main_key]) if (c, ratio) in by else "—" for ratio in ratios] for c in criteria]
    lines.append(markdown_table(["criterion"] + [f"{round(ratio * 100)} %" for ratio in ratios], table))
    lines += ["", "Every row with every protocol:", ""]
    headers = ["group", "method", "target", "achieved", "reconstruct"] + keys + ["extra"]
    body = []
    for r in section["rows"]:
        extra = ", ".join(f"{k} {r[k]}" for k in ("scoring_seconds", "prior_seconds", "reconstruct_seconds") if r.get(k))
        body.append([r["group"], r["label"], str(r["target_ratio"]), str(r["achieved_ratio"]), r["reconstruct"]]
                    + [str(r["ppl"].get(k, "—")) for k in keys] + [extra])  # fmt: skip
    lines.append(markdown_table(headers, body))
    return "\n".join(lines) + "\n"
