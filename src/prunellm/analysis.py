"""Per-layer parameter analysis of a model, before/after comparison, and the analysis files and charts.

Everything is read from the modules through the architecture spec, so one implementation serves width
pruning, layer removal and fine-tuning reports alike: nothing here assumes how the model was changed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .paths import final_path, write_json_atomic, write_text_atomic
from .specs import spec_for
from .surgery import layer_widths
from .units import count_parameters, decoder_layers, get_module

log = logging.getLogger(__name__)

TABLE_COLUMNS: tuple[str, ...] = ("layer", "unit", "index", "score", "cost", "value", "removed")
"""Columns of a selection table row, in the order they are written to CSV (``rank`` follows)."""

_COMPARED = ("attention_params", "mlp_params", "total_params")
_WIDTHS = ("num_heads", "num_kv_heads", "intermediate_size")


def analyze_model(model: nn.Module) -> dict[str, Any]:
    """Count the parameters and widths of every decoder layer, read from the modules as they are now.

    Args:
        model: A causal LM of a supported family (pruned or not).

    Returns:
        ``{"total_params", "embedding_params", "final_norm_params", "other_params", "num_layers", "layers"}``
        where ``embedding_params`` is the input embedding plus the LM head (counted once when tied),
        ``other_params`` is whatever belongs to no layer, embedding or final norm (0 for the shipped
        families), and each entry of ``layers`` holds ``layer``, ``attention_params``, ``mlp_params``,
        ``norm_params`` (the rest of the layer), ``total_params``, ``num_heads``, ``num_kv_heads`` and
        ``intermediate_size``. A zero-output block counts 0 parameters and 0 width. The layer totals
        plus embedding, final norm and other parameters equal ``total_params``.
    """
    spec = spec_for(model.config)
    widths = layer_widths(model, spec)
    layers = []
    for index, block in enumerate(decoder_layers(model, spec)):
        attention = count_parameters(get_module(block, spec.attention.module))
        mlp = count_parameters(get_module(block, spec.mlp.module))
        total = count_parameters(block)
        layers.append(
            {
                "layer": index,
                "attention_params": attention,
                "mlp_params": mlp,
                "norm_params": total - attention - mlp,
                "total_params": total,
                "num_heads": widths[index]["num_attention_heads"],
                "num_kv_heads": widths[index]["num_key_value_heads"],
                "intermediate_size": widths[index]["intermediate_size"],
            }
        )
    total_params = count_parameters(model)
    embedding = count_parameters(get_module(model, spec.embed), get_module(model, spec.lm_head))
    final_norm = count_parameters(get_module(model, spec.final_norm))
    return {
        "total_params": total_params,
        "embedding_params": embedding,
        "final_norm_params": final_norm,
        "other_params": total_params - embedding - final_norm - sum(layer["total_params"] for layer in layers),
        "num_layers": len(layers),
        "layers": layers,
    }


def _reduction(original: int, pruned: int) -> float:
    """Fraction removed; 0.0 when there was nothing to remove."""
    return 1.0 - pruned / original if original else 0.0


def _pruned_layer_map(num_original: int, num_pruned: int, removed_layers: list[int]) -> list[int | None]:
    """For each original layer, the index of the layer it became in the pruned model (None if removed)."""
    removed = set(removed_layers)
    bad = sorted(i for i in removed if not 0 <= i < num_original)
    if bad:
        raise ValueError(f"removed_layers {bad} are outside the original model's layers 0..{num_original - 1}")
    if num_original - len(removed) != num_pruned:
        raise ValueError(
            f"the pruned model has {num_pruned} layers but the original has {num_original} with "
            f"{len(removed)} removed ({sorted(removed)}): pass the removed layers in original numbering"
        )
    mapping: list[int | None] = []
    next_index = 0
    for index in range(num_original):
        if index in removed:
            mapping.append(None)
        else:
            mapping.append(next_index)
            next_index += 1
    return mapping


def _compare_layer(before: dict[str, Any], after: dict[str, Any] | None) -> dict[str, Any]:
    """One original layer: parameters with reduction ratios and widths before/after (after=None: removed)."""
    row: dict[str, Any] = {"layer": before["layer"], "removed": after is None}
    row["pruned_layer"] = None if after is None else after["layer"]
    for key in _COMPARED:
        new = 0 if after is None else after[key]
        row[key] = {"original": before[key], "pruned": new, "reduction_ratio": _reduction(before[key], new)}
    for key in _WIDTHS:
        row[key] = {"original": before[key], "pruned": 0 if after is None else after[key]}
    return row


def compare_models(original: dict[str, Any], pruned: dict[str, Any], removed_layers: list[int] | None = None) -> dict[str, Any]:
    """Compare two :func:`analyze_model` results layer by layer, in the original model's numbering.

    Args:
        original: Analysis of the model before the change.
        pruned: Analysis of the model after it.
        removed_layers: Original indices of decoder layers that were deleted; the pruned layers map, in
            order, to the original layers that were kept.

    Returns:
        The content of ``model_comparison.json``: ``totals`` and ``embedding_params`` (each ``original``,
        ``pruned``, ``reduction_ratio``), ``removed_layers``, and one entry per original layer with
        ``removed``, ``pruned_layer``, attention/MLP/total parameters (original, pruned, reduction_ratio)
        and heads, KV heads and intermediate size (original, pruned). A removed layer has pruned values 0.

    Raises:
        ValueError: If the layer counts do not agree with ``removed_layers``.
    """
    removed = sorted(set(removed_layers or []))
    mapping = _pruned_layer_map(original["num_layers"], pruned["num_layers"], removed)
    layers = [
        _compare_layer(before, None if j is None else pruned["layers"][j])
        for before, j in zip(original["layers"], mapping)
    ]
    totals = (original["total_params"], pruned["total_params"])
    embeddings = (original["embedding_params"], pruned["embedding_params"])
    return {
        "totals": {"original": totals[0], "pruned": totals[1], "reduction_ratio": _reduction(*totals)},
        "embedding_params": {"original": embeddings[0], "pruned": embeddings[1], "reduction_ratio": _reduction(*embeddings)},
        "removed_layers": removed,
        "layers": layers,
    }


def format_layer_table(comparison: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`compare_models` result, one line per original layer.

    Columns: layer, heads, KV heads, MLP width and parameters as ``before→after``, and the reduction of the
    layer's parameters in percent; removed layers are marked, and a totals line closes the table.
    """
    header = ("layer", "heads", "kv heads", "MLP width", "params", "reduction", "")
    rows = [header]
    for layer in comparison["layers"]:
        total = layer["total_params"]
        rows.append(
            (
                str(layer["layer"]),
                _arrow(layer["num_heads"]),
                _arrow(layer["num_kv_heads"]),
                _arrow(layer["intermediate_size"]),
                _arrow(total, "{:,}"),
                f"{100 * total['reduction_ratio']:.2f}%",
                "removed" if layer["removed"] else "",
            )
        )
    totals = comparison["totals"]
    total_row = ("total", "", "", "", _arrow(totals, "{:,}"), f"{100 * totals['reduction_ratio']:.2f}%", "")
    widths = [max(len(row[c]) for row in [*rows, total_row]) for c in range(len(header))]
    lines = [_fixed(row, widths) for row in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([lines[0], rule, *lines[1:], rule, _fixed(total_row, widths)])


def _arrow(pair: dict[str, Any], fmt: str = "{}") -> str:
    return f"{fmt.format(pair['original'])}→{fmt.format(pair['pruned'])}"


def _fixed(row: tuple[str, ...], widths: list[int]) -> str:
    # first column left-aligned, numbers right-aligned, the marker column left-aligned
    cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]
    return "  ".join(cells).rstrip()


