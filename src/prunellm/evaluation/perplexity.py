"""Perplexity under the two protocols of the field, token-weighted, batched.

* ``128``: non-overlapping windows of 128 tokens (LLM-Pruner's protocol); every token but each window's first
  is scored.
* ``2048/512``: windows of 2048 tokens moved by 512; only the tokens new to each window are scored (the first
  window scores all but its first token), so every token is scored once with up to 2048 tokens of context
  (the Hugging Face perplexity guide's protocol).

PPL = exp(Σ NLL / number of scored tokens). The text is tokenized once without special tokens. ``prefix`` (the
tokenizer's leading special tokens, :func:`prunellm.data.leading_special_tokens`: a BOS for Gemma or Llama-3,
nothing for SmolLM2) goes before every window as context only: the scored tokens are the same with or without
it (Gemma 3's PPL@128 on WikiText-2 is ~690 without its BOS and ~106 with it; LLM-Pruner's protocol has none,
``--ppl_bos never``). Only the positions that predict scored tokens go through the LM head (``logits_to_keep``
as an index tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import PrunellmError
from ..models import input_device


@dataclass(frozen=True)
class Protocol:
    """A window length and a stride (stride == seq_len means non-overlapping windows)."""

    seq_len: int
    stride: int

    @property
    def name(self) -> str:
        return str(self.seq_len) if self.stride == self.seq_len else f"{self.seq_len}/{self.stride}"

    @classmethod
    def parse(cls, text: str, flag: str = "--ppl_protocols") -> "Protocol":
        """``"128"`` -> (128, 128); ``"2048/512"`` -> (2048, 512)."""
        try:
            parts = [int(p) for p in str(text).split("/")]
        except ValueError:
            raise PrunellmError(f"{flag} '{text}' is not a protocol: use a window length like 128 or window/stride like 2048/512") from None
        seq_len, stride = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1]) if len(parts) == 2 else (0, 0)
        if seq_len <= 0 or stride <= 0 or stride > seq_len:
            raise PrunellmError(f"{flag} '{text}': window and stride must be positive with stride <= window (e.g. 128 or 2048/512)")
        return cls(seq_len, stride)


@dataclass
class PerplexityResult:
    """One perplexity measurement and how it was made."""

    dataset: str
    protocol: str
    seq_len: int
    stride: int
    ppl: float
    nll_sum: float
    scored_tokens: int
    windows: int
    total_tokens: int
    add_special_tokens: bool = False  # whether the tokenizer's leading special tokens went before every window
    prefix_tokens: list[int] = field(default_factory=list)
    # the NLL sum and scored tokens of each window, in text order, for paired comparisons of two models on the same
    # windows (:func:`paired_ratio_interval`); in memory only, to_dict keeps the totals
    window_nll: list[float] = field(default_factory=list, repr=False)
    window_tokens: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["window_nll"], data["window_tokens"]
        return data


def windows(n_tokens: int, protocol: Protocol) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of every window: the last ``n_scored`` targets of ``[begin, end)`` are scored."""
    L, S = protocol.seq_len, protocol.stride
    if S == L:
        return [(b, b + L, L - 1) for b in range(0, n_tokens - L + 1, L)]
    out, prev_end = [], 0
    for begin in range(0, n_tokens, S):
        end = min(begin + L, n_tokens)
        if end - begin < 2:
            break
        n_scored = end - max(prev_end, begin + 1)  # targets new to this window (token `begin` has no context)
        out.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(
    model,
    token_ids: torch.Tensor,
    protocol: Protocol,
    *,
    dataset: str = "text",
    batch_size: int = 4,
    max_windows: int | None = None,
    progress: bool = True,
    prefix: Sequence[int] = (),
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` on a 1-D tensor of token ids.

    Args:
        token_ids: the whole evaluation text, tokenized once, shape (N,).
        protocol: window length and stride.
        batch_size: windows per forward pass.
        max_windows: score only the first N windows (quick checks).
        prefix: token ids put before every window as context (a BOS); the scored tokens do not change.
    """
    prefix = [int(t) for t in prefix]
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and protocol.seq_len + len(prefix) > max_len:
        raise PrunellmError(
            f"--ppl_protocols window {protocol.seq_len} (+{len(prefix)} leading special tokens) exceeds the model's "
            f"context of {max_len} tokens"
        )
    if batch_size < 1:
        raise PrunellmError(f"--ppl_batch_size {batch_size} must be at least 1")
    if max_windows is not None and max_windows < 1:
        raise PrunellmError(f"--ppl_max_windows {max_windows} must be at least 1")
    spans = windows(int(token_ids.numel()), protocol)
    if not spans:
        raise PrunellmError(
            f"the evaluation text '{dataset}' has {token_ids.numel()} tokens, fewer than one {protocol.seq_len}-token window"
        )
    if max_windows is not None:
        spans = spans[:max_windows]
    device = input_device(model)
    # group windows of equal shape so each batch is one dense tensor
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (begin, end, n_scored) in enumerate(spans):
        groups.setdefault((end - begin, n_scored), []).append(index)
    # index tensors stay on the CPU: indexing works on any device, also across an accelerate-dispatched model
    keep = {(length, n): torch.arange(len(prefix) + length - 1 - n, len(prefix) + length - 1) for length, n in groups}
    head = torch.tensor(prefix, dtype=token_ids.dtype)
    window_nll = [0.0] * len(spans)
    bar = tqdm(total=len(spans), desc=f"perplexity {dataset} ({protocol.name})", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        for (length, n_scored), indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = torch.stack([torch.cat([head, token_ids[spans[i][0] : spans[i][0] + length]]) for i in chunk]).to(device)  # (B, prefix + length)
                # only the n_scored positions before the last (after the prefix: keep's indices are shifted by it)
                # predict the scored targets: the LM head runs on those alone and the logits come out contiguous,
                # (B, n_scored, V), so reshape copies nothing
                logits = model(input_ids=batch, use_cache=False, logits_to_keep=keep[length, n_scored]).logits
                targets = batch[:, batch.shape[1] - n_scored :]
                nll = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device), reduction="none"
                )
                for i, value in zip(chunk, nll.reshape(len(chunk), -1).sum(dim=1).tolist()):
                    window_nll[i] = value
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    nll_sum, scored = math.fsum(window_nll), sum(n_scored for _, _, n_scored in spans)
    ppl = math.exp(nll_sum / scored)
    return PerplexityResult(
        dataset=dataset,
        protocol=protocol.name,
        seq_len=protocol.seq_len,
        stride=protocol.stride,
        ppl=ppl,
        nll_sum=nll_sum,
        scored_tokens=scored,
        windows=len(spans),
        total_tokens=int(token_ids.numel()),
        add_special_tokens=bool(prefix),
        prefix_tokens=prefix,
        window_nll=window_nll,
        window_tokens=[n_scored for _, _, n_scored in spans],
    )


def paired_ratio_interval(
    nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[int], *, confidence: float = 0.95,
    draws: int = 10_000, seed: int = 0,
) -> tuple[float, float, float]:  # fmt: skip
    """``(ratio, low, high)``: PPL of model A ÷ PPL of model B on the same windows, and its paired bootstrap interval.

    ``nll_a`` / ``nll_b``: each window's NLL sum (:attr:`PerplexityResult.window_nll`) under each model; ``tokens``:
    each window's scored tokens. Windows are resampled with replacement, the same windows for both models, so the
    interval measures how much the ratio depends on which windows of the text were scored (percentile interval).
    """
    if not len(nll_a) == len(nll_b) == len(tokens) or not tokens:
        raise PrunellmError(
            f"a paired PPL ratio needs the same windows under both models: got {len(nll_a)} and {len(nll_b)} windows "
            f"for {len(tokens)} token counts"
        )
    diff = torch.tensor(nll_a, dtype=torch.float64) - torch.tensor(nll_b, dtype=torch.float64)
    counts = torch.tensor(tokens, dtype=torch.float64)
    ratio = math.exp(float(diff.sum() / counts.sum()))
    picks = torch.randint(0, len(tokens), (draws, len(tokens)), generator=torch.Generator().manual_seed(seed))
    ratios = torch.exp(diff[picks].sum(dim=1) / counts[picks].sum(dim=1))
    tail = (1 - confidence) / 2
    low, high = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return ratio, low, high
