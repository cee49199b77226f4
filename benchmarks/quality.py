"""Quality of global structured pruning on SmolLM2-135M: criteria × ratio grid, priors, reconstruction, allocation.

Every run scores with the library's own calibration pass and criteria (the defaults of ``prunellm prune`` unless
a row says otherwise: block normalisation, ``--taylor_num_samples 128``, ``--taylor_seq_len 128``, seed 42,
Shakespeare train plays) and is evaluated by :func:`benchmarks.common.evaluate_ppl` (WikiText-2 test and the
held-out Shakespeare plays; the dense model is measured in the same run). One scoring pass per criterion serves
every ratio. Rows:

* ``grid``: taylor, taylor_2nd, wanda, magnitude, random × 10/20/30 % of total parameters, no prior, no
  reconstruction (what the criterion alone does);
* ``prior``: taylor with layer/block priors (T = 1, tau auto) at the three ratios;
* ``reconstruct``: taylor with the default ``--reconstruct`` at the three ratios;
* ``layerwise``: ``--allocation layerwise`` (layer_pruning.py defaults: removal importance, inverse strategy) at 20 %;
* ``calibration``: taylor at 20 % scored on 8 and 32 windows (128 is the grid's).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.common import CALIBRATION, MODEL, eval_token_sets, evaluate_ppl, protocol_text

log = logging.getLogger("benchmarks.quality")

CRITERIA = ("taylor", "taylor_2nd", "wanda", "magnitude", "random")
RATIOS = (0.1, 0.2, 0.3)
SENSITIVITY_SAMPLES = (8, 32)


def run(criteria: tuple[str, ...] = CRITERIA, ratios: tuple[float, ...] = RATIOS) -> dict:
    """Measure every row; returns a JSON-able dict (``rows`` plus the dense model's perplexities)."""
    import torch

    from prunellm.criteria import CriterionOptions, get_criterion
    from prunellm.data import sample_calibration
    from prunellm.models import load_model, load_tokenizer
    from prunellm.options import PruneRecipe, RunOptions
    from prunellm.pruner import collect_stats, compute_priors, reconstruction_settings, score_and_plan
    from prunellm.reconstruction import prune_with_reconstruction
    from prunellm.selection import SelectionConstraints, normalized_values, select_global
    from prunellm.units import all_units, count_parameters

    torch.manual_seed(0)
    defaults, run_options = PruneRecipe(base_model=MODEL, dataset=CALIBRATION), RunOptions()
    tokenizer = load_tokenizer(MODEL)
    base = load_model(MODEL)
    token_sets = eval_token_sets(tokenizer)
    total = count_parameters(base)
    units = list(all_units(base))
    constraints = SelectionConstraints(min_kv_groups=defaults.min_kv_groups, round_to=defaults.round_to)
    rows: list[dict] = []
    started = time.perf_counter()
    dense = evaluate_ppl(base, token_sets)
    log.info("dense: %s", dense)

    def calibration(num_samples: int):
        return sample_calibration(tokenizer, CALIBRATION, num_samples, defaults.taylor_seq_len, run_options.seed)

    def scores_for(criterion: str, num_samples: int):
        recipe = defaults.model_copy(update={"importance_method": criterion, "taylor_num_samples": num_samples})
        t0 = time.perf_counter()
        needs = get_criterion(criterion).needs
        ids = calibration(num_samples) if needs & {"gradients", "activations"} else None
        stats = collect_stats(base, ids, units, recipe)
        scores = get_criterion(criterion).score(base, units, stats, CriterionOptions(seed=run_options.seed))
        return scores, round(time.perf_counter() - t0, 1)

    def measure(group: str, label: str, values, scores, ratio: float, reconstruct: str = "none", **extra) -> None:
        selection = select_global(units, values, scores, round(ratio * total), constraints, total)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        ids = None
        if reconstruct != "none":
            settings = reconstruction_settings(defaults.model_copy(update={"reconstruct": reconstruct}), run_options.seed)
            ids = sample_calibration(tokenizer, CALIBRATION, settings["num_samples"], settings["seq_len"], settings["seed"])
        prune_with_reconstruction(model, selection.kept, ids, reconstruct, defaults.reconstruct_damp)
        row = {
            "group": group, "label": label, "target_ratio": ratio, "reconstruct": reconstruct,
            "achieved_ratio": round(1 - count_parameters(model) / total, 4), "params": count_parameters(model),
            "reconstruct_seconds": round(time.perf_counter() - t0, 1) if reconstruct != "none" else 0.0,
            "ppl": evaluate_ppl(model, token_sets), **extra,
        }  # fmt: skip
        log.info("%s %s @%.2f: %s", group, label, ratio, row["ppl"])
        rows.append(row)
        del model

    taylor_values = None
    for criterion in criteria:
        scores, seconds = scores_for(criterion, defaults.taylor_num_samples)
        values = normalized_values(units, scores, defaults.normalization)
        for ratio in ratios:
            measure("grid", criterion, values, scores, ratio, scoring_seconds=seconds)
        if criterion == "taylor":
            taylor_scores, taylor_values, taylor_seconds = scores, values, seconds
    if taylor_values is not None:
        with tempfile.TemporaryDirectory(prefix="prunellm-bench-") as tmp:
            prior_recipe = defaults.model_copy(update={"temperature": 1.0})
            t0 = time.perf_counter()
            priors = compute_priors(base, tokenizer, prior_recipe, run_options, Path(tmp))
            prior_seconds = round(time.perf_counter() - t0, 1)
        prior_values = normalized_values(units, taylor_scores, defaults.normalization, priors)
        for ratio in ratios:
            measure("prior", "taylor T=1", prior_values, taylor_scores, ratio, prior_seconds=prior_seconds)
        for ratio in ratios:
            measure("reconstruct", f"taylor + {defaults.reconstruct}", taylor_values, taylor_scores, ratio, reconstruct=defaults.reconstruct)
        for num_samples in SENSITIVITY_SAMPLES:
            scores, seconds = scores_for("taylor", num_samples)
            values = normalized_values(units, scores, defaults.normalization)
            measure("calibration", f"taylor, {num_samples} windows", values, scores, 0.2, scoring_seconds=seconds, num_samples=num_samples)
        rows.append({**next(r for r in rows if r["group"] == "grid" and r["label"] == "taylor" and r["target_ratio"] == 0.2),
                     "group": "calibration", "label": f"taylor, {defaults.taylor_num_samples} windows",
                     "num_samples": defaults.taylor_num_samples, "scoring_seconds": taylor_seconds})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="prunellm-bench-") as tmp:
        recipe = defaults.model_copy(update={"allocation": "layerwise", "pruning_ratio": 0.2, "reconstruct": "none"})
        plan, _ = score_and_plan(base, tokenizer, recipe, run_options, Path(tmp))
        model = copy.deepcopy(base)
        prune_with_reconstruction(model, plan.kept_units(), None, "none")
        rows.append({
            "group": "layerwise", "label": "taylor, layerwise (removal, inverse)", "target_ratio": 0.2, "reconstruct": "none",
            "achieved_ratio": round(1 - count_parameters(model) / total, 4), "params": count_parameters(model),
            "ppl": evaluate_ppl(model, token_sets),
        })  # fmt: skip
        del model
    return {
        "protocol": protocol_text(),
        "calibration": f"Shakespeare train plays, {defaults.taylor_num_samples}×{defaults.taylor_seq_len} tokens, seed {run_options.seed}",
        "dense": dense,
        "params": total,
        "rows": rows,
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
