"""The evaluator: one implementation behind ``prunellm eval`` and the evaluation steps of every command.

``evaluate`` returns (and ``save_results`` writes) ``evaluation_results.json``; its JSON Schema ships beside
this file (``results.schema.json``, checked by :func:`validate_results`)::

    {"schema_version": 1,
     "model": {"path", "params", "weight_bytes", "dtype", "num_hidden_layers"},
     "metrics": {                                   # only the metrics asked for (--metrics)
       "ppl": [{"dataset", "protocol", "seq_len", "stride", "ppl", "nll_sum", "scored_tokens", "windows",
                "total_tokens", "add_special_tokens", "source": {"source", "part": "eval", "kind", ...}}],
       "zeroshot": {"harness": "lm-eval", "lm_eval_version", "num_fewshot", "limit", "batch_size",
                    "tasks": [{"task", "source": "local"|"lm-eval", "acc", "acc_stderr", "acc_norm",
                               "acc_norm_stderr", "samples", "llm_pruner_metric"}],
                    "averages": {"llm_pruner": {"value", "tasks", "metric_per_task", "convention"},
                                 "acc_norm_where_available": {...}},
                    "skipped": [{"task", "reason"}]},
       "speed": {"device", "dtype", "threads", "batch_sizes", "prompt_tokens", "new_tokens", "repeats", "warmup",
                 "seed", "rows": [{"batch_size", "prefill_tokens_per_s", "decode_tokens_per_s",
                                   "prefill_seconds", "generate_seconds"}],
                 "base": {"model", "rows"}, "ratio_to_base": [{"batch_size", "prefill_tokens_per_s",
                                                               "decode_tokens_per_s"}]},        # --compare_base
       "memory": {"device", "dtype", "prompt_tokens", "new_tokens", "batch_sizes", "params", "weight_bytes",
                  "method", "rows": [{"batch_size", "peak_bytes", "peak_delta_bytes", "footprint_bytes"}],
                  "base": {...}, "ratio_to_base": {...}}},                                       # --compare_base
     "started_at", "finished_at", "versions"}

Zero-shot values are fractions (0..1); a metric a task does not report is ``null``. Speed is in tokens per
second (see :mod:`.speed` for the protocol), memory in bytes (``null`` where it cannot be measured cleanly).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
from functools import cache
from pathlib import Path
from typing import Any


from ..errors import PrunellmError
from ..options import EvalOptions, split_list
from ..paths import write_json_atomic
from ..plan import package_versions
from .facts import model_facts
from .metrics import METRICS, Column, Context, Metric, get_metrics, register
from .perplexity import Protocol, perplexity
from .standard import eval_tokens, speed_settings

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("results.schema.json")

def evaluate(model, tokenizer, options: EvalOptions, *, model_path: str, progress: bool = True) -> dict[str, Any]:
    """Run the requested metrics on an in-memory model and return the results document.

    Args:
        model: A causal LM (dense, pruned with per-layer widths, fine-tuned), evaluated as it is.
        tokenizer: Its tokenizer.
        options: Which metrics and how (``--metrics ppl,zeroshot,speed,memory`` and their flags).
        model_path: Recorded as ``model.path``.
        progress: Show progress bars.

    Returns:
        The results document described in this module's docstring.
    """
    metrics = get_metrics(split_list(options.metrics))
    for metric in metrics:  # bad flags fail before anything is measured
        metric.check(options)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "model": model_facts(model, model_path), "metrics": {}}
    context = Context(model, tokenizer, options, tuple(m.name for m in metrics), progress)
    versions: dict[str, str] = {}
    for metric in metrics:
        results["metrics"][metric.name] = metric.measure(context)
        versions.update(metric.versions(results["metrics"][metric.name]))
    results["started_at"] = started
    results["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results["versions"] = {**package_versions(), **versions}
    return results


def save_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write an evaluation document atomically."""
    path = Path(path)
    write_json_atomic(path, results)
    return path


@cache
def _schema_file() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def results_schema() -> dict[str, Any]:
    """The JSON Schema of ``evaluation_results.json``: ``results.schema.json`` with ``metrics`` made of every
    registered metric's part."""
    schema = copy.deepcopy(_schema_file())
    schema["properties"]["metrics"]["properties"] = {name: metric.schema for name, metric in METRICS.items()}
    return schema


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _schema_errors(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str) -> list[str]:
    """The subset of JSON Schema that ``results.schema.json`` uses: $ref, type, enum, minimum, required,
    properties, additionalProperties, items."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].removeprefix("#/$defs/")]
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        # bool is an int in Python but not in JSON
        ok = any(isinstance(value, _TYPES[n]) and not (n in ("integer", "number") and isinstance(value, bool)) for n in names)
        if not ok:
            return [f"{where}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    if "minimum" in schema and isinstance(value, (int, float)) and not isinstance(value, bool) and value < schema["minimum"]:
        errors.append(f"{where}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        errors += [f"{where}: '{key}' is required" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += _schema_errors(item, properties[key], root, f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}: unexpected key '{key}'")
            elif isinstance(extra, dict):
                errors += _schema_errors(item, extra, root, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _schema_errors(item, schema["items"], root, f"{where}[{i}]")
    return errors


def validate_results(doc: dict[str, Any]) -> None:
    """Check an evaluation document against ``results.schema.json``.

    Uses ``jsonschema`` when it is installed, otherwise a small built-in checker of the same schema.

    Raises:
        PrunellmError: The document does not match; the message names the first offending field.
    """
    schema = results_schema()
    try:
        import jsonschema
    except ImportError:
        errors = _schema_errors(doc, schema, schema, "$")
    else:
        errors = [f"$.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    if errors:
        raise PrunellmError(f"evaluation results do not match {SCHEMA_FILE.name}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))


__all__ = [
    "METRICS",
    "Column",
    "Context",
    "Metric",
    "register",
    "speed_settings",
    "Protocol",
    "eval_tokens",
    "evaluate",
    "model_facts",
    "perplexity",
    "results_schema",
    "save_results",
    "validate_results",
]
