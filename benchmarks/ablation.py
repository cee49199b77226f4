"""Issue 17 ablation: which part of a structured-pruning method loses quality (criterion, allocation, reconstruction).

One protocol for every row (and for the peers run from their own code, ``benchmarks/peers/run.py``): SmolLM2-135M,
scores AND reconstruction calibrated on the same 32 × 128 windows of WikiText-2 *validation*, PPL@128 over the
first 64 windows of two texts neither saw (WikiText-2 test, the held-out Shakespeare plays). Every row removes the
same share of ALL parameters. Rows are appended to a JSON-lines file as they finish, so an interrupted run keeps
what it measured::

    PYTHONPATH=src python -m benchmarks.ablation --out ablation.jsonl [--rows fluctuation/standard/lstsq/0.2 ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from benchmarks.common import MODEL, WIKITEXT_VALID, eval_token_sets, kjv_text

NUM_SAMPLES, SEQ_LEN, SEED, WINDOWS = 32, 128, 42, 64
# criterion[^T][@units] / normalization / reconstruct[:target][+select] / ratio of all parameters; T: the H-GSP prior's
# temperature (layer/block Δloss of the calibration text, tau auto; default 0 = none); units: all (default),
# mlp (MLP channels only) or attn (KV groups only); target: what the refit preserves (pruned, dense, residual);
# select: the criterion sets each layer's counts, the units are chosen on the layer's pruned-model inputs by
# fluctuation (re-measured in sequence) or greedy OBS (obs); rounds (``*N``, default 1): ``--iterative_steps N``, the
# share removed in N equal steps, each re-scoring, re-measuring the prior and refitting the model the last one left
UNITS = {"all": ("kv_group", "mlp_channel"), "mlp": ("mlp_channel",), "attn": ("kv_group",)}
ROWS = (
    "fluctuation/standard/bias/0.2",  # WIFV with z-scores pooled over all layers: early layers' small variance looks unimportant
    "fluctuation/block_standard/bias/0.2",  # FLAP's recipe: WIFV, z-score per block (AL-AM), bias compensation
    "fluctuation/block_standard/lstsq/0.2",
    "obs/block/lstsq/0.2",
    "obs/block_standard/lstsq/0.2",
    "fluctuation/uniform/lstsq/0.2",
    "fluctuation/block_standard/none/0.2",
    "obs/none/lstsq/0.2",
    "taylor/block/lstsq/0.2",  # the default before issue 17
    "taylor/block/lstsq_bias/0.2",
    "taylor/uniform/lstsq_bias/0.2",
    "taylor/block/lstsq_bias:residual/0.2",  # the refit corrects the error earlier layers left in the stream
    "fluctuation/uniform/none/0.2",
    "fluctuation/uniform/bias/0.2",
    "fluctuation/uniform/lstsq_bias/0.2",
    "fluctuation@mlp/uniform/bias/0.2",  # FLAP's UL-UM on this model (its 1/3 of 3 KV groups rounds down to none)
    "fluctuation@mlp/uniform/lstsq_bias/0.2",  # recipes/retraining_free.yaml
    "taylor@mlp/block/lstsq_bias/0.2",
    "fluctuation@mlp/uniform/lstsq_bias+obs/0.2",  # the recipe's counts, greedy OBS chooses the channels
    "taylor^1/block/lstsq/0.2",  # the H-GSP prior on the previous CLI default
    "taylor^0.5/block/lstsq/0.2",
    "taylor^0.25/block/lstsq/0.2",
    "taylor^0.1/block/lstsq/0.2",
    "taylor^auto/block/lstsq/0.2",  # --temperature auto: the prior's spread matched to the scores' within a block
    "taylor^0.25/block/lstsq_bias/0.2",
    "taylor^0.25@mlp/block/lstsq_bias/0.2",
    "taylor^0.25/block/lstsq/0.3",
    "fluctuation^0.25@mlp/uniform/lstsq_bias/0.2",
    "fluctuation^0.5@mlp/uniform/lstsq_bias/0.2",
    "fluctuation^1@mlp/uniform/lstsq_bias/0.2",
    "fluctuation^auto@mlp/uniform/lstsq_bias/0.2",  # the CLI default before sequential re-scoring
    "fluctuation^auto@mlp/uniform/lstsq_bias/0.3",
    "fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.2",  # one round: re-measured on pruned inputs
    "fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.3",
    "fluctuation^auto@mlp/uniform/lstsq_bias:dense+fluctuation/0.2",  # the refit also absorbs earlier layers' error
    "fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.2*2",  # the CLI default: --iterative_steps auto (2)
    "fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.3*2",
    "fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.2*3",
    "fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.3*3",
    "fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.2*4",
    "fluctuation^auto@mlp/block/lstsq_bias+fluctuation/0.2*2",  # the default with relative energy instead of percentiles
)


def parse_row(row: str) -> dict:
    """``criterion[@units]/normalization/reconstruct[:target]/ratio[*rounds]`` as the fields of a result row."""
    criterion, normalization, reconstruct, ratio = row.split("/")
    ratio, _, rounds = ratio.partition("*")
    criterion, _, units = criterion.partition("@")
    criterion, _, temperature = criterion.partition("^")
    reconstruct, _, select = reconstruct.partition("+")
    reconstruct, _, target = reconstruct.partition(":")
    return {"criterion": criterion, "units": units or "all", "normalization": normalization, "reconstruct": reconstruct,
            "target": target or "pruned", "select": select or "plan",
            "temperature": "auto" if temperature == "auto" else float(temperature or 0),
            "ratio": float(ratio), "rounds": int(rounds or 1)}  # fmt: skip


def calibration_windows(tokenizer) -> torch.Tensor:
    from prunellm.data import sample_calibration

    return sample_calibration(tokenizer, str(WIKITEXT_VALID), NUM_SAMPLES, SEQ_LEN, SEED)


def evaluate(model, token_sets, tokenizer) -> dict[str, float]:
    """PPL@128 over the first :data:`WINDOWS` windows of each text, the tokenizer's BOS (if it adds one) before each
    window as context (:func:`prunellm.data.leading_special_tokens`; none for SmolLM2)."""
    return evaluate_windows(model, token_sets, tokenizer)[0]


def evaluate_windows(model, token_sets, tokenizer) -> tuple[dict[str, float], dict[str, list[float]]]:
    """:func:`evaluate`, and each text's per-window NLL sums (4 decimals), for paired intervals between rows
    (:func:`prunellm.evaluation.perplexity.paired_ratio_interval`; every window scores ``SEQ_LEN - 1`` tokens)."""
    from prunellm.data import leading_special_tokens
    from prunellm.evaluation.perplexity import Protocol, perplexity

    prefix = leading_special_tokens(tokenizer)
    ppl, nll = {}, {}
    for name, ids in token_sets.items():
        result = perplexity(model, ids, Protocol.parse("128"), dataset=name, max_windows=WINDOWS, progress=False, prefix=prefix)
        ppl[name], nll[name] = round(result.ppl, 3), [round(v, 4) for v in result.window_nll]
    return ppl, nll


# Peers measured from their own code before this benchmark existed (issue 17, same calibration and protocol);
# the peer table (benchmarks/peers/run.py) now runs them from pinned checkouts in one run.
ISSUE_17_PEERS = (
    ("FLAP (WIFV, UL-UM, bias), its own code", 0.197, 2.43, 1.69),
    ("LLM-Pruner (Taylor param_first, layers 4–28), its own code", 0.209, 3.05, 2.61),
    ("prunellm taylor / block / none (before issue 17)", 0.200, 3.75, 2.72),
    ("prunellm taylor / block / bias (before issue 17)", 0.200, 4.28, 2.76),
    ("prunellm taylor / block / lstsq (default before issue 17)", 0.200, 2.51, 1.78),
)
TEXTS = (("shakespeare_eval", "held-out Shakespeare"), ("wikitext2_test", "WikiText-2 test"), ("kjv", "King James Bible"))


def texts_of(dense: dict) -> tuple[tuple[str, str], ...]:
    """The :data:`TEXTS` the dense row was evaluated on (the Bible needs Debian's bible-kjv)."""
    return tuple((key, label) for key, label in TEXTS if key in dense)


def ratio_cell(ppl: dict, key: str, dense: dict) -> str:
    """PPL ÷ dense of one text, or — where the row was measured without it."""
    return f"{ppl[key] / dense[key]:.2f}" if key in ppl else "—"


def read_rows(path: str) -> dict:
    """The section of ``benchmarks/results.json``: the rows of a JSON-lines file written by :func:`main`."""
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    dense = next(r for r in rows if r["row"] == "dense")
    return {"protocol": {"num_samples": NUM_SAMPLES, "seq_len": SEQ_LEN, "seed": SEED, "windows": WINDOWS},
            "dense": dense, "rows": [r for r in rows if r["row"] != "dense"]}  # fmt: skip


def render(section: dict) -> str:
    """Markdown of the ablation section."""
    p = section["protocol"]
    dense = section["dense"]["ppl"]
    texts = texts_of(dense)
    lines = [
        "## Issue 17 ablation: criterion × allocation × reconstruction (SmolLM2-135M, no fine-tuning)", "",
        f"Scores and reconstruction calibrated on the same {p['num_samples']} × {p['seq_len']} windows of WikiText-2 "
        f"*validation* (seed {p['seed']}); PPL@128 over the first {p['windows']} windows of texts neither saw "
        "(the King James Bible from Genesis on, where Debian's bible-kjv is installed; — = a row measured before it "
        "was added); each figure is PPL ÷ dense (dense: " + ", ".join(f"{label} {dense[key]:.2f}" for key, label in texts) + "). "
        "Allocation: `block` = importance/cost ÷ its block's mean, `standard` = z-score per unit kind over all "
        "layers, `block_standard` = z-score per block (FLAP AL-AM), `uniform` = percentile within its block, "
        "`none` = importance/cost as it is. Produced by `python -m benchmarks.ablation --out FILE` "
        "(rows appended as they finish); the rows whose criterion names a variant (Fisher-weighted, ridge OBS, prior "
        "on 32 windows) by `python -m benchmarks.ablation_variants --out FILE`, which changes one step of a row "
        "(the module says how).", "",
        "Units: `all` = KV groups and MLP channels, `mlp` = MLP channels only. Target: what the refit preserves "
        "(`pruned` = each projection's own output on the pruned model's inputs, `residual` = the dense model's "
        "residual stream). `+ fluctuation` / `+ obs`: the criterion and allocation set each layer's count, the units "
        "are chosen on the layer's pruned-model inputs, by fluctuation re-measured there (`--reconstruct_select "
        "fluctuation`) or by greedy OBS (`--reconstruct_select obs`). `N rounds`: `--iterative_steps N`, the share "
        "removed in N equal steps, each re-scoring, re-measuring the prior (T per round) and refitting the model the "
        "round before left.", "",
        "| criterion | units | allocation | reconstruct | target | removed | " + " | ".join(label for _, label in texts) + " | seconds |",
        "|---|---|---|---|---|---|" + "---|" * len(texts) + "---|",
    ]  # fmt: skip
    for row in section["rows"]:
        ratios = " | ".join(ratio_cell(row["ppl"], key, dense) for key, _ in texts)
        t = row.get("temperature")
        used = row.get("temperature_used")
        # rounds give one T each; a row without the prior (T = 0) has none to show
        used = "/".join("?" if x is None else f"{x:.2f}" for x in used) if isinstance(used, list) else f"{used:.2f}" if used is not None else "?"
        criterion = row["criterion"] + (f" T=auto ({used})" if t == "auto" else f" T={t:g}" if t else "")
        criterion += f", {row['rounds']} rounds" if row.get("rounds", 1) > 1 else ""
        lines.append(
            f"| {criterion} | {row.get('units', 'all')} | {row['normalization']} | {row['reconstruct']}"
            f"{' + ' + row['select'] if row.get('select', 'plan') != 'plan' else ''} | "
            f"{row.get('target', 'pruned') if row['reconstruct'] != 'none' else '—'} | {row['removed'] * 100:.1f} % | "
            f"{ratios} | {row['seconds']:.0f} |"
        )  # fmt: skip
    lines += ["", "Measured earlier from the peers' own code and with prunellm before issue 17 (same calibration windows "
              "and protocol, not re-run in this table's run):", "",
              "| method | removed | unseen text A (the issue does not name it) | WikiText-2 test |", "|---|---|---|---|"]  # fmt: skip
    for name, removed, text_a, wikitext in ISSUE_17_PEERS:
        lines.append(f"| {name} | {removed * 100:.1f} % | {text_a:.2f} | {wikitext:.2f} |")
    lines += ["", FINDINGS]
    return "\n".join(lines) + "\n"


FINDINGS = """What the rows show (the machine was shared by several engineers during these runs: the seconds are wall time
under a load average of 6–14, not the method's cost; the dense PPL of the later rows' runs differed from the
first run's in the third decimal, 2 vs 1 torch threads; `taylor/block/lstsq_bias` 2.49× / 1.76× and
`taylor/uniform/lstsq_bias` 2.58× / 1.91× were measured in an earlier session and are not in the table):

* **Pruning attention is what loses on this model.** FLAP's own code at `--pruning_ratio 0.333` (the peer table
  below) removes no KV group at all: `int(0.333 × 3)` rounds down, so its UL-UM cuts the same third of every
  layer's MLP and nothing else. The same selection in prunellm (`fluctuation@mlp/uniform/bias`) gives 2.53× /
  1.67×, FLAP's own 2.63× / 1.69×: the reimplementation matches. Every selection that also removed KV groups
  (one group is a third of a layer's attention here: 3 KV heads) was worse on held-out text with the same
  reconstruction: `fluctuation/uniform/lstsq_bias` 2.79× / 1.65× against 2.33× / 1.44× MLP-only;
  `taylor/block/lstsq_bias` 2.49× / 1.76× against `taylor@mlp/block/lstsq_bias` 2.55× / 1.75×.
* **Allocation across layers:** the same share of every layer (`uniform`) beats the adaptive ones for the
  fluctuation criterion (pooled z-scores 8.1×, FLAP's per-block z-scores 3.4–4.0× with bias compensation).
* **Reconstruction** adds the rest: on FLAP's selection, `lstsq_bias` (ridge refit of down_proj with its bias as
  an intercept, damping by cross-validation) takes 2.53× / 1.67× (bias) to **2.33× / 1.44×**: 0.89× / 0.85× of
  FLAP's own code on the two held-out texts (the issue's goal, ≤ 0.8×, is not reached). At 30 % the same
  combination gives 3.61× / 1.83× (FLAP's own code 3.99× / 2.95×, the previous CLI default 3.60× / 2.39×). The
  previous default (`taylor`, all units, `block`, `lstsq`) lost to FLAP at 20 % on WikiText-2 (1.76× vs 1.69×).
* **The refit's intercept is not shrunk** (as in ridge regression): the ridge of `lstsq_bias` pulls the kept
  columns toward the original ones and leaves the bias free, so λ → ∞ is FLAP's bias compensation exactly and
  `auto` may choose it (λ = ∞ is in its grid). Measured on the default recipe before and after (not in the table:
  the earlier solver's rows were replaced): 20 % 1.831× / 1.377× / 3.739× → 1.820× / 1.371× / 3.708×
  (Shakespeare / WikiText-2 / KJV), 30 % 2.870× / 1.814× / 6.777× → 2.842× / 1.809× / 6.811×. A finer damping
  grid (13 values from 0.01 to 100 instead of 5) gave 1.827× / 1.367× / 3.690× at 20 %, 4-fold instead of 2-fold
  cross-validation 1.830× / 1.367× / 3.712×: each better on some texts and worse on others, within noise of the
  default; neither adopted. A ridge scaled per column (λ·diag H_SS, ridge on standardised inputs, instead of
  λ·mean(diag H_SS)·I) was worse on all three with re-scoring: 1.822× / 1.367× / 3.735× against 1.792× / 1.364× /
  3.578×.
* **The H-GSP prior helps at the matched temperature** (`^T`; `^auto` = `--temperature auto`). ln(1+Δ) of the
  calibration text's layer/block ablations spreads ×13.8 between blocks (p90/p10; `prior_scale` in the rows),
  Taylor's block-normalised scores ×2.0 within a block: at T = 1 the prior alone sets each layer's share.
  `auto` takes T = ln(within-block spread) / ln(prior spread) — 0.26 for Taylor/`block` — and the measured
  optimum agrees: T = 0 2.49× / 1.76×, 0.1 2.11× / 1.65×, 0.25 1.88× / 1.59×, auto 1.88× / 1.59×, 0.5 1.95× /
  1.69×, 1 2.02× / 1.83× (Shakespeare / WikiText-2). For `uniform` percentiles (×9 within a block, MLP priors ×6.8) auto gives 1.15,
  predicted before measuring: fluctuation/MLP/`uniform`/`lstsq_bias` goes from 2.33× / 1.44× (T = 0),
  2.26× / 1.41× (T = 0.25), 2.11× / 1.40× (T = 0.5) and 1.94× / 1.39× (T = 1) to **1.83× / 1.38×** at auto
  (1.15) — 0.70× / 0.82× of FLAP's own code; at 30 % 2.87× / 1.81× (FLAP 3.99× / 2.95×). (`uniform` ignored
  the prior before this was measured; the rows here are after the fix.) With re-scoring (the default), T above auto
  wins on the text like the calibration and loses on the others: T = 1.5 1.81× / 1.345× / 3.68×, T = 2 1.81× /
  1.38× / 3.67× against auto's 1.79× / 1.36× / 3.58× (Shakespeare / WikiText-2 / KJV).
* **Ablation targets of the prior, measured** (scratch scripts over this module's `prune_row`, not kept in the
  repository): a *partial* ablation (replace only the lowest-fluctuation third of each MLP's channels, the share
  the budget removes, by their calibration mean, instead of zeroing the block) gives Δloss of 0–0.03 nats, below
  the noise of 16 windows: three blocks measure Δ = 0 and one 0.001 (layer 11, whose whole-block Δ is 1.78, among
  them), the prior all but zeroes them and the plan removes those four MLPs entirely: 15.7× / 15.3× / 39.4× dense
  at 20 %. Replacing a whole MLP's output by its calibration mean instead of zero (what the refit's intercept
  keeps) moves the Δ little (layer 0: 7.32 against 8.43 nats, layer 11: 2.54 against 1.78) and was worse on every
  text: 1.86× / 1.38× / 3.76× against 1.79× / 1.36× / 3.58×. The zeroed whole block stays. Removing whole
  attention blocks of the smallest Δ (layer 7: Δ 0.0001 nats; then 18 and 19 at 0.025–0.027) and spending the
  rest of the budget on the default recipe was worse on every text: 3 blocks 1.91× / 1.45× / 3.70×, 6 blocks
  2.12× / 1.61× / 3.72× (default 1.79× / 1.36× / 3.58×): a block that barely moves the calibration loss still
  carries what other text needs.
* **Sequential re-scoring is the CLI default** (`+ fluctuation`: `--reconstruct_select auto` with the
  fluctuation criterion, and `recipes/retraining_free.yaml`): the plan keeps its per-layer counts and each layer's
  channels are chosen by fluctuation re-measured on the inputs the already pruned layers give it, from the
  statistics the refit gathers anyway. At 20 %: 1.79× / 1.36× / 3.58× (Shakespeare / WikiText-2 / KJV) against
  1.82× / 1.37× / 3.71× with the plan's channels (fluctuation on the dense model); at 30 % 2.56× / 1.81× / 6.18×
  against 2.84× / 1.81× / 6.81×. It gains most on the texts least like the calibration text, so it is not fitting
  that text. Against FLAP's own code (2.63× / 1.69× / 4.18× at 20 %, 3.99× / 2.95× / 8.92× at 30 %) that is
  0.68× / 0.81× / 0.86× and 0.64× / 0.61× / 0.69×: the issue's 0.8× margin at 20 % is met on Shakespeare, and
  missed on WikiText-2 and the KJV.
* **Pruning in rounds** (`--iterative_steps N`: the share removed in N equal steps, each round re-scoring,
  re-measuring the prior and its T on the model the round before left, then refitting; rows `… 2 rounds`, `… 3
  rounds`). Two rounds against one, Shakespeare / WikiText-2 / KJV: at 20 % 1.81× / 1.352× / 3.56× against
  1.79× / 1.364× / 3.58× (better on two texts, worse on Shakespeare by 0.8 %); at 30 % 2.53× / 1.71× / 5.93×
  against 2.56× / 1.81× / 6.18× (better on all three). Three rounds: at 20 % 1.82× / 1.339× / 3.62× (better only
  on WikiText-2, the text like the calibration), at 30 % 2.52× / 1.73× / 5.88× (about two rounds' figures); four
  rounds at 20 %: 1.81× / 1.353× / 3.52× (the KJV 1 % better, the other two as with two rounds). Two
  rounds win five of the six cells, so `--iterative_steps auto` (the default) is 2, at twice the scoring and
  prior cost; more rounds buy nothing measurable here. On WikiText-2 at 20 % two rounds stay a hair above 0.8×
  FLAP (1.352× against 1.350×, loss prior); three rounds pass it (1.339×) but lose on both other texts, and
  choosing them for that would tune to text like the calibration text. (With the KL prior, below, two rounds give
  1.346×: 0.798× FLAP.)
* **Loss-aware, correlation-aware and less noisy variants of the default, measured and not adopted**
  (`python -m benchmarks.ablation_variants`, the `variant:` rows; each changes one step of the default at 20 %,
  two rounds, against its 1.81× / 1.352× / 3.56× on Shakespeare / WikiText-2 / KJV):
  fluctuation with every output dimension of down_proj weighted by the diagonal empirical Fisher of the residual
  stream it writes, E[(∂L/∂h_d)²] (a second-order estimate of the loss a mean-compensated removal costs; in scoring
  and in re-scoring): 1.78× / 1.358× / 3.68×, better on Shakespeare only. The same scores ranked across layers as
  they are (loss units compare across layers, so no prior and no per-block normalisation): 1.97× / 1.40× / 3.47×,
  the best KJV figure measured and worse on the other two; its plan keeps layers 0–9 almost whole and cuts layers
  13–17 to a third, and it skips the prior passes (about a third of the default's time on an idle machine; the
  table's seconds for it were taken beside another job). The per-token Fisher with mean
  compensation, Σ_t (∂L/∂x_tj)²·(x_tj − μ_j)² of down_proj's inputs (Fisher pruning, Theis et al. 2018, with
  FLAP's mean), ranked across layers: 1.86× / 1.42× / 4.00×. Re-scoring by the error the ridge refit leaves when a
  channel alone is removed (λ = mean diag of the centred covariance, between fluctuation at λ → ∞ and OBS at
  λ → 0): 2.05× / 1.364× / 3.57× — the correlations it credits are, as for greedy OBS, the calibration text's. The
  prior's ablations on 32 windows instead of 16: 1.79× / 1.355× / 3.52×, at twice the prior's cost.
  Dividing fluctuation by its block's mean (`block`, relative output energy) instead of taking percentiles
  (`uniform`), with the prior: 2.67× / 1.74× / 4.78× — it empties the MLPs of layers 2, 9, 11 and 28, whose
  fluctuation sits in a few channels, so the same share of every block stays.
  The default (then with the loss prior) sits on a plateau: each of the Fisher, ridge-OBS and 32-window variants
  moves the three texts by about ±1–4 % in different directions, and none is better on all three; the WikiText-2
  margin at 20 % (1.352× against the 1.350× that 0.8× FLAP's 1.688× needs) stays missed by 0.15 %.
* **The prior's Δ as the KL divergence from the dense model** (`--prior_measure kl`, the default since this
  measurement; scratch rows over this module's `prune_row` with the prior's Δ replaced, then the peer table's
  prunellm rows): for each removed layer or block, the mean over calibration positions of KL(p_dense ‖ p_ablated)
  instead of the rise of the calibration tokens' loss. The loss rise samples one token where the KL takes the
  expectation over the vocabulary (the rise the dense model expects on its own predictions): less variance, never
  negative (the loss prior measured 0.0001 nats for layer 7's attention, the KL 0.026), and a changed prediction
  counts even where the calibration token's probability does not move. SmolLM2, 20 %, two rounds: 1.77× / 1.346× /
  3.51× against 1.81× / 1.352× / 3.56× (Shakespeare / WikiText-2 / KJV) — the first variant of the default better
  on all three texts; 30 %: 2.50× / 1.74× / 5.39× against 2.53× / 1.71× / 5.93×. Gemma 3 270M at ~5 %: 1.73× / 1.30× / 2.82× against 1.74× / 1.24× / 3.05×: better on the
  two texts least like the calibration text and worse on WikiText-2, the text like it. Neither text nor family was
  used to choose it; it replaces an estimator by its expectation.
* **bias ≤ none holds** where measured: `fluctuation/uniform` 18.7× / 36.6× without compensation, 3.35× / 2.92×
  with `bias`.
* **A residual target does not generalise:** refitting each projection so the pruned residual stream matches the
  dense one (`:residual`, correcting every earlier layer's error) equals the default target on WikiText-2
  (1.755× vs 1.76×, text like the calibration) and is worse on Shakespeare (2.63× vs 2.49×): with 4 096
  calibration tokens the correction learns the calibration text.
* **A dense target does not generalise either:** with re-scoring, refitting down_proj to the dense model's MLP
  output (`:dense`, absorbing the error earlier layers left in its input) is worse on all three texts than
  preserving the projection's own output: 1.87× / 1.43× / 4.15× against 1.79× / 1.36× / 3.58×.
* **OBS selection fits the calibration text.** Keeping the recipe's per-layer counts and letting greedy OBS
  (`+ obs`: 32 rounds, each followed by the exact update of W and H⁻¹, on each layer's pruned-model inputs) choose
  the channels gives 1.39× on WikiText-2 test (text like the calibration; the recipe's criterion 1.44×) and 4.24×
  on Shakespeare (2.33×): with 4 096 calibration tokens for 1 536 channels a layer, the choice exploits
  correlations of the calibration text that other text does not share. `--reconstruct_select obs` suits
  calibration text like the deployment's; it is not the default. With the default's prior it gives 2.84× /
  1.38× (Shakespeare / WikiText-2; the default without OBS 1.83× / 1.38×), and damping OBS's H⁻¹ as strongly as
  the refit's cross-validation chooses, instead of its light 1 %, was worse on both: 3.12× / 1.50× (earlier
  solver, not in the table).
* **The King James Bible is text the model nearly knows by heart**: dense PPL 13.2 on Genesis against 59–62 on
  the other two texts, so every removal costs it most (FLAP's own code 4.18× at 20 %, LLM-Pruner's 6.12×); the
  ratios on it are high for every method and compare methods, not texts.
* **A second family, Gemma 3 270M** (the `peers_second_family` section below, measured with the loss prior; BOS
  before every window): the default beats FLAP's own code on Shakespeare and WikiText-2 at ~5 % and ~7.5 % of all
  parameters (0.81–0.84× its ratios) and on the KJV at ~7.5 % (0.95×), not at ~5 % (1.04×); with the KL prior
  (the default now) at ~5 %: 1.73× / 1.30× / 2.82× ÷ dense, 0.83× / 0.85× / 0.97× of FLAP's ratios, ahead on all
  three. The loss prior does not help there: without it
  the KJV goes from 3.05× to 2.55× at ~5 % and WikiText-2 from 1.47× to 1.40× at ~7.5 %, and T = 1 (1.79× /
  1.30× / 2.69× at ~5 %, `--model gemma3-270m`) is worse than T = 0 on all three texts. Gemma's MLP blocks
  matter more evenly (ln(1+Δ) spreads ×3.3 p10–p90 against SmolLM2's ×6.8), `auto` stretches that spread to
  the percentiles' ×9 (T = 2.16), and the plan cuts the two MLPs of smallest calibration Δ by 68–78 %.
* **Peers from their own code** are measured in the same protocol by the peer table below
  (`benchmarks/peers/`: FLAP at `3bb57db`, LLM-Pruner at `128a07d`, Torch-Pruning 1.6.1, prunellm's default, at
  ~20 % and ~30 %); the figures above under "measured earlier" are the issue's, kept for reference."""


def held_out_token_sets(tokenizer) -> dict[str, torch.Tensor]:
    """The protocol's held-out texts, tokenized: Shakespeare's held-out plays, WikiText-2 test and, where Debian's
    bible-kjv is installed, the King James Bible (a third text, of another kind than both)."""
    token_sets = eval_token_sets(tokenizer)
    bible = kjv_text()
    if bible is not None:
        from prunellm.data import tokenize_text

        token_sets["kjv"] = tokenize_text(tokenizer, bible[:400_000])
    return token_sets


def start(out: str, threads: int = 2, model: str = MODEL):
    """What every row of a protocol run needs: ``(base, tokenizer, token_sets, ids, total, done, emit)``.

    The dense model is loaded and, unless ``out`` (JSON lines) already has it, evaluated as the row ``dense``;
    ``done`` holds the names of the rows already in ``out``; ``emit(row)`` appends a row (and prints it).
    Shared by this ablation and the peer table (``benchmarks/peers/run.py``).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import prunellm as pl
    from prunellm.units import count_parameters

    base, tokenizer = pl.load(model)
    base.eval()
    token_sets = held_out_token_sets(tokenizer)
    ids = calibration_windows(tokenizer)
    total = count_parameters(base)
    done = set()
    try:
        with open(out) as handle:
            done = {json.loads(line)["row"] for line in handle if line.strip()}
    except FileNotFoundError:
        pass

    def emit(row: dict) -> None:
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}), flush=True)  # the row, less its lists

    if "dense" not in done:
        ppl, window_nll = evaluate_windows(base, token_sets, tokenizer)
        emit({"row": "dense", "ppl": ppl, "params": total, "window_nll": window_nll})
    return base, tokenizer, token_sets, ids, total, done, emit


def prior_deltas(base, tokenizer, num_samples: int = 16, measure: str = "loss") -> dict[str, list[float]]:
    """Δ of ablating each layer, attention block and MLP block on the calibration text (``num_samples`` windows
    each, the CLI's default 16; the seeds ``prunellm prune`` uses: apart from the scoring windows), measured as
    ``--prior_measure`` ``measure`` does (loss or kl)."""
    from prunellm.options import CalibrationOptions
    from prunellm.pruner import ablation_windows
    from prunellm.priors import ablation_deltas

    calibration = CalibrationOptions(dataset=str(WIKITEXT_VALID), calibration_seq_len=SEQ_LEN,
                                     layer_importance_num_samples=num_samples, block_importance_num_samples=num_samples)  # fmt: skip
    layer_ids, block_ids = (ablation_windows(tokenizer, calibration, SEED, kind) for kind in ("layer", "block"))
    return {"layer": ablation_deltas(base, layer_ids, "layer", measure=measure),
            "attention": ablation_deltas(base, block_ids, "attention", measure=measure),
            "mlp": ablation_deltas(base, block_ids, "mlp", measure=measure)}  # fmt: skip


def prior_scale(scores, deltas: dict[str, list[float]], normalization: str) -> dict:
    """How large the prior's spread is against the normalised scores it multiplies: the 10th–90th percentile
    ratio of ln(1+Δ) over blocks (tau auto) and, within a block, of the normalised importance/cost (median over
    blocks). At T = 1 a block's multiplier moves its units by the first ratio, the scores spread by the second."""
    from prunellm.priors import prior_multipliers, resolve_tau, spread
    from prunellm.selection import normalized_values

    multipliers = prior_multipliers(deltas["layer"], deltas["attention"], deltas["mlp"], 1.0, resolve_tau("auto", deltas["layer"]))
    values = normalized_values(scores.units, scores.scores, normalization)
    in_block = torch.tensor([spread(v) for v in values.values() if len(v) > 1], dtype=torch.float64)
    used = torch.tensor([multipliers[key] for key in values], dtype=torch.float64)
    return {"prior_p90_over_p10": round(spread(used), 3), "prior_min": round(float(used.min()), 4),
            "prior_max": round(float(used.max()), 4), "score_p90_over_p10_in_block_median": round(float(in_block.median()), 3)}  # fmt: skip


def measure(out: str, rows: tuple[str, ...] = ROWS, threads: int = 2, model: str = MODEL) -> None:
    """Measure the dense model and every row not yet in ``out`` (JSON lines), appending each as it finishes."""
    from prunellm.units import count_parameters

    base, tokenizer, token_sets, ids, total, done, emit = start(out, threads, model)
    cache: dict = {}
    for row in rows:
        if row in done:
            continue
        fields = parse_row(row)
        started = time.perf_counter()
        model, plan, extra = prune_row(base, tokenizer, ids, fields, cache)
        widths = {
            # None: a kind the row did not consider (kept whole)
            "kv_groups": [None if layer.kv_groups is None else len(layer.kv_groups) for layer in plan.layers],
            "mlp_channels": [None if layer.mlp_channels is None else len(layer.mlp_channels) for layer in plan.layers],
        }
        emit({
            "row": row, **fields, "removed": round(1 - count_parameters(model) / total, 4),
            "ppl": evaluate(model, token_sets, tokenizer), "seconds": round(time.perf_counter() - started, 1), "widths": widths, **extra,
        })  # fmt: skip
        del model


def prune_row(base, tokenizer, ids: torch.Tensor, fields: dict, cache: dict) -> tuple[object, object, dict]:
    """One prunellm configuration on the protocol's calibration windows: ``(pruned copy of base, plan, extra)``.

    ``fields``: :func:`parse_row`'s, optionally with ``kinds`` (unit kinds, instead of ``units``' name), ``tau``,
    ``min_kv_groups``, ``round_to``, ``damp`` and ``batch_size`` (the CLI's defaults otherwise). ``cache`` keeps
    the scores (per criterion and units) and the prior's Δ (per measure) between rows. ``extra``: the T ``auto`` chose and
    the prior's spread against the scores' (:func:`prior_scale`)."""
    import prunellm as pl
    from prunellm.priors import prior_multipliers, resolve_tau, resolve_temperature
    from prunellm.selection import normalized_values

    if fields.get("rounds", 1) > 1:
        return prune_in_rounds(base, tokenizer, ids, fields, cache)
    kinds = tuple(fields.get("kinds") or UNITS[fields["units"]])
    key = (fields["criterion"], kinds)
    if key not in cache:
        cache[key] = pl.score(base, ids, fields["criterion"], units=kinds, batch_size=fields.get("batch_size", 4))
    scores = cache[key]
    priors, extra = None, {}
    if fields["temperature"]:
        measure = fields.get("prior_measure", "loss")  # --prior_measure
        if ("deltas", measure) not in cache:
            cache["deltas", measure] = prior_deltas(base, tokenizer, measure=measure)
        deltas = cache["deltas", measure]
        tau = resolve_tau(fields.get("tau", "auto"), deltas["layer"])
        layered = (deltas["layer"], deltas["attention"], deltas["mlp"])
        plain = normalized_values(scores.units, scores.scores, fields["normalization"])
        temperature = resolve_temperature(fields["temperature"], layered, tau, plain)
        if fields["temperature"] == "auto":
            extra["temperature_used"] = round(temperature, 4)
        priors = prior_multipliers(*layered, temperature, tau)
        extra["prior_scale"] = prior_scale(scores, deltas, fields["normalization"])
    plan = pl.select(base, scores, fields["ratio"], normalization=fields["normalization"], priors=priors,
                     min_kv_groups=fields.get("min_kv_groups", 1), round_to=fields.get("round_to", 1))  # fmt: skip
    model = copy.deepcopy(base)
    pl.prune(model, plan, calibration=ids, reconstruct=fields["reconstruct"], target=fields["target"], select=fields["select"],
             damp=fields.get("damp", "auto"))  # fmt: skip
    return model, plan, extra


def prune_in_rounds(base, tokenizer, ids: torch.Tensor, fields: dict, cache: dict) -> tuple[object, object, dict]:
    """:func:`prune_row` in ``fields["rounds"]`` equal steps of the share of ``base``'s parameters removed, each
    round on the model the last one left (scores, prior and T measured again; ``cache``, of ``base``, serves the
    first round only): ``--iterative_steps``. The plan returned is the last round's (its widths are the final
    model's)."""
    from prunellm.units import count_parameters

    total, rounds = count_parameters(base), fields["rounds"]
    model, plan, extra = base, None, {"temperature_used": []}
    for step in range(1, rounds + 1):
        goal = fields["ratio"] * step / rounds  # share of base's parameters gone after this round
        ratio = 1 - (1 - goal) * total / count_parameters(model)
        model, plan, step_extra = prune_row(model, tokenizer, ids, fields | {"ratio": ratio, "rounds": 1}, cache if step == 1 else {})
        extra["temperature_used"].append(step_extra.get("temperature_used"))
    return model, plan, extra


def run() -> dict:
    """The section for ``python -m benchmarks.run --only ablation``: every row and every variant
    (:mod:`benchmarks.ablation_variants`), in a fresh file."""
    import tempfile
    from pathlib import Path

    from benchmarks import ablation_variants

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "ablation.jsonl")
        measure(out)
        ablation_variants.measure(out, tuple(ablation_variants.VARIANTS))
        return read_rows(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON-lines file; rows already in it are not measured again")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="criterion[@units]/allocation/reconstruct[:target]/ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=MODEL, help="the model the rows prune (an embedded name, a folder, a hub id); "
                        "--into_results takes the default's rows only")  # fmt: skip
    parser.add_argument("--into_results", action="store_true", help="add the file's rows to benchmarks/results.json's (same dense row)")
    args = parser.parse_args()
    if args.into_results and args.model != MODEL:
        parser.error(f"--into_results merges {MODEL} rows only: the ablation table's dense row is {MODEL}'s")
    if not args.into_results:
        measure(args.out, tuple(args.rows), args.threads, args.model)
        return
    into_results("ablation", read_rows(args.out), merge=True)


def merge_rows(old: dict | None, new: dict) -> dict:
    """``new``'s rows added to ``old``'s (a row measured again replaces its old figure); refused when the dense
    model's figures differ beyond float noise (1e-4 relative: torch thread counts move the last digit) or the
    protocol does (another protocol or model: the rows would not compare)."""
    if not old:
        return new
    old_ppl, new_ppl = old["dense"]["ppl"], new["dense"]["ppl"]
    shared = old_ppl.keys() & new_ppl.keys()  # a text one run lacks (the Bible without bible-kjv) is left out
    same_dense = bool(shared) and all(abs(new_ppl[k] - old_ppl[k]) <= 1e-4 * old_ppl[k] for k in shared)
    if not same_dense or old["protocol"] != new["protocol"]:
        raise SystemExit(f"the file's dense row or protocol differs from benchmarks/results.json's: {new['dense']} vs {old['dense']}")
    names = {r["row"] for r in new["rows"]}
    dense = new["dense"] | {"ppl": old_ppl | new_ppl}
    return old | new | {"dense": dense, "rows": [r for r in old["rows"] if r.get("row") not in names] + new["rows"]}


def into_results(name: str, section: dict, merge: bool = False) -> None:
    """Write ``section`` as ``name`` into ``benchmarks/results.json`` (then ``python -m benchmarks.run --render``)."""
    from benchmarks.run import ROOT, write_atomic

    saved = ROOT / "benchmarks" / "results.json"
    results = json.loads(saved.read_text())
    results[name] = merge_rows(results.get(name), section) if merge else section
    write_atomic(saved, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
