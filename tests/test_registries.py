"""Adding a criterion or an evaluation metric touches one file: this test file registers one of each and uses
them through the public API, the evaluator, the results schema and the report, as a user's plugin would."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_ids, make_tiny_model

import prunellm as pl
from prunellm.calibration import GradientTerm
from prunellm.criteria import REGISTRY, get_criterion, register
from prunellm.errors import PrunellmError
from prunellm.evaluation import METRICS, Column, Metric, evaluate, save_results, validate_results
from prunellm.evaluation import register as register_metric
from prunellm.options import EvalOptions
from prunellm.report import build_report
from prunellm.units import decoder_layers, get_module, reduce_to_units


@pytest.fixture
def cubic_magnitude():
    """A criterion: Σ|w|³ over the unit's weights (weights only, no calibration pass)."""

    @register("cubic_magnitude", {"weights"}, "Σ|w|³ of the unit")
    def score(model, units, stats, options):
        layers = decoder_layers(model)
        scores = {}
        for unit in units:
            total = torch.zeros(unit.count)
            for s in unit.slices:
                weight = get_module(layers[unit.layer], s.module).weight.detach()
                total += reduce_to_units(weight.abs().pow(3), s, unit.count)
            scores[(unit.layer, unit.kind)] = total
        return scores

    yield "cubic_magnitude"
    REGISTRY.pop("cubic_magnitude")


@pytest.fixture
def zero_fraction():
    """A metric: the fraction of weights that are exactly zero (no options, no tokenizer)."""

    def measure(ctx):
        weights = [p for p in ctx.model.parameters() if p.dim() == 2]
        zeros = sum(int((p == 0).sum()) for p in weights)
        return {"zero_fraction": zeros / sum(p.numel() for p in weights)}

    register_metric(Metric(
        name="zero_fraction", help="fraction of exactly-zero matrix weights", options=(),
        schema={"type": "object", "required": ["zero_fraction"], "additionalProperties": False,
                "properties": {"zero_fraction": {"type": "number", "minimum": 0}}},
        measure=measure,
        columns=lambda docs: [Column("zero weights", lambda doc: (doc["metrics"].get("zero_fraction") or {}).get("zero_fraction"), "{:.4f}")],
    ))  # fmt: skip
    yield "zero_fraction"
    METRICS.pop("zero_fraction")


def test_a_criterion_registered_outside_the_package_prunes(cubic_magnitude):
    model = make_tiny_model("qwen2")
    scores = pl.score(model, None, cubic_magnitude)
    # the unit with the smallest Σ|w|³ of layer 0's MLP is the one the criterion ranks lowest
    down = decoder_layers(model)[0].mlp
    by_hand = (down.gate_proj.weight.abs().pow(3).sum(1) + down.up_proj.weight.abs().pow(3).sum(1)
               + down.down_proj.weight.abs().pow(3).sum(0)).detach()
    torch.testing.assert_close(scores.scores[(0, "mlp_channel")], by_hand)
    plan = pl.select(model, scores, 0.2)
    pl.prune(model, plan)
    assert plan.criterion == "cubic_magnitude"
    assert torch.isfinite(model(calibration_ids(model.config.vocab_size, n=2, length=8)).logits).all()


@pytest.fixture
def squared_taylor():
    """A gradient criterion: Σ (w·G)² over the unit, its formula declared here; the gradient pass only sums it."""
    term = GradientTerm("squared_first", lambda w, mean_g, fisher: (w * mean_g).pow(2), over="means")

    @register("squared_taylor", {"gradients"}, "Σ(w·G)² of the unit", gradient_terms=(term,))
    def score(model, units, stats, options):
        return {key: value.clone() for key, value in stats.gradient_terms["squared_first"].items()}

    yield "squared_taylor"
    REGISTRY.pop("squared_taylor")


def test_a_gradient_criterion_registered_outside_the_package_scores_in_memory_and_offloaded(squared_taylor):
    model = make_tiny_model("llama")
    ids = calibration_ids(model.config.vocab_size, n=8, length=16, seed=3)
    in_memory = pl.score(model, ids, squared_taylor, batch_size=4)
    offloaded = pl.score(model, ids, squared_taylor, batch_size=4, offload=True)
    first = pl.score(model, ids, "taylor", batch_size=4)
    assert get_criterion(squared_taylor).gradient_terms[0].name == "squared_first"
    for key, value in in_memory.scores.items():
        # one reducer behind both passes; the offloaded loss reads the head in vocabulary slices (float32 order)
        torch.testing.assert_close(offloaded.scores[key], value, rtol=1e-4, atol=1e-12)
        assert (value > 0).all() and not torch.equal(value, first.scores[key])


