"""Peer comparison: Torch-Pruning's uniform LLM pruning on SmolLM2-135M at a matched parameter count.

Torch-Pruning (pip ``torch-pruning``, version pinned by the benchmark: 1.6.1) is run as in its LLM example
``examples/LLMs/prune_llm.py`` (VainF/Torch-Pruning): one ``tp.pruner.MetaPruner`` with local (uniform) pruning,
``pruning_ratio = head_pruning_ratio = r``, ``ignored_layers=[lm_head]``, ``num_heads={q: 9, k: 3, v: 3}``,
``prune_num_heads=True``, ``prune_head_dims=False``, ``round_to=4``, example input ``"Hello world."``; then the
config and attention attributes are patched as the example does. Like the example it also prunes the hidden
(residual) dimension, embeddings and norms included — that is the peer's method, not ours.

Criteria:

* ``magnitude`` — ``tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")`` (the example's
  ``GroupNormImportance``, renamed in Torch-Pruning 1.5);
* ``taylor`` — ``tp.importance.GroupTaylorImportance()`` (Torch-Pruning's defaults), with gradients from
  ``model(input_ids=b, labels=b).loss.backward()`` over the calibration windows in micro-batches; the loss of
  each micro-batch is divided by the number of micro-batches so ``.grad`` holds the mean gradient.

The ratio ``r`` whose achieved parameter count is nearest ``target_params`` is searched (for the first criterion; the
second reuses it, as uniform widths do not depend on the importance) with trial prunings of
``copy.deepcopy(model)`` (gradients copied onto each trial, so one gradient pass serves every trial). The search
runs in a forked child process, so the trials leave no freed-but-resident memory in the measuring process; the
final scoring+pruning then runs on the loaded model in the parent and is the one that is timed and whose peak RSS
is measured (``memory_ratio`` = (peak RSS − RSS before scoring + weight MB) ÷ weight MB, as in ``scoring_cost``).

Adaptations to the example (transformers 5, this benchmark):

* calibration is prunellm's (``sample_calibration(tokenizer, "shakespeare", n, seq_len, seed=0)``, the windows
  prunellm scores on) instead of the example's WikiText-2/C4 loaders; the model is float32 on CPU
  (``prunellm.models.load_model``) instead of float16 with ``device_map="auto"``;
* transformers 5's ``LlamaAttention`` has no ``num_heads``/``num_key_value_heads``/``hidden_size`` attributes
  (it reshapes with ``-1`` heads and reads ``head_dim`` from the config), so the head counts are read from the
  pruned ``q_proj``/``k_proj`` widths; ``num_key_value_groups`` (used by ``repeat_kv``) is set from them, and
  ``config.num_key_value_heads`` is also updated (the example leaves it alone for GQA models, which is only
  right while the KV heads are kept);
* the graph is traced with ``attn_implementation="eager"`` (the pruned model then runs with the loaded one,
  SDPA): transformers 5's SDPA path calls ``scaled_dot_product_attention(..., enable_gqa=True)`` on the 3 KV
  heads instead of ``repeat_kv``, and Torch-Pruning then couples ``k_proj``/``v_proj`` (192 channels) with the
  9-head ``q_proj`` and crashes in ``MetaPruner.step`` (``RuntimeError: shape '[9, -1]' is invalid for input of
  size 192``); eager attention expands K/V with ``repeat_kv`` as the transformers 4 models of the example did;
* Torch-Pruning unties the tied embedding/``lm_head`` (two equal pruned copies); they are tied again after
  pruning when equal, so the count matches what ``save_pretrained`` → ``from_pretrained`` would give;
* the example input is passed as ``{"input_ids": ..., "use_cache": False}``: transformers 5 returns a
  ``DynamicCache`` object in ``past_key_values``, which Torch-Pruning's graph tracer cannot flatten
  (``AttributeError: 'tuple' object has no attribute 'grad_fn'``); the graph is traced from the logits alone;
* ``LlamaMLP.intermediate_size`` is patched beside ``config.intermediate_size``; the example's
  ``torch.cuda.empty_cache()`` is dropped (CPU).

What to expect (SmolLM2-135M, 20 % of parameters): local head pruning removes whole query heads per KV group
(ceil), so any ``r > 0`` removes 3 of 9 query heads per layer, and the remaining budget (r ≈ 0.098) goes to the
hidden and MLP widths; weight magnitude ranks two of SmolLM2's massive-activation residual channels (230, 308)
among the least important, which is why the magnitude variant collapses (PPL > 10^5) without fine-tuning.

Run through :func:`run_isolated` (a fresh process per criterion) or directly:
``python -m benchmarks.peer_torch_pruning --criterion taylor --target_params 107612006 --json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import logging
import math
import multiprocessing
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import MODEL, ROOT, eval_token_sets, evaluate_ppl, peak_rss_mb, reset_peak_rss, rss_mb

logger = logging.getLogger(__name__)

PEER = "torch-pruning"
PINNED = "1.6.1"
CRITERIA = ("taylor", "magnitude")
MAX_TRIALS = 6
EXAMPLE_TEXT = "Hello world."  # the example's tracing input


class _SearchFailed(Exception):
    """The ratio search failed in its child process; the message is already an error line."""


def _error_line(exc: BaseException) -> str:
    """``ExceptionType: message`` on one line."""
    if isinstance(exc, _SearchFailed):
        return str(exc)
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _importance(criterion: str) -> Any:
    """Torch-Pruning's importance for a criterion name."""
    import torch_pruning as tp

    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    raise ValueError(f"--criterion {criterion!r} is not a peer criterion; use one of {', '.join(CRITERIA)}")


