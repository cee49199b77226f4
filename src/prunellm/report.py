"""``prunellm report``: one comparison table (markdown, CSV, HTML) and charts over many run folders.

A run folder is ``results/<name>/`` holding ``evaluation_results.json`` and, when it was pruned, ``plan.json``
and ``analysis/model_comparison.json``; any folder that directly holds ``evaluation_results.json`` is accepted.
A folder without it is skipped with a warning.

Columns: parameters, achieved pruning ratio (from ``plan.json``), PPL of every dataset × protocol, every
zero-shot task in its LLM-Pruner metric (the header names it: ``acc`` or ``acc_norm``), both zero-shot averages,
prefill and decode tokens/s per batch size, weight MB and peak memory delta per batch size.
Charts: the kept fraction of every layer's parameters per run, and PPL against parameter count.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .analysis import _figure_width, _save_figure_atomic
from .errors import PrunellmError
from .evaluation.metrics import METRICS
from .evaluation.metrics import Column as MetricColumn
from .paths import final_path, write_text_atomic

log = logging.getLogger(__name__)

RESULTS_FILE = "evaluation_results.json"
MB = 1024 * 1024


@dataclass
class Run:
    """What one run folder holds."""

    name: str
    folder: Path
    results: dict[str, Any]
    plan: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None


@dataclass(frozen=True)
class Column:
    """One table column: a header, how to read its value from a run, and how to print it."""

    header: str
    value: Callable[[Run], Any]
    fmt: str = "{}"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s could not be read (%s); ignored", path, exc)
        return None


def results_file(folder: Path) -> Path:
    """A run folder's evaluation results: ``<folder>/evaluation_results.json`` (written by prune, layers, finetune and
    ``prunellm eval`` of a results folder), else ``<folder>/model/evaluation_results.json`` (where ``prunellm eval``
    of a results folder wrote them before)."""
    for candidate in (folder / RESULTS_FILE, folder / "model" / RESULTS_FILE):
        if candidate.is_file():
            return candidate
    return folder / RESULTS_FILE


def read_results(folder: Path) -> dict[str, Any] | None:
    """The evaluation document of a run folder (:func:`results_file`), or ``None`` when it has none.

    Raises:
        PrunellmError: The file is there but is not JSON or not an evaluation document (the message names the file
            and the first missing or wrong field of ``results.schema.json``).
    """
    from .evaluation import validate_results

    path = results_file(folder)
    if not path.is_file():
        return None
    fix = "re-run prunellm eval on that model, or leave the folder out"
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrunellmError(f"RESULTS_DIR '{folder}': {path} is not a readable JSON file ({exc}): {fix}".splitlines()[0]) from None
    if not isinstance(doc, dict):
        raise PrunellmError(f"RESULTS_DIR '{folder}': {path} holds a JSON {type(doc).__name__}, not an evaluation document (an object): {fix}")
    missing = [key for key in ("model", "metrics") if not isinstance(doc.get(key), dict)]
    if missing:
        raise PrunellmError(f"RESULTS_DIR '{folder}': {path} lacks {' and '.join(repr(k) for k in missing)} (objects the report reads): {fix}")
    # metrics of a plugin not registered here are not reported, so they are not checked either
    known = {**doc, "metrics": {name: part for name, part in doc["metrics"].items() if name in METRICS}}
    try:
        validate_results(known)
    except PrunellmError as exc:
        raise PrunellmError(f"RESULTS_DIR '{folder}': {path}: {exc}; {fix}") from None
    return doc


def load_runs(folders: list[str | Path]) -> list[Run]:
    """Read every run folder; a folder without ``evaluation_results.json`` is skipped with a warning.

    Raises:
        PrunellmError: None of the folders holds results, or one holds a damaged ``evaluation_results.json``.
    """
    runs: list[Run] = []
    for folder in map(Path, folders):
        results = read_results(folder)
        if results is None:
            log.warning("%s has no %s: skipped", folder, RESULTS_FILE)
            continue
        runs.append(Run(folder.resolve().name, folder, results, _read_json(folder / "plan.json"),
                        _read_json(folder / "analysis" / "model_comparison.json")))  # fmt: skip
    if not runs:
        raise PrunellmError(f"none of the RESULTS_DIR folders holds {RESULTS_FILE}: give run folders such as results/<name>")
    names = [run.name for run in runs]
    for run in runs:  # same folder name in two places: prefix the parent
        if names.count(run.name) > 1:
            run.name = f"{run.folder.resolve().parent.name}/{run.name}"
    return runs


def _run_column(column: MetricColumn) -> Column:
    return Column(column.header, lambda run: column.value(run.results), column.fmt)


def table_columns(runs: list[Run]) -> list[Column]:
    """The columns of the comparison table: only those some run has a value for. Every registered metric adds
    its own (evaluation/metrics.py), in registry order, with weights MB before the memory columns."""
    docs = [run.results for run in runs]
    by_metric = {name: [_run_column(c) for c in metric.columns(docs)] for name, metric in METRICS.items()}
    weights = Column("weights MB", lambda run: run.results["model"].get("weight_bytes", 0) / MB, "{:.1f}")
    columns = [
        Column("run", lambda run: run.name),
        Column("params", lambda run: run.results["model"]["params"], "{:,}"),
        Column("achieved ratio", lambda run: (run.plan or {}).get("achieved_ratio"), "{:.4f}"),
    ]
    for name, metric_columns in by_metric.items():
        if name == "memory":
            columns.append(weights)
        columns += metric_columns
    if "memory" not in by_metric:
        columns.append(weights)
    return [c for c in columns if c.header == "run" or any(c.value(run) is not None for run in runs)]


def _cell(column: Column, value: Any) -> str:
    return "—" if value is None else column.fmt.format(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (``|`` in cells escaped)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows)]) + "\n"


def csv_table(headers: list[str], rows: list[list[Any]]) -> str:
    """CSV text; ``None`` becomes an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def html_table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML ``<table>`` with escaped cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _notes(runs: list[Run]) -> list[str]:
    docs = [run.results for run in runs]
    return [note for metric in METRICS.values() for note in metric.notes(docs)]


