"""Offloaded scoring (one decoder layer at a time, weights read from the safetensors shards) gives the in-memory
pass's scores and the identical plan, on every family; the skeleton never holds weights; the CLI flag too."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import calibration_ids, make_tiny_model

import prunellm as pl
from prunellm.api import Scores
from prunellm.errors import PrunellmError
from prunellm.offload import load_lazy
from prunellm.units import count_parameters

CRITERIA = ("taylor", "taylor_2nd", "wanda")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (in-memory tiny model, its save_pretrained folder)."""
    root = tmp_path_factory.mktemp("offload")
    models = {}

    def get(family: str):
        if family not in models:
            model = make_tiny_model(family, num_hidden_layers=3)
            model.save_pretrained(root / family)
            models[family] = (model, root / family)
        return models[family]

    return get


def _assert_same(offloaded: Scores, reference: Scores) -> None:
    assert set(offloaded.scores) == set(reference.scores)
    for key, value in reference.scores.items():
        torch.testing.assert_close(offloaded.scores[key], value, rtol=1e-4, atol=1e-7 * float(value.abs().max()))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_offloaded_from_disk_matches_in_memory_scores_and_plan(family, criterion, saved):
    model, folder = saved(family)
    ids = calibration_ids(model.config.vocab_size, n=12, length=16, seed=7)
    reference = pl.score(model, ids, criterion, batch_size=4)
    lazy = load_lazy(str(folder))
    assert count_parameters(lazy) == count_parameters(model)
    offloaded = pl.score(lazy, ids, criterion, batch_size=4, offload=True)
    _assert_same(offloaded, reference)
    if criterion != "wanda":
        assert offloaded.stats.mean_loss == pytest.approx(reference.stats.mean_loss, rel=1e-6)
    assert pl.select(lazy, offloaded, 0.2).layers == pl.select(model, reference, 0.2).layers
    assert all(p.device.type == "meta" for p in lazy.parameters())  # every layer went back to the shards


@pytest.mark.parametrize("family", ["llama", "mistral"])  # tied head (the embedding's rows) and an untied one
def test_head_and_embedding_read_in_uneven_vocabulary_slices(family, saved, monkeypatch):
    import prunellm.offload as offload

    model, folder = saved(family)
    ids = calibration_ids(model.config.vocab_size, n=8, length=16, seed=5)
    reference = pl.score(model, ids, "taylor_mix", batch_size=4)
    # 128 words in slices of 7 rows (the last one 2); the 2 × 60 shifted tokens in chunks of 25, one across both
    # micro-batches
    monkeypatch.setattr(offload, "VOCAB_SLICE_BYTES", 4 * 64 * 7)
    monkeypatch.setattr(offload, "LOGITS_CHUNK_BYTES", 4 * 128 * 25)
    reads = []
    read_rows = offload.SafetensorsWeights.read_rows
    monkeypatch.setattr(offload.SafetensorsWeights, "read_rows", lambda self, name, a, b, d: reads.append(b - a) or read_rows(self, name, a, b, d))
    offloaded = pl.score(load_lazy(str(folder)), ids, "taylor_mix", batch_size=4)
    _assert_same(offloaded, reference)
    assert offloaded.stats.mean_loss == pytest.approx(reference.stats.mean_loss, rel=1e-6)
    assert max(reads) == 7 and sum(reads) == 128 + 5 * 2 * 128  # the embedding once, the head twice per chunk
    host = pl.score(model, ids, "taylor_mix", batch_size=4, offload=True)  # slices of host memory
    _assert_same(host, reference)


def test_hidden_states_on_disk_and_a_model_in_host_memory(saved, tmp_path):
    model, folder = saved("qwen3")
    ids = calibration_ids(model.config.vocab_size, n=12, length=16, seed=3)
    reference = pl.score(model, ids, "taylor_2nd", batch_size=5, layers=[1, 2])  # uneven last micro-batch
    on_disk = pl.score(load_lazy(str(folder)), ids, "taylor_2nd", batch_size=5, layers=[1, 2], offload_dir=tmp_path / "h")
    _assert_same(on_disk, reference)
    assert list((tmp_path / "h").iterdir()) == []  # scratch files are removed
    host = pl.score(model, ids, "taylor_2nd", batch_size=5, layers=[1, 2], offload=True)
    _assert_same(host, reference)
    assert all(p.device.type == "cpu" and p.grad is None for p in model.parameters())


def test_weight_criteria_and_taylor_mix_offloaded(saved):
    model, folder = saved("llama")
    ids = calibration_ids(model.config.vocab_size, n=8, length=16, seed=1)
    lazy = load_lazy(str(folder))
    for criterion in ("magnitude", "taylor_mix"):
        _assert_same(pl.score(lazy, ids, criterion, batch_size=4), pl.score(model, ids, criterion, batch_size=4))


