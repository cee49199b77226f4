"""Global selection: budget accuracy, constraints, frozen layers, unreachable targets."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from prunellm.errors import PrunellmError
from prunellm.priors import prior_multipliers, resolve_tau
from prunellm.selection import SelectionConstraints, normalized_values, select_global
from prunellm.units import all_units, count_parameters


def _setup(seed: int = 0, layers: int = 4):
    model = make_tiny_model("llama", num_hidden_layers=layers)
    units = list(all_units(model))
    generator = torch.Generator().manual_seed(seed)
    scores = {(u.layer, u.kind): torch.rand(u.count, generator=generator) * u.cost for u in units}
    return model, units, scores, count_parameters(model)


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4])
def test_removed_params_within_one_unit_of_target(ratio):
    model, units, scores, total = _setup()
    values = normalized_values(units, scores, "none")
    target = round(ratio * total)
    selection = select_global(units, values, scores, target, SelectionConstraints(), total)
    assert abs(selection.removed_params - target) <= max(u.cost for u in units)
    removed = sum(u.cost * (u.count - len(selection.kept[(u.layer, u.kind)])) for u in units)
    assert removed == selection.removed_params


def test_lowest_value_units_go_first():
    model, units, scores, total = _setup()
    values = normalized_values(units, scores, "none")
    selection = select_global(units, values, scores, round(0.1 * total), SelectionConstraints(), total)
    removed = [row["value"] for row in selection.table if row["removed"]]
    kept = [row["value"] for row in selection.table if not row["removed"] and row["unit"] == "mlp_channel"]
    # every removed MLP channel is worth less per parameter than every kept one (KV groups may be skipped
    # when they would overshoot the budget, MLP channels never are at this ratio)
    removed_mlp = [row["value"] for row in selection.table if row["removed"] and row["unit"] == "mlp_channel"]
    assert removed and max(removed_mlp) <= min(kept)


def test_round_to_and_min_kv_groups():
    model, units, scores, total = _setup()
    values = normalized_values(units, scores, "none")
    constraints = SelectionConstraints(min_kv_groups=2, round_to=8)
    selection = select_global(units, values, scores, round(0.3 * total), constraints, total)
    for (layer, kind), kept in selection.kept.items():
        if kind == "mlp_channel":
            assert len(kept) % 8 == 0
        else:
            assert len(kept) == 2  # tiny models have 2 KV groups: none may go


def test_unreachable_ratio_names_the_maximum():
    model, units, scores, total = _setup()
    values = normalized_values(units, scores, "none")
    with pytest.raises(PrunellmError, match=r"unreachable.*at most 0\.\d+"):
        select_global(units, values, scores, round(0.9 * total), SelectionConstraints(), total)


def test_normalization_block_gives_every_block_mean_one():
    model, units, scores, total = _setup()
    values = normalized_values(units, scores, "block")
    for value in values.values():
        assert float(value.mean()) == pytest.approx(1.0)
    with pytest.raises(PrunellmError, match="--normalization"):
        normalized_values(units, scores, "bogus")


def test_normalization_standard_z_scores_each_kind_over_all_layers():
    model, units, scores, total = _setup()
    values = normalized_values(units, scores, "standard")
    for kind in ("kv_group", "mlp_channel"):
        pooled = torch.cat([v for (layer, k), v in values.items() if k == kind])
        assert abs(float(pooled.mean())) < 1e-9 and abs(float(pooled.std(unbiased=False)) - 1) < 1e-9
    # a z-score keeps the order of importance per parameter within a kind, across layers
    per_param = torch.cat([scores[key].double() / u.cost for u in units for key in [(u.layer, u.kind)] if u.kind == "mlp_channel"])
    z = torch.cat([values[(u.layer, u.kind)] for u in units if u.kind == "mlp_channel"])
    assert torch.equal(torch.argsort(per_param), torch.argsort(z))


def test_normalization_block_standard_z_scores_each_block():
    model, units, scores, total = _setup()
    values = normalized_values(units, scores, "block_standard")
    for value in values.values():
        assert abs(float(value.mean())) < 1e-9 and abs(float(value.std(unbiased=False)) - 1) < 1e-9


def test_normalization_uniform_removes_the_same_share_of_every_mlp_block():
    model, units, scores, total = _setup()
    values = normalized_values(units, scores, "uniform")
    selection = select_global(units, values, scores, round(0.1 * total), SelectionConstraints(), total)
    shares = {len(selection.kept[(u.layer, u.kind)]) for u in units if u.kind == "mlp_channel"}
    assert max(shares) - min(shares) <= 1


def test_uniform_with_a_prior_cuts_each_block_in_inverse_proportion_to_it():
    model, units, scores, total = _setup()
    mlp = [u for u in units if u.kind == "mlp_channel"]
    priors = {(u.layer, u.kind): 1.0 for u in units}
    priors[(mlp[0].layer, "mlp_channel")] = 2.0  # twice as costly to remove: about half the share of the others
    values = normalized_values(units, scores, "uniform", priors)
    selection = select_global(units, values, scores, round(0.1 * total), SelectionConstraints(), total)
    removed = {u.layer: u.count - len(selection.kept[(u.layer, u.kind)]) for u in mlp}
    others = [removed[u.layer] for u in mlp[1:]]
    assert max(others) - min(others) <= 1
    assert abs(removed[mlp[0].layer] - others[0] / 2) <= 1


def test_nonfinite_scores_are_refused_with_the_layer():
    model, units, scores, total = _setup()
    scores[(2, "mlp_channel")][3] = float("nan")
    with pytest.raises(PrunellmError, match="layer 2"):
        normalized_values(units, scores, "none")


def test_priors_switch_between_layer_and_block():
    layer, attn, mlp = [0.0, 0.5, 2.0], [0.1, 0.2, 0.3], [1.0, 1.5, 3.0]
    mult = prior_multipliers(layer, attn, mlp, temperature=1.0, tau=1.0)
    import math

    assert mult[(0, "kv_group")] == 0.0  # a layer whose removal costs nothing gets prior 0
    assert mult[(1, "mlp_channel")] == pytest.approx(math.log1p(0.5))  # below tau: layer prior
    assert mult[(2, "kv_group")] == pytest.approx(math.log1p(0.3))  # above tau: the block's own
    assert resolve_tau("auto", [0.0, 1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.0)
    assert resolve_tau("-inf", layer) == float("-inf")
    with pytest.raises(PrunellmError, match="--tau"):
        resolve_tau("sometimes", layer)


def test_matched_temperature_makes_the_priors_spread_the_scores_spread():
    from prunellm.priors import matched_temperature, spread

    # 11 blocks (p10/p90 fall on data points): ln(1+Δ) from 0.1 to 2.1, scores spreading x3 within every block
    base = {(layer, "mlp_channel"): 0.1 + 0.2 * layer for layer in range(11)}
    values = {key: torch.linspace(1.0, 3.5, 11) for key in base}  # p10 = 1.25, p90 = 3.25
    t = matched_temperature(base, values)
    tempered = torch.tensor([v**t for v in base.values()], dtype=torch.float64)
    assert spread(tempered) == pytest.approx(3.25 / 1.25, rel=1e-9)
    assert 0.0 < t < 1.0  # the prior spreads x6.3, the scores x2.6
    assert matched_temperature({k: 1.0 for k in base}, values) == 0.0  # a flat prior has nothing to say
    assert matched_temperature(base, {k: torch.ones(11) for k in base}) == 0.0  # nor do tied scores
