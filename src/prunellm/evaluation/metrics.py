"""The metric registry: what an evaluation metric is, apart from the metrics themselves.

A metric declares, in one place: the :class:`~prunellm.options.EvalOptions` fields it reads, the JSON Schema of
its entry in ``evaluation_results.json`` (``metrics.<name>``), how to measure it on an in-memory model, and the
columns (and notes) it adds to ``prunellm report``. The evaluator, the results schema and the report read the
registry, so a new metric is one :func:`register` call (see ``tests/test_metric_registry.py`` for an example
that lives in a single test file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PrunellmError


@dataclass(frozen=True)
class Column:
    """One report column: a header, how to read its value from a run's results document, and how to print it."""

    header: str
    value: Callable[[dict[str, Any]], Any]  # results document -> value (None = not measured)
    fmt: str = "{}"


@dataclass
class Context:
    """What a metric measures on: the model, its tokenizer, the options, the metrics asked for, and a memo for
    passes that several metrics share (speed and memory come from one generate pass)."""

    model: Any
    tokenizer: Any
    options: Any  # EvalOptions
    wanted: tuple[str, ...]
    progress: bool = True
    memo: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the same value after."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


@dataclass(frozen=True)
class Metric:
    """A registered evaluation metric."""

    name: str
    help: str
    options: tuple[str, ...]  # EvalOptions fields it reads
    schema: dict[str, Any]  # JSON Schema of results["metrics"][name]; may $ref results.schema.json's $defs
    measure: Callable[[Context], Any]
    columns: Callable[[list[dict[str, Any]]], list[Column]] = lambda docs: []
    notes: Callable[[list[dict[str, Any]]], list[str]] = lambda docs: []
    check: Callable[[Any], None] = lambda options: None  # refuse bad options before anything is measured
    versions: Callable[[Any], dict[str, str]] = lambda part: {}  # extra package versions its numbers depend on


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add ``metric`` to the registry (a second metric of the same name replaces the first)."""
    METRICS[metric.name] = metric
    return metric


def get_metrics(names: list[str], flag: str = "--metrics") -> list[Metric]:
    """The registered metrics named, in registry order; an unknown name lists the valid ones."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise PrunellmError(f"{flag} '{','.join(unknown)}' is not valid: use a comma-separated subset of {', '.join(METRICS)}")
    return [metric for name, metric in METRICS.items() if name in names]


def metric_part(doc: dict[str, Any], name: str) -> Any:
    """``doc["metrics"][name]`` of a results document, or ``None``."""
    return (doc.get("metrics") or {}).get(name)


def first_seen(items) -> list:
    """Unique items in the order first seen."""
    return list(dict.fromkeys(items))
