"""Criterion scores against an oracle: plain autograd gradients and activations, sliced index by index.

The oracle shares nothing with the scoring code but the model: it takes each micro-batch's gradient with
``torch.autograd.grad``, averages them, and sums |w·G| (and ½·w²·mean(g²)) over the rows, columns and biases
each unit index owns, written out by hand from the unit definitions (kv_group i: q rows of its query heads,
k/v rows of head i, biases of those rows, o columns of its query heads; mlp_channel i: gate/up row i and
bias, down column i). Wanda's ‖X‖ comes from forward hooks of its own.
"""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_ids, make_tiny_model

from prunellm.calibration import collect_gradient_stats
from prunellm.offload import activation_stats
from prunellm.criteria import CriterionOptions, get_criterion
from prunellm.specs import spec_for
from prunellm.units import all_units, decoder_layers, head_dim


def _owned(model, layer: int, kind: str, index: int) -> list[tuple[torch.nn.Linear, str, slice | None, slice | None]]:
    """(linear, "weight"|"bias", rows, columns) that unit ``index`` owns, from the unit definitions."""
    spec = spec_for(model.config)
    block = decoder_layers(model)[layer]
    if kind == "kv_group":
        attn = getattr(block, spec.attention.module)
        d = head_dim(model.config, spec)
        q, k, v, o = (getattr(attn, name) for name in (spec.attention.q, spec.attention.k, spec.attention.v, spec.attention.o))
        g = q.out_features // k.out_features  # query heads per KV head
        q_rows, kv_rows = slice(index * g * d, (index + 1) * g * d), slice(index * d, (index + 1) * d)
        owned = [(q, "weight", q_rows, None), (k, "weight", kv_rows, None), (v, "weight", kv_rows, None), (o, "weight", None, q_rows)]
        owned += [(lin, "bias", rows, None) for lin, rows in ((q, q_rows), (k, kv_rows), (v, kv_rows)) if lin.bias is not None]
        return owned
    mlp = getattr(block, spec.mlp.module)
    gate, up, down = (getattr(mlp, name) for name in (spec.mlp.gate, spec.mlp.up, spec.mlp.down))
    row = slice(index, index + 1)
    owned = [(gate, "weight", row, None), (up, "weight", row, None), (down, "weight", None, row)]
    owned += [(lin, "bias", row, None) for lin in (gate, up) if lin.bias is not None]
    return owned


def _part(tensor: torch.Tensor, rows, columns) -> torch.Tensor:
    if tensor.dim() == 1:
        return tensor[rows]
    return tensor[rows if rows is not None else slice(None), columns if columns is not None else slice(None)]