def test_a_folder_without_safetensors_is_refused(tmp_path):
    model = make_tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # weights, but not safetensors
    with pytest.raises(PrunellmError, match="--offload reads safetensors"):
        load_lazy(str(tmp_path))


def test_cli_offload_gives_the_same_plan_and_model(tmp_path):
    from test_streaming import _tensors

    from prunellm.cli import main
    from prunellm.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model = make_tiny_model("llama", num_hidden_layers=3, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(" ".join("the king and the queen walked to the castle while the people sang".split() * 200))
    plans = {}
    lstsq = ["--reconstruct", "lstsq", "--reconstruct_num_samples", "8", "--reconstruct_seq_len", "32"]
    runs = (("memory", ["--reconstruct", "none"]), ("offload", ["--offload", "--reconstruct", "none"]),
            ("disk", ["--offload", "--offload_dir", str(tmp_path / "h"), "--reconstruct", "none"]),
            ("memory_lstsq", lstsq), ("offload_lstsq", ["--offload", *lstsq]),
            ("memory_residual", [*lstsq, "--reconstruct_target", "residual"]),
            ("offload_residual", ["--offload", *lstsq, "--reconstruct_target", "residual"]))  # fmt: skip
    for name, extra in runs:
        args = ["prune", "--base_model", str(tmp_path / "tiny"), "--output_dir", str(tmp_path / "results"), "--output_name", name,
                "--dataset", str(text), "--taylor_num_samples", "8", "--taylor_seq_len", "32", "--gradient_batch_size", "4",
                "--pruning_ratio", "0.02", "--importance_method", "taylor", "--units", "kv_group,mlp_channel",
                "--iterative_steps", "1", "--prior_measure", "kl", *extra]  # fmt: skip  (--offload: one round, exact Δ: compare those)
        assert main(args) == 0
        plans[name] = json.loads((tmp_path / "results" / name / "plan.json").read_text())
    assert plans["offload"]["layers"] == plans["memory"]["layers"] == plans["disk"]["layers"]
    assert plans["offload"]["params_after"] == plans["memory"]["params_after"]
    for streamed, reference in (("offload", "memory"), ("offload_lstsq", "memory_lstsq"), ("offload_residual", "memory_residual")):
        a, b = (_tensors(tmp_path / "results" / name / "model") for name in (streamed, reference))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert any(not torch.equal(a[k], _tensors(tmp_path / "results" / "offload" / "model")[k]) for k in a)  # refitted
    report = json.loads((tmp_path / "results" / "offload_lstsq" / "analysis" / "reconstruction.json").read_text())
    assert report["layers"] and report["settings"]["mode"] == "lstsq"
    residual = json.loads((tmp_path / "results" / "offload_residual" / "analysis" / "reconstruction.json").read_text())
    assert residual["settings"]["target"] == "residual" and residual["layers"] != report["layers"]


def test_cli_offload_refuses_what_needs_the_whole_model(tmp_path, capsys):
    from prunellm.cli import main

    args = ["--offload", "--run_evaluation", "ppl", "--output_dir", str(tmp_path)]
    assert main(["prune", *args, "--finetune", "--reconstruct_target", "dense", "--temperature", "1"]) == 2
    assert "--run_evaluation/--metrics, --finetune still load it whole" in capsys.readouterr().err
    assert main(["layers", *args, "--n_remove_layers", "1"]) == 2  # depth pruning streams; its evaluation does not
    assert "--run_evaluation/--metrics still load it whole" in capsys.readouterr().err
    assert main(["layers", "--offload", "--device", "auto", "--n_remove_layers", "1", "--output_dir", str(tmp_path)]) == 2
    assert "use --device cpu, cuda or cuda:N, not auto" in capsys.readouterr().err


def test_offload_benchmark_section_renders():
    from benchmarks.offload_memory import render

    row = dict(params=1_100_048_384, layers=22, dtype="bfloat16", weight_mb=2098.3, offload_dir=False, tokens=256,
               seconds=30.0, rss_before_mb=400.0, peak_rss_mb=800.0, memory_ratio=0.19, total_rss_ratio=0.38)  # fmt: skip
    section = {"rows": [{**row, "model": "llama-2048x22", "reference_seconds": 25.0, "reference_memory_ratio": 1.1,
                         "time_ratio": 1.2},
                        {**row, "model": "llama-2048x6", "layers": 6, "weight_mb": 700.0, "peak_rss_mb": 780.0}]}  # fmt: skip
    text = render(section)
    assert "| llama-2048x22 | 1100 M | 22 | bfloat16 |" in text and "0.19 (met, goal ≤ 0.25)" in text and "1.2 (met)" in text
    assert "16 more layers cost 20 MB" in text and "Llama-3-70B" in text


def test_a_crashed_offloaded_scoring_restarts_where_it_stopped(saved, tmp_path, monkeypatch):
    import prunellm.offload as offload

    model, folder = saved("qwen2")
    ids = calibration_ids(model.config.vocab_size, n=8, length=16, seed=6)
    reference = pl.score(model, ids, "taylor_mix", batch_size=4)
    lazy = load_lazy(str(folder))
    finish, done = offload.GradientReducer.finish, []

    def crash_in_layer_1(self):  # the backward sweep finished layer 2, dies in layer 1
        done.append(1)
        if len(done) == 2:
            raise RuntimeError("crash")
        finish(self)

    monkeypatch.setattr(offload.GradientReducer, "finish", crash_in_layer_1)
    with pytest.raises(RuntimeError, match="crash"):
        pl.score(lazy, ids, "taylor_mix", batch_size=4, offload_dir=tmp_path / "h")
    monkeypatch.setattr(offload.GradientReducer, "finish", finish)
    (kept,) = (tmp_path / "h").iterdir()
    assert sorted(p.name for p in kept.iterdir()) == ["hidden_00000.safetensors", "hidden_00001.safetensors", "progress.safetensors"]
    read, original = [], offload.SafetensorsWeights.read
    monkeypatch.setattr(offload.SafetensorsWeights, "read", lambda self, names, device: read.extend(names) or original(self, names, device))
    resumed = pl.score(lazy, ids, "taylor_mix", batch_size=4, offload_dir=tmp_path / "h")
    _assert_same(resumed, reference)
    assert resumed.stats.mean_loss == pytest.approx(reference.stats.mean_loss, rel=1e-6)
    assert {name.split(".")[2] for name in read if name.startswith("model.layers.")} == {"0", "1"}  # no forward, no layer 2
    assert list((tmp_path / "h").iterdir()) == []  # finished: its folder goes
    # a forward sweep that died: the rerun starts from the last layer input stored
    monkeypatch.setattr(offload, "_loss_at_top", lambda *args: (_ for _ in ()).throw(RuntimeError("crash at the top")))
    with pytest.raises(RuntimeError, match="crash at the top"):
        pl.score(lazy, ids, "taylor_mix", batch_size=4, offload_dir=tmp_path / "h")
    monkeypatch.undo()
    read.clear()
    monkeypatch.setattr(offload.SafetensorsWeights, "read", lambda self, names, device: read.extend(names) or original(self, names, device))
    _assert_same(pl.score(lazy, ids, "taylor_mix", batch_size=4, offload_dir=tmp_path / "h"), reference)
    layers_read = [name.split(".")[2] for name in read if name.startswith("model.layers.")]
    assert layers_read[: len(layers_read) // 2] and set(layers_read[:1]) == {"2"}  # forward resumed at layer 2


def test_the_activation_pass_is_one_code_in_memory_and_offloaded(family, saved):
    """The activation statistics (fluctuation, wanda, obs) come from one layer-by-layer pass, its layers used in place
    or read from the shards one at a time: bit-identical to each other and to the same hooks on HF's own forward."""
    from prunellm.calibration import Stats, activation_hooks
    from prunellm.offload import activation_stats
    from prunellm.units import all_units, decoder_layers

    model, folder = saved(family)
    ids = calibration_ids(model.config.vocab_size, n=6, length=16, seed=3)
    units = [u for u in all_units(model) if u.layer < 2]  # the pass stops after layer 1
    by_forward = Stats()
    handles = activation_hooks(decoder_layers(model), units, by_forward, grams=True)
    with torch.no_grad():
        for batch in ids.split(4):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    in_place = activation_stats(model, ids, units, batch_size=4, grams=True)
    offloaded = activation_stats(load_lazy(str(folder)), ids, units, batch_size=4, grams=True, device="cpu")
    for stats in (in_place, offloaded):
        for table in ("act_sq", "act_sum", "act_gram"):
            ours, theirs = getattr(stats, table), getattr(by_forward, table)
            assert ours.keys() == theirs.keys() and ours, table
            assert all(torch.equal(ours[key], theirs[key]) for key in theirs), table
        assert stats.act_tokens == ids.numel()
    with pytest.raises(PrunellmError, match="pass offload=prunellm.sweep.Offload"):
        activation_stats(load_lazy(str(folder)), ids, units)  # weights on disk, no device to read them to
