"""The public, in-memory API: one call per stage, the same numbers as the internals it wraps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import calibration_ids, make_tiny_model

import prunellm as pl
from prunellm.errors import PrunellmError
from prunellm.units import all_units, count_parameters


def test_import_is_cheap_and_names_are_public():
    code = "import sys, prunellm; print('torch' in sys.modules); print(sorted(prunellm.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "False"  # the CLI's --help must not pay for torch
    for name in ("load", "calibrate", "score", "select", "prune", "save_pruned", "load_pruned", "evaluate", "FineTuner", "Recipe"):
        assert name in out[1]
        assert getattr(pl, name) is not None
    with pytest.raises(AttributeError):
        pl.no_such_name  # noqa: B018


@pytest.mark.parametrize("reconstruct", ["none", "lstsq"])
def test_pipeline_meets_budget_and_round_trips(family, reconstruct, tmp_path):
    model = make_tiny_model(family)
    total = count_parameters(model)
    ids = calibration_ids(model.config.vocab_size, n=8, length=32)
    scores = pl.score(model, ids, "taylor", batch_size=4)
    assert {(u.layer, u.kind) for u in scores.units} == set(scores.scores)
    assert scores.calibration["hash"] and scores.calibration["num_samples"] == 8
    plan = pl.select(model, scores, 0.2)
    largest_unit = max(u.cost for u in scores.units)
    assert abs(plan.params_before - plan.params_after - round(0.2 * total)) <= largest_unit
    report = pl.prune(model, plan, calibration=ids if reconstruct != "none" else None, reconstruct=reconstruct)
    assert report["mode"] == reconstruct
    assert count_parameters(model) == plan.params_after
    for unit in all_units(model):  # the kept widths are the plan's, weights sliced, not masked
        assert unit.count == len(plan.kept_units()[(unit.layer, unit.kind)])
    probe = calibration_ids(model.config.vocab_size, n=2, length=16, seed=5)
    with torch.no_grad():
        before = model(probe).logits
    out = pl.save_pruned(model, None, tmp_path / "model", plan)
    assert (out / "plan.json").exists()
    loaded, tokenizer = pl.load_pruned(out)
    assert tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, before, rtol=0, atol=0)
    assert pl.Plan.load(out / "plan.json").kept_units() == plan.kept_units()


def test_select_equals_the_internal_global_ranking():
    """select() is the CLI's global ranking: the same scores give the same kept indices."""
    from prunellm.selection import SelectionConstraints, normalized_values, select_global

    model = make_tiny_model("llama")
    ids = calibration_ids(model.config.vocab_size)
    scores = pl.score(model, ids, "wanda")
    total = count_parameters(model)
    values = normalized_values(scores.units, scores.scores, "block")
    internal = select_global(scores.units, values, scores.scores, round(0.3 * total), SelectionConstraints(), total)
    assert pl.select(model, scores, 0.3).kept_units() == internal.kept


def test_bad_arguments_fail_in_one_line():
    model = make_tiny_model("qwen2")
    with pytest.raises(PrunellmError, match="units"):
        pl.score(model, None, "magnitude", units=("heads",))
    with pytest.raises(PrunellmError, match="layers"):
        pl.score(model, None, "magnitude", layers=[7])
    with pytest.raises(PrunellmError, match="needs calibration"):
        pl.score(model, None, "taylor")
    with pytest.raises(PrunellmError, match="criterion 'nope'"):
        pl.score(model, None, "nope")
    scores = pl.score(model, None, "magnitude")
    with pytest.raises(PrunellmError, match="ratio 1.5"):
        pl.select(model, scores, 1.5)
    plan = pl.select(model, scores, 0.1)
    with pytest.raises(PrunellmError, match="needs calibration"):
        pl.prune(model, plan, reconstruct="lstsq")


