"""Layer-aware pruning: depth surgery equals ablation, HF-native checkpoints, and allocation meets its budget."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import calibration_ids, make_tiny_model
from transformers import AutoModelForCausalLM

from prunellm.checkpoint import save_model
from prunellm.cli import main, translate_seed_layer_flags
from prunellm.errors import PrunellmError
from prunellm.criteria.depth import hidden_change_scores
from prunellm.layers import allocate_rates, choose_layers_to_remove, select_layerwise
from prunellm.priors import _ablated_losses_full, ablated, ablation_deltas, ablation_deltas_of, scored_positions
from prunellm.sweep import IN_PLACE
from prunellm.selection import normalized_values
from prunellm.surgery import remove_layers
from prunellm.specs import spec_for
from prunellm.units import all_units, count_parameters, decoder_layers, get_module


@pytest.mark.parametrize("target", ["layer", "attention", "mlp"])
def test_prefix_reusing_ablation_equals_full_forward_ablation(family, target):
    # the sweep reruns only layers L.. from the hidden state entering L (every branch advanced as the windows go up
    # the layers, the head read in slices); it must give the same Δloss as ablating inside a full forward pass of
    # the model (which uses the model's own head and loss)
    model = make_tiny_model(family, num_hidden_layers=4)
    ids = calibration_ids(n=5, length=16)
    fast_base, by_target = IN_PLACE.ablated_losses(model, ids, (target,), 2, [0, 1, 2, 3])
    fast = by_target[target]
    full_base, full = _ablated_losses_full(model, ids, target, 2, [0, 1, 2, 3])
    assert abs(fast_base - full_base) < 1e-5 and len(set(full)) == 4 and full_base not in full
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(full), rtol=1e-5, atol=1e-5)
    deltas = ablation_deltas(model, ids, target, batch_size=2, layers=[3, 1])
    expected = [max(full[3] - full_base, 0.0), max(full[1] - full_base, 0.0)]
    torch.testing.assert_close(torch.tensor(deltas), torch.tensor(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["layer", "mlp"])
def test_kl_deltas_are_the_ablated_distributions_divergence_from_the_dense_ones(family, target):
    """``measure="kl"``: Δ = mean over positions of KL(p_dense ‖ p_ablated), computed here by hand from two full
    forward passes per window; the fast path, the full-forward path (soft-capped heads) and the cache agree, a block
    whose output is already zero gives 0, and the loss measure is kept apart in the cache."""
    model = make_tiny_model(family, num_hidden_layers=3)
    ids = calibration_ids(n=5, length=16)
    by_hand = []
    with torch.no_grad():
        dense = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
        for layer in range(3):
            with ablated(model, layer, target):
                q = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
            by_hand.append(float((dense.exp() * (dense - q)).sum(-1).mean()))
    _, fast = IN_PLACE.ablated_losses(model, ids, (target,), 2, [0, 1, 2], "kl")
    _, full = _ablated_losses_full(model, ids, target, 2, [0, 1, 2], "kl")
    torch.testing.assert_close(torch.tensor(fast[target]), torch.tensor(by_hand), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(full), torch.tensor(by_hand), rtol=1e-4, atol=1e-6)
    assert min(by_hand) > 0
    kl = ablation_deltas(model, ids, target, batch_size=2, measure="kl")
    loss = ablation_deltas(model, ids, target, batch_size=2)
    torch.testing.assert_close(torch.tensor(kl), torch.tensor(by_hand), rtol=1e-4, atol=1e-6)
    assert kl != loss
    if target == "mlp":
        spec = spec_for(model.config)
        with torch.no_grad():
            for param in get_module(decoder_layers(model)[1], spec.mlp.module + "." + spec.mlp.down).parameters():
                param.zero_()  # weight and bias: the block's output is zero
        assert ablation_deltas(model, ids, "mlp", batch_size=2, layers=[1], measure="kl") == [pytest.approx(0.0, abs=1e-6)]
    with pytest.raises(PrunellmError, match="--prior_measure 'nll' is not valid: use loss, kl or fisher"):
        ablation_deltas(model, ids, target, measure="nll")


@pytest.mark.parametrize("target", ["layer", "mlp"])
def test_kl_on_a_subset_of_positions_is_the_divergence_at_those_positions(family, target):
    """``positions=P`` (``--prior_positions``): the KL averaged over P evenly spaced positions of each window, the last
    predicting one included, computed here by hand from full forward passes; the fast path and the full-forward path
    (soft-capped heads, HF's ``logits_to_keep``) agree, it is cached apart from the all-positions KL, and P at or
    above the window's predicting positions is every position."""
    model = make_tiny_model(family, num_hidden_layers=3)
    ids = calibration_ids(n=5, length=16)
    picked = scored_positions(16, 5)
    assert picked.tolist() == [2, 5, 8, 11, 14] and scored_positions(16, 15) is None and scored_positions(16, 0) is None
    by_hand = []
    with torch.no_grad():
        dense = torch.log_softmax(model(ids).logits[:, picked].float(), dim=-1)
        for layer in range(3):
            with ablated(model, layer, target):
                q = torch.log_softmax(model(ids).logits[:, picked].float(), dim=-1)
            by_hand.append(float((dense.exp() * (dense - q)).sum(-1).mean()))
    _, fast = IN_PLACE.ablated_losses(model, ids, (target,), 2, [0, 1, 2], "kl", 5)
    _, full = _ablated_losses_full(model, ids, target, 2, [0, 1, 2], "kl", 5)
    torch.testing.assert_close(torch.tensor(fast[target]), torch.tensor(by_hand), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(full), torch.tensor(by_hand), rtol=1e-4, atol=1e-6)
    subset = ablation_deltas(model, ids, target, batch_size=2, measure="kl", positions=5)
    every = ablation_deltas(model, ids, target, batch_size=2, measure="kl")
    torch.testing.assert_close(torch.tensor(subset), torch.tensor(by_hand), rtol=1e-4, atol=1e-6)
    assert subset != every and ablation_deltas(model, ids, target, batch_size=2, measure="kl", positions=15) == every


def test_ablation_deltas_are_computed_once_per_weights_and_calibration():
    model = make_tiny_model("llama", num_hidden_layers=3)
    ids = calibration_ids(n=4, length=16)
    calls = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda *a: calls.append(1))  # every pass runs layer 0
    first = ablation_deltas(model, ids, "layer")
    n_calls = len(calls)
    assert ablation_deltas(model, ids, "layer") == first and len(calls) == n_calls  # the prior and layerwise share it
    block_ids = calibration_ids(n=4, length=16, seed=1)
    ablation_deltas_of(model, block_ids, ("attention", "mlp"))  # other windows and targets: computed
    assert len(calls) > n_calls
    n_calls = len(calls)
    assert ablation_deltas(model, ids, "layer") == first and len(calls) == n_calls  # ... beside the layer ablations
    assert ablation_deltas(model, block_ids, "mlp") == ablation_deltas_of(model, block_ids, ("mlp",))["mlp"] and len(calls) == n_calls
    with torch.no_grad():
        decoder_layers(model)[1].mlp.down_proj.weight.mul_(0.0)  # in place: the cached deltas are stale
    n_calls = len(calls)
    changed = ablation_deltas(model, ids, "layer")
    assert len(calls) > n_calls and changed != first
    handle.remove()


