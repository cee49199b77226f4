"""Generation speed and peak memory of an in-memory model.

Speed: for each batch size, greedy ``generate`` from a fixed random prompt of ``prompt_tokens`` tokens is
timed with ``max_new_tokens=1`` (prefill: the prompt's forward pass plus choosing the first token) and with
``max_new_tokens=new_tokens`` (the same plus ``new_tokens - 1`` decode steps, EOS ignored). After ``warmup``
untimed runs, each is repeated ``repeats`` times and the median kept::

    prefill tokens/s = batch * prompt_tokens / t_prefill
    decode tokens/s  = batch * (new_tokens - 1) / (t_generate - t_prefill)

Memory: the peak during one ``generate`` of ``new_tokens`` tokens, measured around that call only.
CUDA: ``reset_peak_memory_stats`` then ``max_memory_allocated``; the delta is over ``memory_allocated`` before
the call. CPU (Linux): the RSS high-water mark is reset by writing ``5`` to ``/proc/self/clear_refs``, the
call runs, and ``VmHWM`` is read from ``/proc/self/status``; the delta is over ``VmRSS`` before the call, so
earlier allocations of the process never count. Freed heap pages are first handed back to the OS (glibc
``malloc_trim``): otherwise the call reuses pages that are already resident and its peak does not show. Elsewhere memory is reported as ``null`` with method
``unavailable``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..errors import PrunellmError
from .. import rss
from ..models import input_device
from .facts import model_facts

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SpeedSettings:
    """How speed and memory are measured."""

    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise PrunellmError(f"--speed_batch_sizes {','.join(map(str, self.batch_sizes))} is not valid: give positive batch sizes, e.g. 1,4")
        if self.new_tokens < 2:
            raise PrunellmError(f"--speed_new_tokens {self.new_tokens} is not valid: use at least 2 (one prefill token + decode steps)")
        if self.prompt_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise PrunellmError("--speed_prompt_tokens and --speed_repeats must be at least 1 and --speed_warmup at least 0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_method(device: torch.device) -> str:
    """``cuda_max_memory_allocated``, ``proc_vmhwm`` (Linux CPU) or ``unavailable``."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    if device.type == "cpu" and rss.available():
        return "proc_vmhwm"
    return "unavailable"


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run ``fn`` once and return the peak memory during that call only.

    Returns:
        ``{"method", "peak_bytes", "peak_delta_bytes"}``: the absolute peak (CUDA allocated, or process RSS)
        and the peak minus what was in use just before the call; ``None`` when the method is unavailable.
    """
    method = memory_method(device)
    gc.collect()
    if method == "cuda_max_memory_allocated":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": method, "peak_bytes": peak, "peak_delta_bytes": peak - before}
    if method == "proc_vmhwm":
        rss.trim_heap()
        if not rss.reset_peak():
            method = "unavailable"
        else:
            before = rss.rss_bytes()
            fn()
            peak = rss.peak_rss_bytes()
            if before is not None and peak is not None:
                return {"method": method, "peak_bytes": peak, "peak_delta_bytes": peak - before}
            method = "unavailable"
    fn()
    return {"method": method, "peak_bytes": None, "peak_delta_bytes": None}


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prompt(model, settings: SpeedSettings, batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch_size, settings.prompt_tokens), generator=generator)  # (B, T)
    return ids.to(input_device(model))


@torch.no_grad()
def measure(model, settings: SpeedSettings, *, speed: bool = True, memory: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Speed and/or peak memory rows, one per batch size.

    Args:
        model: A causal LM (dense or pruned) in eval mode.
        settings: Prompt length, new tokens, repeats, warm-up runs and batch sizes.
        speed: Time prefill and decode.
        memory: Measure the peak memory of one generate call.

    Returns:
        ``{"speed": [...], "memory": [...]}`` (a key only when asked for).
    """
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and settings.prompt_tokens + settings.new_tokens > max_len:
        raise PrunellmError(
            f"--speed_prompt_tokens + --speed_new_tokens = {settings.prompt_tokens + settings.new_tokens} exceeds the model's context of {max_len}"
        )
    device = input_device(model)
    was_training = model.training
    model.eval()
    out: dict[str, list[dict[str, Any]]] = {"speed": [], "memory": []}
    try:
        for batch_size in settings.batch_sizes:
            ids = _prompt(model, settings, batch_size)
            mask = torch.ones_like(ids)

            def generate(n: int) -> torch.Tensor:
                # greedy; min_new_tokens and no EOS/pad id make every run produce exactly n tokens
                return model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    use_cache=True, pad_token_id=0, num_beams=1,
                )  # fmt: skip

            for _ in range(settings.warmup):
                generate(settings.new_tokens)
            if speed:
                t_prefill = _median_seconds(lambda: generate(1), device, settings.repeats)
                t_total = _median_seconds(lambda: generate(settings.new_tokens), device, settings.repeats)
                decode_seconds = max(t_total - t_prefill, 1e-9)
                row = {
                    "batch_size": batch_size,
                    "prefill_tokens_per_s": batch_size * settings.prompt_tokens / t_prefill,
                    "decode_tokens_per_s": batch_size * (settings.new_tokens - 1) / decode_seconds,
                    "prefill_seconds": t_prefill,
                    "generate_seconds": t_total,
                }
                log.info("speed bs=%d: prefill %.1f tok/s, decode %.1f tok/s", batch_size, row["prefill_tokens_per_s"], row["decode_tokens_per_s"])
                out["speed"].append(row)
            if memory:
                peak = peak_memory(lambda: generate(settings.new_tokens), device)
                out["memory"].append({"batch_size": batch_size, "peak_bytes": peak["peak_bytes"], "peak_delta_bytes": peak["peak_delta_bytes"]})
    finally:
        model.train(was_training)
    return {key: rows for key, rows in out.items() if (key == "speed" and speed) or (key == "memory" and memory)}


