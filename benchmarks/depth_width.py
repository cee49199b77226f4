"""Depth vs width pruning at the same parameter count on SmolLM2-135M: perplexity and CPU generation speed.

* depth: ``prunellm layers --pruning_ratio 0.2`` (the whole number of layers nearest 20 % of all parameters),
  by ``block_influence`` and by ``ppl``, with the ``prunellm layers`` defaults (32×128 calibration windows);
* width: ``prunellm prune`` with the default criterion (Taylor), normalisation and reconstruction, removing
  exactly the parameter count the depth runs removed, with ``--round_to`` 1, 8 and 64 (MLP widths multiples of N).
  The round_to 8 and 64 rows are there for speed, which reconstruction does not change (it rewrites weights, not
  shapes): they skip it and the 2048/512 protocol, and say so in their label.

Speed is :func:`prunellm.evaluation.speed.measure` (greedy ``generate``, 128-token prompt, 32 new tokens) at batch
sizes 1 and 4 for the dense model and each pruned one, in this one process and thread count, interleaved: after
one untimed round, each of ``rounds`` rounds times every model once in turn and each figure is the median over
the rounds, so the ratios pruned ÷ dense compare like with like on a machine whose speed drifts (goal ≥ 1.15×).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time

from benchmarks.common import CALIBRATION, MODEL, evaluate_ppl, protocol_text, shared

log = logging.getLogger("benchmarks.depth_width")

SPEED_GOAL = 1.15
SPEED_THREADS = 1
SPEED_ROUNDS = 5
ROUND_TO = (1, 8, 64)
DEPTH_METHODS = ("block_influence", "ppl")


def run(ratio: float = 0.2, rounds: int = SPEED_ROUNDS) -> dict:
    """Measure dense, depth-pruned and width-pruned models; returns a JSON-able dict."""
    import torch

    from prunellm.data import sample_calibration
    from prunellm.evaluation.speed import SpeedSettings
    from prunellm.layers import choose_layers_to_remove, layers_for_ratio
    from prunellm.options import LayersRecipe, PruneRecipe, RunOptions
    from prunellm.reconstruction import prune_with_reconstruction
    from prunellm.selection import SelectionConstraints, normalized_values, select_global
    from prunellm.surgery import remove_layers
    from prunellm.units import count_parameters

    torch.manual_seed(0)
    started = time.perf_counter()
    run_options, layers_recipe = RunOptions(), LayersRecipe(base_model=MODEL, dataset=CALIBRATION)
    width_recipe = PruneRecipe(base_model=MODEL, dataset=CALIBRATION)
    bench = shared()
    tokenizer, base, total, units = bench.tokenizer, bench.base, bench.total, bench.units
    settings = SpeedSettings(batch_sizes=(1, 4), repeats=1, warmup=0)
    rows: list[dict] = []
    models: list[torch.nn.Module] = []  # kept until the speed rounds, in the order of ``rows``

    def record(kind: str, label: str, model, extra: dict | None = None, tier: str = "full") -> None:
        rows.append({
            "kind": kind, "label": label, "params": count_parameters(model),
            "achieved_ratio": round(1 - count_parameters(model) / total, 4), "layers": model.config.num_hidden_layers,
            "ppl": bench.dense_ppl() if model is base else evaluate_ppl(model, bench.token_sets, tier),
            **(extra or {}),
        })  # fmt: skip
        models.append(model)
        log.info("%s %s: %s", kind, label, rows[-1])

    record("dense", "dense", base)
    n_remove = layers_for_ratio(base, ratio, total)
    depth_ids = sample_calibration(tokenizer, CALIBRATION, layers_recipe.num_samples, layers_recipe.seq_len, run_options.seed)
    for method in DEPTH_METHODS:
        removed, _ = choose_layers_to_remove(base, depth_ids, method, n_remove, batch_size=layers_recipe.batch_size)
        model = copy.deepcopy(base)
        remove_layers(model, removed)
        record("depth", method, model, {"removed_layers": removed})
    depth_params = rows[-1]["params"]

    scores, _ = bench.gradient_scores(
        (width_recipe.scoring.importance_method,), width_recipe.calibration.calibration_num_samples, width_recipe.calibration.calibration_seq_len,
        run_options.seed, width_recipe.calibration.gradient_batch_size,
    )[width_recipe.scoring.importance_method]
    values = normalized_values(units, scores, width_recipe.selection.normalization)
    recon_ids = bench.reconstruction_ids(width_recipe, run_options.seed)
    for round_to in ROUND_TO:
        constraints = SelectionConstraints(min_kv_groups=width_recipe.selection.min_kv_groups, round_to=round_to)
        selection = select_global(units, values, scores, total - depth_params, constraints, total)
        model = copy.deepcopy(base)
        reconstruct = width_recipe.reconstruction.reconstruct if round_to == 1 else "none"  # speed rows: same shapes either way
        prune_with_reconstruction(model, selection.kept, recon_ids, reconstruct, width_recipe.reconstruction.reconstruct_damp)
        label = f"taylor, round_to {round_to}" + ("" if reconstruct == width_recipe.reconstruction.reconstruct else f", reconstruct {reconstruct}")
        record("width", label, model, {"round_to": round_to, "reconstruct": reconstruct}, tier="full" if round_to == 1 else "128")
    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)  # one thread: the least disturbed timing on a shared 2-core machine
    try:
        for row, speed in zip(rows, interleaved_speed(models, settings, rounds)):
            row["speed"] = speed
    finally:
        torch.set_num_threads(threads)
    del models
    dense_speed = rows[0]["speed"]
    for row in rows:
        row["speedup"] = {
            bs: {k: round(v / dense_speed[bs][k], 3) for k, v in figures.items()} for bs, figures in row["speed"].items()
        }
    return {
        "protocol": protocol_text(),
        "speed_protocol": f"greedy generate, prompt {settings.prompt_tokens} tokens, {settings.new_tokens} new tokens, "
        f"one warm-up round, then the median of {rounds} rounds that each time every model once in turn, "
        f"{SPEED_THREADS} torch thread, fp32 CPU",
        "target_ratio": ratio,
        "n_remove_layers": n_remove,
        "rows": rows,
        "goal": SPEED_GOAL,
        "seconds": round(time.perf_counter() - started, 1),
    }


def interleaved_speed(models: list, settings, rounds: int) -> list[dict[str, dict[str, float]]]:
    """Per model, ``{batch: {"prefill", "decode"}}`` tokens/s: the median over ``rounds`` rounds, each timing every
    model once in turn (after one untimed round), so a slow spell of this shared machine slows every model alike
    instead of whichever one was being timed then."""
    from prunellm.evaluation.speed import measure

    samples: list[dict[str, dict[str, list[float]]]] = [{} for _ in models]
    for round_index in range(rounds + 1):
        for model, sample in zip(models, samples):
            for r in measure(model, settings, memory=False)["speed"]:
                if round_index == 0:
                    continue  # warm-up round
                figures = sample.setdefault(str(r["batch_size"]), {"prefill": [], "decode": []})
                figures["prefill"].append(r["prefill_tokens_per_s"])
                figures["decode"].append(r["decode_tokens_per_s"])
    return [{bs: {k: round(statistics.median(v), 1) for k, v in f.items()} for bs, f in sample.items()} for sample in samples]


def render(section: dict) -> str:
    """Markdown table: PPL and speed (and speed-up over dense) of every model."""
    from prunellm.report import markdown_table

    keys = list(section["rows"][0]["ppl"])
    headers = ["model", "layers", "params", "removed"] + [f"PPL {k}" for k in keys]
    headers += ["prefill tok/s bs1 (×)", "decode tok/s bs1 (×)", "prefill tok/s bs4 (×)", "decode tok/s bs4 (×)"]
    body = []
    for r in section["rows"]:
        cells = [f"{r['kind']}: {r['label']}", str(r["layers"]), f"{r['params']:,}", str(r["achieved_ratio"])]
        cells += [str(r["ppl"].get(k, "—")) for k in keys]
        for bs in ("1", "4"):
            for what in ("prefill", "decode"):
                cells.append(f"{r['speed'][bs][what]} ({r['speedup'][bs][what]}×)")
        body.append(cells)
    goal = section["goal"]
    pruned = [r for r in section["rows"] if r["kind"] != "dense"]
    verdicts = []
    for r in pruned:
        decode = min(r["speedup"][bs]["decode"] for bs in ("1", "4"))
        verdicts.append(f"{r['kind']} {r['label']}: decode ≥ {decode}× ({'met' if decode >= goal else 'missed'})")
    return "\n".join([
        f"## Depth vs width at the same parameter count (SmolLM2-135M, {round(section['target_ratio'] * 100)} %)",
        "",
        f"Depth: {section['n_remove_layers']} whole layers (the count nearest the target); width: Taylor global "
        f"pruning to the same parameter count. {section['protocol']}. Speed: {section['speed_protocol']}; (×) = "
        f"÷ dense in the same run. Section time {section['seconds']} s.",
        "",
        markdown_table(headers, body),
        f"Speed goal ≥ {goal}× dense: " + "; ".join(verdicts) + ".",
        "",
    ])
