"""Bad input on the command line: exit status 2 and one line ``error: <what, which file or flag, what is valid>``.

Damaged model folders (weights, shards, tokenizer, config.json, pickled .bin weights), a device this machine lacks,
and a damaged evaluation_results.json for ``prunellm report``: every command that reads them says so in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import link_tree, make_tiny_model

from prunellm.cli import main
from prunellm.models import load_tokenizer

TEXT = " ".join("the king and the queen walked to the castle while the people sang of war and peace".split() * 60)


def _replace(file: Path, data: bytes) -> None:
    file.unlink()
    file.write_bytes(data)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Qwen2 model with SmolLM2's tokenizer (``good``), the same sharded (``sharded``), and a text file."""
    root = tmp_path_factory.mktemp("faults")
    tokenizer = load_tokenizer("smollm2-135m")
    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    for name, shard in (("good", None), ("sharded", "4MB")):
        model.save_pretrained(root / name, **({"max_shard_size": shard} if shard else {}))
        tokenizer.save_pretrained(root / name)
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 1
    (root / "text.txt").write_text(TEXT)
    return root


def _damaged(ws: Path, tmp_path: Path, source: str = "good") -> Path:
    return link_tree(ws / source, tmp_path / "model")


def _command(command: str, model: Path, ws: Path, out: Path) -> list[str]:
    """The cheapest arguments of ``command`` that load ``model``."""
    if command == "eval":
        return ["eval", "--model_path", str(model), "--metrics", "ppl", "--ppl_datasets", str(ws / "text.txt"),
                "--ppl_seq_len", "16", "--ppl_max_windows", "1", "--output", str(out / "results.json")]  # fmt: skip
    if command == "export":
        return ["export", "--model", str(model), "--format", "gguf", "--output", str(out / "export")]
    run = ["--base_model", str(model), "--output_dir", str(out / "results"), "--output_name", "run", "--dataset", str(ws / "text.txt")]
    if command == "layers":
        return ["layers", *run, "--n_remove_layers", "1"]
    if command == "prune --offload":
        return ["prune", *run, "--offload"]
    return [command, *run]


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one stderr line, ``error: ...``, and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# 1. damaged weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "prune", "prune --offload", "layers", "export"])
def test_truncated_safetensors_is_named_by_every_command(workspace, tmp_path, capsys, command):
    model = _damaged(workspace, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    _replace(model / "model.safetensors", data[: len(data) // 2])
    line = _one_error_line(capsys, _command(command, model, workspace, tmp_path))
    flag = "--model" if command == "export" else "--model_path" if command == "eval" else "--base_model"
    assert f"{flag} '{model}'" in line and "model.safetensors" in line and "truncated" in line


@pytest.mark.parametrize(
    ("source", "damage", "named"),
    [
        ("good", "delete model.safetensors", "no weights"),
        ("sharded", "delete a shard", "model-00002-of-"),
        ("sharded", "truncate the index", "model.safetensors.index.json is not valid JSON"),
        ("sharded", "index without weight_map", 'model.safetensors.index.json has no "weight_map"'),
        ("sharded", "index names a tensor its shard lacks", "does not hold it"),
    ],
)  # fmt: skip
def test_missing_weights_and_broken_shards_are_named(workspace, tmp_path, capsys, source, damage, named):
    model = _damaged(workspace, tmp_path, source)
    index = model / "model.safetensors.index.json"
    if damage == "delete model.safetensors":
        (model / "model.safetensors").unlink()
    elif damage == "delete a shard":
        next(model.glob("model-00002-of-*.safetensors")).unlink()
    elif damage == "truncate the index":
        _replace(index, index.read_bytes()[:40])
    elif damage == "index without weight_map":
        _replace(index, b'{"metadata": {}}')
    else:
        doc = json.loads(index.read_text())
        doc["weight_map"]["model.norm.extra"] = min(doc["weight_map"].values())
        _replace(index, json.dumps(doc).encode())
    line = _one_error_line(capsys, _command("eval", model, workspace, tmp_path))
    assert named in line and "--model_path" in line


# 2. no tokenizer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "prune", "export"])
def test_folder_without_tokenizer_files_is_named(workspace, tmp_path, capsys, command):
    model = _damaged(workspace, tmp_path)
    for file in model.glob("tokenizer*"):  # left alone, transformers builds an empty tokenizer and says nothing
        file.unlink()
    line = _one_error_line(capsys, _command(command, model, workspace, tmp_path))
    assert "has no tokenizer" in line and "tokenizer.json" in line and str(model) in line


# 3. config.json before the tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (b'{"model_type": "qwen2", ', "config.json is not valid JSON"),
        (b'{"hidden_size": 64}', "config.json names no model_type"),
        (b"[1, 2]", "config.json names no model_type (got a JSON list)"),
        (b'{"model_type": "no-such-family"}', "model_type 'no-such-family'"),
        (None, "config.json is not a valid 'qwen2' config"),  # num_hidden_layers: "two"
    ],
)  # fmt: skip
def test_damaged_config_is_named_not_blamed_on_the_tokenizer(workspace, tmp_path, capsys, config, named):
    model = _damaged(workspace, tmp_path)
    if config is None:
        doc = json.loads((model / "config.json").read_text())
        doc["num_hidden_layers"] = "two"
        config = json.dumps(doc).encode()
    _replace(model / "config.json", config)
    line = _one_error_line(capsys, _command("eval", model, workspace, tmp_path))
    assert named in line and "tokenizer" not in line


# 4. pickled .bin weights ----------------------------------------------------------------------------------------


def test_pickled_bin_weights_are_refused_for_safety_in_one_line(workspace, tmp_path, capsys):
    model = _damaged(workspace, tmp_path)
    (model / "model.safetensors").unlink()
    # a whole pickled model, not a state dict: torch's weights_only loader refuses the code it would import
    torch.save(make_tiny_model("qwen2", vocab_size=49152), model / "pytorch_model.bin")
    line = _one_error_line(capsys, _command("eval", model, workspace, tmp_path))
    assert "pytorch_model.bin is a pickle" in line and "not loaded for safety" in line
    assert "safetensors" in line and "--trust_pickle" in line


# 5. a device this machine lacks ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
@pytest.mark.parametrize(("command", "device"), [("eval", "cuda"), ("eval", "cuda:1"), ("prune", "cuda"), ("layers", "cuda:0")])
def test_cuda_device_without_cuda_is_refused_before_loading(workspace, tmp_path, capsys, command, device):
    # a truncated model: the device is refused first, before anything is read
    model = _damaged(workspace, tmp_path)
    _replace(model / "model.safetensors", b"")
    line = _one_error_line(capsys, [*_command(command, model, workspace, tmp_path), "--device", device])
    assert line.startswith(f"error: --device '{device}'") and "no CUDA GPU" in line and "--device cpu" in line


def test_unknown_device_string_lists_the_valid_ones(workspace, tmp_path, capsys):
    line = _one_error_line(capsys, [*_command("eval", workspace / "good", workspace, tmp_path), "--device", "gpu0"])
    assert line == "error: --device 'gpu0' is not a device: use cpu, cuda, cuda:N, mps or auto"


# 6. a damaged evaluation_results.json ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("{}", "lacks 'model' and 'metrics'"),
        ('{"metrics": {}}', "lacks 'model'"),
        ('{"model": {"params": 10}}', "lacks 'metrics'"),
        ("not json", "is not a readable JSON file"),
        (None, "$.model: 'params' is"),  # a whole document, but for model.params
    ],
)  # fmt: skip
def test_report_names_the_damaged_results_file(tmp_path, capsys, content, named):
    run = tmp_path / "run"
    run.mkdir()
    if content is None:
        versions = {"prunellm": "1", "torch": "2", "transformers": "5"}
        content = json.dumps({"schema_version": 1, "model": {"path": "m", "weight_bytes": 4, "dtype": "float32"}, "metrics": {},
                              "started_at": "", "finished_at": "", "versions": versions})  # fmt: skip
    (run / "evaluation_results.json").write_text(content)
    line = _one_error_line(capsys, ["report", str(run), "--output", str(tmp_path / "report")])
    assert str(run / "evaluation_results.json") in line and named in line


# the console script itself: no traceback reaches stderr -----------------------------------------------------------


def test_console_script_prints_one_line_and_no_traceback(workspace, tmp_path):
    model = _damaged(workspace, tmp_path)
    _replace(model / "config.json", b"{")
    done = subprocess.run([sys.executable, "-m", "prunellm.cli", *_command("eval", model, workspace, tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --model_path") and "config.json is not valid JSON" in lines[0]
