"""Issue 36: bad input is refused with one line before any calibration text is read or anything is scored (an
unreachable ratio, a bad layer range, both depth budgets), the rounds hint is given only where one round could
reach the ratio, and the pruned model's parameter count is one number in the summary, plan.json and the report."""

from __future__ import annotations

import json
import re

import pytest
from conftest import save_cli_workspace

import prunellm.pruner as pruner
from prunellm.cli import main
from prunellm.errors import PrunellmError
from prunellm.models import load_model
from prunellm.units import all_units, count_parameters



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_cli_workspace(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def no_data(monkeypatch):
    """Reading calibration text or scoring fails the test: a refusal must come before both."""

    def fail(*args, **kwargs):
        pytest.fail("calibration text was read (or scoring started) before the refusal")

    monkeypatch.setattr(pruner, "sample_calibration", fail)
    monkeypatch.setattr(pruner, "collect_stats", fail)
    monkeypatch.setattr(pruner, "evaluate", fail)


def _prune_args(ws, name: str, *extra: str) -> list[str]:
    return [
        "prune", "--base_model", str(ws / "tiny"), "--output_dir", str(ws / "results"), "--output_name", name,
        "--dataset", str(ws / "text.txt"), "--taylor_num_samples", "8", "--taylor_seq_len", "32",
        "--pruning_ratio", "0.015", *extra,
    ]  # fmt: skip


def _layers_args(ws, name: str, *extra: str) -> list[str]:
    return [
        "layers", "--base_model", str(ws / "tiny"), "--output_dir", str(ws / "results"), "--output_name", name,
        "--dataset", str(ws / "text.txt"), "--num_samples", "4", "--seq_len", "32", *extra,
    ]  # fmt: skip


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def _mlp_share(ws) -> float:
    """The share of all parameters that every MLP channel of the tiny model together holds."""
    model = load_model(str(ws / "tiny"))
    return sum(u.removed_cost(u.count) for u in all_units(model, ("mlp_channel",))) / count_parameters(model)


@pytest.mark.parametrize(
    "extra, expected",
    [
        # --units mlp_channel (the default) can take only the MLPs: the message names the maximum and what raises it
        (["--pruning_ratio", "0.5"], ["--pruning_ratio 0.5 is out of reach", "--units mlp_channel, 3 of 3 layers",
                                       "embeddings included", "--units kv_group,mlp_channel (up to 0.0"]),
        (["--pruning_ratio", "0.012", "--freeze_first_n_layers", "1", "--freeze_last_n_layers", "1"],
         ["--pruning_ratio 0.012 is out of reach", "1 of 3 layers",
          "fewer frozen layers (--freeze_first_n_layers 0 --freeze_last_n_layers 0) (up to 0.0"]),
        (["--pruning_ratio", "0.012", "--layer_start", "1", "--layer_end", "2"],
         ["is out of reach", "the whole layer range (--layer_start 0 --layer_end 3) (up to 0.0"]),
        # per-layer allocation is bounded by --max_pruning_rate too
        (["--allocation", "layerwise", "--max_pruning_rate", "0.2", "--pruning_ratio", "0.012"],
         ["--pruning_ratio 0.012 is out of reach", "--max_pruning_rate 0.2 a layer)", "--max_pruning_rate 1 (up to 0.0"]),
        # nothing left to relax: say what width pruning keeps
        (["--pruning_ratio", "0.5", "--units", "kv_group,mlp_channel", "--min_kv_groups", "0"],
         ["is out of reach", "3 of 3 layers, --min_kv_groups 0)", "width pruning keeps the rest (embeddings, norms, LM head): "
          "lower --pruning_ratio, or remove whole layers with prunellm layers"]),
        (["--allocation", "layerwise", "--min_pruning_rate", "0.9", "--pruning_ratio", "0.001", "--iterative_steps", "1"],
         ["--pruning_ratio 0.001 is below the 0.0", "--min_pruning_rate 0.9 removes from every pruned layer"]),
        (["--layer_start", "5", "--layer_end", "3"],
         ["--layer_start 5 / --layer_end 3 is not a layer range of this model: it has 3 layers, so give "
          "0 <= --layer_start < --layer_end <= 3"]),
        (["--layer_end", "7"], ["--layer_start 0 / --layer_end 7 is not a layer range", "<= 3"]),
        (["--layer_start", "3"], ["--layer_start 3 / --layer_end 3 (the default: all) is not a layer range"]),
        (["--freeze_first_n_layers", "2", "--freeze_last_n_layers", "1"], ["leave no layer that may be pruned"]),
    ],
)  # fmt: skip
def test_bad_budget_is_refused_in_one_line_before_any_calibration_text(workspace, capsys, no_data, extra, expected):
    assert main(_prune_args(workspace, "bad", *extra)) == 2
    err = _one_error(capsys)
    assert all(text in err for text in expected), err
    assert not (workspace / "results" / "bad").exists()


def test_the_refusal_names_the_exact_maximum(workspace, capsys, no_data):
    """The maximum the message gives is every MLP channel of every layer, of ALL parameters (embeddings included)."""
    assert main(_prune_args(workspace, "bad", "--pruning_ratio", "0.5")) == 2
    assert f"takes at most {_mlp_share(workspace):.4f} of all" in _one_error(capsys)


def test_a_reachable_ratio_passes_the_check(workspace):
    """The check refuses nothing that selection can meet: the MLPs' whole share (as selection may end one channel short)."""
    model = load_model(str(workspace / "tiny"))
    recipe = pruner.PruneRecipe(pruning_ratio=round(_mlp_share(workspace), 6))
    reach = pruner.check_reachable(model, recipe.budget, recipe.selection, recipe.allocation)
    assert reach.most == sum(u.removed_cost(u.count) for u in all_units(model, ("mlp_channel",)))
    with pytest.raises(PrunellmError, match="out of reach"):
        pruner.check_reachable(model, recipe.budget.model_copy(update={"pruning_ratio": 0.02}), recipe.selection, recipe.allocation)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--pruning_ratio", "0.1", "--n_remove_layers", "1"], "give --n_remove_layers or --pruning_ratio, not both"),
        ([], "give --n_remove_layers N or --pruning_ratio r"),
    ],
)
def test_layers_budget_given_twice_or_not_at_all_is_refused_before_loading(workspace, capsys, monkeypatch, extra, expected):
    monkeypatch.setattr(pruner, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    assert main(_layers_args(workspace, "bad_layers", *extra)) == 2
    assert expected in _one_error(capsys)
    assert not (workspace / "results" / "bad_layers").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--n_remove_layers", "3"], "--n_remove_layers 3 must be between 1 and 2 (the model has 3 layers)"),
        (["--n_remove_layers", "2", "--freeze_first_n_layers", "2"],
         "--n_remove_layers 2 is more than the 1 of 3 layers that --freeze_first_n_layers 2 / --freeze_last_n_layers 0 leave removable"),
    ],
)  # fmt: skip
def test_layers_count_is_checked_against_the_model_before_any_calibration_text(workspace, capsys, no_data, extra, expected):
    assert main(_layers_args(workspace, "bad_layers", "--run_evaluation", "ppl", *extra)) == 2
    assert expected in _one_error(capsys)
    assert not (workspace / "results" / "bad_layers").exists()