def _accumulate_gradients(model, calibration, batch_size: int) -> None:
    """Mean gradient of the LM loss over the calibration windows, left in every ``param.grad``."""
    model.zero_grad(set_to_none=True)
    batches = calibration.split(batch_size)
    for batch in batches:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss / len(batches)
        loss.backward()


def _prune(model, example_inputs, criterion: str, ratio: float) -> None:
    """Prune ``model`` in place as Torch-Pruning's LLM example does, then patch its config (see the module doc)."""
    import torch
    import torch_pruning as tp

    config = model.config
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    attn_implementation = config._attn_implementation
    model.set_attn_implementation("eager")  # trace through repeat_kv, not SDPA's enable_gqa (see the module doc)
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=example_inputs,
        importance=_importance(criterion),
        global_pruning=False,
        pruning_ratio=ratio,
        ignored_layers=[model.lm_head],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,  # keeps head_dim, so RoPE is untouched
        head_pruning_ratio=ratio,
        round_to=4,
    )
    model.set_attn_implementation(attn_implementation)
    for group in pruner.step(interactive=True):
        group.prune()
    del pruner

    # Torch-Pruning slices the tied embedding and lm_head into two new, equal Parameters; tie them again so the
    # pruned model holds (and is counted with) one matrix, as save_pretrained → from_pretrained would give
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if config.tie_word_embeddings and head.weight is not embed.weight and torch.equal(head.weight, embed.weight):
        head.weight = embed.weight

    config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            n_q = module.q_proj.out_features // module.head_dim
            n_kv = module.k_proj.out_features // module.head_dim
            module.num_key_value_groups = n_q // n_kv
            config.num_attention_heads = n_q
            config.num_key_value_heads = n_kv
        elif name.endswith("mlp"):
            module.hidden_size = module.gate_proj.in_features
            module.intermediate_size = module.gate_proj.out_features
            config.intermediate_size = module.gate_proj.out_features
        elif hasattr(module, "hidden_size") and name.split(".")[-2:-1] == ["layers"]:
            module.hidden_size = config.hidden_size  # LlamaDecoderLayer.hidden_size


