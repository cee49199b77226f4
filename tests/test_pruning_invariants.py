"""Invariants of scoring → selection → surgery → checkpoint over every family × criterion."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import calibration_ids, make_tiny_model
from transformers import AutoModelForCausalLM

from prunellm.calibration import collect_gradient_stats
from prunellm.offload import activation_stats
from prunellm.checkpoint import load_checkpoint, save_model
from prunellm.criteria import CRITERIA, CriterionOptions, get_criterion
from prunellm.hf_modeling import ZeroAttention, ZeroMLP
from prunellm.priors import ablated
from prunellm.selection import SelectionConstraints, normalized_values, select_global
from prunellm.surgery import prune_units
from prunellm.units import all_units, count_parameters, decoder_layers, get_module, index_ranges, layer_units


def _scores(model, criterion: str, ids: torch.Tensor):
    units = list(all_units(model))
    c = get_criterion(criterion)
    if "gradients" in c.needs:
        stats = collect_gradient_stats(model, ids, units, terms=c.gradient_terms, batch_size=4)
    elif "activations" in c.needs:
        stats = activation_stats(model, ids, units, grams="gram" in c.activation_terms)
    else:
        stats = None
    return units, c.score(model, units, stats, CriterionOptions(seed=0))


def _prune(model, criterion: str, ratio: float = 0.2, **constraints):
    ids = calibration_ids(model.config.vocab_size)
    units, scores = _scores(model, criterion, ids)
    total = count_parameters(model)
    values = normalized_values(units, scores, "none")
    selection = select_global(units, values, scores, round(ratio * total), SelectionConstraints(**constraints), total)
    prune_units(model, selection.kept)
    return selection, total, units


@pytest.mark.parametrize("criterion", CRITERIA)
def test_grid_forward_count_and_roundtrip(family, criterion, tmp_path):
    model = make_tiny_model(family)
    selection, total, units = _prune(model, criterion)
    ids = calibration_ids(model.config.vocab_size, n=2, length=16, seed=5)
    # parameter count equals the plan's accounting, within one unit of the target
    assert count_parameters(model) == total - selection.removed_params
    largest_unit = max(u.cost for u in units)
    assert abs(selection.removed_params - selection.target_params) <= largest_unit
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # no zeros left behind: removed rows are gone, not masked
    for unit in all_units(model):
        assert unit.count == len(selection.kept[(unit.layer, unit.kind)])
    # save -> load, both ways, identical logits
    save_model(model, None, tmp_path / "model")
    ours = load_checkpoint(tmp_path / "model")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    torch.testing.assert_close(ours(ids).logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(theirs(ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("emptied", [False, True], ids=["partial", "emptied"])
@pytest.mark.parametrize("allocation", ["global", "layerwise"])
def test_grid_allocation_parameter_count_equals_the_plan(family, allocation, emptied, tmp_path):
    """Every family (llama: attention and MLP biases) × allocation, with and without a block losing every unit.

    An emptied block becomes a zero-output block and takes its own parameters with it (down_proj's and
    o_proj's bias, q/k head norms): the plan's accounting must count them, or the run stops after scoring.
    """
    from prunellm.layers import select_layerwise

    model = make_tiny_model(family)
    ids = calibration_ids(model.config.vocab_size)
    units, scores = _scores(model, "taylor", ids)
    total = count_parameters(model)
    values = normalized_values(units, scores, "none")
    if allocation == "global":
        target = round(0.2 * total)
        if emptied:  # layer 0's blocks rank lowest and the budget is exactly all of layer 0
            values = {key: (value - value.max() - 1 if key[0] == 0 else value) for key, value in values.items()}
            target = sum(u.removed_cost(u.count) for u in units if u.layer == 0)
        selection = select_global(units, values, scores, target, SelectionConstraints(min_kv_groups=0 if emptied else 1), total)
    else:
        rates = [1.0, 0.1] if emptied else [0.3, 0.1]
        selection = select_layerwise(units, values, scores, rates, None, 0 if emptied else 1, 1)
    prune_units(model, selection.kept)
    layer0 = decoder_layers(model)[0]
    assert isinstance(get_module(layer0, "mlp"), ZeroMLP) == emptied
    assert isinstance(get_module(layer0, "self_attn"), ZeroAttention) == emptied
    assert count_parameters(model) == total - selection.removed_params
    logits = model(calibration_ids(model.config.vocab_size, n=2, length=16, seed=5)).logits
    assert torch.isfinite(logits).all()
    save_model(model, None, tmp_path / "model")
    assert count_parameters(load_checkpoint(tmp_path / "model")) == total - selection.removed_params


def _zero_units(model, layer: int, kind: str, indices: list[int]) -> None:
    """Zero every weight and bias a set of unit indices owns (what pruning them would remove)."""
    units = layer_units(model, layer, kind)
    block = decoder_layers(model)[layer]
    with torch.no_grad():
        for s in units.slices:
            linear = get_module(block, s.module)
            rows = index_ranges(torch.tensor(indices), s.width)
            if s.dim == 0:
                linear.weight[rows] = 0
                if linear.bias is not None:
                    linear.bias[rows] = 0
            else:
                linear.weight[:, rows] = 0


def test_pruning_zeroed_units_leaves_logits_unchanged(family):
    model = make_tiny_model(family)
    ids = calibration_ids(model.config.vocab_size, n=2, length=16, seed=3)
    # a whole KV group of layer 0 and a few MLP channels of layer 1 contribute nothing once zeroed...
    # (qwen2's q/k/v biases are zeroed too; o_proj has no per-group bias)
    _zero_units(model, 0, "kv_group", [1])
    _zero_units(model, 1, "mlp_channel", [0, 5, 17])
    before = model(ids).logits
    n_kv = layer_units(model, 0, "kv_group").count
    width = layer_units(model, 1, "mlp_channel").count
    kept = {(0, "kv_group"): [i for i in range(n_kv) if i != 1], (1, "mlp_channel"): [i for i in range(width) if i not in (0, 5, 17)]}
    prune_units(model, kept)
    # ...so physically removing them leaves the logits as they were
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["attention", "mlp"])
def test_zero_output_block_equals_removing_the_block(family, target, tmp_path):
    model = make_tiny_model(family)
    ids = calibration_ids(model.config.vocab_size, n=2, length=16, seed=4)
    with ablated(model, 1, target):
        expected = model(ids).logits
    kind = "kv_group" if target == "attention" else "mlp_channel"
    prune_units(model, {(1, kind): []})
    module = ZeroAttention if target == "attention" else ZeroMLP
    assert isinstance(get_module(decoder_layers(model)[1], "self_attn" if target == "attention" else "mlp"), module)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    save_model(model, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_generate_with_cache_on_nonuniform_and_empty_attention():
    model = make_tiny_model("llama")
    prune_units(model, {(0, "kv_group"): [], (1, "kv_group"): [1], (1, "mlp_channel"): list(range(0, 96, 2))})
    prompt = calibration_ids(128, n=1, length=8, seed=9)
    with_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_uniform_plan_needs_no_remote_code(tmp_path):
    model = make_tiny_model("mistral")
    prune_units(model, {(0, "kv_group"): [0], (1, "kv_group"): [1], (0, "mlp_channel"): list(range(48)), (1, "mlp_channel"): list(range(48, 96))})
    save_model(model, None, tmp_path / "m")
    assert not (tmp_path / "m" / "modeling_prunellm.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # no trust_remote_code
    ids = calibration_ids(128, n=1, length=8)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert reloaded.config.num_key_value_heads == 1 and reloaded.config.intermediate_size == 48


def test_remote_code_loads_without_prunellm(tmp_path):
    model = make_tiny_model("qwen3")
    _prune(model, "magnitude", ratio=0.25)
    save_model(model, None, tmp_path / "m")
    ids = calibration_ids(128, n=1, length=8)
    torch.save(model(ids).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys; sys.modules['prunellm'] = None\n"  # any import of prunellm now fails
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'm'}', trust_remote_code=True).eval()\n"
        f"ids = torch.load(r'{tmp_path / 'ids.pt'}')\n"
        f"torch.testing.assert_close(m(ids).logits, torch.load(r'{tmp_path / 'expected.pt'}'), rtol=0, atol=0)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_every_parameter_has_a_role(family):
    """Every parameter is sliced by a unit, a hidden-sized norm, a head norm, or the embeddings/head."""
    from prunellm.specs import spec_for

    model = make_tiny_model(family)
    spec = spec_for(model.config)
    covered = {f"{spec.embed}.weight", f"{spec.lm_head}.weight", f"{spec.final_norm}.weight"}
    for unit in all_units(model):
        for s in unit.slices:
            covered |= {f"{spec.layers}.{unit.layer}.{s.module}.weight", f"{spec.layers}.{unit.layer}.{s.module}.bias"}
    for layer in range(len(decoder_layers(model))):
        for norm in spec.layer_norms:
            covered.add(f"{spec.layers}.{layer}.{norm}.weight")
        for norm in spec.attention.head_norms:
            covered.add(f"{spec.layers}.{layer}.{spec.attention.module}.{norm}.weight")
        # o_proj's bias is hidden-sized and shared by all groups: untouched
        covered.add(f"{spec.layers}.{layer}.{spec.attention.module}.{spec.attention.o}.bias")
        covered.add(f"{spec.layers}.{layer}.{spec.mlp.module}.{spec.mlp.down}.bias")
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert names - covered == set()


@pytest.mark.parametrize("reconstruct", ["none", "lstsq_bias"])
def test_a_plan_in_rounds_applies_round_by_round_and_composes_to_original_indices(family, reconstruct, tmp_path):
    """Two rounds of random kept indices (KV groups and MLP channels): the plan's composition names the original
    units the model keeps; without reconstruction the result equals the composed plan applied at once, with it
    each round is refitted, and either way the count matches and the checkpoint round-trips."""
    from prunellm import api as pl
    from prunellm.plan import LayerPlan, RoundPlan, compose_rounds, kept_units_of

    generator = torch.Generator().manual_seed(0)
    model = make_tiny_model(family)
    ids = calibration_ids(model.config.vocab_size)

    def random_round(current) -> list[LayerPlan]:
        layers = []
        for index in range(len(decoder_layers(current))):
            kv, mlp = (layer_units(current, index, kind).count for kind in ("kv_group", "mlp_channel"))
            keep = lambda n, k: sorted(torch.randperm(n, generator=generator)[:k].tolist())  # noqa: E731
            layers.append(LayerPlan(kv_groups=keep(kv, max(1, kv - 1)), mlp_channels=keep(mlp, mlp - 16)))
        return layers

    first = random_round(model)
    shrunk = make_tiny_model(family)  # the model after round 1, to draw round 2 from
    total = count_parameters(model)
    prune_units(shrunk, kept_units_of(first))
    rounds = [RoundPlan(first, total, count_parameters(shrunk))]
    second = random_round(shrunk)
    prune_units(shrunk, kept_units_of(second))
    rounds.append(RoundPlan(second, rounds[0].params_after, count_parameters(shrunk)))
    composed = compose_rounds([first, second])
    plan = pl.plan_from_kept(model, {}, criterion="random", target_ratio=0.1, removed_params=total - count_parameters(shrunk))
    plan.layers, plan.rounds = composed, rounds
    report = pl.prune(model, plan, calibration=ids, reconstruct=reconstruct)
    assert plan.layers == composed
    assert count_parameters(model) == plan.params_after + report["added_params"]
    for index, layer in enumerate(composed):
        assert layer_units(model, index, "mlp_channel").count == len(layer.mlp_channels)
        assert all(0 <= i < layer_units(make_tiny_model(family), index, "mlp_channel").count for i in layer.mlp_channels)
    if reconstruct == "none":
        at_once = make_tiny_model(family)
        prune_units(at_once, plan.kept_units())
        with torch.no_grad():
            assert torch.equal(model(ids[:2]).logits, at_once(ids[:2]).logits)
    else:
        assert {entry["round"] for entry in report["layers"]} == {1, 2}
    save_model(model, None, tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(model(ids[:2]).logits, load_checkpoint(tmp_path / "m")(ids[:2]).logits, atol=1e-5)
