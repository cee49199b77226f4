"""Shared fixtures: tiny seeded models of every supported family, built offline from real config classes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# family -> (config class, model class, extra config): each one exercises something the others do not
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=24)),  # q/k norms, explicit head_dim
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(head_dim=32, num_attention_heads=4)),  # head_dim != 64/4
}


def make_tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer, hidden-64, 4-query/2-KV-head model of ``family`` with seeded random weights."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    # random init leaves biases and norms at 0/1: perturb them so tests can see them being sliced
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the model/corpus cache of tests apart from a user's, but reuse it across the session."""
    if "PRUNELLM_CACHE" not in os.environ:
        os.environ["PRUNELLM_CACHE"] = str(Path.home() / ".cache" / "prunellm")
    yield


def calibration_ids(vocab: int = 128, n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=generator)
