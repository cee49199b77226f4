"""Model references: the embedded model converts faithfully; bad references fail with one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunellm.errors import PrunellmError
from prunellm.assets import EMBEDDED_MODELS, _embedded_gguf_path
from prunellm.models import load_model, load_tokenizer, resolve_model_path


@pytest.mark.real_model
def test_converted_model_matches_gguf_logits(tmp_path):
    path = resolve_model_path("smollm2-135m")
    config = json.loads((__import__("pathlib").Path(path) / "config.json").read_text())
    assert "quantization_config" not in config
    gguf = _embedded_gguf_path(EMBEDDED_MODELS["smollm2-135m"], tmp_path)  # in its package: tmp_path stays empty
    assert not any(tmp_path.iterdir())
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert converted.config.num_key_value_heads == 3 and converted.config.num_hidden_layers == 30


def test_a_chunked_embedded_model_missing_its_package_names_the_install(tmp_path):
    from prunellm.assets import EmbeddedModel

    entry = EmbeddedModel(package="no_such_gguf_package", gguf_file="x.gguf", install_hint="pip install 'prunellm[x]'", assembled=True)
    with pytest.raises(PrunellmError, match=r"no_such_gguf_package.*not installed: pip install 'prunellm\[x\]'"):
        _embedded_gguf_path(entry, tmp_path)


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


def test_unreachable_hub_fails_fast_and_quietly(monkeypatch, capfd):
    """No network (here: a closed local port as the hub): one line within seconds, not ~25 s of retry warnings."""
    import time

    import huggingface_hub.constants

    from prunellm.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    started = time.perf_counter()
    assert main(["eval", "--model_path", "some-org/some-model-that-is-not-cached"]) == 2
    assert time.perf_counter() - started < 10
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--model_path 'some-org/some-model-that-is-not-cached'" in err[0] and "cannot be reached" in err[0]
    assert "smollm2-135m" in err[0] and "local model directory" in err[0]


def test_tests_never_use_the_users_cache():
    """The tests' cache is their own (and subprocesses inherit it), not $PRUNELLM_CACHE / ~/.cache/prunellm."""
    import os
    from pathlib import Path

    from conftest import TEST_CACHE, USER_CACHE

    from prunellm.paths import cache_dir

    assert cache_dir() == TEST_CACHE and os.environ["PRUNELLM_CACHE"] == str(TEST_CACHE)
    assert cache_dir().resolve() not in (USER_CACHE.resolve(), (Path.home() / ".cache" / "prunellm").resolve())


def test_test_cache_is_seeded_by_links_without_partial_or_replaced_entries(tmp_path):
    from conftest import seed_test_cache

    user, tests = tmp_path / "user", tmp_path / "tests"
    (user / "models" / "m").mkdir(parents=True)
    (user / "models" / "m" / "w.bin").write_bytes(b"weights")
    (user / "models" / ".m2.tmp-1").mkdir()  # a conversion in progress: never copied
    (user / "corpora" / "c").mkdir(parents=True)
    (user / "corpora" / "c" / "t.txt").write_text("user")
    (tests / "corpora" / "c").mkdir(parents=True)
    (tests / "corpora" / "c" / "t.txt").write_text("tests")  # the tests' own entry is kept
    seed_test_cache(user, tests)
    assert (tests / "models" / "m" / "w.bin").stat().st_ino == (user / "models" / "m" / "w.bin").stat().st_ino
    assert not (tests / "models" / ".m2.tmp-1").exists()
    assert (tests / "corpora" / "c" / "t.txt").read_text() == "tests"
    assert sorted(p.name for p in (tests / "models").iterdir()) == ["m"]