def _value_order(row: dict[str, Any]) -> tuple[bool, float]:
    """Sort key: value ascending, missing or NaN values last."""
    value = row.get("value")
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return missing, 0.0 if missing else float(value)


def ranked_table(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The selection table in its own order, each row with ``rank``: 1 + its position by value ascending."""
    order = sorted(range(len(table)), key=lambda i: _value_order(table[i]))
    ranks = {row_index: rank for rank, row_index in enumerate(order, start=1)}
    return [{**row, "rank": ranks[i]} for i, row in enumerate(table)]


def _csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV with the standard columns, any extra keys the rows carry, then ``rank``."""
    extra = [key for row in rows for key in row if key not in TABLE_COLUMNS and key != "rank"]
    columns = [*TABLE_COLUMNS, *dict.fromkeys(extra), "rank"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _save_figure_atomic(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _figure_width(num_layers: int) -> float:
    return max(6.0, 0.45 * num_layers + 2.0)


def plot_pruning_ratio(comparison: dict[str, Any], path: Path) -> None:
    """Grouped bars per original layer: reduction ratio of total, attention and MLP parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = comparison["layers"]
    x = [layer["layer"] for layer in layers]
    bar = 0.27
    fig, ax = plt.subplots(figsize=(_figure_width(len(layers)), 4.5))
    try:
        for offset, key, label in ((-bar, "total_params", "whole layer"), (0.0, "attention_params", "attention"), (bar, "mlp_params", "MLP")):
            ax.bar([i + offset for i in x], [layer[key]["reduction_ratio"] for layer in layers], bar, label=label)
        ax.set_title(f"Parameter reduction per layer (overall {comparison['totals']['reduction_ratio']:.1%})")
        ax.set_xlabel("layer (original numbering)")
        ax.set_ylabel("reduction ratio")
        ax.set_xticks(x)
        ax.set_ylim(0, 1.05)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        _save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def plot_layer_importance(scores: list[float], method: str, path: Path, highlight: list[int] | None = None) -> None:
    """Bar chart of one importance score per layer; ``highlight`` marks removed layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    marked = set(highlight or [])
    fig, ax = plt.subplots(figsize=(_figure_width(len(scores)), 4.0))
    try:
        colors = ["tab:red" if i in marked else "tab:blue" for i in range(len(scores))]
        ax.bar(range(len(scores)), scores, color=colors)
        ax.set_title(f"Layer importance ({method})" + (" — red: removed" if marked else ""))
        ax.set_xlabel("layer")
        ax.set_ylabel(method)
        ax.set_xticks(range(len(scores)))
        _save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def plot_param_breakdown(comparison: dict[str, Any], path: Path) -> None:
    """Stacked bars per original layer, attention under MLP, original and pruned side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = comparison["layers"]
    x = [layer["layer"] for layer in layers]
    bar = 0.4
    fig, ax = plt.subplots(figsize=(_figure_width(len(layers)), 4.5))
    try:
        for offset, which, hatch in ((-bar / 2, "original", None), (bar / 2, "pruned", "//")):
            positions = [i + offset for i in x]
            attention = [layer["attention_params"][which] for layer in layers]
            mlp = [layer["mlp_params"][which] for layer in layers]
            ax.bar(positions, attention, bar, color="tab:blue", hatch=hatch, edgecolor="white", label=f"attention ({which})")
            ax.bar(positions, mlp, bar, bottom=attention, color="tab:orange", hatch=hatch, edgecolor="white", label=f"MLP ({which})")
        ax.set_title("Attention and MLP parameters per layer: original (left) vs pruned (right)")
        ax.set_xlabel("layer (original numbering)")
        ax.set_ylabel("parameters")
        ax.set_xticks(x)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        _save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def write_analysis(
    out_dir: Path,
    original: dict[str, Any],
    pruned: dict[str, Any],
    table: list[dict[str, Any]],
    removed_layers: list[int] | None = None,
) -> dict[str, Path]:
    """Write the analysis files into ``out_dir/analysis/`` and the charts into ``out_dir/visualization/``.

    Args:
        out_dir: Run folder.
        original: :func:`analyze_model` of the model before the change.
        pruned: :func:`analyze_model` of the model after it.
        table: Selection rows (``layer, unit, index, score, cost, value, removed``); may be empty, e.g.
            when a plan was replayed or only layers were removed.
        removed_layers: Original indices of deleted decoder layers.

    Returns:
        File name (e.g. ``"model_comparison.json"``) -> path of every file written, each written atomically.
    """
    analysis_dir = Path(out_dir) / "analysis"
    charts_dir = Path(out_dir) / "visualization"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    charts_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare_models(original, pruned, removed_layers)
    ranked = ranked_table(table)
    to_prune = sorted((row for row in ranked if row.get("removed") is True), key=_value_order)
    written: dict[str, Path] = {}

    def target(folder: Path, name: str) -> Path:
        written[name] = folder / name
        return written[name]

    write_json_atomic(target(analysis_dir, "original_model_analysis.json"), original)
    write_json_atomic(target(analysis_dir, "pruned_model_analysis.json"), pruned)
    write_json_atomic(target(analysis_dir, "model_comparison.json"), comparison)
    write_text_atomic(target(analysis_dir, "global_group_table.csv"), _csv_text(ranked))
    write_text_atomic(target(analysis_dir, "groups_to_prune.csv"), _csv_text(to_prune))
    write_text_atomic(target(analysis_dir, "pruning_summary_by_layer.txt"), format_layer_table(comparison) + "\n")
    plot_pruning_ratio(comparison, target(charts_dir, "pruning_ratio_per_layer.png"))
    plot_param_breakdown(comparison, target(charts_dir, "param_breakdown.png"))
    log.info("wrote %d analysis files under %s", len(written), final_path(out_dir))
    return written
