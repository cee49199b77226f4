"""Layer-at-a-time forward passes (``--offload``) of the ablation priors and the layer criteria give the in-memory
numbers, on every family; the depth-pruning and allocation runs with ``--offload`` give the in-memory plans and
checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_ids
from test_offload import saved  # noqa: F401 (the fixture: family -> (in-memory tiny model, its saved folder))

from prunellm.errors import PrunellmError
from prunellm.layers import layer_importance
from prunellm.offload import load_lazy
from prunellm.sweep import Offload
from prunellm.priors import _ablated_losses_full, ablation_deltas, ablation_deltas_of


@pytest.mark.parametrize("target", ["layer", "attention", "mlp"])
def test_offloaded_ablation_deltas_equal_in_memory(family, target, saved):  # noqa: F811
    model, folder = saved(family)
    ids = calibration_ids(model.config.vocab_size, n=5, length=16, seed=4)
    base, losses = _ablated_losses_full(model, ids, target, 2, [0, 1, 2])  # full forward passes: no sweep
    reference = [max(loss - base, 0.0) for loss in losses]
    in_place = ablation_deltas(model, ids, target, batch_size=2)  # the same sweep, every layer used where it is
    torch.testing.assert_close(torch.tensor(in_place), torch.tensor(reference), rtol=1e-4, atol=1e-6)
    lazy = load_lazy(str(folder))
    offloaded = ablation_deltas(lazy, ids, target, batch_size=2, offload=Offload("cpu"))
    torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(reference), rtol=1e-4, atol=1e-6)
    host = ablation_deltas(model, ids, target, batch_size=2, layers=[2, 0], offload=Offload("cpu"))
    torch.testing.assert_close(torch.tensor(host), torch.tensor([reference[2], reference[0]]), rtol=1e-4, atol=1e-6)
    if family == "llama" and target == "layer":
        with pytest.raises(PrunellmError, match="pass offload=prunellm.sweep.Offload"):
            ablation_deltas(lazy, ids, "mlp", batch_size=2)  # weights on disk, no way to reach them in memory


def test_one_offloaded_sweep_serves_the_attention_and_mlp_priors(saved, monkeypatch):  # noqa: F811
    import prunellm.offload as offload

    model, folder = saved("qwen2")
    ids = calibration_ids(model.config.vocab_size, n=5, length=16, seed=9)
    expected = {target: ablation_deltas(model, ids, target, batch_size=2) for target in ("attention", "mlp")}
    read, original = [], offload.SafetensorsWeights.read
    monkeypatch.setattr(offload.SafetensorsWeights, "read", lambda self, names, device: read.extend(names) or original(self, names, device))
    both = ablation_deltas_of(load_lazy(str(folder)), ids, ("attention", "mlp"), batch_size=2, offload=Offload("cpu"))
    for target, deltas in expected.items():
        torch.testing.assert_close(torch.tensor(both[target]), torch.tensor(deltas), rtol=1e-4, atol=1e-6)
    assert read.count("model.layers.1.mlp.down_proj.weight") == 1  # every layer read once for both targets


def test_offloaded_ablation_keeps_its_branches_in_the_offload_dir(saved, tmp_path, monkeypatch):  # noqa: F811
    import prunellm.offload as offload

    model, folder = saved("qwen3")
    ids = calibration_ids(model.config.vocab_size, n=5, length=16, seed=2)
    expected = ablation_deltas(model, ids, "mlp", batch_size=2)
    written = []
    put = offload.HiddenStore.put
    monkeypatch.setattr(offload.HiddenStore, "put", lambda self, k, h: written.append(self.folder) or put(self, k, h))
    on_disk = ablation_deltas(load_lazy(str(folder)), ids, "mlp", batch_size=2, offload=Offload("cpu", tmp_path / "h"))
    torch.testing.assert_close(torch.tensor(on_disk), torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert written and all(f is not None and f.parent == tmp_path / "h" for f in written)
    assert list((tmp_path / "h").iterdir()) == []  # the branches' files are removed


@pytest.mark.parametrize("method", ["block_influence", "activation", "ppl", "taylor"])
def test_offloaded_layer_criteria_equal_in_memory(method, saved):  # noqa: F811
    model, folder = saved("llama")
    ids = calibration_ids(model.config.vocab_size, n=6, length=16, seed=8)
    reference = layer_importance(model, ids, method, batch_size=3)
    offloaded = layer_importance(load_lazy(str(folder)), ids, method, batch_size=3, offload=Offload("cpu"))
    torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(reference), rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny Llama with the SmolLM2 tokenizer and a text file: what a CLI run needs."""
    from conftest import make_tiny_model

    from prunellm.models import load_tokenizer

    root = tmp_path_factory.mktemp("offload_layers")
    tokenizer = load_tokenizer("smollm2-135m")
    make_tiny_model("llama", num_hidden_layers=4, vocab_size=len(tokenizer), seed=2).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "text.txt").write_text(" ".join("the king and the queen walked to the castle while the people sang".split() * 200))
    return root


