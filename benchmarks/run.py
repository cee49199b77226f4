"""Run the benchmarks on the real model and write ``benchmarks/results.json`` and ``docs/benchmarks.md``.

    .venv/bin/python -m benchmarks.run            # everything
    .venv/bin/python -m benchmarks.run --only scoring

Sections:
* ``scoring``: scoring time ÷ one forward+backward over the same calibration data, and peak memory ÷ weight
  bytes, for every criterion (each measured in a fresh process; see ``benchmarks/scoring_cost.py``).
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


def main() -> None:
    parser = argparse.ArgumentParser(description="prunellm benchmarks on SmolLM2-135M")
    parser.add_argument("--only", default="scoring", help="comma-separated sections: scoring")
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    results = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "processor": platform.processor(), "cpus": __import__("os").cpu_count()},
    }
    markdown = ["# prunellm benchmarks", "", "Produced by `python -m benchmarks.run`; every figure states its protocol.", ""]
    if "scoring" in sections:
        results["scoring"] = scoring_section(args.num_samples, args.seq_len, args.batch_size)
        markdown.append(render_scoring(results["scoring"]))
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(markdown))
    log.info("wrote benchmarks/results.json and docs/benchmarks.md")


if __name__ == "__main__":
    main()
