"""The four standard metrics, registered: ``ppl``, ``zeroshot``, ``speed``, ``memory``.

Each declares the options it reads, its part of the results schema (``results.schema.json`` ``$defs``), how it is
measured and its report columns. The measurements themselves live in :mod:`.perplexity`, :mod:`.zeroshot` and
:mod:`.speed`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from ..data import describe_source, leading_special_tokens, text_tokens
from ..errors import PrunellmError
from ..options import split_list
from .metrics import Column, Context, Metric, first_seen, metric_part, register
from .perplexity import Protocol, perplexity

log = logging.getLogger(__name__)

MB = 1024 * 1024


def eval_tokens(tokenizer, dataset: str):
    """Token ids of the evaluation part of ``dataset`` (tokenized once per process)."""
    return text_tokens(tokenizer, dataset, "eval", flag="--ppl_datasets")


# --- ppl ---------------------------------------------------------------------------------------------------


def protocols_for_model(options, model, n_prefix: int) -> list[Protocol]:
    """The PPL protocols to run on ``model``. The default pair adapts to a short context: a default window that
    the model cannot hold is skipped with a warning; a protocol the user named is kept (and refused later)."""
    protocols = [Protocol.parse(p) for p in options.protocol_names()]
    default = type(options).model_fields["ppl_protocols"].default
    if options.ppl_seq_len is not None or options.ppl_protocols != default:
        return protocols
    context = getattr(model.config, "max_position_embeddings", None)
    fitting = [p for p in protocols if not context or p.seq_len + n_prefix <= context]
    for skipped in (p for p in protocols if p not in fitting):
        log.warning(
            "PPL protocol %s skipped: the model's context is %d tokens (choose windows with --ppl_protocols)",
            skipped.name, context,
        )  # fmt: skip
    if not fitting:
        raise PrunellmError(
            f"the model's context ({context} tokens) holds none of the default --ppl_protocols {default}: "
            f"give --ppl_protocols with a window of at most {context - n_prefix}"
        )
    return fitting


def _measure_ppl(ctx: Context) -> list[dict[str, Any]]:
    options = ctx.options
    prefix = leading_special_tokens(ctx.tokenizer) if options.ppl_bos == "auto" else []
    protocols = protocols_for_model(options, ctx.model, len(prefix))
    rows: list[dict] = []
    for dataset in split_list(options.ppl_datasets):
        tokens = eval_tokens(ctx.tokenizer, dataset)
        source = describe_source(dataset, "eval")
        for protocol in protocols:
            result = perplexity(
                ctx.model, tokens, protocol, dataset=dataset, batch_size=options.ppl_batch_size,
                max_windows=options.ppl_max_windows, progress=ctx.progress, prefix=prefix,
            )  # fmt: skip
            log.info("PPL %s (%s): %.3f over %d tokens", dataset, protocol.name, result.ppl, result.scored_tokens)
            rows.append({**result.to_dict(), "source": source})
    return rows


def _ppl_columns(docs: list[dict[str, Any]]) -> list[Column]:
    keys = first_seen((row["dataset"], row["protocol"]) for doc in docs for row in metric_part(doc, "ppl") or [])

    def getter(dataset: str, protocol: str) -> Callable[[dict], Any]:
        return lambda doc: next(
            (r["ppl"] for r in metric_part(doc, "ppl") or [] if (r["dataset"], r["protocol"]) == (dataset, protocol)), None
        )

    return [Column(f"PPL {Path(d).name} ({p})", getter(d, p), "{:.2f}") for d, p in keys]


register(Metric(
    name="ppl",
    help="perplexity of held-out text under each window[/stride] protocol",
    options=("ppl_datasets", "ppl_protocols", "ppl_seq_len", "ppl_max_windows", "ppl_batch_size", "ppl_bos"),
    schema={"type": "array", "items": {"$ref": "#/$defs/ppl_row"}},
    measure=_measure_ppl,
    columns=_ppl_columns,
))  # fmt: skip


# --- zeroshot ----------------------------------------------------------------------------------------------


def _measure_zeroshot(ctx: Context) -> dict[str, Any]:
    from .zeroshot import zeroshot

    options = ctx.options
    return zeroshot(
        ctx.model, ctx.tokenizer, split_list(options.zeroshot_tasks), num_fewshot=options.num_fewshot,
        limit=options.limit, batch_size=options.zeroshot_batch_size,
        include_path=[options.zeroshot_include_path] if options.zeroshot_include_path else None,
    )  # fmt: skip


def _zeroshot_columns(docs: list[dict[str, Any]]) -> list[Column]:
    def part(doc: dict) -> dict:
        return metric_part(doc, "zeroshot") or {}

    tasks = first_seen((row["task"], row["llm_pruner_metric"]) for doc in docs for row in part(doc).get("tasks", []))

    def getter(task: str, metric: str) -> Callable[[dict], Any]:
        return lambda doc: next((r[metric] for r in part(doc).get("tasks", []) if r["task"] == task), None)

    def average(name: str) -> Callable[[dict], Any]:
        return lambda doc: (part(doc).get("averages", {}).get(name) or {}).get("value")

    columns = [Column(f"{task} {metric}", getter(task, metric), "{:.3f}") for task, metric in tasks]
    if tasks:
        columns += [Column("avg LLM-Pruner", average("llm_pruner"), "{:.3f}"),
                    Column("avg acc_norm where available", average("acc_norm_where_available"), "{:.3f}")]  # fmt: skip
    return columns


def _zeroshot_notes(docs: list[dict[str, Any]]) -> list[str]:
    from .zeroshot import AVERAGES

    if not any(metric_part(doc, "zeroshot") for doc in docs):
        return []
    return ["Zero-shot columns give the task's LLM-Pruner metric (named in the header; fractions, lm-eval).",
            *(f"avg {'LLM-Pruner' if k == 'llm_pruner' else 'acc_norm where available'}: {v}." for k, v in AVERAGES.items())]  # fmt: skip


register(Metric(
    name="zeroshot",
    help="zero-shot (or few-shot) accuracy through lm-evaluation-harness",
    options=("zeroshot_tasks", "num_fewshot", "limit", "zeroshot_batch_size", "zeroshot_include_path"),
    schema={"$ref": "#/$defs/zeroshot"},
    measure=_measure_zeroshot,
    columns=_zeroshot_columns,
    notes=_zeroshot_notes,
    versions=lambda part: {"lm_eval": part["lm_eval_version"]},
))  # fmt: skip


# --- speed and memory (one generate pass) ------------------------------------------------------------------


def speed_settings(options):
    """The :class:`~.speed.SpeedSettings` of a set of evaluation options."""
    from .speed import SpeedSettings

    try:
        batch_sizes = tuple(int(b) for b in split_list(options.speed_batch_sizes))
    except ValueError:
        raise PrunellmError(f"--speed_batch_sizes '{options.speed_batch_sizes}' is not valid: give comma-separated positive integers, e.g. 1,4") from None
    return SpeedSettings(
        batch_sizes=batch_sizes,
        prompt_tokens=options.speed_prompt_tokens,
        new_tokens=options.speed_new_tokens,
        repeats=options.speed_repeats,
        warmup=options.speed_warmup,
    )


def _check_speed_options(options) -> None:
    speed_settings(options)
    if options.compare_base:
        from ..models import resolve_model_path

        resolve_model_path(options.compare_base, "--compare_base")


def _load_base(ref: str, like) -> Any:
    """The dense model of ``--compare_base``, on the evaluated model's device and in its dtype."""
    from ..models import input_device, load_model

    dtype = str(next(like.parameters()).dtype).removeprefix("torch.")
    return load_model(ref, dtype=dtype, device=str(input_device(like)), flag="--compare_base")


