"""Zero-shot through lm-eval, offline, on the in-memory model: local BIG-bench tasks, pruned vs reloaded, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import STORY_TASK, make_tiny_model, story_task

from prunellm.checkpoint import load_pruned, save_model
from prunellm.cli import main
from prunellm.errors import PrunellmError
from prunellm.evaluation import validate_results
from prunellm.evaluation.zeroshot import FEWSHOT_POOL, LOCAL_TASKS, averages, local_tasks_dir, zeroshot
from prunellm.models import load_tokenizer
from prunellm.surgery import prune_units

OFFLINE = ["bigbench_strategyqa", "bigbench_wikihow_step"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """A tiny llama with SmolLM2's tokenizer, saved (for the CLI) and in memory."""
    folder = tmp_path_factory.mktemp("zeroshot") / "tiny"
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder


def _rows(result: dict) -> dict[str, dict]:
    return {row["task"]: row for row in result["tasks"]}


def test_local_tasks_are_written_from_bigbench_with_sensible_prompts(requires_bigbench):
    folder = local_tasks_dir()
    for name in LOCAL_TASKS:
        config = json.loads((folder / f"{name}.yaml").read_text().split("\n", 1)[1])  # the YAML is JSON after a comment
        assert config["output_type"] == "multiple_choice" and config["dataset_path"] == "json"
        assert config["dataset_kwargs"]["data_files"]["test"] == str(folder / f"{name}.test.jsonl")
        train = (folder / f"{name}.train.jsonl").read_text().splitlines()
        assert len(train) == FEWSHOT_POOL
    strategy = [json.loads(line) for line in (folder / "bigbench_strategyqa.test.jsonl").read_text().splitlines()]
    assert len(strategy) == 2290 - FEWSHOT_POOL
    first = strategy[0]
    assert first["query"].startswith("Question: ") and first["query"].endswith("?\nAnswer:")
    assert all(row["choices"] == ["Yes", "No"] and row["label"] in (0, 1) for row in strategy)
    assert 0.3 < sum(row["label"] == 0 for row in strategy) / len(strategy) < 0.7  # both answers occur
    wikihow = json.loads((folder / "bigbench_wikihow_step.test.jsonl").read_text().splitlines()[0])
    assert len(wikihow["choices"]) == 4 and wikihow["query"].startswith("The most reasonable step of '")
    assert not wikihow["query"].endswith(" ")  # lm-eval puts one space between the prompt and each choice
    assert local_tasks_dir() == folder  # a second call reuses the files


def test_tiny_model_scores_local_tasks_offline_with_acc_and_acc_norm(requires_bigbench, tiny, tokenizer):
    model, _ = tiny
    result = zeroshot(model, tokenizer, OFFLINE, limit=8, batch_size=4)
    rows = _rows(result)
    assert list(rows) == OFFLINE and result["skipped"] == []
    for row in rows.values():
        assert row["samples"] == 8 and row["source"] == "local" and row["llm_pruner_metric"] == "acc"
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert 0.0 <= row[key] <= 1.0
        assert row["acc"] * 8 == round(row["acc"] * 8)  # a fraction of 8 examples
    mean_acc = sum(r["acc"] for r in rows.values()) / 2
    assert result["averages"]["llm_pruner"]["value"] == pytest.approx(mean_acc)
    assert result["averages"]["acc_norm_where_available"]["value"] == pytest.approx(sum(r["acc_norm"] for r in rows.values()) / 2)
    assert result["lm_eval_version"] and result["limit"] == 8


def test_averages_follow_both_conventions():
    rows = [
        {"task": "boolq", "acc": 0.6, "acc_norm": None, "llm_pruner_metric": "acc"},
        {"task": "hellaswag", "acc": 0.3, "acc_norm": 0.4, "llm_pruner_metric": "acc_norm"},
        {"task": "piqa", "acc": 0.7, "acc_norm": 0.8, "llm_pruner_metric": "acc"},
    ]
    result = averages(rows)
    assert result["llm_pruner"]["value"] == pytest.approx((0.6 + 0.4 + 0.7) / 3)
    assert result["acc_norm_where_available"]["value"] == pytest.approx((0.6 + 0.4 + 0.8) / 3)
    assert result["llm_pruner"]["metric_per_task"] == {"boolq": "acc", "hellaswag": "acc_norm", "piqa": "acc"}


