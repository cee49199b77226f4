"""Recovery after pruning on SmolLM2-135M: LoRA, full fine-tuning and distillation for the same token budget.

The model is pruned by 20 % of all parameters with ``prunellm prune``'s defaults (Taylor, block normalisation,
default reconstruction), then each method trains a fresh copy with :class:`prunellm.finetune.FineTuner` on the
same windows of the Shakespeare train plays (``steps`` × ``batch_size`` × ``seq_len`` tokens, the same seed and
order), fp32 on the CPU. Short-budget settings, fixed before measuring: LoRA r 8 / alpha 16 at lr 1e-3; full
fine-tuning at lr 1e-4; distillation = full fine-tuning on (1 − α)·NLL + α·T²·KL from the unpruned model
(α 0.5, T 2). Perplexity as every quality benchmark (:func:`benchmarks.common.evaluate_ppl`).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.common import CALIBRATION, MODEL, evaluate_ppl, protocol_text, pruned_key, shared

log = logging.getLogger("benchmarks.recovery")

METHODS = (
    ("lora", True, 1e-3, None),
    ("full", False, 1e-4, None),
    ("full + KD", False, 1e-4, 0.5),
)


def run(steps: int = 12, batch_size: int = 4, seq_len: int = 128, ratio: float = 0.2) -> dict:
    """Prune once, recover with every method for the same token budget; returns a JSON-able dict."""
    import torch

    from prunellm.finetune import FineTuner
    from prunellm.options import DistillOptions, FinetuneData, PruneRecipe, RunOptions, TrainOptions
    from prunellm.reconstruction import prune_with_reconstruction
    from prunellm.selection import SelectionConstraints, normalized_values, select_global
    from prunellm.units import count_parameters

    torch.manual_seed(0)
    started = time.perf_counter()
    bench = shared()
    tokenizer, base, token_sets = bench.tokenizer, bench.base, bench.token_sets
    recipe, seed = PruneRecipe(base_model=MODEL, dataset=CALIBRATION, pruning_ratio=ratio), RunOptions().seed
    dense = bench.dense_ppl()
    cached = bench.cache.pop(pruned_key(recipe.scoring.importance_method, ratio, recipe.reconstruction.reconstruct), None)
    if cached is not None:  # the quality section pruned the same model (same scores, selection and reconstruction)
        pruned, row = cached
        rows = [{"method": "pruned (no recovery)", "params": row["params"], "ppl": row["ppl"]}]
    else:  # what `prunellm prune --pruning_ratio 0.2` does, from the run's shared Taylor scores
        calib, rebuild = recipe.calibration, recipe.reconstruction
        scores, _ = bench.gradient_scores((recipe.scoring.importance_method,), calib.calibration_num_samples, calib.calibration_seq_len, seed,
                                          calib.gradient_batch_size)[recipe.scoring.importance_method]  # fmt: skip
        values = normalized_values(bench.units, scores, recipe.selection.normalization)
        constraints = SelectionConstraints(min_kv_groups=recipe.selection.min_kv_groups, round_to=recipe.selection.round_to)
        kept = select_global(bench.units, values, scores, round(ratio * bench.total), constraints, bench.total).kept
        pruned = copy.deepcopy(base)
        prune_with_reconstruction(pruned, kept, bench.reconstruction_ids(recipe, seed), rebuild.reconstruct, rebuild.reconstruct_damp)
        rows = [{"method": "pruned (no recovery)", "params": count_parameters(pruned), "ppl": evaluate_ppl(pruned, token_sets)}]
    data = FinetuneData(dataset_name=CALIBRATION, num_samples=steps * batch_size, seq_len=seq_len, val_set_size=8)
    for name, use_lora, lr, alpha in METHODS:
        training = TrainOptions(batch_size=batch_size, micro_batch_size=batch_size, max_steps=steps, learning_rate=lr,
                                warmup_steps=0.1, save_steps=0, precision="fp32", seed=42)  # fmt: skip
        distill = DistillOptions(distill_alpha=alpha) if alpha is not None else None
        tuner = FineTuner(copy.deepcopy(pruned), tokenizer, use_lora=use_lora, training=training, distill=distill,
                          teacher=base if alpha is not None else None)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="prunellm-bench-") as tmp:
            metrics = tuner.finetune(data=data, output_dir=Path(tmp) / "ft")
        rows.append({
            "method": name, "learning_rate": lr, "distill_alpha": alpha, "params": count_parameters(tuner.model),
            "train_tokens": metrics["train_tokens"], "train_seconds": metrics["train_seconds"],
            "tokens_per_second": metrics["tokens_per_second"], "trainable_params": metrics["trainable_params"],
            "ppl": evaluate_ppl(tuner.model, token_sets),
        })  # fmt: skip
        log.info("recovery %s: %s", name, rows[-1])
        del tuner
    return {
        "protocol": protocol_text(),
        "budget": f"{steps} steps × {batch_size} × {seq_len} tokens = {steps * batch_size * seq_len} tokens of the Shakespeare train plays",
        "pruning": f"taylor, {round(ratio * 100)} % of all parameters, reconstruct {recipe.reconstruction.reconstruct}",
        "dense": dense,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def render(section: dict) -> str:
    """Markdown table of the section."""
    from prunellm.report import markdown_table

    keys = list(section["dense"])
    headers = ["model", "trainable params", "train tok/s"] + [f"PPL {k}" for k in keys]
    body = [["dense", "—", "—"] + [str(section["dense"][k]) for k in keys]]
    for r in section["rows"]:
        body.append([r["method"], f"{r.get('trainable_params', 0):,}" if r.get("trainable_params") else "—",
                     str(r.get("tokens_per_second") or "—")] + [str(r["ppl"].get(k, "—")) for k in keys])  # fmt: skip
    return "\n".join([
        "## Recovery: LoRA vs full fine-tuning vs distillation (SmolLM2-135M)",
        "",
        f"Pruned: {section['pruning']}. Budget: {section['budget']}. {section['protocol']}. Section time {section['seconds']} s.",
        "",
        markdown_table(headers, body),
    ])
