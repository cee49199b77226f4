"""Perplexity: both protocols agree with exp(mean NLL) computed by hand, and every token is scored once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from prunellm.errors import PrunellmError
from prunellm.evaluation.perplexity import Protocol, perplexity, windows


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _by_hand_non_overlapping(model, ids: torch.Tensor, length: int) -> float:
    nlls = []
    for begin in range(0, ids.numel() - length + 1, length):
        window = ids[begin : begin + length][None]
        logits = model(window).logits[0, :-1]
        nlls.append(F.cross_entropy(logits, window[0, 1:], reduction="none"))
    return math.exp(torch.cat(nlls).mean().item())


@torch.no_grad()
def _by_hand_sliding(model, ids: torch.Tensor, length: int, stride: int) -> float:
    # the Hugging Face perplexity guide, token-weighted
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + length, ids.numel())
        trg = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-trg] = -100
        logits = model(window).logits[0, :-1]
        target = labels[0, 1:]
        mask = target != -100
        nll_sum += F.cross_entropy(logits[mask], target[mask], reduction="sum").item()
        count += int(mask.sum())
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll_sum / count)


def test_non_overlapping_matches_by_hand():
    model = make_tiny_model("llama")
    ids = _tokens(32 * 7 + 5)
    result = perplexity(model, ids, Protocol(32, 32), batch_size=3, progress=False)
    assert result.windows == 7 and result.scored_tokens == 7 * 31
    assert result.ppl == pytest.approx(_by_hand_non_overlapping(model, ids, 32), rel=1e-5)


def test_sliding_matches_by_hand_and_scores_each_token_once():
    model = make_tiny_model("qwen2")
    ids = _tokens(200, seed=1)
    result = perplexity(model, ids, Protocol(64, 16), batch_size=4, progress=False)
    assert result.scored_tokens == ids.numel() - 1  # every token but the first, once
    assert result.ppl == pytest.approx(_by_hand_sliding(model, ids, 64, 16), rel=1e-5)


def test_window_plan_and_max_windows():
    spans = windows(1000, Protocol(256, 64))
    assert sum(n for *_, n in spans) == 999
    assert spans[-1][1] == 1000
    model = make_tiny_model("llama")
    result = perplexity(model, _tokens(32 * 10), Protocol(32, 32), max_windows=4, progress=False)
    assert result.windows == 4 and result.scored_tokens == 4 * 31


def test_protocol_parsing_and_bad_input():
    assert Protocol.parse("2048/512") == Protocol(2048, 512)
    assert Protocol.parse("128").name == "128"
    for bad in ("0", "-5", "abc", "64/128"):
        with pytest.raises(PrunellmError, match="--ppl_protocols"):
            Protocol.parse(bad)
    model = make_tiny_model("llama")  # context 256
    with pytest.raises(PrunellmError, match="exceeds the model's context"):
        perplexity(model, _tokens(1000), Protocol(512, 512), progress=False)
    with pytest.raises(PrunellmError, match="fewer than one"):
        perplexity(model, _tokens(10), Protocol(32, 32), progress=False)


@torch.no_grad()
def test_a_prefix_is_context_only_and_scores_the_same_tokens():
    """A BOS before every window (``--ppl_bos auto`` for Gemma or Llama-3): the same targets are scored, each
    window's logits are the model's on [BOS] + window, under both protocols."""
    model = make_tiny_model("gemma3")
    ids, bos = _tokens(200, seed=3), 1
    for protocol in (Protocol(16, 16), Protocol(32, 8)):
        plain = perplexity(model, ids, protocol, progress=False)
        prefixed = perplexity(model, ids, protocol, progress=False, prefix=[bos])
        assert prefixed.scored_tokens == plain.scored_tokens and prefixed.windows == plain.windows
        assert prefixed.add_special_tokens and prefixed.prefix_tokens == [bos] and not plain.add_special_tokens
        assert prefixed.ppl != pytest.approx(plain.ppl, rel=1e-4)  # the context changed what the model predicts
    # by hand, non-overlapping: window w's targets are w[1:], predicted from [BOS] + w[:-1]
    nlls = []
    for begin in range(0, ids.numel() - 16 + 1, 16):
        window = torch.cat([torch.tensor([bos]), ids[begin : begin + 16]])[None]
        nlls.append(F.cross_entropy(model(window).logits[0, 1:-1], window[0, 2:], reduction="none"))
    by_hand = math.exp(torch.cat(nlls).mean().item())
    assert perplexity(model, ids, Protocol(16, 16), progress=False, prefix=[bos]).ppl == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(PrunellmError, match="leading special tokens"):
        perplexity(model, ids, Protocol(256, 256), progress=False, prefix=[bos])  # 256 + 1 > the tiny model's 256


@torch.no_grad()
def test_each_windows_nll_is_that_window_alone_in_text_order():
    """The per-window NLLs (the input of paired comparisons) sum to the total, come in text order although windows
    are batched by shape (the strided protocol's first window scores more tokens), and each equals its window
    scored on its own; the JSON form keeps the totals only."""
    model = make_tiny_model("llama")
    ids = _tokens(100, seed=3)
    result = perplexity(model, ids, Protocol(32, 16), batch_size=2, progress=False)
    spans = windows(100, Protocol(32, 16))
    assert len(result.window_nll) == len(spans) == result.windows and result.window_tokens == [n for *_, n in spans]
    assert math.fsum(result.window_nll) == pytest.approx(result.nll_sum) and sum(result.window_tokens) == result.scored_tokens
    for (begin, end, n_scored), nll in zip(spans, result.window_nll):
        window = ids[begin:end][None]
        logits = model(window).logits[0, -n_scored - 1 : -1]
        assert nll == pytest.approx(F.cross_entropy(logits, window[0, -n_scored:], reduction="sum").item(), rel=1e-5)
    assert "window_nll" not in result.to_dict() and "window_tokens" not in result.to_dict()


def test_paired_ratio_interval_of_the_same_windows():
    """A ÷ B is exp(ΔNLL / tokens); a constant per-token gap gives a zero-width interval at exactly that ratio,
    windows that disagree give an interval around it; different windows under the two models are refused."""
    from prunellm.evaluation.perplexity import paired_ratio_interval

    tokens = [127] * 8
    base = [300.0 + 10 * i for i in range(8)]
    ratio, low, high = paired_ratio_interval([b + 0.1 * 127 for b in base], base, tokens)
    assert ratio == pytest.approx(math.exp(0.1)) and low == pytest.approx(ratio) and high == pytest.approx(ratio)
    noisy = [b + (20 if i % 2 else -5) for i, b in enumerate(base)]
    ratio, low, high = paired_ratio_interval(noisy, base, tokens, seed=1)
    assert ratio == pytest.approx(math.exp(60 / (8 * 127))) and low < ratio < high
    assert math.exp(-5 / 127) <= low and high <= math.exp(20 / 127)
    assert paired_ratio_interval(noisy, base, tokens, seed=1) == (ratio, low, high)  # seeded
    with pytest.raises(PrunellmError, match="the same windows under both models"):
        paired_ratio_interval(base, base[:7], tokens)


def test_default_protocols_fit_a_short_context_and_named_ones_are_kept(caplog):
    from prunellm.evaluation.standard import protocols_for_model
    from prunellm.options import EvalOptions

    model = make_tiny_model("llama", max_position_embeddings=256)
    names = [p.name for p in protocols_for_model(EvalOptions(), model, n_prefix=1)]
    assert names == ["128"]  # the default 2048/512 window does not fit 256 tokens: skipped, said in a warning
    assert "2048/512 skipped" in caplog.text and "--ppl_protocols" in caplog.text
    asked = EvalOptions(ppl_protocols="128,2048/512,64")  # named by the user: kept, refused where it runs
    assert [p.name for p in protocols_for_model(asked, model, 0)] == ["128", "2048/512", "64"]
    tiny_context = make_tiny_model("llama", max_position_embeddings=100)
    with pytest.raises(PrunellmError, match="holds none of the default --ppl_protocols"):
        protocols_for_model(EvalOptions(), tiny_context, 0)
    long_context = make_tiny_model("llama", max_position_embeddings=4096)
    assert [p.name for p in protocols_for_model(EvalOptions(), long_context, 1)] == ["128", "2048/512"]
