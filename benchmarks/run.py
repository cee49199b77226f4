"""Run the benchmarks on the real model and write ``benchmarks/results.json`` and ``docs/benchmarks.md``.

    .venv/bin/python -m benchmarks.run            # everything
    .venv/bin/python -m benchmarks.run --only scoring

Sections:
* ``scoring``: scoring time ÷ one forward+backward over the same calibration data, and peak memory ÷ weight
  bytes, for every criterion (each measured in a fresh process; see ``benchmarks/scoring_cost.py``).
* ``ppl_throughput``: perplexity evaluation tokens/s ÷ raw batched forward tokens/s on the same windows
  (see ``benchmarks/ppl_throughput.py``).
* ``finetune_throughput``: LoRA training tokens/s of prunellm's fine-tuning engine ÷ a plain HF Trainer + peft
  script on the same model and windows (see ``benchmarks/finetune_throughput.py``).

Sections not run keep their last figures from ``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
from pathlib import Path

from benchmarks.scoring_cost import run_isolated

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks")

TIME_GOAL = 1.3
MEMORY_GOAL = 2.0
PPL_THROUGHPUT_GOAL = 0.9
FINETUNE_THROUGHPUT_GOAL = 0.95


def scoring_section(num_samples: int, seq_len: int, batch_size: int) -> dict:
    """Cost of every criterion's calibration pass relative to one forward+backward pass."""
    reference = run_isolated("forward_backward", num_samples, seq_len, batch_size)
    rows = []
    for criterion in ("taylor", "taylor_2nd", "taylor_mix", "wanda", "magnitude"):
        log.info("scoring cost: %s", criterion)
        row = run_isolated(criterion, num_samples, seq_len, batch_size)
        row["time_ratio"] = round(row["seconds"] / reference["seconds"], 3)
        rows.append(row)
    return {"reference": reference, "criteria": rows, "goals": {"time_ratio": TIME_GOAL, "memory_ratio": MEMORY_GOAL}}


def render_scoring(section: dict) -> str:
    """Markdown table of the scoring section."""
    ref = section["reference"]
    lines = [
        "## Scoring cost (SmolLM2-135M, fp32, CPU)",
        "",
        f"Calibration: {ref['tokens']} tokens (Shakespeare train plays), micro-batch {ref['batch_size']}. "
        f"Reference forward+backward: {ref['seconds']} s, peak RSS {ref['peak_rss_mb']} MB "
        f"(memory ratio {ref['memory_ratio']}). Memory ratio = (peak RSS during the pass − RSS after loading + "
        f"weights) ÷ weights; weights = {ref['weight_mb']} MB.",
        "",
        f"| criterion | seconds | time ÷ fwd+bwd (goal ≤ {TIME_GOAL}) | memory ratio (goal ≤ {MEMORY_GOAL}) | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for row in section["criteria"]:
        time_ok = "met" if row["time_ratio"] <= TIME_GOAL else "missed"
        mem_ok = "met" if row["memory_ratio"] <= MEMORY_GOAL else "missed"
        lines.append(
            f"| {row['criterion']} | {row['seconds']} | {row['time_ratio']} ({time_ok}) | {row['memory_ratio']} ({mem_ok}) | {row['peak_rss_mb']} |"
        )
    return "\n".join(lines) + "\n"


def render_ppl_throughput(section: dict) -> str:
    """Markdown table of the PPL-throughput section."""
    from prunellm.report import markdown_table

    met = "met" if section["ratio"] >= PPL_THROUGHPUT_GOAL else "missed"
    row = [section["windows"], section["seq_len"], section["batch_size"], section["ppl_tokens_per_s"],
           section["raw_tokens_per_s"], f"{section['ratio']} ({met})", section["ppl"]]  # fmt: skip
    headers = ["windows", "window tokens", "batch", "PPL eval tok/s", "raw forward tok/s",
               f"ratio (goal ≥ {PPL_THROUGHPUT_GOAL})", "PPL"]  # fmt: skip
    return "\n".join([
        "## Perplexity evaluation throughput (SmolLM2-135M, fp32, CPU)",
        "",
        f"`prunellm.evaluation.perplexity` against a bare `model(input_ids=batch)` loop over the same "
        f"{section['tokens']} tokens (Shakespeare eval plays), {section['threads']} torch threads; the fastest of "
        f"{section['repeats']} alternating runs of each after one warm-up.",
        "",
        markdown_table(headers, [[str(v) for v in row]]),
    ])


def render_finetune_throughput(section: dict) -> str:
    """Markdown table of the fine-tuning throughput section."""
    from prunellm.report import markdown_table

    met = "met" if section["ratio"] >= FINETUNE_THROUGHPUT_GOAL else "missed"
    headers = ["engine tok/s", "plain Trainer + peft tok/s", f"ratio (goal ≥ {FINETUNE_THROUGHPUT_GOAL})", "ratio of the medians"]
    row = [str(section["engine_tokens_per_s"]), str(section["plain_tokens_per_s"]), f"{section['ratio']} ({met})",
           str(section.get("median_ratio", ""))]  # fmt: skip
    return "\n".join([
        "## Fine-tuning throughput (SmolLM2-135M, LoRA, fp32, CPU)",
        "",
        f"`prunellm.finetune.FineTuner` against a plain `Trainer` + `get_peft_model` script: {section['method']}, "
        f"{section['steps']} steps of {section['batch_size']} × {section['seq_len']} tokens (the same Shakespeare train "
        f"windows), {section['threads']} torch threads; tokens/s from each Trainer's `train_runtime`, the fastest of "
        f"{section['repeats']} alternating runs of each after one warm-up.",
        "",
        markdown_table(headers, [row]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description="prunellm benchmarks on SmolLM2-135M")
    parser.add_argument("--only", default="scoring", help="comma-separated sections: scoring, ppl_throughput, finetune_throughput, reconstruction")
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    saved = ROOT / "benchmarks" / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}  # sections not run keep their figures
    results |= {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "processor": platform.processor(), "cpus": __import__("os").cpu_count()},
    }
    markdown = ["# prunellm benchmarks", "", "Produced by `python -m benchmarks.run`; every figure states its protocol.", ""]
    if "scoring" in sections:
        results["scoring"] = scoring_section(args.num_samples, args.seq_len, args.batch_size)
    if "scoring" in results:
        markdown.append(render_scoring(results["scoring"]))
    if "ppl_throughput" in sections:
        from benchmarks.ppl_throughput import measure

        results["ppl_throughput"] = measure(args.num_samples, args.seq_len, args.batch_size)
    if "ppl_throughput" in results:
        markdown.append(render_ppl_throughput(results["ppl_throughput"]))
    if "finetune_throughput" in sections:
        from benchmarks.finetune_throughput import measure as measure_finetune

        results["finetune_throughput"] = measure_finetune()
    if "finetune_throughput" in results:
        markdown.append(render_finetune_throughput(results["finetune_throughput"]))
    if "reconstruction" in sections:
        from benchmarks.reconstruction_quality import run as measure_reconstruction

        results["reconstruction"] = measure_reconstruction()
    if "reconstruction" in results:
        from benchmarks.reconstruction_quality import render as render_reconstruction

        markdown.append(render_reconstruction(results["reconstruction"]))
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(markdown))
    log.info("wrote benchmarks/results.json and docs/benchmarks.md")


if __name__ == "__main__":
    main()
