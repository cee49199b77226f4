"""What every quality benchmark shares: the evaluation texts, the PPL protocols and one evaluation function.

Calibration comes from the Shakespeare *train* plays (``prunellm.data.sample_calibration``), and for the rows that
say so, reconstruction from a mixture of those plays and WikiText-2 *validation*; evaluation uses WikiText-2 test
(``../shared/data/wikitext-2/{valid,test}.txt`` where they exist: never copied into the project) and the held-out
Shakespeare plays; the issue-17 protocol (``benchmarks/ablation.py``, ``benchmarks/peers``) adds the King James
Bible where Debian's ``bible-kjv`` is installed, a third text of another kind. Calibration and evaluation text
never overlap.
"""

from __future__ import annotations

import functools
import logging
import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from prunellm import rss

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
WIKITEXT_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
MODEL = "smollm2-135m"
CALIBRATION = "shakespeare"
MIXED_CALIBRATION_LABEL = "Shakespeare train + WikiText-2 validation"


def mixed_calibration() -> str | None:
    """``--reconstruct_dataset`` of the rows that reconstruct on a two-domain mixture (Shakespeare train plays +
    WikiText-2 *validation*, never the test text), or ``None`` where WikiText-2 is absent."""
    return f"{CALIBRATION}+{WIKITEXT_VALID}" if WIKITEXT_VALID.is_file() else None


log = logging.getLogger("benchmarks")
# (text, protocol, windows): PPL@128 over 24 non-overlapping windows of both texts; PPL 2048/512 (2048-token
# windows, stride 512, the literature's WikiText-2 protocol) over the first 2 windows of WikiText-2 test
EVALUATIONS: tuple[tuple[str, str, int], ...] = (
    ("wikitext2_test", "128", 24),
    ("shakespeare_eval", "128", 24),
    ("wikitext2_test", "2048/512", 2),
)
# Which evaluations a row gets. Every one for the models the headline compares (dense, 20 % of all parameters,
# depth vs width, recovery); the two 128-token ones where the held-out Shakespeare figure is part of the point
# (reconstruction, calibration size); WikiText-2 PPL@128 alone for the 10 % / 30 % grid rows, whose table shows
# only that figure. The 2048/512 protocol costs as much as both 128-token ones together.
Tier = Literal["full", "128", "wikitext128"]
TIERS: dict[str, tuple[str, ...]] = {
    "full": ("wikitext2_test 128", "shakespeare_eval 128", "wikitext2_test 2048/512"),
    "128": ("wikitext2_test 128", "shakespeare_eval 128"),
    "wikitext128": ("wikitext2_test 128",),
}


def eval_token_sets(tokenizer, max_chars: int = 400_000) -> dict[str, torch.Tensor]:
    """Tokenized evaluation texts by name (WikiText-2 test when present, held-out Shakespeare plays always)."""
    from prunellm.data import load_text, tokenize_text

    texts = {}
    if WIKITEXT.is_file():
        texts["wikitext2_test"] = WIKITEXT.read_text()[:max_chars]
    texts["shakespeare_eval"] = load_text("shakespeare", "eval")[:max_chars]
    return {name: tokenize_text(tokenizer, text) for name, text in texts.items()}


