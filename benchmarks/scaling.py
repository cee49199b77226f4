"""Issue 39: the default recipe's prune seconds against the model's size, in memory and ``--offload``.

Each row is ``prunellm prune --pruning_ratio 0.2`` with every other option at its default (no evaluation), run in a
fresh process on an otherwise idle machine: the prune seconds and where they went come from the run's own
``logs/timings.json`` (stages, and their parts: the prior's layer and block ablations, the refit's statistics,
solves and next-layer inputs), the peak RSS from the process. Models: the embedded SmolLM2-135M and Gemma 3 270M,
and random Llama models of TinyLlama's width (hidden 2048, 32 query / 4 KV heads, MLP 5632) with SmolLM2's
tokenizer and vocabulary, 6 and 22 layers, stored in bf16 and pruned in float32 (what the prior and the refit
cost does not depend on the weights' values). The fit is least squares of log seconds on log parameters over the
in-memory rows: an exponent above 1 grows faster than the model.

    python -m benchmarks.scaling --rows smollm2-135m/memory llama-2048x6/memory   # prints the rows' JSON
    python -m benchmarks.run --only scaling                                       # into results.json and docs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, log

SYNTHETIC_LAYERS = {"llama-2048x6": 6, "llama-2048x22": 22}
ROWS = ("smollm2-135m/memory", "smollm2-135m/offload", "gemma3-270m/memory", "llama-2048x6/memory",
        "llama-2048x22/memory", "llama-2048x22/offload")  # fmt: skip
RATIO = 0.2
# the peak inside the child process, after prunellm's own command line ran there
_CHILD = ("import resource, sys\nfrom prunellm.cli import main\ncode = main(sys.argv[1:])\n"
          "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")  # fmt: skip


def synthetic_model(name: str) -> Path:
    """A random Llama of TinyLlama's width with ``SYNTHETIC_LAYERS[name]`` layers and SmolLM2's tokenizer, saved
    once (bf16) under ``$PRUNELLM_CACHE/benchmarks/``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunellm.models import load_tokenizer
    from prunellm.paths import atomic_dir, cache_dir

    target = cache_dir() / "benchmarks" / f"{name}-smollm2-vocab"
    if (target / "config.json").is_file():
        return target
    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=SYNTHETIC_LAYERS[name],
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, max_shard_size="500MB")
        tokenizer.save_pretrained(tmp)
    return target


