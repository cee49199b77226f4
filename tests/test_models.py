"""Model references: the embedded model converts faithfully; bad references fail with one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunellm.errors import PrunellmError
from prunellm.models import EMBEDDED_MODELS, _embedded_gguf_path, load_model, load_tokenizer, resolve_model_path


@pytest.mark.real_model
def test_converted_model_matches_gguf_logits():
    path = resolve_model_path("smollm2-135m")
    config = json.loads((__import__("pathlib").Path(path) / "config.json").read_text())
    assert "quantization_config" not in config
    gguf = _embedded_gguf_path(EMBEDDED_MODELS["smollm2-135m"])
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert converted.config.num_key_value_heads == 3 and converted.config.num_hidden_layers == 30


def test_unknown_model_name_is_refused():
    with pytest.raises(PrunellmError, match="--base_model 'not-a-model' is not a known model.*smollm2-135m"):
        resolve_model_path("not-a-model")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(PrunellmError, match="not a model directory"):
        resolve_model_path(str(tmp_path), flag="--model_path")


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(PrunellmError) as info:
        load_model("some-org/some-model-that-is-not-cached")
    message = str(info.value)
    assert "\n" not in message and "Hugging Face hub" in message and "smollm2-135m" in message
