"""What every quality benchmark shares: the evaluation texts, the PPL protocols and one evaluation function.

Calibration always comes from the Shakespeare *train* plays (``prunellm.data.sample_calibration``); evaluation
uses WikiText-2 test (``../shared/data/wikitext-2/test.txt`` where it exists: it is never copied into the project)
and the held-out Shakespeare plays. The two never overlap.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
MODEL = "smollm2-135m"
CALIBRATION = "shakespeare"
# (protocol, windows): PPL@128 over 32 non-overlapping windows; PPL 2048/512 over the first 4 windows
PROTOCOLS: tuple[tuple[str, int], ...] = (("128", 32), ("2048/512", 4))


def eval_token_sets(tokenizer, max_chars: int = 400_000) -> dict[str, torch.Tensor]:
    """Tokenized evaluation texts by name (WikiText-2 test when present, held-out Shakespeare plays always)."""
    from prunellm.data import load_text, tokenize_text

    texts = {}
    if WIKITEXT.is_file():
        texts["wikitext2_test"] = WIKITEXT.read_text()[:max_chars]
    texts["shakespeare_eval"] = load_text("shakespeare", "eval")[:max_chars]
    return {name: tokenize_text(tokenizer, text) for name, text in texts.items()}


def protocol_text(protocols: tuple[tuple[str, int], ...] | None = None) -> str:
    """One line that states the PPL protocols."""
    parts = [f"PPL {name} over the first {n} windows" for name, n in (protocols or PROTOCOLS)]
    return "; ".join(parts) + " of WikiText-2 test and of the held-out Shakespeare plays"


def evaluate_ppl(model, token_sets: dict[str, torch.Tensor], protocols: tuple[tuple[str, int], ...] | None = None) -> dict[str, float]:
    """``{"<dataset> <protocol>": ppl}`` for every evaluation text and protocol."""
    from prunellm.evaluation.perplexity import Protocol, perplexity

    out = {}
    for dataset, ids in token_sets.items():
        for name, n_windows in protocols or PROTOCOLS:
            result = perplexity(model, ids, Protocol.parse(name), dataset=dataset, max_windows=n_windows, progress=False)
            out[f"{dataset} {name}"] = round(result.ppl, 3)
    return out


def rss_mb() -> float:
    """Current resident set size of this process, MB (Linux)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (VmHWM) so the peak covers only what follows (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss`, MB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