def measure(row: str) -> dict:
    """One row (``model/memory`` or ``model/offload``) in a fresh process."""
    model, mode = row.split("/")
    ref = str(synthetic_model(model)) if model in SYNTHETIC_LAYERS else model
    out = Path(tempfile.mkdtemp(prefix="prunellm-scaling-"))
    try:
        command = [sys.executable, "-c", _CHILD, "prune", "--base_model", ref, "--output_dir", str(out), "--output_name",
                   "row", "--pruning_ratio", str(RATIO), "--dtype", "float32", *(["--offload"] if mode == "offload" else [])]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"scaling row {row} failed: {done.stderr[-2000:]}")
        timings = json.loads((out / "row" / "logs" / "timings.json").read_text())
        plan = json.loads((out / "row" / "plan.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    peak_kb = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return {"row": row, "model": model, "mode": mode, "params": plan["params_before"], "layers": len(plan["layers"]),
            "achieved_ratio": plan["achieved_ratio"], "prune_seconds": timings["prune_seconds"],
            "stages": timings["stages"], "parts": timings.get("parts", {}), "peak_rss_gb": round(peak_kb / 2**20, 2)}  # fmt: skip


def exponent(rows: list[dict]) -> float | None:
    """b of the least-squares fit log seconds = a + b log params over ``rows`` (None with fewer than two sizes)."""
    points = [(math.log(r["params"]), math.log(r["prune_seconds"])) for r in rows]
    if len({x for x, _ in points}) < 2:
        return None
    mean_x, mean_y = (sum(p[i] for p in points) / len(points) for i in (0, 1))
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


# Llama-3 8B and 70B, the shapes the arithmetic is done for
LARGE = {"8 B": dict(layers=32, hidden=4096, intermediate=14336, kv_heads=8, heads=32, vocab=128256),
         "70 B": dict(layers=80, hidden=8192, intermediate=28672, kv_heads=8, heads=64, vocab=128256)}  # fmt: skip
GPU_RATES = {"matmul": 300e12, "fp64": 30e12}  # assumed sustained FLOP/s of one H100: bf16 layer passes, fp64 solves
SOLVES_PER_PROJECTION = 8  # the damping walk's three or four λ on two folds, and the final solve


def gpu_arithmetic(shape: dict) -> dict:
    """FLOPs of the default's prior and of one round's refit for a Llama ``shape``, and their seconds at
    :data:`GPU_RATES`: the prior's ablations rerun every later layer (L²/2 layer passes per window and kind, layer
    and MLP) plus the head on the scored positions; the refit runs one pass for its statistics, accumulates the down
    projection's XᵀX and solves :data:`SOLVES_PER_PROJECTION` fp64 ridge systems of the kept width per layer."""
    from prunellm.options import PruneRecipe

    recipe = PruneRecipe()
    calibration, L, h, inter = recipe.calibration, shape["layers"], shape["hidden"], shape["intermediate"]
    layer_params = 2 * h * h + 2 * h * h * shape["kv_heads"] // shape["heads"] + 3 * h * inter
    tokens = calibration.calibration_seq_len * (calibration.layer_importance_num_samples + calibration.block_importance_num_samples) / 2
    prior = 2 * tokens * (L * L / 2) * 2 * layer_params  # two kinds, each ablation through the later layers
    prior += 2 * L * (tokens / calibration.calibration_seq_len) * recipe.priors.prior_positions * 2 * shape["vocab"] * h
    refit_tokens = recipe.reconstruction.reconstruct_num_samples * recipe.reconstruction.reconstruct_seq_len
    kept = (1 - RATIO) * inter
    statistics = 2 * layer_params * L * refit_tokens + L * refit_tokens * 2 * inter * inter
    solves = L * SOLVES_PER_PROJECTION * (kept**3 / 3 + 4 * kept * kept * h)  # factor, solve, held-out error
    return {"prior_flops": prior, "refit_flops": statistics, "solve_flops_fp64": solves,
            "prior_seconds": prior / GPU_RATES["matmul"],
            "refit_seconds_per_round": statistics / GPU_RATES["matmul"] + solves / GPU_RATES["fp64"]}  # fmt: skip


def run(rows: tuple[str, ...] = ROWS) -> dict:
    """The section: every row of ``rows``, one at a time."""
    measured = []
    for row in rows:
        log.info("scaling: %s", row)
        measured.append(measure(row))
    return {"ratio": RATIO, "rows": measured, "exponent_in_memory": exponent([r for r in measured if r["mode"] == "memory"])}


def render(section: dict) -> str:
    def part(r: dict, name: str) -> str:
        value = r["parts"].get(name)
        return "—" if value is None else f"{value:.0f}"

    lines = [
        "## Issue 39: prune seconds against the model's size", "",
        f"`prunellm prune --pruning_ratio {section['ratio']}` with the default recipe, no evaluation, one fresh process "
        "a row on the idle 2-core machine; seconds from the run's `logs/timings.json`. Random Llamas: TinyLlama's width, "
        "SmolLM2's vocabulary, bf16 on disk, float32 in use. `python -m benchmarks.run --only scaling`.", "",
        "| model | parameters | layers | placement | prune s | prior: layer / block ablations s | refit s (statistics / solves) | s per 100 M parameters | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in section["rows"]:
        stages = r["stages"]
        refit = stages.get("surgery and refit", 0.0)
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:,.0f} M | {r['layers']} | {r['mode']} | {r['prune_seconds']:.0f} | "
            f"{part(r, 'priors/layer ablations')} / {part(r, 'priors/block ablations')} | {refit:.0f} "
            f"({part(r, 'surgery and refit/statistics')} / {part(r, 'surgery and refit/solves')}) | "
            f"{r['prune_seconds'] / (r['params'] / 1e8):.0f} | {r['peak_rss_gb']:.1f} |"
        )  # fmt: skip
    b = section.get("exponent_in_memory")
    sizes = len({r["params"] for r in section["rows"] if r["mode"] == "memory"})
    lines += ["", "Fitted exponent of prune seconds on parameters, in memory: " + ("—" if b is None else f"**{b:.2f}**") +
              f" (1 = linear) over {sizes} sizes of different depth and width, so read the stages rather than the fit: the "
              "prior's exact ablations rerun every later layer, L²/2 layer passes per window and kind (deep models), and "
              "each refit solve is cubic in the MLP's kept width (wide models): both grow faster than the parameters.", "",
              "The same default on one H100, by arithmetic (Llama-3 shapes; assumed sustained 300 TFLOP/s for the bf16 "
              "layer passes, 30 TFLOP/s for the fp64 solves; `--offload` prunes in one round and reads each layer once "
              "per sweep on top):", "",
              "| model | prior FLOPs | prior s | refit FLOPs (passes / fp64 solves) | refit s per round |", "|---|---|---|---|---|"]  # fmt: skip
    for name, shape in LARGE.items():
        a = gpu_arithmetic(shape)
        lines.append(f"| Llama-3 {name} | {a['prior_flops']:.1e} | {a['prior_seconds']:.0f} | {a['refit_flops']:.1e} / "
                     f"{a['solve_flops_fp64']:.1e} | {a['refit_seconds_per_round']:.0f} |")  # fmt: skip
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"model/placement rows: {' '.join(ROWS)}")
    args = parser.parse_args()
    print(json.dumps(run(tuple(args.rows)), indent=2))


if __name__ == "__main__":
    main()