@pytest.mark.real_model
def test_api_on_smollm2_evaluates_a_valid_results_document():
    from prunellm.evaluation import validate_results

    model, tokenizer = pl.load("smollm2-135m")
    options = dict(metrics="ppl", ppl_protocols="128", ppl_max_windows=8)
    dense = pl.evaluate(model, tokenizer, **options)
    validate_results(dense)
    ids = pl.calibrate(tokenizer, "shakespeare", 8, 64)
    plan = pl.select(model, pl.score(model, ids, "taylor"), 0.1)
    pl.prune(model, plan)
    pruned = pl.evaluate(model, tokenizer, **options)
    validate_results(pruned)
    assert pruned["model"]["params"] == plan.params_after
    dense_ppl, pruned_ppl = dense["metrics"]["ppl"][0]["ppl"], pruned["metrics"]["ppl"][0]["ppl"]
    assert dense_ppl < pruned_ppl < 10 * dense_ppl
    with pytest.raises(Exception, match="no_such_option"):
        pl.evaluate(model, tokenizer, no_such_option=1)


def test_one_loader_one_return_type_and_the_remedy_in_the_config(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    import prunellm.checkpoint
    from prunellm.surgery import prune_units

    model = make_tiny_model("llama")
    prune_units(model, {(1, "mlp_channel"): list(range(0, 96, 2))})  # per-layer widths: remote code needed
    ids = torch.arange(12)[None]
    pl.save_pruned(model, None, tmp_path / "run" / "model")
    assert not hasattr(prunellm.checkpoint, "load_pruned")  # one function of that name: prunellm.load_pruned
    for path in (tmp_path / "run", tmp_path / "run" / "model"):  # a results folder or its model/
        loaded, tokenizer = pl.load_pruned(path)
        assert tokenizer is None
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert "trust_remote_code=True" in config["prunellm_loading"]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # what plain transformers says
        AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", trust_remote_code=True)
    torch.testing.assert_close(remote(ids).logits, model(ids).logits, rtol=0, atol=0)
    pl.save_pruned(make_tiny_model("llama"), None, tmp_path / "uniform")  # a standard config carries no note
    assert "prunellm_loading" not in json.loads((tmp_path / "uniform" / "config.json").read_text())


def test_run_gives_the_clis_model_for_every_family(family, tmp_path):
    """One composition: ``prunellm.run(recipe)`` in memory and ``prunellm prune`` with the same options give
    bit-identical weights (the recipe's defaults: fluctuation, uniform, the KL prior, lstsq_bias refit
    re-choosing the units; two rounds, as auto)."""
    from conftest import STORY, save_tiny_model_dir

    from prunellm.cli import main
    from prunellm.checkpoint import load_checkpoint

    folder = save_tiny_model_dir(tmp_path / "tiny", family, num_hidden_layers=3)
    (tmp_path / "text.txt").write_text(STORY)
    small = {"dataset": str(tmp_path / "text.txt"), "calibration_num_samples": 8, "calibration_seq_len": 32,
             "layer_importance_num_samples": 4, "block_importance_num_samples": 4, "reconstruct_num_samples": 16,
             "reconstruct_seq_len": 32, "pruning_ratio": 0.005, "iterative_steps": 2}  # fmt: skip
    flags = [f"--{name}={value}" for name, value in small.items()]
    assert main(["prune", "--base_model", str(folder), "--output_dir", str(tmp_path / "out"), "--output_name", "cli", *flags]) == 0
    by_cli = load_checkpoint(tmp_path / "out" / "cli" / "model").state_dict()

    model, plan = pl.run(pl.Recipe(base_model=str(folder), **small))
    assert len(plan.rounds) == 2 and plan.params_after == count_parameters(model)
    ours = model.state_dict()
    assert ours.keys() == by_cli.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, by_cli[name]), name
    cli_plan = json.loads((tmp_path / "out" / "cli" / "plan.json").read_text())
    assert plan.to_dict()["layers"] == cli_plan["layers"] and plan.params_after == cli_plan["params_after"]