def test_pruned_model_in_memory_scores_like_its_reloaded_checkpoint(requires_bigbench, tokenizer, tmp_path):
    model = make_tiny_model("llama", seed=3, vocab_size=len(tokenizer))
    # per-layer widths: the layers differ, so the checkpoint needs prunellm's modeling code
    prune_units(model, {(0, "kv_group"): [1], (1, "mlp_channel"): list(range(0, 96, 3)), (0, "mlp_channel"): list(range(80))})
    save_model(model, tokenizer, tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    in_memory = zeroshot(model, tokenizer, OFFLINE, limit=6, batch_size=3)
    from_disk = zeroshot(reloaded, tokenizer, OFFLINE, limit=6, batch_size=3)
    assert in_memory["tasks"] == from_disk["tasks"]
    assert in_memory["averages"] == from_disk["averages"]


def test_unreachable_task_data_is_skipped_and_the_rest_scored(tiny, tokenizer, tmp_path, caplog):
    model, _ = tiny
    story_task(tmp_path / "story")  # the rest: a task with local data
    # an lm-eval task whose data lives on the hub under a name that does not exist: never loadable
    (tmp_path / "gone.yaml").write_text(
        "task: prunellm_unreachable\ndataset_path: prunellm-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: c\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n"
    )
    result = zeroshot(model, tokenizer, ["prunellm_unreachable", STORY_TASK], limit=4, include_path=[str(tmp_path), str(tmp_path / "story")])
    assert [s["task"] for s in result["skipped"]] == ["prunellm_unreachable"]
    assert [r["task"] for r in result["tasks"]] == [STORY_TASK]
    assert any("prunellm_unreachable skipped" in r.getMessage() for r in caplog.records)


def test_unknown_task_names_the_closest(tiny, tokenizer):
    model, _ = tiny
    with pytest.raises(PrunellmError, match=r"--zeroshot_tasks 'hellaswg' is not an lm-eval task: closest are hellaswag"):
        zeroshot(model, tokenizer, ["hellaswg"], limit=2)
    with pytest.raises(PrunellmError, match="bigbench_strategyqa"):
        zeroshot(model, tokenizer, ["bigbench_strategyq"], limit=2)


@pytest.mark.parametrize("kwargs, flag", [({"limit": 0}, "--limit 0"), ({"batch_size": 0}, "--zeroshot_batch_size"), ({"num_fewshot": -1}, "--num_fewshot")])
def test_bad_numbers_are_refused(tiny, tokenizer, kwargs, flag):
    with pytest.raises(PrunellmError, match=flag):
        zeroshot(tiny[0], tokenizer, OFFLINE, **kwargs)


def test_cli_eval_zeroshot_offline_writes_valid_results(requires_bigbench, tiny, tmp_path):
    _, folder = tiny
    out = tmp_path / "results.json"
    args = ["eval", "--model_path", str(folder), "--metrics", "zeroshot", "--zeroshot_tasks", "bigbench_strategyqa",
            "--limit", "4", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    doc = json.loads(out.read_text())
    validate_results(doc)
    assert doc["metrics"]["zeroshot"]["tasks"][0]["acc_norm"] is not None
    assert doc["versions"]["lm_eval"] == doc["metrics"]["zeroshot"]["lm_eval_version"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--limit", "0"], "--limit 0"),
        (["--limit", "-3"], "--limit -3"),
        (["--zeroshot_tasks", "piqaa"], "closest are piqa"),
        (["--metrics", "ppl,zeroshots"], "--metrics 'zeroshots'"),
    ],
)
def test_cli_bad_input_gives_one_line(tiny, capsys, extra, expected):
    _, folder = tiny
    assert main(["eval", "--model_path", str(folder), "--metrics", "zeroshot", *extra]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err


def test_cli_model_path_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["eval", "--model_path", str(tmp_path), "--metrics", "zeroshot"]) == 2
    assert "is not a model directory" in capsys.readouterr().err


@pytest.mark.real_model
def test_smollm2_scores_the_local_tasks_above_chance_where_it_can(requires_bigbench):
    from prunellm.models import load_model

    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    result = zeroshot(model, tokenizer, OFFLINE, limit=40, batch_size=8)
    rows = _rows(result)
    assert all(row["samples"] == 40 and row["acc"] is not None and row["acc_norm"] is not None for row in rows.values())
    # step inference carries signal for a 135M model (chance is 0.25); strategyqa is at chance (DATA.md)
    assert rows["bigbench_wikihow_step"]["acc"] >= 0.4
    assert 0.3 <= rows["bigbench_strategyqa"]["acc"] <= 0.7