def test_the_one_round_hint_is_given_only_where_one_round_could_reach_the_ratio(workspace, capsys, monkeypatch):
    fast = ("--importance_method", "magnitude", "--temperature", "0", "--reconstruct", "none", "--iterative_steps", "2")
    original, calls = pruner.score_and_plan, []

    def second_round_refuses(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise PrunellmError("this round's step is out of reach")
        return original(*args, **kwargs)

    monkeypatch.setattr(pruner, "score_and_plan", second_round_refuses)
    assert main(_prune_args(workspace, "hint", *fast)) == 2
    err = _one_error(capsys)
    assert "--pruning_ratio 0.015 in 2 rounds (--iterative_steps): round 2 could not remove its step" in err
    assert err.endswith("; one round can reach it: try --iterative_steps 1"), err
    # the early check missed (as if): the safety net of selection refuses, and no round count would help
    monkeypatch.setattr(pruner, "score_and_plan", original)
    monkeypatch.setattr(pruner, "check_reachable", lambda *a, **k: None)
    assert main(_prune_args(workspace, "hint", *fast, "--pruning_ratio", "0.5")) == 2
    err = _one_error(capsys)
    assert "round 1 could not remove its step" in err and "unreachable" in err
    assert f"--pruning_ratio 0.5 is out of reach in any number of rounds: at most {_mlp_share(workspace):.4f}" in err
    assert "try --iterative_steps 1" not in err
    assert not (workspace / "results" / "hint").exists()


def test_summary_plan_layer_table_and_report_count_the_saved_model_alike(workspace, capsys, tmp_path):
    """lstsq_bias (the default) gives o_proj/down_proj intercepts the qwen2 family does not build: the saved model
    has them, and every count of the run says so."""
    args = _prune_args(workspace, "counted", "--importance_method", "magnitude", "--temperature", "0", "--reconstruct_num_samples",
                       "8", "--reconstruct_seq_len", "32", "--run_evaluation", "ppl", "--ppl_datasets", str(workspace / "text.txt"),
                       "--ppl_seq_len", "32", "--ppl_max_windows", "2")  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    out = workspace / "results" / "counted"
    saved = count_parameters(load_model(str(out / "model")))
    plan = json.loads((out / "plan.json").read_text())
    added = json.loads((out / "analysis" / "reconstruction.json").read_text())["added_params"]
    assert added > 0 and plan["added_params"] == added  # the compensation biases are in the count
    summary = int(re.search(r"parameters after\D*([\d,]+)", err).group(1).replace(",", ""))
    table = int(re.search(r"^total\s.*?[\d,]+→([\d,]+)", err, re.MULTILINE).group(1).replace(",", ""))
    assert summary == table == plan["params_after"] == saved
    assert plan["achieved_ratio"] == round(1 - saved / plan["params_before"], 6)
    # the budget is still what selection removed, biases apart: within one MLP channel of the target
    removed = plan["params_before"] - plan["params_after"] + plan["added_params"]
    assert abs(removed - round(0.015 * plan["params_before"])) <= 3 * 64
    assert main(["report", str(out), "--output", str(tmp_path / "report")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    row = dict(zip(header, (cell.strip() for cell in lines[2].strip("|").split("|"))))
    assert int(row["params"].replace(",", "")) == saved
    assert row["achieved ratio"] == f"{1 - saved / plan['params_before']:.4f}"
    # a replay records the same count
    assert main(_prune_args(workspace, "counted_replay", "--plan", str(out / "plan.json"))) == 0
    replay = json.loads((workspace / "results" / "counted_replay" / "plan.json").read_text())
    assert (replay["params_after"], replay["added_params"]) == (plan["params_after"], plan["added_params"])
