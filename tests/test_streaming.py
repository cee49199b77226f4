"""Streamed surgery and save (one decoder layer read, sliced, written and dropped at a time) writes the checkpoint
the in-memory prune + save writes: same tensors, config and logits after loading, on every family; with
reconstruction, removed layers and several output shards too."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import calibration_ids, make_tiny_model
from safetensors import safe_open

import prunellm as pl
from prunellm.offload import load_lazy
from prunellm.streaming import save_pruned_streamed
from prunellm.units import count_parameters


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (its save_pretrained folder, a plan with uneven widths across layers)."""
    root = tmp_path_factory.mktemp("streaming")
    made = {}

    def get(family: str):
        if family not in made:
            model = make_tiny_model(family, num_hidden_layers=3)
            model.save_pretrained(root / family)
            ids = calibration_ids(model.config.vocab_size, n=8, length=16, seed=2)
            plan = pl.select(model, pl.score(model, ids, "taylor", batch_size=4), 0.25, normalization="none")
            made[family] = (root / family, plan)
        return made[family]

    return get


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _in_memory(folder, plan, out, **prune_args):
    model, _ = pl.load_pruned(folder)
    report = pl.prune(model, plan, **prune_args)
    pl.save_pruned(model, None, out)
    return model, report


def _assert_same_checkpoint(streamed, reference) -> None:
    config = json.loads((streamed / "config.json").read_text())
    assert config == json.loads((reference / "config.json").read_text())
    a, b = _tensors(streamed), _tensors(reference)
    assert set(a) == set(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert sorted(p.name for p in streamed.iterdir() if not p.name.startswith("model")) == sorted(
        p.name for p in reference.iterdir() if not p.name.startswith("model")
    )
    ids = calibration_ids(config["vocab_size"], n=2, length=12, seed=9)
    with torch.no_grad():
        logits = [pl.load_pruned(folder)[0](input_ids=ids).logits for folder in (streamed, reference)]
    assert torch.equal(*logits)


def test_streamed_save_equals_in_memory_prune_and_save(family, saved, tmp_path):
    folder, plan = saved(family)
    assert len({len(layer.mlp_channels) for layer in plan.layers}) > 1  # per-layer widths: the modeling file path
    _in_memory(folder, plan, tmp_path / "memory")
    lazy = load_lazy(str(folder))
    report = save_pruned_streamed(lazy, plan, None, tmp_path / "streamed")
    assert report["added_params"] == 0
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")
    assert count_parameters(lazy) == plan.params_after  # the skeleton has the pruned shapes
    assert all(p.device.type == "meta" for p in lazy.parameters())


@pytest.mark.parametrize("family,mode", [("llama", "lstsq"), ("mistral", "bias"), ("qwen2", "lstsq_bias")])
def test_streamed_reconstruction_equals_in_memory(family, mode, saved, tmp_path):
    folder, plan = saved(family)
    ids = calibration_ids(plan_vocab(folder), n=8, length=16, seed=4)
    model, expected = _in_memory(folder, plan, tmp_path / "memory", calibration=ids, reconstruct=mode, batch_size=4)
    report = save_pruned_streamed(load_lazy(str(folder)), plan, None, tmp_path / "streamed", calibration=ids,
                                  reconstruct=mode, batch_size=4)  # fmt: skip
    assert report["added_params"] == expected["added_params"] and report["layers"] == expected["layers"]
    assert (report["added_params"] > 0) == (mode != "lstsq")  # bias modes add o_proj/down_proj biases here
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")


@pytest.mark.parametrize("family,target", [("llama", "dense"), ("qwen3", "residual"), ("mistral", "residual")])
def test_streamed_dense_and_residual_targets_equal_in_memory(family, target, saved, tmp_path):
    # the dense hidden states run beside the pruned ones, each layer dense before it is sliced
    folder, plan = saved(family)
    ids = calibration_ids(plan_vocab(folder), n=8, length=16, seed=4)
    args = dict(calibration=ids, reconstruct="lstsq_bias", batch_size=4, target=target)
    _, expected = _in_memory(folder, plan, tmp_path / "memory", **args)
    _, pruned_target = _in_memory(folder, plan, tmp_path / "pruned", **{**args, "target": "pruned"})
    assert expected["layers"] != pruned_target["layers"]  # the target changes the refits
    report = save_pruned_streamed(load_lazy(str(folder)), plan, None, tmp_path / "streamed", **args)
    assert report["added_params"] == expected["added_params"] and report["layers"] == expected["layers"]
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")


def test_removed_layers_and_several_shards(saved, tmp_path, monkeypatch):
    import prunellm.offload as offload

    monkeypatch.setattr(offload, "VOCAB_SLICE_BYTES", 4 * 64 * 7)  # the embedding and head copied 7 rows at a time
    folder, plan = saved("qwen3")
    plan = dataclasses.replace(plan, removed_layers=[1])
    _in_memory(folder, plan, tmp_path / "memory")
    read, original = [], offload.SafetensorsWeights.read
    monkeypatch.setattr(offload.SafetensorsWeights, "read", lambda self, names, device: read.extend(names) or original(self, names, device))
    save_pruned_streamed(load_lazy(str(folder)), plan, None, tmp_path / "streamed", shard_bytes=100_000)
    assert {name.split(".")[2] for name in read if name.startswith("model.layers.")} == {"0", "2"}  # layer 1 never read
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not any(name.startswith("model.layers.2.") for name in index["weight_map"])  # renumbered 0, 1
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", trust_remote_code=True)  # without prunellm
    assert count_parameters(loaded) == count_parameters(pl.load_pruned(tmp_path / "memory")[0])


def plan_vocab(folder) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]