def _ratios(rows: list[dict], base_rows: list[dict], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    by_batch = {row["batch_size"]: row for row in base_rows}
    ratios = []
    for row in rows:
        base = by_batch.get(row["batch_size"], {})
        ratio = {"batch_size": row["batch_size"]}
        for key in keys:
            ratio[key] = row[key] / base[key] if row.get(key) is not None and base.get(key) else None
        ratios.append(ratio)
    return ratios


def _add_footprint(rows: list[dict[str, Any]], weight_bytes: int) -> None:
    """``footprint_bytes`` = weights + the call's peak delta: what running this model costs, comparable across
    models measured in one process (``peak_bytes`` also counts whatever else the process holds)."""
    for row in rows:
        row["footprint_bytes"] = None if row["peak_delta_bytes"] is None else weight_bytes + row["peak_delta_bytes"]


def speed_and_memory(
    model,
    settings: SpeedSettings,
    *,
    speed: bool,
    memory: bool,
    base: Callable[[], Any] | None = None,
    base_path: str | None = None,
) -> dict[str, dict[str, Any]]:
    """The ``speed`` and ``memory`` metric entries, with the dense model's numbers and ratios when given.

    Args:
        model: The model to measure.
        settings: How to measure.
        speed: Return the ``speed`` entry.
        memory: Return the ``memory`` entry.
        base: Loads the dense model to compare with (called once, after ``model`` is measured; freed after).
        base_path: The dense model's reference, recorded in the results.
    """
    device = input_device(model)
    common = {"device": str(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), **asdict(settings)}  # fmt: skip
    common["batch_sizes"] = list(settings.batch_sizes)
    facts = model_facts(model, "")
    rows = measure(model, settings, speed=speed, memory=memory)
    _add_footprint(rows.get("memory", []), facts["weight_bytes"])
    entries: dict[str, dict[str, Any]] = {}
    if speed:
        entries["speed"] = {**common, "rows": rows["speed"]}
    if memory:
        entries["memory"] = {key: common[key] for key in ("device", "dtype", "prompt_tokens", "new_tokens", "batch_sizes")}
        entries["memory"].update(params=facts["params"], weight_bytes=facts["weight_bytes"], method=memory_method(device), rows=rows["memory"])
    if base is not None:
        dense = base()
        try:
            dense_facts = model_facts(dense, base_path or "")
            dense_rows = measure(dense, settings, speed=speed, memory=memory)
            _add_footprint(dense_rows.get("memory", []), dense_facts["weight_bytes"])
        finally:
            del dense
            gc.collect()
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
        if speed:
            entries["speed"]["base"] = {"model": base_path, "rows": dense_rows["speed"]}
            entries["speed"]["ratio_to_base"] = _ratios(rows["speed"], dense_rows["speed"], ("prefill_tokens_per_s", "decode_tokens_per_s"))
        if memory:
            entries["memory"]["base"] = {"model": base_path, "params": dense_facts["params"], "weight_bytes": dense_facts["weight_bytes"], "rows": dense_rows["memory"]}
            entries["memory"]["ratio_to_base"] = {
                "params": facts["params"] / dense_facts["params"],
                "weight_bytes": facts["weight_bytes"] / dense_facts["weight_bytes"],
                "rows": _ratios(rows["memory"], dense_rows["memory"], ("peak_delta_bytes", "footprint_bytes")),
            }
    return entries
