"""Speed and memory: positive figures, clean peak-memory isolation, --compare_base ratios, the results schema."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_model

from prunellm.cli import main
from prunellm.errors import PrunellmError
from prunellm.evaluation import evaluate, results_schema, validate_results
from prunellm.evaluation.speed import SpeedSettings, measure, memory_method, peak_memory
from prunellm.models import load_tokenizer
from prunellm.options import EvalOptions
from prunellm.surgery import prune_units

QUICK = dict(speed_batch_sizes="1,2", speed_prompt_tokens=16, speed_new_tokens=4, speed_repeats=2, speed_warmup=1)
CPU = torch.device("cpu")
needs_proc = pytest.mark.skipif(memory_method(CPU) != "proc_vmhwm", reason="RSS high-water mark needs Linux /proc")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    # the CLI loads a tokenizer with every model: SmolLM2's (transformers 5 picks the class from model_type)
    folder = tmp_path_factory.mktemp("speed") / "dense"
    tokenizer = load_tokenizer("smollm2-135m")
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pruned():
    model = make_tiny_model("llama", vocab_size=len(load_tokenizer("smollm2-135m")))
    prune_units(model, {(0, "kv_group"): [0], (1, "mlp_channel"): list(range(48)), (0, "mlp_channel"): list(range(64))})
    return model


def test_speed_figures_are_positive_per_batch_size():
    settings = SpeedSettings(batch_sizes=(1, 3), prompt_tokens=16, new_tokens=5, repeats=2, warmup=1)
    rows = measure(make_tiny_model("qwen2"), settings, speed=True, memory=False)
    assert list(rows) == ["speed"] and [r["batch_size"] for r in rows["speed"]] == [1, 3]
    for row in rows["speed"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert 0 < row["prefill_seconds"] < row["generate_seconds"]


@needs_proc
def test_peak_memory_counts_only_the_measured_call():
    # an earlier, freed 256 MB allocation raised the process's high-water mark; it must not count
    big = torch.ones(64 * 2**20)
    del big
    idle = peak_memory(lambda: None, CPU)
    assert idle["method"] == "proc_vmhwm" and idle["peak_delta_bytes"] < 16 * 2**20
    # a 64 MB tensor held before the call does not count either; one made inside the call does
    held = torch.ones(16 * 2**20)
    inside = peak_memory(lambda: torch.ones(16 * 2**20).sum(), CPU)
    assert 56 * 2**20 < inside["peak_delta_bytes"] < 100 * 2**20
    assert inside["peak_bytes"] > inside["peak_delta_bytes"]
    del held


def test_evaluate_speed_memory_with_base_validates(dense_dir):
    options = EvalOptions(metrics="speed,memory", compare_base=str(dense_dir), **QUICK)
    doc = evaluate(_pruned(), None, options, model_path="pruned-in-memory", progress=False)
    validate_results(doc)
    speed, memory = doc["metrics"]["speed"], doc["metrics"]["memory"]
    assert [r["batch_size"] for r in speed["rows"]] == [1, 2] == [r["batch_size"] for r in speed["base"]["rows"]]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in speed["rows"] + speed["base"]["rows"])
    assert all(r["prefill_tokens_per_s"] > 0 for r in speed["ratio_to_base"])
    assert memory["base"]["model"] == str(dense_dir) and memory["params"] < memory["base"]["params"]
    assert memory["ratio_to_base"]["params"] == pytest.approx(memory["params"] / memory["base"]["params"])
    assert memory["weight_bytes"] == 4 * memory["params"]  # float32
    if memory["method"] == "proc_vmhwm":
        assert all(r["peak_delta_bytes"] >= 0 and r["footprint_bytes"] >= memory["weight_bytes"] for r in memory["rows"])


def test_cli_eval_speed_writes_schema_valid_json(dense_dir, tmp_path):
    out = tmp_path / "speed.json"
    args = ["eval", "--model_path", str(dense_dir), "--metrics", "speed", "--output", str(out)]
    for key, value in QUICK.items():
        args += [f"--{key}", str(value)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    validate_results(doc)
    assert "memory" not in doc["metrics"] and doc["metrics"]["speed"]["new_tokens"] == 4


def test_schema_rejects_malformed_documents(dense_dir):
    doc = evaluate(make_tiny_model("llama"), None, EvalOptions(metrics="memory", **QUICK), model_path="m", progress=False)
    validate_results(doc)
    broken = copy.deepcopy(doc)
    broken["metrics"]["memory"]["rows"][0]["peak_delta_bytes"] = "a lot"
    with pytest.raises(PrunellmError, match=r"\$\.metrics\.memory\.rows\[0\]\.peak_delta_bytes"):
        validate_results(broken)
    broken = copy.deepcopy(doc)
    broken["metrics"]["accuracy"] = 1.0
    with pytest.raises(PrunellmError, match="accuracy"):
        validate_results(broken)
    del broken["metrics"]["accuracy"], broken["versions"]
    with pytest.raises(PrunellmError, match="'versions' is required"):
        validate_results(broken)
    assert results_schema()["properties"]["schema_version"]["enum"] == [doc["schema_version"]]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--speed_batch_sizes", "1,x"], "--speed_batch_sizes '1,x'"),
        (["--speed_batch_sizes", "0"], "--speed_batch_sizes 0"),
        (["--speed_new_tokens", "1"], "--speed_new_tokens"),
        (["--compare_base", "no/such/dir/here"], "--compare_base"),
    ],
)
def test_cli_bad_speed_flags_give_one_line(dense_dir, capsys, flags, expected):
    args = ["eval", "--model_path", str(dense_dir), "--metrics", "speed", "--speed_repeats", "1", "--speed_new_tokens", "2",
            "--speed_prompt_tokens", "4", "--speed_batch_sizes", "1", *flags]  # fmt: skip
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
