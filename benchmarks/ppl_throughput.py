"""Perplexity evaluation throughput relative to a raw batched forward pass over the same windows.

Both sides process the same ``num_windows`` non-overlapping windows of ``seq_len`` tokens of the Shakespeare
eval plays, ``batch_size`` windows per forward, on SmolLM2-135M:

* ``ppl``: :func:`prunellm.evaluation.perplexity` (slicing, loss in float32, accumulation, bookkeeping);
* ``raw``: ``model(input_ids=batch, use_cache=False)`` on pre-stacked batches, nothing else.

After one untimed run of each, the two are timed alternately ``repeats`` times (so load changes on a shared
machine hit both alike) and the fastest run of each is kept (the one least disturbed by other processes).
``ratio`` = PPL tokens/s ÷ raw tokens/s (goal ≥ 0.9).
"""

from __future__ import annotations

import time


def measure(num_windows: int, seq_len: int, batch_size: int, repeats: int = 5) -> dict:
    """Time both passes and return tokens/s of each and their ratio."""
    import torch

    from prunellm.evaluation import Protocol, eval_tokens, perplexity
    from prunellm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    tokens = eval_tokens(tokenizer, "shakespeare")
    protocol = Protocol(seq_len, seq_len)
    windows = tokens[: num_windows * seq_len].view(num_windows, seq_len)  # (N, L), the windows PPL scores
    batches = [windows[i : i + batch_size] for i in range(0, num_windows, batch_size)]

    def ppl() -> float:
        return perplexity(model, tokens, protocol, dataset="shakespeare", batch_size=batch_size, max_windows=num_windows, progress=False).ppl

    @torch.no_grad()
    def raw() -> None:
        for batch in batches:
            model(input_ids=batch, use_cache=False)

    value = ppl()  # warm-up of both
    raw()
    ppl_seconds, raw_seconds = [], []
    for _ in range(repeats):
        for fn, times in ((ppl, ppl_seconds), (raw, raw_seconds)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    n_tokens = num_windows * seq_len
    ppl_tps = n_tokens / min(ppl_seconds)
    raw_tps = n_tokens / min(raw_seconds)
    return {
        "model": "smollm2-135m",
        "dataset": "shakespeare (eval plays)",
        "windows": num_windows,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens": n_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "ppl": round(value, 3),
        "ppl_tokens_per_s": round(ppl_tps, 1),
        "raw_tokens_per_s": round(raw_tps, 1),
        "ppl_seconds": [round(t, 3) for t in ppl_seconds],
        "raw_seconds": [round(t, 3) for t in raw_seconds],
        "ratio": round(ppl_tps / raw_tps, 3),
    }
