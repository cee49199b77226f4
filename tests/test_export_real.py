"""SmolLM2-135M pruned non-uniformly, exported to GGUF: llama.cpp continues a prompt exactly like transformers."""

from __future__ import annotations

import pytest
import torch

from prunellm.export.gguf import export_gguf
from prunellm.models import load_model, load_tokenizer
from prunellm.surgery import prune_units

pytest.importorskip("xllamacpp", reason="llama.cpp tests need the serve extra (pip install xllamacpp)")
from prunellm.export.llamacpp import LlamaCpp  # noqa: E402

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
