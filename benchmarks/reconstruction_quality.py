"""Retraining-free reconstruction on SmolLM2-135M: held-out perplexity with none / bias / lstsq.

Calibration (scoring and reconstruction) comes from the Shakespeare train plays; perplexity is measured on
WikiText-2 test (``../shared/data/wikitext-2/test.txt`` when present) and on the held-out Shakespeare plays,
PPL protocol 128 over the first ``--windows`` windows. Two budgets: 20 % of MLP channels (Taylor, MLP only;
≈ 11.9 % of all parameters) and 20 % of total parameters (Taylor, heads and channels).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
GOALS = {"mlp_20pct_channels": 1.3, "total_20pct": 2.0}


def run(num_samples: int = 64, seq_len: int = 128, windows: int = 48, modes: tuple[str, ...] = ("none", "bias", "lstsq")) -> dict:
    """Measure every (budget, mode) pair; returns a JSON-able dict."""
    import torch

    from prunellm.calibration import collect_gradient_stats
    from prunellm.criteria import CriterionOptions, get_criterion
    from prunellm.data import load_text, sample_calibration, tokenize_text
    from prunellm.evaluation.perplexity import Protocol, perplexity
    from prunellm.models import load_model, load_tokenizer
    from prunellm.reconstruction import prune_with_reconstruction
    from prunellm.selection import SelectionConstraints, normalized_values, select_global
    from prunellm.units import all_units, count_parameters

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m")
    texts = {"shakespeare_eval": load_text("shakespeare", "eval")[:200_000]}
    if WIKITEXT.is_file():
        texts["wikitext2_test"] = WIKITEXT.read_text()[:200_000]
    eval_ids = {name: tokenize_text(tokenizer, text) for name, text in texts.items()}

    def ppl(model) -> dict[str, float]:
        return {name: round(perplexity(model, ids, Protocol(128, 128), max_windows=windows, progress=False).ppl, 3) for name, ids in eval_ids.items()}

    calibration = sample_calibration(tokenizer, "shakespeare", num_samples, seq_len, seed=0)
    reconstruction_ids = sample_calibration(tokenizer, "shakespeare", num_samples, seq_len, seed=3)
    total = count_parameters(base)
    dense = ppl(base)
    rows = []
    for budget, kinds, ratio in (("mlp_20pct_channels", ("mlp_channel",), None), ("total_20pct", ("kv_group", "mlp_channel"), 0.2)):
        units = list(all_units(base, kinds))
        if ratio is None:  # 20 % of every layer's MLP channels, as a share of all parameters
            ratio = 0.2 * sum(u.cost * u.count for u in units) / total
        stats = collect_gradient_stats(base, calibration, units, terms={"first"}, batch_size=8)
        scores = get_criterion("taylor").score(base, units, stats, CriterionOptions())
        values = normalized_values(units, scores, "block")
        selection = select_global(units, values, scores, round(ratio * total), SelectionConstraints(), total)
        for mode in modes:
            model = copy.deepcopy(base)
            started = time.perf_counter()
            prune_with_reconstruction(model, selection.kept, reconstruction_ids, mode)
            seconds = time.perf_counter() - started
            result = ppl(model)
            rows.append({
                "budget": budget, "mode": mode, "achieved_ratio": round(1 - count_parameters(model) / total, 4),
                "ppl": result, "ratio_to_dense": {k: round(v / dense[k], 3) for k, v in result.items()},
                "reconstruction_seconds": round(seconds, 1),
            })  # fmt: skip
            del model
    return {
        "protocol": f"PPL@128, first {windows} windows; calibration: Shakespeare train plays, {num_samples}x{seq_len} tokens",
        "dense": dense, "rows": rows, "goals": GOALS,
    }  # fmt: skip


def render(section: dict) -> str:
    """Markdown table of the section."""
    datasets = list(section["dense"])
    lines = [
        "## Retraining-free reconstruction (SmolLM2-135M, Taylor, no fine-tuning)",
        "",
        f"{section['protocol']}. Dense: " + ", ".join(f"{k} {v}" for k, v in section["dense"].items()) + ".",
        "",
        "| budget | reconstruct | achieved ratio | " + " | ".join(f"PPL {d} (× dense)" for d in datasets) + " | seconds | goal |",
        "|---|---|---|" + "---|" * len(datasets) + "---|---|",
    ]
    for row in section["rows"]:
        goal = section["goals"][row["budget"]]
        key = "wikitext2_test" if "wikitext2_test" in row["ratio_to_dense"] else datasets[0]
        met = "met" if row["ratio_to_dense"][key] <= goal else f"missed (≤ {goal}×)"
        cells = " | ".join(f"{row['ppl'][d]} ({row['ratio_to_dense'][d]}×)" for d in datasets)
        lines.append(f"| {row['budget']} | {row['mode']} | {row['achieved_ratio']} | {cells} | {row['reconstruction_seconds']} | {met} |")
    return "\n".join(lines) + "\n"
