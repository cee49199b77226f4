"""The prior's cheap Δ (``--prior_measure fisher``): the ablation KL to second order, from one forward and a few
backward passes, against the exact ablations it stands in for; and the priors ablate only the blocks pruned."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import calibration_ids, make_tiny_model, save_cli_workspace

from prunellm.cli import main
from prunellm.errors import PrunellmError
from prunellm.priors import _fisher_deltas, ablation_deltas, ablation_deltas_of
from prunellm.specs import spec_for
from prunellm.sweep import Offload
from prunellm.units import decoder_layers, get_module


def _quiet_blocks(model: torch.nn.Module, scale: float) -> None:
    """Scale what every attention and MLP block writes into the residual stream (o_proj, down_proj): their
    ablations become small perturbations, where second order is exact."""
    spec = spec_for(model.config)
    with torch.no_grad():
        for block in decoder_layers(model):
            for path in (f"{spec.attention.module}.{spec.attention.o}", f"{spec.mlp.module}.{spec.mlp.down}"):
                for param in get_module(block, path).parameters():
                    param.mul_(scale)


@pytest.mark.parametrize("target", ["layer", "attention", "mlp"])
def test_fisher_estimate_converges_to_the_ablation_kl_of_small_blocks(target):
    """With blocks that change the stream little, ½ δᵀFδ from sampled labels is the exact KL of each ablation
    (within the Monte-Carlo error of 8 windows × 512 draws: ~2 %)."""
    model = make_tiny_model("llama", num_hidden_layers=3)
    _quiet_blocks(model, 0.05)
    ids = calibration_ids(n=8, length=16)
    exact = ablation_deltas(model, ids, target, batch_size=4, measure="kl")
    estimate = _fisher_deltas(model, ids, (target,), 4, [0, 1, 2], samples=512)[target]
    assert min(exact) > 0
    torch.testing.assert_close(torch.tensor(estimate), torch.tensor(exact), rtol=0.12, atol=0.0)


def test_fisher_estimate_ranks_full_size_blocks_and_is_deterministic(family):
    """On a model at its own scale (every family, post-norms and soft-capped heads included) the estimate is positive,
    finite, the same on every call, 0 for a block whose output is already zero, and cached like the exact Δ."""
    model = make_tiny_model(family, num_hidden_layers=3)
    ids = calibration_ids(n=4, length=16)
    first = ablation_deltas_of(model, ids, ("layer", "mlp"), batch_size=2, measure="fisher")
    again = _fisher_deltas(model, ids, ("layer", "mlp"), 2, [0, 1, 2])
    assert first == {target: [max(v, 0.0) for v in again[target]] for target in again}
    assert all(0 < v < float("inf") for values in first.values() for v in values)
    spec = spec_for(model.config)
    with torch.no_grad():
        for param in get_module(decoder_layers(model)[1], f"{spec.mlp.module}.{spec.mlp.up}").parameters():
            param.zero_()  # gate * 0: the MLP outputs its down_proj bias or 0, whatever the norms after it
        for param in get_module(decoder_layers(model)[1], f"{spec.mlp.module}.{spec.mlp.down}").parameters():
            param.zero_()
    assert ablation_deltas(model, ids, "mlp", batch_size=2, layers=[1], measure="fisher") == [pytest.approx(0.0, abs=1e-9)]


def test_fisher_estimate_is_refused_offloaded_with_the_flag_that_works():
    model = make_tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(PrunellmError, match="--prior_measure fisher needs the model in memory.*--prior_measure kl"):
        ablation_deltas(model, calibration_ids(n=2, length=8), "layer", measure="fisher", offload=Offload("cpu"))


def test_priors_ablate_only_the_blocks_whose_units_are_pruned(tmp_path):
    """MLP channels only (the default units): no attention ablation runs and its Δ is not recorded (it would
    multiply no score); with KV groups too, both blocks are measured. The prior files name the measure."""
    workspace = save_cli_workspace(tmp_path)
    results = workspace / "results"
    common = ("--base_model", str(workspace / "tiny"), "--dataset", str(workspace / "text.txt"), "--output_dir", str(results),
              "--calibration_num_samples", "4", "--calibration_seq_len", "16", "--layer_importance_num_samples", "4",
              "--block_importance_num_samples", "4", "--reconstruct", "none", "--iterative_steps", "1", "--pruning_ratio", "0.015",
              "--prior_measure", "fisher")  # fmt: skip
    assert main(["prune", *common, "--output_name", "mlp"]) == 0
    assert main(["prune", *common, "--output_name", "both", "--units", "kv_group,mlp_channel", "--min_kv_groups", "1"]) == 0
    mlp = json.loads((results / "mlp" / "block_importance_loss.json").read_text())
    both = json.loads((results / "both" / "block_importance_loss.json").read_text())
    assert set(mlp) == {"metric", "mlp"} and set(both) == {"metric", "attention", "mlp"}
    assert mlp["metric"] == both["metric"] == "kl_from_dense_zero_ablation_fisher_estimate"
    assert mlp["mlp"] == both["mlp"]  # the same windows, weights and draws