def _num_params(model) -> int:
    """Parameter count, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


def _trial(model, example_inputs, criterion: str, ratio: float) -> int:
    """Parameter count after pruning a deep copy of ``model`` (with its gradients) at ``ratio``."""
    trial = copy.deepcopy(model)
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, p in trial.named_parameters():
        p.grad = grads[name]  # deepcopy drops .grad; Torch-Pruning slices it into new tensors, never in place
    _prune(trial, example_inputs, criterion, ratio)
    count = _num_params(trial)
    del trial
    gc.collect()
    return count


def _search_ratio(model, example_inputs, criterion: str, target: int) -> tuple[float, int, int]:
    """``(ratio, params, trials)``: the trialled ratio whose count is nearest ``target``.

    The count falls with ``r`` roughly as ``dense · (1 − r)^k`` (k between 1 and 2: embeddings are linear in the
    hidden size, projections quadratic), so the next trial interpolates ``log params`` against ``log(1 − r)``
    between the closest counts above and below the target, falling back to bisection of the bracket.
    """
    dense = _num_params(model)
    above: tuple[float, int] = (0.0, dense)  # (ratio, params) with params >= target
    below: tuple[float, int] | None = None
    tried: dict[float, int] = {}
    ratio = 1 - (target / dense) ** (1 / 1.8)  # first guess from k ≈ 1.8 (SmolLM2's embedding share)
    for _ in range(MAX_TRIALS):
        ratio = round(min(max(ratio, 1e-4), 0.95), 5)
        if ratio in tried:
            break
        count = _trial(model, example_inputs, criterion, ratio)
        # the count is a step function of r (heads, round_to=4): a repeated count means a plateau, so bisect
        plateau = count in tried.values()
        tried[ratio] = count
        logger.info("trial %d: ratio %.5f -> %d params (target %d)", len(tried), ratio, count, target)
        if count == target:
            break
        if count > target:
            above = (ratio, count)
        else:
            below = (ratio, count)
        if below is None:
            ratio = min(0.95, 2 * ratio + 0.05)
            continue
        (r_a, p_a), (r_b, p_b) = above, below
        if p_a == p_b or r_b - r_a < 1e-4:
            break
        # log-log secant between the bracket ends
        x_a, x_b = math.log1p(-r_a), math.log1p(-r_b)
        y_a, y_b, y_t = math.log(p_a), math.log(p_b), math.log(target)
        guess = 1 - math.exp(x_a + (y_t - y_a) * (x_b - x_a) / (y_b - y_a))
        ratio = guess if r_a < guess < r_b and round(guess, 5) not in tried and not plateau else (r_a + r_b) / 2
    best = min(tried, key=lambda r: (abs(tried[r] - target), r))
    return best, tried[best], len(tried)


def _search_in_child(model, example_inputs, criterion: str, target: int, calibration, batch_size: int) -> tuple[float, int, int]:
    """:func:`_search_ratio` (after the gradient pass for ``taylor``) in a forked child; returns its result.

    Raises:
        _SearchFailed: the child raised (its error line) or died (its exit code).
    """
    context = multiprocessing.get_context("fork")  # the child shares the loaded model copy-on-write
    reader, writer = context.Pipe(duplex=False)

    def search() -> None:
        try:
            if criterion == "taylor":
                _accumulate_gradients(model, calibration, batch_size)
            writer.send(("ok", _search_ratio(model, example_inputs, criterion, target)))
        except Exception as exc:  # noqa: BLE001 — sent to the parent as its error line
            logger.exception("the ratio search failed")
            writer.send(("error", _error_line(exc)))

    child = context.Process(target=search, name="peer-ratio-search")
    child.start()
    writer.close()
    try:
        status, payload = reader.recv()
    except EOFError:
        child.join()
        raise _SearchFailed(f"ChildProcessError: the ratio search process died (exit code {child.exitcode})") from None
    child.join()
    if status != "ok":
        raise _SearchFailed(payload)
    return payload


def measure(criterion: str, target_params: int, num_samples: int = 32, seq_len: int = 128, batch_size: int = 4,
            pruning_ratio: float | None = None) -> dict:  # fmt: skip
    """One peer measurement in this process (call in a fresh process; see :func:`run_isolated`).

    ``pruning_ratio`` skips the search: uniform pruning removes the same count of heads and channels per layer
    whatever the importance, so the ratio another criterion's search found gives the same parameter count.

    Returns:
        ``{"peer", "version", "criterion", "pruning_ratio", "trials", "params", "achieved_ratio",
        "target_params", "seconds", "memory_ratio", "peak_rss_mb", "ppl", "generate_ok"}``; on an exception,
        what was measured before it plus ``"error": "<ExceptionType: message>"``.
    """
    import torch

    result: dict[str, Any] = {"peer": PEER, "criterion": criterion, "target_params": target_params}
    try:
        import torch_pruning  # noqa: F401 — fails here, as one error line, when the peer is missing

        from prunellm.data import sample_calibration
        from prunellm.models import load_model, load_tokenizer

        result["version"] = importlib.metadata.version("torch-pruning")  # tp.__version__ says 1.6.0 in 1.6.1
        # one thread: the ratio search runs in a forked child, and a child forked after the OpenMP pool has run a
        # parallel region hangs in its first one (measured: the search never finished with 2 threads)
        torch.set_num_threads(1)
        torch.manual_seed(0)
        _importance(criterion)  # a bad name fails before the model loads
        tokenizer = load_tokenizer(MODEL)
        calibration = sample_calibration(tokenizer, "shakespeare", num_samples, seq_len, seed=0)
        # use_cache=False: transformers 5 returns a DynamicCache, which Torch-Pruning's tracer cannot flatten
        example_inputs = {"input_ids": torch.tensor(tokenizer.encode(EXAMPLE_TEXT)).unsqueeze(0), "use_cache": False}
        model = load_model(MODEL)
        model.eval()
        dense = _num_params(model)
        weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        result.update(dense_params=dense, weight_mb=round(weight_mb, 1), rss_after_load_mb=round(rss_mb(), 1))

        search_started = time.perf_counter()
        if pruning_ratio is None:
            ratio, _, trials = _search_in_child(model, example_inputs, criterion, target_params, calibration, batch_size)
        else:
            ratio, trials = pruning_ratio, 0
        result.update(pruning_ratio=ratio, trials=trials, search_seconds=round(time.perf_counter() - search_started, 1))

        # the measured run: scoring (gradient pass for taylor) + Torch-Pruning's importance and surgery
        gc.collect()
        rss_loaded = rss_mb()
        reset_peak_rss()
        started = time.perf_counter()
        if criterion == "taylor":
            _accumulate_gradients(model, calibration, batch_size)
        _prune(model, example_inputs, criterion, ratio)
        elapsed = time.perf_counter() - started
        peak = peak_rss_mb()
        model.zero_grad(set_to_none=True)
        params = _num_params(model)
        result.update(
            params=params,
            achieved_ratio=round(1 - params / dense, 5),
            seconds=round(elapsed, 2),
            rss_before_scoring_mb=round(rss_loaded, 1),
            peak_rss_mb=round(peak, 1),
            memory_ratio=round((peak - rss_loaded + weight_mb) / weight_mb, 3),
            tied_embeddings=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
            widths={
                "hidden_size": model.config.hidden_size,
                "num_attention_heads": model.config.num_attention_heads,
                "num_key_value_heads": model.config.num_key_value_heads,
                "intermediate_size": model.config.intermediate_size,
            },
        )

        with torch.no_grad():
            logits = model(input_ids=calibration[:1]).logits  # (1, T, vocab)
            if not torch.isfinite(logits).all():
                raise FloatingPointError("the pruned model's logits are not finite")
            prompt = calibration[:1, :16]
            out = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
        result["generate_ok"] = tuple(out.shape) == (1, 24)
        result["ppl"] = evaluate_ppl(model, eval_token_sets(tokenizer))
    except Exception as exc:  # noqa: BLE001 — a peer crash is a result, recorded as one line
        logger.exception("torch-pruning failed")
        result["error"] = _error_line(exc)
    return result


def run_isolated(criterion: str, target_params: int, num_samples: int = 32, seq_len: int = 128, batch_size: int = 4,
                 timeout_s: float = 3600, pruning_ratio: float | None = None) -> dict:  # fmt: skip
    """Run :func:`measure` in a fresh Python process; never raises (a failure is returned as ``"error"``)."""
    if importlib.util.find_spec("torch_pruning") is None:
        return {"peer": PEER, "criterion": criterion, "error": f"torch-pruning is not installed (pip install torch-pruning=={PINNED})"}
    command = [sys.executable, "-m", "benchmarks.peer_torch_pruning", "--criterion", criterion, "--target_params", str(target_params),
               "--num_samples", str(num_samples), "--seq_len", str(seq_len), "--batch_size", str(batch_size), "--json"]  # fmt: skip
    if pruning_ratio is not None:
        command += ["--pruning_ratio", str(pruning_ratio)]
    failed = {"peer": PEER, "criterion": criterion}
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        return {**failed, "error": _error_line(exc)}
    for line in reversed(done.stdout.strip().splitlines()):
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            if done.returncode != 0 and "error" not in parsed:
                parsed["error"] = f"exit status {done.returncode}"
            return parsed
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
    reason = tail[-1].strip() if tail else "no output"
    return {**failed, "error": f"exit status {done.returncode}: {reason}"}


def main() -> None:
    """CLI: one criterion, result as one JSON line (``--json``) or logged."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criterion", choices=CRITERIA, default="taylor", help="Torch-Pruning importance")
    parser.add_argument("--target_params", type=int, required=True, help="parameter count to match (tied weights once)")
    parser.add_argument("--num_samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--batch_size", type=int, default=4, help="calibration micro-batch size")
    parser.add_argument("--pruning_ratio", type=float, default=None, help="Torch-Pruning's ratio (default: searched for --target_params)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    args = parser.parse_args()
    if args.pruning_ratio is not None and not 0 < args.pruning_ratio < 1:
        parser.error(f"--pruning_ratio {args.pruning_ratio} must be between 0 and 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    result = measure(args.criterion, args.target_params, args.num_samples, args.seq_len, args.batch_size, args.pruning_ratio)
    if args.json:
        print(json.dumps(result))
    else:
        logger.info("%s", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
