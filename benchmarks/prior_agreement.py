"""Issue 39: do the prior's cheaper Δ rank layers and blocks as the exact ablations do?

On SmolLM2-135M and the default recipe's prior windows (Shakespeare train plays, ``--layer_importance_num_samples`` × 128 tokens, the layer
ablations' seed), every layer, attention block and MLP block is ablated exactly (``kl``: the mean KL divergence of
the next-token distributions from the dense model's at every position, each ablation rerunning the layers after it)
and measured two cheaper ways: ``fisher`` (½ δᵀFδ from one forward and two backward passes a batch) and ``kl`` at
``POSITIONS`` evenly spaced positions of each window (``--prior_positions``: the same ablations, the LM head and
softmax on those positions only). Reported per target and way: Spearman's rank correlation, Pearson's correlation
of ln(1 + Δ) (what the prior multiplies by), the blocks the two put in their top five, and each way's seconds::

    PYTHONPATH=src python -m benchmarks.prior_agreement            # prints the JSON
    python -m benchmarks.run --only prior_agreement                 # into results.json and docs/benchmarks.md
"""

from __future__ import annotations

import json
import math
import time

import torch

from benchmarks.common import MODEL

TARGETS = ("layer", "attention", "mlp")
POSITIONS = 32


def _ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).argsort().argsort().double()


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def agreement(exact: list[float], estimate: list[float]) -> dict:
    """Spearman of Δ, Pearson of ln(1 + Δ) and the shared top five of two measures of the same blocks."""
    top = lambda values: set(sorted(range(len(values)), key=lambda i: -values[i])[:5])  # noqa: E731
    logs = [torch.tensor([math.log1p(v) for v in values], dtype=torch.float64) for values in (exact, estimate)]
    return {"spearman": round(_correlation(_ranks(exact), _ranks(estimate)), 3),
            "pearson_log1p": round(_correlation(*logs), 3), "top5_shared": len(top(exact) & top(estimate)),
            "exact": [round(v, 4) for v in exact], "estimate": [round(v, 4) for v in estimate]}  # fmt: skip


def run(threads: int = 2) -> dict:
    import prunellm as pl
    from prunellm.options import CalibrationOptions
    from prunellm.priors import ablation_deltas_of
    from prunellm.pruner import ablation_windows

    torch.set_num_threads(threads)
    model, tokenizer = pl.load(MODEL)
    model.eval()
    calibration = CalibrationOptions()
    ids = ablation_windows(tokenizer, calibration, 42, "layer")
    measured, seconds = {}, {}
    for name, options in (("kl", {"measure": "kl"}), ("fisher", {"measure": "fisher"}),
                          (f"kl_{POSITIONS}_positions", {"measure": "kl", "positions": POSITIONS})):  # fmt: skip
        started = time.perf_counter()
        measured[name] = ablation_deltas_of(model, ids, TARGETS, calibration.gradient_batch_size, **options)
        seconds[name] = round(time.perf_counter() - started, 1)
    exact = measured.pop("kl")
    return {"model": MODEL, "windows": list(ids.shape), "threads": threads, "seconds": seconds,
            "estimates": {name: {t: agreement(exact[t], deltas[t]) for t in TARGETS} for name, deltas in measured.items()}}  # fmt: skip


def render(section: dict) -> str:
    seconds = section["seconds"]
    rows = [
        f"| {name} ({seconds[name]:.0f} s) | {target} | {a['spearman']:.3f} | {a['pearson_log1p']:.3f} | {a['top5_shared']} of 5 |"
        for name, targets in section["estimates"].items() for target, a in targets.items()
    ]  # fmt: skip
    fisher = section["estimates"]["fisher"]["mlp"]
    return "\n".join([
        "## Issue 39: the prior's Δ measured cheaper against the exact ablations (`kl`, every position)", "",
        f"{section['model']}, the default prior windows ({section['windows'][0]} × {section['windows'][1]} tokens of the "
        f"Shakespeare train plays), {section['threads']} torch threads. Exact: every layer, attention and MLP block "
        f"ablated, the KL divergence of the next-token distributions from the dense model's at every position "
        f"({seconds['kl']:.0f} s for the three). `fisher`: ½ δᵀFδ, the ablation's exact change δ of the residual stream "
        f"after its layer and the Fisher information there from labels drawn from the model, one forward and two "
        f"backward passes a batch. `kl_{POSITIONS}_positions` (`--prior_positions {POSITIONS}`): the same ablations, the "
        f"KL at {POSITIONS} evenly spaced positions of each window. `python -m benchmarks.run --only prior_agreement`.", "",
        "| way (seconds, three targets) | target | Spearman of Δ | Pearson of ln(1 + Δ) | top five shared |",
        "|---|---|---|---|---|", *rows, "",
        f"Second order underestimates the few blocks whose removal breaks the model (MLP 0: exact {fisher['exact'][0]:.2f}, "
        f"fisher {fisher['estimate'][0]:.2f}). What the prior changes in the pruned model is in the peer table's rows "
        "(quality and prune seconds side by side).", "",
    ])  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