def test_a_metric_registered_outside_the_package_is_measured_validated_and_reported(zero_fraction, tmp_path):
    model = make_tiny_model("llama")
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.weight[:, :10] = 0
    doc = evaluate(model, None, EvalOptions(metrics="zero_fraction"), model_path="tiny", progress=False)
    assert 0 < doc["metrics"]["zero_fraction"]["zero_fraction"] < 0.1
    validate_results(doc)
    with pytest.raises(PrunellmError, match="zero_fraction"):
        validate_results({**doc, "metrics": {"zero_fraction": {"zero_fraction": -1}}})
    save_results(doc, tmp_path / "run" / "evaluation_results.json")
    report = build_report([tmp_path / "run"], tmp_path / "report")
    assert "zero weights" in (tmp_path / "report" / "report.md").read_text()
    assert report is not None


def test_unknown_metric_lists_the_registered_ones():
    with pytest.raises(PrunellmError, match="ppl, zeroshot, speed, memory"):
        evaluate(make_tiny_model("llama"), None, EvalOptions(metrics="nope"), model_path="tiny")


def test_a_depth_criterion_registered_outside_the_package_chooses_layers():
    from prunellm.criteria import LAYER_REGISTRY, register_layer
    from prunellm.layers import choose_layers_to_remove

    @register_layer("last_is_least", "ranks later layers as less important")
    def last_is_least(model, input_ids, batch_size=4):
        return [-float(i) for i in range(len(decoder_layers(model)))]

    try:
        model = make_tiny_model("mistral", num_hidden_layers=4)
        removed, scores = choose_layers_to_remove(model, calibration_ids(model.config.vocab_size, n=2), "last_is_least", 2)
        assert removed == [2, 3] and scores == [0.0, -1.0, -2.0, -3.0]
        with pytest.raises(PrunellmError, match="block_influence"):
            choose_layers_to_remove(model, calibration_ids(model.config.vocab_size, n=2), "nope", 1)
    finally:
        LAYER_REGISTRY.pop("last_is_least")


def test_a_reselection_registered_outside_the_package_chooses_the_units_surgery_applies(tmp_path):
    """``--reconstruct_select`` is a registry like the criteria: a re-selection registered here is valid in a Recipe,
    is picked by ``auto`` for the criterion it measures again, chooses each pruned layer's units from the pruned
    model's inputs (the plan's count kept), is what the Plan records and the model holds, and is refused where the
    refit cannot serve it (the replay of such a Plan: tests/test_cli.py)."""
    from conftest import STORY, save_tiny_model_dir

    from prunellm.criteria import RESELECTIONS, register_reselection
    from prunellm.reconstruction import resolve_select

    seen = []

    @register_reselection("highest_indices", "the units of highest index", rescores="magnitude")
    def highest_indices(inputs, keep):
        seen.append((inputs.count, keep, inputs.tokens, tuple(inputs.gram.shape)))
        return list(range(inputs.count - keep, inputs.count))

    try:
        folder = save_tiny_model_dir(tmp_path / "tiny", "llama", num_hidden_layers=2)
        (tmp_path / "text.txt").write_text(STORY)
        small = {"dataset": str(tmp_path / "text.txt"), "calibration_num_samples": 8, "calibration_seq_len": 32,
                 "reconstruct_num_samples": 16, "reconstruct_seq_len": 32, "pruning_ratio": 0.005, "temperature": 0,
                 "iterative_steps": 1, "importance_method": "magnitude", "units": "mlp_channel"}  # fmt: skip
        assert resolve_select("auto", "magnitude", "lstsq_bias") == "highest_indices"
        assert resolve_select("auto", "magnitude", "none") == "plan" and resolve_select("auto", "taylor", "lstsq") == "plan"
        width = pl.load(str(folder))[0].config.intermediate_size
        model, plan = pl.run(pl.Recipe(base_model=str(folder), **small))  # auto: magnitude's re-selection
        assert seen and all(keep < count == width and tokens == 16 * 32 and gram[0] == width for count, keep, tokens, gram in seen)
        pruned = {key: units for key, units in plan.kept_units().items() if len(units) < width}
        assert len(pruned) == len(seen) and all(units == list(range(width - len(units), width)) for units in pruned.values())
        assert [model.model.layers[layer].mlp.down_proj.in_features for layer, _ in sorted(pruned)] == [len(u) for _, u in sorted(pruned.items())]
        with pytest.raises(PrunellmError, match="reconstruct_select highest_indices chooses units during reconstruction"):
            pl.run(pl.Recipe(base_model=str(folder), **small | {"reconstruct": "none", "reconstruct_select": "highest_indices"}))
        with pytest.raises(ValueError, match="use one of auto, plan, fluctuation, obs, highest_indices"):
            pl.Recipe(reconstruct_select="nope")
    finally:
        RESELECTIONS.pop("highest_indices")
