"""``prunellm report``: one table (markdown, CSV, HTML) and charts over run folders; bad folders are skipped."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from conftest import STORY_TASK, make_tiny_model, story_task

from prunellm.analysis import analyze_model, compare_models
from prunellm.cli import main
from prunellm.evaluation import evaluate, save_results, validate_results
from prunellm.models import load_tokenizer
from prunellm.options import EvalOptions
from prunellm.paths import write_json_atomic
from prunellm.report import build_report, load_runs, summarize
from prunellm.surgery import prune_units

TEXT = "the king and the queen walked to the castle while the people sang of war and peace and love. " * 60


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run folders made by the evaluator: a dense one (results only) and a pruned one (plan + analysis)."""
    root = tmp_path_factory.mktemp("report")
    (root / "text.txt").write_text(TEXT)
    tokenizer = load_tokenizer("smollm2-135m")
    options = EvalOptions(
        metrics="ppl,zeroshot,speed,memory", ppl_datasets=str(root / "text.txt"), ppl_seq_len=32, ppl_max_windows=4,
        zeroshot_tasks=STORY_TASK, zeroshot_include_path=str(story_task(root / "tasks")), limit=4, speed_batch_sizes="1",
        speed_prompt_tokens=8, speed_new_tokens=3, speed_repeats=1,
    )  # fmt: skip
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    save_results(evaluate(model, tokenizer, options, model_path="dense", progress=False), root / "dense" / "evaluation_results.json")
    before = analyze_model(model)
    prune_units(model, {(0, "kv_group"): [1], (1, "mlp_channel"): list(range(40))})
    pruned = root / "results" / "pruned"
    save_results(evaluate(model, tokenizer, options, model_path="pruned", progress=False), pruned / "evaluation_results.json")
    write_json_atomic(pruned / "analysis" / "model_comparison.json", compare_models(before, analyze_model(model)))
    params_before = before["total_params"]
    params_after = sum(p.numel() for p in model.parameters())
    write_json_atomic(pruned / "plan.json", {"achieved_ratio": 1 - params_after / params_before, "params_before": params_before})
    (root / "empty").mkdir()
    return root


def test_report_renders_one_table_from_two_runs(runs, tmp_path, capsys):
    for name in ("dense/evaluation_results.json", "results/pruned/evaluation_results.json"):
        validate_results(json.loads((runs / name).read_text()))
    out = tmp_path / "report"
    assert main(["report", str(runs / "dense"), str(runs / "results" / "pruned"), str(runs / "empty"), "--output", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, rule, two runs
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    for column in ("run", "params", "achieved ratio", "PPL text.txt (32)", f"{STORY_TASK} acc", "avg LLM-Pruner",
                   "avg acc_norm where available", "prefill tok/s bs=1", "decode tok/s bs=1", "weights MB"):  # fmt: skip
        assert column in header, column
    dense, pruned = ([cell.strip() for cell in row.strip("|").split("|")] for row in table[2:])
    assert dense[0] == "dense" and pruned[0] == "pruned"
    assert dense[header.index("achieved ratio")] == "—" and float(pruned[header.index("achieved ratio")]) > 0
    assert int(pruned[header.index("params")].replace(",", "")) < int(dense[header.index("params")].replace(",", ""))
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["run"] for r in rows] == ["dense", "pruned"] and rows[0]["achieved ratio"] == ""
    assert float(rows[1]["PPL text.txt (32)"]) > 1
    page = (out / "report.html").read_text()
    assert page.count("<tr>") == 3 and "kept_ratio_per_layer.png" in page
    for chart in ("kept_ratio_per_layer.png", "ppl_vs_params.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| run |" in printed and "skipped" in printed  # the table is printed, the empty folder named


def test_report_without_any_results_is_one_line_error(runs, tmp_path, capsys):
    assert main(["report", str(runs / "empty"), str(tmp_path / "missing"), "--output", str(tmp_path / "r")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "evaluation_results.json" in err[0]
    assert not (tmp_path / "r").exists()


def test_folder_without_results_is_skipped_with_a_warning(runs, caplog):
    with caplog.at_level(logging.WARNING, logger="prunellm.report"):
        found = load_runs([runs / "empty", runs / "dense"])
    assert [run.name for run in found] == ["dense"] and found[0].plan is None
    assert any(str(runs / "empty") in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_report_leaves_out_what_no_run_measured(runs, tmp_path):
    doc = json.loads((runs / "dense" / "evaluation_results.json").read_text())
    del doc["metrics"]["speed"], doc["metrics"]["memory"], doc["metrics"]["zeroshot"]
    save_results(doc, tmp_path / "ppl_only" / "evaluation_results.json")
    report = build_report([tmp_path / "ppl_only"], tmp_path / "out")
    assert "tok/s" not in report["markdown"] and "avg" not in report["markdown"]
    assert not (tmp_path / "out" / "kept_ratio_per_layer.png").exists() and (tmp_path / "out" / "ppl_vs_params.png").exists()
    assert dict(summarize(doc))["params"] == f"{doc['model']['params']:,}"