def _oracle_gradients(model, ids: torch.Tensor, batch_size: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Mean gradient G and mean squared gradient over micro-batches, per parameter (by id)."""
    params = [p for p in model.parameters()]
    grads, squares = {}, {}
    chunks = ids.split(batch_size)
    for chunk in chunks:
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is None:
                continue
            grads[id(p)] = grads.get(id(p), 0) + g.double() / len(chunks)
            squares[id(p)] = squares.get(id(p), 0) + g.double().pow(2) / len(chunks)
    return grads, squares


@pytest.mark.parametrize("batch_size", [12, 4], ids=["one_batch", "three_micro_batches"])
def test_taylor_scores_match_plain_autograd(family, batch_size):
    model = make_tiny_model(family)
    ids = calibration_ids(model.config.vocab_size, n=12, length=16, seed=7)
    units = list(all_units(model))
    stats = collect_gradient_stats(model, ids, units, terms=get_criterion("taylor_2nd").gradient_terms, batch_size=batch_size)
    first = get_criterion("taylor").score(model, units, stats, CriterionOptions(seed=0))
    second = get_criterion("taylor_2nd").score(model, units, stats, CriterionOptions(seed=0))
    grads, squares = _oracle_gradients(model, ids, batch_size)
    for u in units:
        expected_first, expected_second = [], []
        for index in range(u.count):
            f = s = 0.0
            for linear, name, rows, columns in _owned(model, u.layer, u.kind, index):
                p = getattr(linear, name)
                w, g, g2 = _part(p.detach().double(), rows, columns), _part(grads[id(p)], rows, columns), _part(squares[id(p)], rows, columns)
                f += float((w * g).abs().sum())
                s += float((0.5 * w.pow(2) * g2).sum())
            expected_first.append(f)
            expected_second.append(f + s)
        key = (u.layer, u.kind)
        torch.testing.assert_close(first[key].double(), torch.tensor(expected_first, dtype=torch.float64), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(second[key].double(), torch.tensor(expected_second, dtype=torch.float64), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("batch_size", [12, 4], ids=["one_batch", "three_micro_batches"])
def test_wanda_scores_match_hand_computed_activation_norms(family, batch_size):
    model = make_tiny_model(family)
    ids = calibration_ids(model.config.vocab_size, n=12, length=16, seed=8)
    units = list(all_units(model))
    stats = activation_stats(model, ids, units, batch_size=batch_size)
    scores = get_criterion("wanda").score(model, units, stats, CriterionOptions(seed=0))
    # the oracle's ‖X‖: every linear's input over all calibration tokens, one forward pass of the whole set
    squares: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args: squares.__setitem__(id(m), args[0].double().pow(2).sum((0, 1))))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for u in units:
        expected = []
        for index in range(u.count):
            total = 0.0
            for linear, name, rows, columns in _owned(model, u.layer, u.kind, index):
                if name == "bias":
                    continue  # Wanda weighs weights by their input's norm; biases have no input
                weighted = linear.weight.detach().double().abs() * squares[id(linear)].sqrt()[None, :]
                total += float(_part(weighted, rows, columns).sum())
            expected.append(total)
        torch.testing.assert_close(scores[(u.layer, u.kind)].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-9)


def _output_projection_inputs(model, ids) -> dict[int, torch.Tensor]:
    """Every linear's input rows ``(tokens, in)`` over all calibration windows, float64, from hooks of the oracle."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args: inputs.__setitem__(id(m), args[0].double().reshape(-1, args[0].shape[-1])))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return inputs


def _output_columns(model, u, index):
    """(linear, columns) of the output projection (o_proj / down_proj) that unit ``index`` owns."""
    return [(linear, columns) for linear, name, rows, columns in _owned(model, u.layer, u.kind, index) if columns is not None]


def test_fluctuation_scores_match_hand_computed_variance(family):
    model = make_tiny_model(family)
    ids = calibration_ids(model.config.vocab_size, n=12, length=16, seed=8)
    units = list(all_units(model))
    stats = activation_stats(model, ids, units, batch_size=4)
    scores = get_criterion("fluctuation").score(model, units, stats, CriterionOptions(seed=0))
    inputs = _output_projection_inputs(model, ids)
    for u in units:
        expected = []
        for index in range(u.count):
            total = 0.0
            for linear, columns in _output_columns(model, u, index):
                x = inputs[id(linear)][:, columns]  # (tokens, w)
                variance = x.var(0, unbiased=False)  # FLAP's fluctuation of each input channel
                total += float((linear.weight.detach().double()[:, columns].pow(2).sum(0) * variance).sum())
            expected.append(total)
        torch.testing.assert_close(scores[(u.layer, u.kind)].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-9)


def test_obs_scores_are_the_error_left_after_the_best_refit(family):
    """Oracle: remove the unit's columns, refit the others by least squares on the (damped) calibration Gram,
    measure the output error that is left — it must equal the closed-form OBS score."""
    from prunellm.criteria.obs import DAMP

    model = make_tiny_model(family)
    ids = calibration_ids(model.config.vocab_size, n=12, length=16, seed=8)
    units = list(all_units(model))
    stats = activation_stats(model, ids, units, batch_size=4, grams=True)
    scores = get_criterion("obs").score(model, units, stats, CriterionOptions(seed=0))
    inputs = _output_projection_inputs(model, ids)
    for u in units:
        expected = []
        for index in range(u.count):
            total = 0.0
            for linear, columns in _output_columns(model, u, index):
                x = inputs[id(linear)]
                h = x.T @ x
                h = h + DAMP * h.diagonal().mean() * torch.eye(len(h), dtype=torch.float64)
                w = linear.weight.detach().double()
                keep = torch.ones(w.shape[1], dtype=torch.bool)
                keep[columns] = False
                # best W'_S: argmin tr((W − W'_S P_S) H (W − W'_S P_S)ᵀ) = W H[:, S] H_SS⁻¹
                refit = w @ h[:, keep] @ torch.linalg.inv(h[keep][:, keep])
                error = w @ h @ w.T - 2 * refit @ h[keep] @ w.T + refit @ h[keep][:, keep] @ refit.T
                total += float(error.trace())
            expected.append(total)
        torch.testing.assert_close(scores[(u.layer, u.kind)].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-3, atol=1e-6)