def kjv_text() -> str | None:
    """The King James Bible from Genesis on (Debian ``bible-kjv``: ``bible -p /usr/lib``), one paragraph per chapter,
    without chapter headings and verse numbers; ``None`` where the ``bible`` command is absent."""
    command = shutil.which("bible")
    if command is None:
        log.info("the King James Bible is skipped: install Debian's bible-kjv (apt-get install bible-kjv) to evaluate on it")
        return None
    printed = subprocess.run([command, "-p", "/usr/lib", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters, verses = [], []
    for line in printed.splitlines():
        verse = re.match(r"^\s+\d+ (.*)$", line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip() and verses and not re.match(r"^\S.* \d+$", line):
            verses[-1] += " " + line.strip()  # a verse wrapped onto the next line
        elif re.match(r"^\S.* \d+$", line) and verses:  # the next chapter's heading
            chapters.append(" ".join(verses))
            verses = []
    if verses:
        chapters.append(" ".join(verses))
    return "\n\n".join(chapters)


def protocol_text() -> str:
    """One line that states the PPL protocols."""
    names = {"wikitext2_test": "WikiText-2 test", "shakespeare_eval": "the held-out Shakespeare plays"}
    return "; ".join(f"PPL {protocol} over the first {n} windows of {names[text]}" for text, protocol, n in EVALUATIONS) + (
        " (2048/512 on the dense model and the models removing ~20 % of all parameters; — = not measured)"
    )


def evaluate_ppl(model, token_sets: dict[str, torch.Tensor], tier: Tier = "full") -> dict[str, float]:
    """``{"<text> <protocol>": ppl}`` for the evaluations of :data:`EVALUATIONS` in ``tier`` whose text is present."""
    from prunellm.evaluation.perplexity import Protocol, perplexity

    out = {}
    for text, protocol, n_windows in EVALUATIONS:
        if text in token_sets and f"{text} {protocol}" in TIERS[tier]:
            result = perplexity(model, token_sets[text], Protocol.parse(protocol), dataset=text, max_windows=n_windows, progress=False)
            out[f"{text} {protocol}"] = round(result.ppl, 3)
    return out


@dataclass
class Shared:
    """What the quality sections of one ``benchmarks.run`` process share: the model, texts and Taylor scores.

    The base model is never modified (every pruned model is a deep copy), so one load, one dense evaluation and
    one calibration pass per (criterion, windows) serve every section.
    """

    tokenizer: object
    base: torch.nn.Module
    token_sets: dict[str, torch.Tensor]
    total: int
    units: list
    dense: dict[str, float] | None = None
    scores: dict[tuple[str, int], tuple[dict, float]] = field(default_factory=dict)
    cache: dict[tuple, object] = field(default_factory=dict)

    def dense_ppl(self) -> dict[str, float]:
        """The dense model's perplexities (measured once)."""
        if self.dense is None:
            self.dense = evaluate_ppl(self.base, self.token_sets)
        return self.dense

    def reconstruction_ids(self, recipe, seed: int):
        """The windows ``prunellm prune`` would reconstruct from with ``recipe`` (``None`` for none), sampled once."""
        from prunellm.pruner import reconstruction_calibration, reconstruction_settings

        settings = reconstruction_settings(recipe.reconstruction, recipe.calibration.dataset, seed, recipe.scoring.importance_method)
        key = ("reconstruction", settings["mode"] != "none", settings.get("dataset"), settings.get("num_samples"), settings.get("seq_len"), settings.get("seed"))
        if key not in self.cache:
            self.cache[key] = reconstruction_calibration(self.tokenizer, settings)
        return self.cache[key]

    def gradient_scores(self, criteria: tuple[str, ...], num_samples: int, seq_len: int = 128, seed: int = 42, batch_size: int = 4) -> dict[str, tuple[dict, float]]:
        """Scores of gradient criteria from ONE calibration pass (``num_samples`` × ``seq_len`` Shakespeare train
        windows) that produces every Taylor term they need; ``{criterion: (scores, seconds of the shared pass)}``."""
        from prunellm.calibration import collect_gradient_stats
        from prunellm.criteria import CriterionOptions, get_criterion
        from prunellm.data import sample_calibration

        missing = [c for c in criteria if (c, num_samples) not in self.scores]
        if missing:
            started = time.perf_counter()
            ids = sample_calibration(self.tokenizer, CALIBRATION, num_samples, seq_len, seed)
            terms = [term for c in missing for term in get_criterion(c).gradient_terms]  # one pass, each term once
            stats = collect_gradient_stats(self.base, ids, self.units, terms=terms, batch_size=batch_size)
            seconds = round(time.perf_counter() - started, 1)
            for c in missing:
                self.scores[(c, num_samples)] = (get_criterion(c).score(self.base, self.units, stats, CriterionOptions(seed=seed)), seconds)
            log.info("scored %s on %d windows in %.1f s", ", ".join(missing), num_samples, seconds)
        return {c: self.scores[(c, num_samples)] for c in criteria}


def pruned_key(criterion: str, ratio: float, reconstruct: str) -> tuple:
    """Key of :attr:`Shared.cache` under which a section leaves a model pruned with ``prunellm prune``'s defaults
    (``criterion``, global selection, ``ratio`` of all parameters, ``reconstruct``) and its evaluation row."""
    return ("pruned", criterion, round(ratio, 4), reconstruct)


@functools.cache
def shared() -> Shared:
    """The one :class:`Shared` of this process."""
    from prunellm.models import load_model, load_tokenizer
    from prunellm.units import all_units, count_parameters

    tokenizer = load_tokenizer(MODEL)
    base = load_model(MODEL)
    return Shared(tokenizer, base, eval_token_sets(tokenizer), count_parameters(base), list(all_units(base)))


def rss_mb() -> float:
    """Current resident set size of this process, MB (Linux; NaN elsewhere)."""
    value = rss.rss_bytes()
    return float("nan") if value is None else value / 2**20


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (VmHWM) so the peak covers only what follows (Linux)."""
    rss.reset_peak()


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss`, MB."""
    value = rss.peak_rss_bytes()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if value is None else value / 2**20