def _speed_and_memory(ctx: Context) -> dict[str, Any]:
    """Both parts from one pass (the memory runs reuse the speed runs' warm-up and the base model's load)."""
    from .speed import speed_and_memory

    def run() -> dict[str, Any]:
        base = ctx.options.compare_base
        return speed_and_memory(
            ctx.model, speed_settings(ctx.options), speed="speed" in ctx.wanted, memory="memory" in ctx.wanted,
            base=(lambda: _load_base(base, ctx.model)) if base else None, base_path=base,
        )  # fmt: skip

    return ctx.once("speed_and_memory", run)


def _per_batch(metric: str, key: str, header: str, scale: float, fmt: str) -> Callable[[list[dict]], list[Column]]:
    def columns(docs: list[dict[str, Any]]) -> list[Column]:
        sizes = first_seen(row["batch_size"] for doc in docs for row in (metric_part(doc, metric) or {}).get("rows", []))

        def getter(size: int) -> Callable[[dict], Any]:
            def value(doc: dict) -> Any:
                row = next((r for r in (metric_part(doc, metric) or {}).get("rows", []) if r["batch_size"] == size), {})
                return None if row.get(key) is None else row[key] / scale

            return value

        return [Column(f"{header} bs={size}", getter(size), fmt) for size in sizes]

    return columns


def _speed_notes(docs: list[dict[str, Any]]) -> list[str]:
    speed = next((metric_part(d, "speed") for d in docs if metric_part(d, "speed")), None)
    if not speed:
        return []
    return [f"Speed: greedy generate, {speed['prompt_tokens']}-token prompt, {speed['new_tokens']} new tokens, "
            f"median of {speed['repeats']}, on {speed['device']} ({speed['dtype']})."]  # fmt: skip


_SPEED_OPTIONS = ("speed_batch_sizes", "speed_prompt_tokens", "speed_new_tokens", "speed_repeats", "speed_warmup", "compare_base")

register(Metric(
    name="speed",
    help="prefill and decode tokens/s of greedy generate per batch size (median of repeats)",
    options=_SPEED_OPTIONS,
    schema={"$ref": "#/$defs/speed"},
    measure=lambda ctx: _speed_and_memory(ctx)["speed"],
    columns=lambda docs: _per_batch("speed", "prefill_tokens_per_s", "prefill tok/s", 1.0, "{:.1f}")(docs)
    + _per_batch("speed", "decode_tokens_per_s", "decode tok/s", 1.0, "{:.1f}")(docs),
    notes=_speed_notes,
    check=_check_speed_options,
))  # fmt: skip

register(Metric(
    name="memory",
    help="weights and the peak memory of one generate call per batch size",
    options=_SPEED_OPTIONS,
    schema={"$ref": "#/$defs/memory"},
    measure=lambda ctx: _speed_and_memory(ctx)["memory"],
    columns=_per_batch("memory", "peak_delta_bytes", "peak Δ MB", MB, "{:.1f}"),
    notes=lambda docs: ["peak Δ MB: peak memory during one generate call minus the memory in use just before it."]
    if any(metric_part(d, "memory") for d in docs) else [],
    check=_check_speed_options,
))  # fmt: skip
