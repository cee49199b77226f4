"""The evaluator: one implementation behind ``prunellm eval`` and the evaluation steps of every command.

``evaluate`` returns (and ``save_results`` writes) ``evaluation_results.json``::

    {"schema_version": 1, "model": {"path", "params", "weight_bytes", "dtype"},
     "metrics": {"ppl": [{"dataset", "protocol", "seq_len", "stride", "ppl", "scored_tokens", ...}]},
     "started_at", "finished_at", "versions"}
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import torch

from ..data import load_text, tokenize_text
from ..errors import PrunellmError
from ..options import EvalOptions, split_list
from ..paths import write_json_atomic
from ..plan import package_versions
from .perplexity import PerplexityResult, Protocol, perplexity

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METRICS: tuple[str, ...] = ("ppl",)

_TOKEN_CACHE: dict[tuple[str, int, str], torch.Tensor] = {}


def eval_tokens(tokenizer, dataset: str) -> torch.Tensor:
    """The eval part of a dataset, tokenized once per process (dense and pruned runs share it)."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), dataset)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenize_text(tokenizer, load_text(dataset, "eval", flag="--ppl_datasets"))
    return _TOKEN_CACHE[key]


def model_facts(model, path: str) -> dict[str, Any]:
    """Parameter count, weight bytes and dtype of a model."""
    params = list(model.parameters())
    return {
        "path": path,
        "params": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtype": str(params[0].dtype).removeprefix("torch."),
        "num_hidden_layers": getattr(model.config, "num_hidden_layers", None),
    }


def evaluate(model, tokenizer, options: EvalOptions, *, model_path: str, progress: bool = True) -> dict[str, Any]:
    """Run the requested metrics on an in-memory model and return the results document."""
    metrics = split_list(options.metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise PrunellmError(f"--metrics '{','.join(unknown)}' is not valid: use a comma-separated subset of {', '.join(METRICS)}")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "model": model_facts(model, model_path), "metrics": {}}
    if "ppl" in metrics:
        protocols = [Protocol.parse(p) for p in options.protocol_names()]
        rows: list[dict] = []
        for dataset in split_list(options.ppl_datasets):
            tokens = eval_tokens(tokenizer, dataset)
            for protocol in protocols:
                result: PerplexityResult = perplexity(
                    model,
                    tokens,
                    protocol,
                    dataset=dataset,
                    batch_size=options.ppl_batch_size,
                    max_windows=options.ppl_max_windows,
                    progress=progress,
                )
                log.info("PPL %s (%s): %.3f over %d tokens", dataset, protocol.name, result.ppl, result.scored_tokens)
                rows.append(result.to_dict())
        results["metrics"]["ppl"] = rows
    results["started_at"] = started
    results["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results["versions"] = package_versions()
    return results


def save_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write an evaluation document atomically."""
    path = Path(path)
    write_json_atomic(path, results)
    return path


__all__ = ["METRICS", "Protocol", "eval_tokens", "evaluate", "perplexity", "save_results"]