@pytest.mark.parametrize("k", [0, 2])
def test_removing_a_layer_equals_its_zero_output_ablation(family, k):
    model = make_tiny_model(family, num_hidden_layers=3)
    ids = calibration_ids(n=2, length=16)
    with ablated(model, k, "layer"):
        expected = model(ids).logits
    remove_layers(model, [k])
    assert model.config.num_hidden_layers == 2 and len(decoder_layers(model)) == 2
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1]
    layer_types = getattr(model.config, "layer_types", None)
    assert layer_types is None or len(layer_types) == 2
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_depth_pruned_checkpoint_is_plain_hf_and_generates(tmp_path):
    model = make_tiny_model("qwen2", num_hidden_layers=4)
    remove_layers(model, [1, 2])
    save_model(model, None, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in config and config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # no trust_remote_code
    prompt = calibration_ids(n=1, length=6, seed=2)
    torch.testing.assert_close(reloaded(prompt).logits, model(prompt).logits, rtol=0, atol=0)
    cached = reloaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = reloaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_block_influence_matches_by_hand():
    model = make_tiny_model("llama", num_hidden_layers=3)
    ids = calibration_ids(n=4, length=16)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states  # embeddings, then after each layer (last normed)
    scores = hidden_change_scores(model, ids, batch_size=2)["block_influence"]
    for layer in range(2):  # the last entry of hidden_states has the final norm applied
        cos = torch.nn.functional.cosine_similarity(states[layer], states[layer + 1], dim=-1)
        assert scores[layer] == pytest.approx(float((1 - cos).mean()), rel=1e-4)


def test_iterative_and_frozen_choice():
    model = make_tiny_model("llama", num_hidden_layers=4)
    ids = calibration_ids(n=4, length=16)
    removed, scores = choose_layers_to_remove(model, ids, "block_influence", 2, iterative=True, candidates=[1, 2, 3])
    assert len(removed) == 2 and 0 not in removed and len(scores) == 4
    with pytest.raises(PrunellmError, match="--n_remove_layers 4"):
        choose_layers_to_remove(model, ids, "ppl", 4)


@pytest.mark.parametrize("method", ["ppl", "removal"])
def test_iterative_loss_criteria_rescore_with_the_dropped_layers(method):
    # each round scores the model with the layers removed so far (the Δloss cache must not hand back round one)
    model = make_tiny_model("qwen2", num_hidden_layers=5, seed=3)
    ids = calibration_ids(n=4, length=16)
    removed, first_round = choose_layers_to_remove(model, ids, method, 3, iterative=True)
    assert first_round == ablation_deltas(model, ids, "layer")
    expected, pruned = [], copy.deepcopy(model)
    for _ in range(3):  # by hand: remove the least important layer of the model as it is now, and score again
        deltas = ablation_deltas(pruned, ids, "layer")
        k = min(range(len(deltas)), key=lambda i: deltas[i])
        kept = [i for i in range(5) if i not in expected]
        expected.append(kept[k])
        remove_layers(pruned, [k])
    assert removed == sorted(expected) and removed != sorted(sorted(range(5), key=lambda i: first_round[i])[:3])


def test_allocation_meets_budget_and_respects_limits():
    model = make_tiny_model("llama", num_hidden_layers=6, intermediate_size=128)
    units = list(all_units(model))
    total = count_parameters(model)
    prunable = [0] * 6
    for u in units:
        prunable[u.layer] += u.cost * u.count
    importance = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2]
    budget = round(0.2 * total)
    rates = allocate_rates(importance, prunable, budget, strategy="inverse", min_rate=0.05, max_rate=0.6, frozen={5})
    assert rates[5] == 0.0 and all(0.05 <= r <= 0.6 for r in rates[:5])
    assert rates[1] > rates[2]  # less important layer loses more
    assert sum(r * p for r, p in zip(rates, prunable)) == pytest.approx(budget, rel=1e-6)
    scores = {(u.layer, u.kind): torch.rand(u.count) * u.cost for u in units}
    selection = select_layerwise(units, normalized_values(units, scores, "none"), scores, rates, None, 1, 1)
    assert abs(selection.removed_params - budget) <= max(u.cost for u in units)
    assert len(selection.kept[(5, "mlp_channel")]) == 128 and len(selection.kept[(5, "kv_group")]) == 2
    with pytest.raises(PrunellmError, match="reachable"):
        allocate_rates(importance, prunable, round(0.95 * sum(prunable)), strategy="uniform", max_rate=0.5)
    with pytest.raises(PrunellmError, match="--min_pruning_rate"):
        allocate_rates(importance, prunable, budget, strategy="uniform", min_rate=0.6, max_rate=0.5)
    with pytest.raises(PrunellmError, match="--pruning_strategy"):
        allocate_rates(importance, prunable, budget, strategy="sideways")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from prunellm.models import load_tokenizer

    root = tmp_path_factory.mktemp("layers")
    tokenizer = load_tokenizer("smollm2-135m")
    make_tiny_model("llama", num_hidden_layers=4, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "text.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 200)
    return root


def test_layers_command_end_to_end(tiny_dir):
    code = main(["layers", "--base_model", str(tiny_dir / "tiny"), "--output_dir", str(tiny_dir / "r"), "--output_name", "d",
                 "--n_remove_layers", "1", "--dataset", str(tiny_dir / "text.txt"), "--num_samples", "4", "--seq_len", "32"])  # fmt: skip
    assert code == 0
    out = tiny_dir / "r" / "d"
    plan = json.loads((out / "plan.json").read_text())
    importance = json.loads((out / "layer_importance.json").read_text())
    assert len(plan["removed_layers"]) == 1 and plan["removed_layers"] == importance["removed_layers"]
    assert (out / "visualization" / "layer_importance.png").is_file()
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.num_hidden_layers == 3


def test_layer_pruning_script_flags(tiny_dir):
    argv = translate_seed_layer_flags([
        "--base_model", str(tiny_dir / "tiny"), "--save_ckpt_log_name", "alloc", "--pruning_ratio", "0.05",
        "--layer_importance_samples", "4", "--channel_importance_samples", "4", "--taylor_seq_len", "32",
        "--save_model", "--test_original_ppl", "True", "--eval_seq_len", "32", "--min_pruning_rate", "0.0",
        "--max_pruning_rate", "0.8", "--pruning_strategy", "inverse", "--pruning_distribution", "1:3",
        "--dataset", str(tiny_dir / "text.txt"), "--output_dir", str(tiny_dir / "r"), "--ppl_datasets", str(tiny_dir / "text.txt"),
        "--ppl_max_windows", "2", "--reconstruct", "none", "--units", "kv_group,mlp_channel",
    ])  # fmt: skip
    assert argv[:3] == ["prune", "--allocation", "layerwise"] and "--output_name" in argv and "--run_evaluation" in argv
    assert main(argv) == 0
    out = tiny_dir / "r" / "alloc"
    plan = json.loads((out / "plan.json").read_text())
    assert abs(plan["achieved_ratio"] - 0.05) < 0.01
    assert len(json.loads((out / "rounds" / "1" / "layer_importance.json").read_text())["pruning_rates"]) == 4  # 2 rounds
    assert (out / "evaluation_results.json").is_file() and (out / "evaluation_results_base.json").is_file()


def test_ablations_computed_in_bfloat16_rank_like_the_weights_dtype_and_leave_the_weights_alone(family):
    """``--prior_dtype bfloat16``: the sweep's layers compute in bfloat16 (each layer's weights cast while it runs);
    the deltas stay close to float32's and keep its order, the model keeps its float32 weights, and the cache keeps
    the two apart."""
    from prunellm.sweep import Offload

    model = make_tiny_model(family, num_hidden_layers=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = calibration_ids(n=4, length=16)
    exact = ablation_deltas_of(model, ids, ("layer", "mlp"), batch_size=2, measure="kl")
    half = ablation_deltas_of(model, ids, ("layer", "mlp"), batch_size=2, measure="kl", offload=Offload(device=None, dtype=torch.bfloat16))
    for target in ("layer", "mlp"):
        assert half[target] != exact[target]  # computed, not the float32 entry of the cache
        torch.testing.assert_close(torch.tensor(half[target]), torch.tensor(exact[target]), rtol=0.1, atol=1e-3)
        assert torch.tensor(half[target]).argmax() == torch.tensor(exact[target]).argmax()
    assert all(p.dtype == torch.float32 and torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_prior_dtype_is_refused_with_the_fisher_estimate():
    from prunellm.options import PruneRecipe
    from prunellm.pruner import check_prune_recipe

    with pytest.raises(PrunellmError, match="--prior_dtype bfloat16 sets the dtype of the ablations"):
        check_prune_recipe(PruneRecipe(prior_dtype="bfloat16", prior_measure="fisher"))
