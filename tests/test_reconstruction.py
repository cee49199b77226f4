"""Retraining-free reconstruction: exactness where it must be exact, never worse, never NaN."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_ids, make_tiny_model
from transformers import AutoModelForCausalLM

from prunellm import reconstruction
from prunellm.checkpoint import load_checkpoint, save_model
from prunellm.errors import PrunellmError
from prunellm.reconstruction import (
    DAMP_GRID, InputStats, _System, choose_damp, compensate_projection, prune_with_reconstruction, resolve_select, solve_lstsq,
)  # fmt: skip
from prunellm.surgery import prune_units
from prunellm.units import count_parameters, decoder_layers, layer_units


def _kept_mlp(model, layer: int, drop_every: int = 3) -> list[int]:
    width = layer_units(model, layer, "mlp_channel").count
    return [i for i in range(width) if i % drop_every]


def _capture(model, module, ids):
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(seen)


def test_lstsq_with_nothing_removed_returns_the_weights():
    torch.manual_seed(0)
    x = torch.randn(400, 12, dtype=torch.float64)
    weight = torch.randn(5, 12)
    solution, _ = solve_lstsq(weight, x.T @ x, torch.arange(12), damp=1e-8)
    torch.testing.assert_close(solution.float(), weight, rtol=1e-5, atol=1e-5)
    model = make_tiny_model("llama")
    ids = calibration_ids()
    before = model(ids).logits
    kept = {(i, k): list(range(layer_units(model, i, k).count)) for i in range(2) for k in ("kv_group", "mlp_channel")}
    prune_with_reconstruction(model, kept, ids, "lstsq", damp=1e-8)
    torch.testing.assert_close(model(ids).logits, before)
    prune_with_reconstruction(model, kept, ids, "lstsq", damp="auto")
    torch.testing.assert_close(model(ids).logits, before)


def test_ridge_pulls_toward_the_original_columns():
    torch.manual_seed(0)
    x = torch.randn(500, 10, dtype=torch.float64)
    x[:, 7] = x[:, 2] + 0.1 * x[:, 7]  # a removed column the kept ones can stand in for
    weight = torch.randn(4, 10)
    kept = torch.tensor([0, 1, 2, 3, 4, 5])
    gram = x.T @ x
    tiny, _ = solve_lstsq(weight, gram, kept, damp=1e-10)
    plain = torch.linalg.lstsq(x[:, kept], x @ weight.double().T).solution.T  # the unregularised refit
    torch.testing.assert_close(tiny, plain, rtol=1e-6, atol=1e-6)
    huge, _ = solve_lstsq(weight, gram, kept, damp=1e8)
    torch.testing.assert_close(huge, weight.double()[:, kept], rtol=1e-5, atol=1e-5)
    middle, _ = solve_lstsq(weight, gram, kept, damp=1.0)
    between = (middle - weight.double()[:, kept]).norm()
    assert 0 < between < (plain - weight.double()[:, kept]).norm()


def test_auto_damp_refits_when_it_generalises_and_leaves_the_weights_when_not():
    torch.manual_seed(0)
    weight = torch.randn(4, 10)
    kept = torch.arange(6)
    # same distribution in both folds, removed columns predictable from kept ones: a refit helps held-out data
    folds = []
    for _ in range(2):
        x = torch.randn(400, 10, dtype=torch.float64)
        x[:, 6:] = x[:, :4] + 0.05 * x[:, 6:]
        folds.append(x.T @ x)
    chosen, errors = choose_damp(weight, folds, kept)
    assert chosen in DAMP_GRID and errors["cv_error"][str(chosen)] < errors["cv_error_no_refit"]
    # the removed columns track the kept ones with opposite signs in the two folds: what one fold teaches
    # hurts the other, so no damping beats leaving the weights as they are
    folds = []
    for sign in (1.0, -1.0):
        x = torch.randn(400, 10, dtype=torch.float64)
        x[:, 6:] = sign * x[:, :4] + 0.05 * x[:, 6:]
        folds.append(x.T @ x)
    chosen, errors = choose_damp(weight, folds, kept)
    assert chosen is None


@pytest.mark.parametrize("noise", [0.02, 3.0, 30.0])  # the minimum at λ = 0.01, 1 and 10
def test_the_damping_walk_finds_the_grid_minimum_with_fewer_solves(noise):
    """Walking the grid downhill from λ = 1 chooses what trying every λ would, here with its minimum at either end or
    inside, and solves for fewer λ than the grid holds."""
    torch.manual_seed(1)
    weight = torch.randn(6, 24)
    kept = torch.arange(16)
    folds = []
    for _ in range(2):
        x = torch.randn(60, 24, dtype=torch.float64)
        x[:, 16:] = x[:, :8] + noise * torch.randn(60, 8, dtype=torch.float64)  # removed columns: kept ones + noise
        folds.append(x.T @ x)
    chosen, errors = choose_damp(weight, folds, kept)
    exhaustive = {}
    for damp in DAMP_GRID:
        systems = [_System.build(gram, weight, kept) for gram in folds]
        exhaustive[damp] = sum(held.error((systems[1 - i]).solve(weight[:, kept], damp)[0]) for i, held in enumerate(systems))
    best = min(exhaustive, key=exhaustive.get)
    assert chosen == best
    assert errors["cv_error"][str(best)] == pytest.approx(exhaustive[best], rel=1e-3)  # the walk ranks in float32
    assert len(errors["cv_error"]) < len(DAMP_GRID)


def test_the_gram_summed_from_its_upper_blocks_is_xtx():
    xs = [torch.randn(37, 11), torch.randn(5, 11)]
    total = torch.zeros(11, 11, dtype=torch.float64)
    for x in xs:
        reconstruction._add_gram_upper(total, x)
    expected = sum((x.T @ x).double() for x in xs)
    torch.testing.assert_close(reconstruction._mirrored(total), expected, rtol=1e-5, atol=1e-4)


def test_a_float32_search_solves_a_system_too_ill_conditioned_for_float32_in_float64():
    torch.manual_seed(2)
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 5] = x[:, 4] + 1e-5 * x[:, 5]  # two nearly equal columns: fine for float64, singular for float32
    system = _System.build(x.T @ x, torch.randn(3, 6), torch.arange(6))
    solution, used = system.cast(torch.float32).solve(torch.randn(3, 6), 1e-9)
    assert solution.dtype == torch.float64 and torch.isfinite(solution).all()


def test_auto_damp_keeps_original_weights_when_cross_validation_says_so():
    linear = torch.nn.Linear(10, 4, bias=False)
    grams = []
    for sign in (1.0, -1.0):
        x = torch.randn(300, 10, dtype=torch.float64)
        x[:, 6:] = sign * x[:, :4] + 0.05 * x[:, 6:]
        grams.append(x.T @ x)
    stats = InputStats(sum=torch.zeros(10, dtype=torch.float64), gram=grams[0] + grams[1], tokens=600, fold_grams=grams)
    weight, bias, report = compensate_projection(linear, stats, torch.arange(6), "lstsq", damp="auto")
    assert report["kept_original"] and report["damp"] is None and bias is None
    torch.testing.assert_close(weight, linear.weight.detach()[:, :6])


def test_replaying_a_pruned_layer_from_its_statistics_pass_equals_running_it(family, monkeypatch):
    """The next layer's inputs come from the down projection's statistics pass (the attention's output and the
    channels' inputs kept, the refitted projection applied) instead of a second run of the layer: the same hidden
    states as running the pruned, refitted layer, in every layer of every family."""
    model = make_tiny_model(family)
    layers = len(decoder_layers(model))
    kept = {(layer, "mlp_channel"): _kept_mlp(model, layer, 2 + layer) for layer in range(layers)}
    kept[(0, "kv_group")] = [0]  # the attention pruned and refitted first: the replay must see its new output
    replay, replayed = reconstruction._Replay.run, []

    def checked(self, layer, index, kwargs_list, hidden, columns):
        outputs = replay(self, layer, index, kwargs_list, hidden, columns)
        for output, rerun in zip(outputs, reconstruction._run_layer(layer, index, hidden, kwargs_list), strict=True):
            torch.testing.assert_close(output, rerun, rtol=1e-5, atol=1e-6)
        replayed.append(index)
        return outputs

    monkeypatch.setattr(reconstruction._Replay, "run", checked)
    prune_with_reconstruction(model, kept, calibration_ids(n=4, length=16), "lstsq_bias", damp="auto", batch_size=2)
    assert replayed == list(range(layers))
    assert not any("forward" in vars(module) for module in model.modules())  # the classes' forwards again


def test_auto_damp_on_a_pruned_model_lowers_calibration_error_and_works_with_one_batch(family):
    model = make_tiny_model(family)
    ids = calibration_ids(n=3, length=32)  # 3 windows: split into 2 batches for the cross-validation
    report = prune_with_reconstruction(model, {(0, "mlp_channel"): _kept_mlp(model, 0, 2)}, ids, "lstsq", damp="auto", batch_size=8)
    entry = report.layers[0]["mlp_channel"]
    assert entry["error_after"] <= entry["error_before"] and "cv_relative_error" in entry
    assert torch.isfinite(model(ids).logits).all()


def test_bias_compensation_preserves_the_mean_output(family):
    model = make_tiny_model(family)
    ids = calibration_ids(n=8, length=32)
    down = decoder_layers(model)[0].mlp.down_proj
    mean_before = _capture(model, down, ids).mean(0)
    prune_with_reconstruction(model, {(0, "mlp_channel"): _kept_mlp(model, 0)}, ids, "bias", batch_size=4)
    down = decoder_layers(model)[0].mlp.down_proj
    torch.testing.assert_close(_capture(model, down, ids).mean(0), mean_before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp_channel", "kv_group"])
def test_lstsq_never_increases_the_layer_error(family, kind):
    model = make_tiny_model(family)
    reference = make_tiny_model(family)
    ids = calibration_ids(n=16, length=32)
    count = layer_units(model, 0, kind).count
    keep = [0] if kind == "kv_group" else _kept_mlp(model, 0, 2)
    proj = decoder_layers(reference)[0].self_attn.o_proj if kind == "kv_group" else decoder_layers(reference)[0].mlp.down_proj
    target = _capture(reference, proj, ids)  # the unpruned projection's output on the same calibration
    plain = make_tiny_model(family)
    prune_units(plain, {(0, kind): keep})
    report = prune_with_reconstruction(model, {(0, kind): keep}, ids, "lstsq", damp=1e-4)
    proj_of = lambda m: decoder_layers(m)[0].self_attn.o_proj if kind == "kv_group" else decoder_layers(m)[0].mlp.down_proj  # noqa: E731
    err_plain = (_capture(plain, proj_of(plain), ids) - target).pow(2).sum()
    err_lstsq = (_capture(model, proj_of(model), ids) - target).pow(2).sum()
    assert count > len(keep)
    assert err_lstsq <= err_plain * (1 + 1e-6)
    entry = report.layers[0][kind]
    assert entry["error_after"] <= entry["error_before"]


def test_rank_deficient_inputs_stay_finite():
    torch.manual_seed(1)
    base = torch.randn(300, 4, dtype=torch.float64)
    x = torch.cat([base, base, base[:, :2]], dim=1)  # 10 columns of rank 4: singular Gram
    linear = torch.nn.Linear(10, 6, bias=False)
    stats = InputStats(sum=x.sum(0), gram=x.T @ x, tokens=300)
    weight, bias, report = compensate_projection(linear, stats, torch.tensor([0, 1, 2, 5, 7]), "lstsq", damp=0.0)
    assert torch.isfinite(weight).all() and bias is None
    assert report["damp"] > 0  # raised automatically
    assert report["error_after"] <= report["error_before"]


def test_too_few_tokens_is_refused():
    linear = torch.nn.Linear(10, 6, bias=False)
    x = torch.randn(4, 10, dtype=torch.float64)
    stats = InputStats(sum=x.sum(0), gram=x.T @ x, tokens=4)
    with pytest.raises(PrunellmError, match="at least 8 tokens"):
        compensate_projection(linear, stats, torch.arange(8), "lstsq", damp=0.01)


@pytest.mark.parametrize("kind", ["mlp_channel", "kv_group"])
def test_lstsq_bias_error_is_at_most_that_of_bias_and_of_lstsq(family, kind):
    """The intercept refit solves over a space holding both the bias shift and the plain refit."""
    ids = calibration_ids(n=16, length=32)
    keep = [0] if kind == "kv_group" else _kept_mlp(make_tiny_model(family), 0, 2)
    proj_of = lambda m: decoder_layers(m)[0].self_attn.o_proj if kind == "kv_group" else decoder_layers(m)[0].mlp.down_proj  # noqa: E731
    reference = make_tiny_model(family)
    target = _capture(reference, proj_of(reference), ids)
    errors = {}
    for mode in ("bias", "lstsq", "lstsq_bias"):
        model = make_tiny_model(family)
        prune_with_reconstruction(model, {(0, kind): keep}, ids, mode, damp=1e-6)
        errors[mode] = float((_capture(model, proj_of(model), ids) - target).pow(2).sum())
    assert errors["lstsq_bias"] <= min(errors["bias"], errors["lstsq"]) * (1 + 1e-4) + 1e-9


@pytest.mark.parametrize("damp", [float("inf"), 1e6])
def test_lstsq_bias_ridge_leaves_the_intercept_free_so_heavy_damping_gives_bias_compensation(damp):
    """Ridge regression does not shrink its intercept: λ → ∞ keeps W_S and moves the bias by Σ_removed W_j·mean(x_j),
    FLAP's compensation, instead of shrinking the bias back to the original one."""
    torch.manual_seed(3)
    x = torch.randn(500, 10, dtype=torch.float64) + torch.linspace(-2, 3, 10, dtype=torch.float64)  # non-zero means
    linear = torch.nn.Linear(10, 6).double()
    stats = InputStats(sum=x.sum(0), gram=x.T @ x, tokens=500)
    kept = torch.tensor([0, 2, 3, 5, 8])
    weight, bias, _ = compensate_projection(linear, stats, kept, "lstsq_bias", damp=damp)
    removed = torch.tensor([1, 4, 6, 7, 9])
    flap = linear.bias.detach() + linear.weight.detach()[:, removed] @ x.mean(0)[removed]
    torch.testing.assert_close(weight, linear.weight.detach()[:, kept], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias, flap, rtol=1e-4, atol=1e-5)


def test_auto_damp_may_choose_bias_compensation_alone():
    """Where no refit of the kept columns generalises (they carry only noise the removed ones shared), cross-validation
    keeps W_S and the shifted intercept (λ = ∞) rather than the unshifted original."""
    torch.manual_seed(4)
    signal = torch.randn(64, 1, dtype=torch.float64)
    x = torch.cat([torch.randn(64, 8, dtype=torch.float64) * 0.01 + 5.0, signal], 1)  # constant-ish inputs, few tokens
    linear = torch.nn.Linear(9, 4).double()
    grams = [x[:32].T @ x[:32], x[32:].T @ x[32:]]
    stats = InputStats(sum=x.sum(0), gram=grams[0] + grams[1], tokens=64, fold_grams=grams,
                       fold_sums=[x[:32].sum(0), x[32:].sum(0)], fold_tokens=[32, 32])  # fmt: skip
    kept = torch.arange(4)
    weight, bias, report = compensate_projection(linear, stats, kept, "lstsq_bias", damp="auto")
    cv = report["cv_relative_error"]
    assert "inf" in cv and cv["inf"] < cv["no_refit"]
    assert bias is not None and not torch.allclose(bias, linear.bias.detach())


@pytest.mark.parametrize("mode", ["bias", "lstsq", "lstsq_bias"])
def test_reconstructed_checkpoint_loads_both_ways(mode, tmp_path):
    model = make_tiny_model("mistral")  # no biases anywhere: bias compensation must add them
    ids = calibration_ids(n=8, length=32)
    kept = {(0, "mlp_channel"): _kept_mlp(model, 0), (1, "kv_group"): [1], (1, "mlp_channel"): _kept_mlp(model, 1, 4)}
    prune_with_reconstruction(model, kept, ids, mode)
    logits = model(ids[:2]).logits
    assert torch.isfinite(logits).all()
    save_model(model, None, tmp_path / "m")
    torch.testing.assert_close(load_checkpoint(tmp_path / "m")(ids[:2]).logits, logits, rtol=0, atol=0)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    torch.testing.assert_close(theirs(ids[:2]).logits, logits, rtol=0, atol=0)
    assert count_parameters(theirs) == count_parameters(model)


def test_layer_inputs_follow_each_layers_own_mask_with_mixed_layer_types():
    """Sliding-window and full-attention layers get different masks: replaying the layers from the captured
    inputs must reproduce the model's own hidden states (with layer 0's arguments everywhere it would not)."""
    from prunellm.calibration import run_block
    from prunellm.reconstruction import capture_layer_inputs

    model = make_tiny_model("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    ids = calibration_ids(n=4, length=24)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states  # embeddings, after layer 0, 1, (norm)
    hidden, kwargs = capture_layer_inputs(model, ids, batch_size=2)
    layers = decoder_layers(model)
    with torch.no_grad():
        own = torch.cat([run_block(layers[1], run_block(layers[0], h, kw[0]), kw[1]) for h, kw in zip(hidden, kwargs)])
        first_only = torch.cat([run_block(layers[1], run_block(layers[0], h, kw[0]), kw[0]) for h, kw in zip(hidden, kwargs)])
    torch.testing.assert_close(own, expected[2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first_only, expected[2], atol=1e-3)


def _zero_units(model, kept):
    """Zero what the pruned units contribute (their o_proj/down_proj input columns): removing them changes nothing."""
    for (layer, kind), indices in kept.items():
        units = layer_units(model, layer, kind)
        proj = decoder_layers(model)[layer].self_attn.o_proj if kind == "kv_group" else decoder_layers(model)[layer].mlp.down_proj
        width = next(s.width for s in units.slices if s.module.endswith("o_proj" if kind == "kv_group" else "down_proj"))
        with torch.no_grad():
            for unit in set(range(units.count)) - set(indices):
                proj.weight[:, unit * width : (unit + 1) * width] = 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # without biases, with q/k/v biases, with head norms
@pytest.mark.parametrize("target,mode", [("dense", "lstsq"), ("residual", "lstsq_bias"), ("residual", "bias")])
def test_targets_change_nothing_when_the_pruned_units_contribute_nothing(family, mode, target):
    model = make_tiny_model(family)
    ids = calibration_ids(n=8, length=32)
    kept = {(0, "kv_group"): [0], (0, "mlp_channel"): _kept_mlp(model, 0), (1, "mlp_channel"): _kept_mlp(model, 1, 2)}
    _zero_units(model, kept)
    with torch.no_grad():
        before = model(ids).logits
    prune_with_reconstruction(model, kept, ids, mode, damp=1e-3, target=target, refit_unpruned=True)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_an_explicit_target_equal_to_the_projection_output_gives_the_implicit_refit():
    """Xᵀ Y with Y = X Wᵀ + b is the system the implicit path builds: the same solution, bias or not."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(10, 4, bias=True)
    x = torch.randn(600, 10, dtype=torch.float64)
    y = x @ linear.weight.detach().double().T + linear.bias.detach().double()
    implicit = InputStats(sum=x.sum(0), gram=x.T @ x, tokens=600)
    explicit = InputStats(sum=x.sum(0), gram=x.T @ x, tokens=600, cross=x.T @ y, target_sq=float(y.square().sum()), target_sum=y.sum(0))
    kept = torch.tensor([0, 1, 2, 3, 5, 8])
    for mode in ("bias", "lstsq", "lstsq_bias"):
        w_i, b_i, _ = compensate_projection(linear, implicit, kept, mode, damp=0.01)
        w_e, b_e, _ = compensate_projection(linear, explicit, kept, mode, damp=0.01)
        torch.testing.assert_close(w_e, w_i, rtol=1e-5, atol=1e-6)
        if b_i is None:
            assert b_e is None
        else:
            torch.testing.assert_close(b_e, b_i, rtol=1e-5, atol=1e-6)


def _last_hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_residual_target_tracks_the_dense_stream_better_than_the_pruned_target(family):
    ids = calibration_ids(n=16, length=32)
    dense = make_tiny_model(family)
    reference = _last_hidden(dense, ids)
    kept = {(i, "mlp_channel"): _kept_mlp(dense, i, 2) for i in range(2)} | {(0, "kv_group"): [0]}
    errors = {}
    for target in ("pruned", "residual"):
        model = make_tiny_model(family)
        prune_with_reconstruction(model, kept, ids, "lstsq_bias", damp=1e-3, target=target)
        errors[target] = float((_last_hidden(model, ids) - reference).pow(2).sum())
    assert errors["residual"] < errors["pruned"]


def test_an_unknown_target_is_refused():
    model = make_tiny_model("llama")
    with pytest.raises(PrunellmError, match="--reconstruct_target 'x' is not valid"):
        prune_with_reconstruction(model, {(0, "mlp_channel"): [0]}, calibration_ids(), "lstsq", target="x")


def _refit_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> float:
    """‖X Wᵀ − X_S W'ᵀ‖² after the exact (undamped) least-squares refit of the kept columns."""
    w, h = weight.double(), gram.double()
    solution = torch.linalg.solve(h[kept][:, kept], h[kept] @ w.T).T
    e = torch.cat([w, -solution], 1)
    idx = torch.cat([torch.arange(w.shape[1]), kept])
    return float(((e @ h[idx][:, idx]) * e).sum())


@pytest.mark.parametrize("width,rounds", [(1, 5), (3, 5), (1, 2)])
def test_greedy_obs_round_errors_add_up_to_the_error_after_the_refit(width, rounds):
    """OBS identity: each round's predicted error increase, summed, is the error the optimal refit of the
    columns left really has — so the update of W and H⁻¹ after every round is exact."""
    from prunellm.criteria.obs import greedy_obs_removal, obs_errors

    torch.manual_seed(0)
    x = torch.randn(500, 12 * width, dtype=torch.float64) @ torch.randn(12 * width, 12 * width, dtype=torch.float64)
    weight, gram = torch.randn(7, 12 * width), x.T @ x
    order, increases = greedy_obs_removal(weight, gram, width, 5, damp=0.0, rounds=rounds)
    assert len(set(order)) == 5 and len(increases) == rounds
    assert order[0] == int(obs_errors(weight, gram, width, damp=0.0).argmin())  # the first pick is the one-shot best
    done, total = 0, 0.0
    for r in range(rounds):
        done += (5 * (r + 1)) // rounds - (5 * r) // rounds
        kept = torch.as_tensor([c for i in range(12) if i not in order[:done] for c in range(i * width, (i + 1) * width)])
        total += increases[r]
        assert _refit_error(weight, gram, kept) == pytest.approx(total, rel=1e-6)


def test_greedy_obs_removes_what_contributes_nothing_and_never_the_intercept():
    from prunellm.criteria.obs import greedy_obs_removal

    torch.manual_seed(1)
    x = torch.cat([torch.randn(300, 9, dtype=torch.float64), torch.ones(300, 1, dtype=torch.float64)], 1)
    weight = torch.randn(4, 10)
    weight[:, [2, 5, 7]] = 0
    order, increases = greedy_obs_removal(weight, x.T @ x, 1, 3, fixed=1)
    assert sorted(order) == [2, 5, 7] and max(increases) < 1e-9
    assert 9 not in greedy_obs_removal(weight, x.T @ x, 1, 9, fixed=1)[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_obs_selection_keeps_the_counts_and_beats_the_plans_random_choice_on_calibration(family):
    """select='obs' keeps each layer's count, reports the units it applied, and its last hidden state on the
    calibration windows is closer to the dense model's than the same counts chosen at random and refitted."""
    ids = calibration_ids(n=16, length=32)
    dense = make_tiny_model(family)
    reference = _last_hidden(dense, ids)
    generator = torch.Generator().manual_seed(0)
    kept = {}
    for i in range(2):
        count = layer_units(dense, i, "mlp_channel").count
        kept[(i, "mlp_channel")] = sorted(torch.randperm(count, generator=generator)[: count // 2].tolist())
    errors, reports = {}, {}
    for select in ("plan", "obs"):
        model = make_tiny_model(family)
        reports[select] = prune_with_reconstruction(model, kept, ids, "lstsq_bias", damp=1e-3, select=select)
        errors[select] = float((_last_hidden(model, ids) - reference).pow(2).sum())
        for key, indices in reports[select].kept.items():
            assert len(indices) == len(kept[key])
            assert layer_units(model, key[0], key[1]).count == len(indices)
    assert reports["plan"].kept == kept and reports["obs"].kept != kept
    assert errors["obs"] < errors["plan"]


def test_obs_selection_needs_a_least_squares_refit():
    model = make_tiny_model("llama")
    with pytest.raises(PrunellmError, match="--reconstruct_select obs .* lstsq or lstsq_bias"):
        prune_with_reconstruction(model, {(0, "mlp_channel"): [0]}, calibration_ids(), "bias", select="obs")


def _first_layer_fluctuation(model, ids, count: int) -> list[int]:
    """The ``count`` MLP channels of layer 0 that the fluctuation criterion, on the dense model, ranks highest."""
    import prunellm as pl

    scores = pl.score(model, ids, "fluctuation", units=("mlp_channel",), batch_size=4)
    return sorted(torch.topk(scores.scores[(0, "mlp_channel")], count).indices.tolist())


def test_fluctuation_selection_keeps_the_counts_and_on_the_first_layer_is_the_criterions_choice(family):
    """select='fluctuation' keeps each layer's count; layer 0's MLP inputs are the dense model's (its attention is
    not pruned), so there the re-measured choice is the fluctuation criterion's own."""
    ids = calibration_ids(n=8, length=32)
    model = make_tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    kept = {}
    for i in range(2):
        count = layer_units(model, i, "mlp_channel").count
        kept[(i, "mlp_channel")] = sorted(torch.randperm(count, generator=generator)[: count // 2].tolist())
    expected = _first_layer_fluctuation(model, ids, len(kept[(0, "mlp_channel")]))
    report = prune_with_reconstruction(model, kept, ids, "lstsq_bias", select="fluctuation")
    assert report.kept[(0, "mlp_channel")] == expected != kept[(0, "mlp_channel")]
    for key, indices in report.kept.items():
        assert len(indices) == len(kept[key]) == layer_units(model, key[0], key[1]).count


@pytest.mark.parametrize("mode", ["bias", "lstsq_bias"])
def test_fluctuation_selection_removes_units_that_contribute_nothing(family, mode):
    """Units whose output-projection columns are zero have no fluctuation: re-measured selection removes exactly
    those, whatever the plan chose, and the model's outputs do not change."""
    ids = calibration_ids(n=8, length=32)
    model = make_tiny_model(family)
    zero = {(0, "kv_group"): [1], (0, "mlp_channel"): _kept_mlp(model, 0), (1, "mlp_channel"): _kept_mlp(model, 1, 2)}
    _zero_units(model, zero)
    with torch.no_grad():
        before = model(ids).logits
    plan = {key: list(range(len(indices))) for key, indices in zero.items()}  # same counts, other units
    report = prune_with_reconstruction(model, plan, ids, mode, damp=1e-3, select="fluctuation")
    assert report.kept == zero
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_select_auto_re_measures_only_what_the_input_statistics_measure():
    assert resolve_select("auto", "fluctuation", "lstsq_bias") == "fluctuation"
    assert resolve_select("auto", "taylor", "lstsq_bias") == "plan"
    assert resolve_select("auto", "fluctuation", "none") == "plan"
    assert resolve_select("obs", "taylor", "lstsq") == "obs"
    with pytest.raises(PrunellmError, match="--reconstruct_select fluctuation chooses units during reconstruction"):
        prune_with_reconstruction(make_tiny_model("llama"), {(0, "mlp_channel"): [0]}, calibration_ids(), "none", select="fluctuation")
