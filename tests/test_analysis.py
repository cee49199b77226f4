"""Per-layer analysis, before/after comparison and the analysis files and charts."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import make_tiny_model

from prunellm.analysis import analyze_model, compare_models, format_layer_table, write_analysis
from prunellm.hf_modeling import ZeroMLP
from prunellm.surgery import prune_units, remove_layers

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE = 64, 4, 2, 96
HEAD_DIM = HIDDEN // HEADS
# tiny llama: attention_bias=True, mlp_bias=True
ATTENTION = (
    (HEADS * HEAD_DIM * HIDDEN + HEADS * HEAD_DIM)  # q
    + 2 * (KV_HEADS * HEAD_DIM * HIDDEN + KV_HEADS * HEAD_DIM)  # k, v
    + (HIDDEN * HEADS * HEAD_DIM + HIDDEN)  # o
)
MLP = 2 * (INTERMEDIATE * HIDDEN + INTERMEDIATE) + (HIDDEN * INTERMEDIATE + HIDDEN)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sum_of_parts(analysis: dict) -> int:
    layers = sum(layer["total_params"] for layer in analysis["layers"])
    return layers + analysis["embedding_params"] + analysis["final_norm_params"] + analysis["other_params"]


def _table(model) -> list[dict]:
    """A selection-like table: every KV group and every 8th MLP channel, values descending, odd indices removed."""
    rows = []
    for layer in range(2):
        for unit, count in (("kv_group", KV_HEADS), ("mlp_channel", INTERMEDIATE)):
            for index in range(0, count, 1 if unit == "kv_group" else 8):
                rows.append(
                    {"layer": layer, "unit": unit, "index": index, "score": 1.0, "cost": 10,
                     "value": float(1000 - len(rows)), "removed": index % 2 == 1}
                )
    return rows


def test_analysis_sums_to_model_parameters(family):
    model = make_tiny_model(family)
    analysis = analyze_model(model)
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert analysis["total_params"] == sum(distinct.values())
    assert analysis["other_params"] == 0
    assert _sum_of_parts(analysis) == analysis["total_params"]
    assert analysis["num_layers"] == 2
    for layer in analysis["layers"]:
        assert layer["attention_params"] + layer["mlp_params"] + layer["norm_params"] == layer["total_params"]
        assert (layer["num_heads"], layer["num_kv_heads"]) == (HEADS, KV_HEADS)


def test_llama_layer_counts_by_hand():
    model = make_tiny_model("llama")
    analysis = analyze_model(model)
    assert analysis["total_params"] == sum(p.numel() for p in model.parameters())
    assert analysis["embedding_params"] == 128 * HIDDEN  # tied: lm_head counted once
    assert analysis["final_norm_params"] == HIDDEN
    for layer in analysis["layers"]:
        assert layer["attention_params"] == ATTENTION
        assert layer["mlp_params"] == MLP
        assert layer["norm_params"] == 2 * HIDDEN
        assert layer["intermediate_size"] == INTERMEDIATE


def test_zero_mlp_block_counts_nothing():
    model = make_tiny_model("llama")
    model.model.layers[1].mlp = ZeroMLP()
    analysis = analyze_model(model)
    layer = analysis["layers"][1]
    assert (layer["mlp_params"], layer["intermediate_size"]) == (0, 0)
    assert layer["attention_params"] == ATTENTION
    assert analysis["total_params"] == sum(p.numel() for p in model.parameters())
    assert _sum_of_parts(analysis) == analysis["total_params"]


def test_compare_models_with_removed_layer():
    model = make_tiny_model("llama", num_hidden_layers=3)
    original = analyze_model(model)
    prune_units(model, {(2, "kv_group"): [0], (2, "mlp_channel"): list(range(48))})
    remove_layers(model, [1])
    pruned = analyze_model(model)
    comparison = compare_models(original, pruned, removed_layers=[1])

    assert comparison["totals"]["original"] == original["total_params"]
    assert comparison["totals"]["pruned"] == pruned["total_params"]
    assert comparison["totals"]["reduction_ratio"] == pytest.approx(1 - pruned["total_params"] / original["total_params"])
    assert comparison["removed_layers"] == [1]
    first, gone, last = comparison["layers"]
    assert not first["removed"] and first["total_params"]["reduction_ratio"] == 0.0
    assert gone["removed"] is True and gone["pruned_layer"] is None
    assert gone["total_params"] == {"original": original["layers"][1]["total_params"], "pruned": 0, "reduction_ratio": 1.0}
    assert gone["num_heads"]["pruned"] == gone["intermediate_size"]["pruned"] == 0
    assert last["pruned_layer"] == 1
    assert last["num_heads"] == {"original": HEADS, "pruned": HEADS // KV_HEADS}
    assert last["num_kv_heads"] == {"original": KV_HEADS, "pruned": 1}
    assert last["intermediate_size"] == {"original": INTERMEDIATE, "pruned": 48}
    assert last["mlp_params"]["reduction_ratio"] == pytest.approx(0.5, abs=0.01)


def test_compare_models_refuses_wrong_layer_count():
    original = analyze_model(make_tiny_model("llama"))
    with pytest.raises(ValueError, match="removed"):
        compare_models(original, original, removed_layers=[0])


def test_write_analysis_files(tmp_path):
    model = make_tiny_model("llama")
    original = analyze_model(model)
    table = _table(model)
    prune_units(model, {(0, "mlp_channel"): list(range(0, INTERMEDIATE, 2))})
    pruned = analyze_model(model)
    written = write_analysis(tmp_path, original, pruned, table)

    expected = {
        "analysis/original_model_analysis.json", "analysis/pruned_model_analysis.json",
        "analysis/model_comparison.json", "analysis/global_group_table.csv", "analysis/groups_to_prune.csv",
        "analysis/pruning_summary_by_layer.txt", "visualization/pruning_ratio_per_layer.png",
        "visualization/param_breakdown.png",
    }
    assert {str(p.relative_to(tmp_path)) for p in written.values()} == expected
    assert all(p.is_file() for p in written.values())
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"

    assert json.loads(written["model_comparison.json"].read_text()) == compare_models(original, pruned)
    with written["global_group_table.csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(table)
    assert list(rows[0]) == ["layer", "unit", "index", "score", "cost", "value", "removed", "rank"]
    assert sorted(int(r["rank"]) for r in rows) == list(range(1, len(table) + 1))
    assert rows[0]["rank"] == str(len(table))  # values descend, so the first row ranks last
    with written["groups_to_prune.csv"].open() as handle:
        chosen = list(csv.DictReader(handle))
    assert len(chosen) == sum(row["removed"] for row in table)
    assert all(r["removed"] == "True" for r in chosen)
    assert [float(r["value"]) for r in chosen] == sorted(float(r["value"]) for r in chosen)

    for name in ("pruning_ratio_per_layer.png", "param_breakdown.png"):
        assert written[name].read_bytes()[:8] == PNG_SIGNATURE

    summary = written["pruning_summary_by_layer.txt"].read_text()
    lines = summary.splitlines()
    for layer in range(2):
        assert any(line.split()[0] == str(layer) for line in lines)
    assert f"{INTERMEDIATE}→{INTERMEDIATE // 2}" in summary
    assert lines[-1].startswith("total")


def test_layer_table_marks_removed_layers_and_empty_table(tmp_path):
    model = make_tiny_model("llama")
    original = analyze_model(model)
    remove_layers(model, [0])
    pruned = analyze_model(model)
    text = format_layer_table(compare_models(original, pruned, [0]))
    assert text.splitlines()[2].split()[0] == "0" and text.splitlines()[2].endswith("removed")
    written = write_analysis(tmp_path, original, pruned, [], removed_layers=[0])
    with written["groups_to_prune.csv"].open() as handle:
        assert list(csv.DictReader(handle)) == []