def _run(root, command: str, name: str, *extra: str) -> dict:
    import json

    from prunellm.cli import main

    args = [command, "--base_model", str(root / "tiny"), "--output_dir", str(root / "r"), "--output_name", name,
            "--dataset", str(root / "text.txt"), *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((root / "r" / name / "plan.json").read_text())


def _same_checkpoint(root, a: str, b: str) -> None:
    from test_streaming import _tensors

    x, y = (_tensors(root / "r" / name / "model") for name in (a, b))
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in y)


@pytest.mark.parametrize("method,extra", [("block_influence", ["--iterative"]), ("ppl", ["--iterative"]), ("taylor", [])])
def test_layers_offload_gives_the_in_memory_plan_and_checkpoint(tiny_run, method, extra):
    import json

    flags = ["--layer_importance_method", method, "--n_remove_layers", "2", "--num_samples", "4", "--seq_len", "32", *extra]
    memory = _run(tiny_run, "layers", f"{method}_memory", *flags)
    offloaded = _run(tiny_run, "layers", f"{method}_offload", *flags, "--offload")
    assert offloaded["removed_layers"] == memory["removed_layers"] and offloaded["params_after"] == memory["params_after"]
    scores = [json.loads((tiny_run / "r" / f"{method}_{how}" / "layer_importance.json").read_text())["scores"] for how in ("memory", "offload")]
    torch.testing.assert_close(torch.tensor(scores[1]), torch.tensor(scores[0]), rtol=1e-4, atol=1e-7)
    _same_checkpoint(tiny_run, f"{method}_offload", f"{method}_memory")  # the removed layers dropped, the rest renumbered
    config = json.loads((tiny_run / "r" / f"{method}_offload" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2


def test_prune_offload_with_priors_and_layerwise_allocation_gives_the_in_memory_plan(tiny_run):
    flags = ["--taylor_num_samples", "4", "--taylor_seq_len", "32", "--gradient_batch_size", "2", "--pruning_ratio", "0.02",
             "--layer_importance_num_samples", "4", "--block_importance_num_samples", "4", "--reconstruct", "none",
             "--temperature", "1", "--allocation", "layerwise", "--layer_importance_method", "removal",
             "--iterative_steps", "1", "--prior_measure", "kl"]  # fmt: skip  (--offload: one round, exact Δ: compare those)
    memory = _run(tiny_run, "prune", "priors_memory", *flags)
    offloaded = _run(tiny_run, "prune", "priors_offload", *flags, "--offload")
    assert offloaded["layers"] == memory["layers"] and offloaded["params_after"] == memory["params_after"]
    for file in ("layer_importance_loss.json", "block_importance_loss.json", "layer_importance.json"):
        import json

        a, b = (json.loads((tiny_run / "r" / name / file).read_text()) for name in ("priors_offload", "priors_memory"))
        for key in set(a) - {"method", "metric"}:
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=1e-4, atol=1e-7)
    _same_checkpoint(tiny_run, "priors_offload", "priors_memory")


def test_a_layer_criterion_not_declared_offloadable_is_refused_with_offload(saved):  # noqa: F811
    from prunellm.criteria import LAYER_REGISTRY, register_layer

    register_layer("in_memory_only", "needs the whole model")(lambda model, input_ids, batch_size=4: [0.0, 1.0, 2.0])
    try:
        model, folder = saved("llama")
        ids = calibration_ids(model.config.vocab_size, n=2, length=8)
        assert layer_importance(model, ids, "in_memory_only") == [0.0, 1.0, 2.0]
        with pytest.raises(PrunellmError, match="with --offload use one of block_influence, activation, ppl, removal, taylor"):
            layer_importance(load_lazy(str(folder)), ids, "in_memory_only", offload=Offload("cpu"))
    finally:
        LAYER_REGISTRY.pop("in_memory_only")


def test_offloaded_ablation_reads_the_head_in_uneven_slices(saved, monkeypatch):  # noqa: F811
    import prunellm.offload as offload

    model, folder = saved("mistral")  # an untied head
    ids = calibration_ids(model.config.vocab_size, n=5, length=16, seed=11)
    expected = ablation_deltas(model, ids, "attention", batch_size=2)
    monkeypatch.setattr(offload, "VOCAB_SLICE_BYTES", 4 * 64 * 7)  # 128 words in slices of 7 rows
    monkeypatch.setattr(offload, "LOGITS_CHUNK_BYTES", 4 * 128 * 13)  # 13 tokens a chunk, across micro-batches
    reads = []
    read_rows = offload.SafetensorsWeights.read_rows
    monkeypatch.setattr(offload.SafetensorsWeights, "read_rows", lambda self, name, a, b, d: reads.append(name) or read_rows(self, name, a, b, d))
    offloaded = ablation_deltas(load_lazy(str(folder)), ids, "attention", batch_size=2, offload=Offload("cpu"))
    torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(expected), rtol=1e-4, atol=1e-6)
    chunks = -(-5 * 15 // 13)  # 5 windows × 15 shifted tokens per loss, in chunks of 13
    assert reads.count("lm_head.weight") == (1 + 3) * chunks * -(-128 // 7)  # dense + 3 branches, the head once a chunk


def test_offloaded_ablation_refuses_a_soft_capped_head():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    model.config.final_logit_softcapping = 30.0  # the loss would no longer be lm_head(final_norm(h))
    with pytest.raises(PrunellmError, match="transforms its logits further: run it in memory"):
        ablation_deltas(model, calibration_ids(model.config.vocab_size, n=2, length=8), "layer", offload=Offload("cpu"))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_offloaded_kl_deltas_equal_in_memory(family, saved):  # noqa: F811
    """The prior's KL measure, offloaded: the LM head read a vocabulary slice at a time for both the dense and the
    ablated distributions gives the in-memory divergences, at every position and at ``--prior_positions``."""
    model, folder = saved(family)
    ids = calibration_ids(model.config.vocab_size, n=5, length=16, seed=6)
    for positions in (None, 6):  # every position, and --prior_positions 6
        expected = ablation_deltas_of(model, ids, ("attention", "mlp"), batch_size=2, measure="kl", positions=positions)
        offloaded = ablation_deltas_of(load_lazy(str(folder)), ids, ("attention", "mlp"), batch_size=2, offload=Offload("cpu"),
                                       measure="kl", positions=positions)  # fmt: skip
        for target, deltas in expected.items():
            torch.testing.assert_close(torch.tensor(offloaded[target]), torch.tensor(deltas), rtol=1e-4, atol=1e-6)