def plot_kept_ratio(runs: list[Run], path: Path) -> bool:
    """Kept fraction of each original layer's parameters, one line per run with a model comparison."""
    with_layers = [run for run in runs if run.comparison and run.comparison.get("layers")]
    if not with_layers:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(run.comparison["layers"]) for run in with_layers)
    fig, ax = plt.subplots(figsize=(_figure_width(width), 4.5))
    try:
        for run in with_layers:
            layers = run.comparison["layers"]
            kept = [1.0 - layer["total_params"]["reduction_ratio"] for layer in layers]
            ax.plot([layer["layer"] for layer in layers], kept, marker="o", markersize=3, label=run.name)
        ax.set_title("Kept fraction of each layer's parameters")
        ax.set_xlabel("layer (original numbering)")
        ax.set_ylabel("kept ratio")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        _save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
    return True


def plot_ppl_vs_params(runs: list[Run], columns: list[Column], path: Path) -> bool:
    """PPL (log scale) against parameter count, one series per PPL column, points labelled by run."""
    ppl_columns = [c for c in columns if c.header.startswith("PPL ")]
    if not ppl_columns:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    try:
        for column in ppl_columns:
            points = [(run.results["model"]["params"] / 1e6, column.value(run), run.name) for run in runs if column.value(run) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="", label=column.header)
            for x, y, name in points:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_title("Perplexity against parameter count")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("PPL (log scale)")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        _save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
    return True


def build_report(folders: list[str | Path], output: str | Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.csv``, ``report.html`` and the charts into ``output``.

    Args:
        folders: Run folders (``results/<name>/``) or folders that directly hold ``evaluation_results.json``.
        output: Folder for the report (created).

    Returns:
        ``{"markdown": str, "files": {name: path}, "runs": [run names]}``.

    Raises:
        PrunellmError: None of the folders holds results.
    """
    runs = load_runs(folders)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    columns = table_columns(runs)
    headers = [c.header for c in columns]
    raw = [[c.value(run) for c in columns] for run in runs]
    shown = [[_cell(c, v) for c, v in zip(columns, row)] for row in raw]
    files: dict[str, Path] = {}
    charts = []
    if plot_kept_ratio(runs, out / "kept_ratio_per_layer.png"):
        charts.append("kept_ratio_per_layer.png")
    if plot_ppl_vs_params(runs, columns, out / "ppl_vs_params.png"):
        charts.append("ppl_vs_params.png")
    notes = _notes(runs)
    table = markdown_table(headers, shown)
    markdown = "\n".join(["# prunellm report", "", table, *(f"* {n}" for n in notes), "", *(f"![{c}]({c})" for c in charts)]) + "\n"
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>prunellm report</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px;text-align:right}</style>"
        "</head><body>\n<h1>prunellm report</h1>\n" + html_table(headers, shown)
        + "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>\n"
        + "".join(f"<p><img src='{c}' alt='{c}'></p>\n" for c in charts) + "</body></html>\n"
    )  # fmt: skip
    for name, text in (("report.md", markdown), ("report.csv", csv_table(headers, raw)), ("report.html", page)):
        files[name] = out / name
        write_text_atomic(files[name], text)
    files.update({c: out / c for c in charts})
    log.debug("report over %d runs written to %s", len(runs), final_path(out))
    return {"markdown": table, "files": files, "runs": [run.name for run in runs]}


def summarize(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(column, printed value) pairs of one results document, as a row of the comparison table shows them."""
    run = Run("", Path("."), results)
    return [(c.header, _cell(c, c.value(run))) for c in table_columns([run]) if c.header != "run"]
