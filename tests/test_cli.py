"""The command line end to end on a tiny model directory: outputs, replay, refusals and one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import REPO, make_tiny_model, save_cli_workspace
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from prunellm.checkpoint import load_checkpoint
from prunellm.cli import main
from prunellm.units import layer_units

TEXT = " ".join(
    "the king and the queen walked to the castle while the people sang of war and peace and love".split() * 120
)


def _tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set(TEXT.split()))
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_cli_workspace(tmp_path_factory.mktemp("cli"))


def _prune_args(ws, name: str, *extra: str) -> list[str]:
    return [
        "prune", "--base_model", str(ws / "tiny"), "--output_dir", str(ws / "results"), "--output_name", name,
        "--dataset", str(ws / "text.txt"), "--taylor_num_samples", "8", "--taylor_seq_len", "32",
        "--pruning_ratio", "0.015", *extra,
    ]  # fmt: skip


def test_prune_writes_the_whole_results_layout(workspace):
    args = _prune_args(workspace, "run1", "--run_evaluation", "ppl", "--ppl_datasets", str(workspace / "text.txt"),
                       "--ppl_seq_len", "32", "--ppl_max_windows", "4", "--temperature", "1",
                       "--layer_importance_num_samples", "4", "--block_importance_num_samples", "4", "--iterative_steps", "2")  # fmt: skip
    assert main(args) == 0
    out = workspace / "results" / "run1"
    for rel in (
        "model/config.json", "model/model.safetensors", "model/tokenizer.json", "plan.json", "logs/command.sh",
        "logs/prune.log", "evaluation_results.json", "evaluation_results_base.json", "rounds/1/layer_importance_loss.json",
        "rounds/1/block_importance_loss.json", "rounds/2/layer_importance_loss.json", "analysis/original_model_analysis.json", "analysis/pruned_model_analysis.json",
        "analysis/model_comparison.json", "analysis/global_group_table.csv", "analysis/groups_to_prune.csv",
        "analysis/pruning_summary_by_layer.txt", "visualization/pruning_ratio_per_layer.png",
        "visualization/param_breakdown.png",
    ):  # fmt: skip
        assert (out / rel).is_file(), rel
    plan = json.loads((out / "plan.json").read_text())
    assert abs(plan["achieved_ratio"] - 0.015) < 0.005  # the tied 49k-token embedding is most of this model
    assert len(plan["rounds"]) == 2  # --iterative_steps 2, as auto
    # the default (uniform + a re-selecting refit) needs no dense scores: the plan says the pass was skipped and why
    assert plan["calibration"]["scoring"].startswith("skipped: --normalization uniform") and plan["versions"]["transformers"]
    assert plan["reconstruction"]["hash"]  # the refit's windows, which a replay checks
    model = load_checkpoint(out / "model")
    added = json.loads((out / "analysis" / "reconstruction.json").read_text())["added_params"]  # lstsq_bias's intercepts
    assert added == sum(m.bias.numel() for n, m in model.named_modules() if n.endswith("down_proj") and m.bias is not None)
    assert sum(p.numel() for p in model.parameters()) == plan["params_after"] and plan["added_params"] == added  # as saved
    result = json.loads((out / "evaluation_results.json").read_text())
    assert result["metrics"]["ppl"][0]["protocol"] == "32" and result["metrics"]["ppl"][0]["scored_tokens"] == 4 * 31
    assert "--pruning_ratio 0.015" in (out / "logs" / "command.sh").read_text()
    assert not [p for p in (workspace / "results").iterdir() if p.name.startswith(".")]  # no temp folders left
    timings = json.loads((out / "logs" / "timings.json").read_text())  # where the time went, stage by stage
    stages = timings["stages"]
    assert {"load", "evaluate dense", "priors", "select", "surgery and refit", "save", "analysis", "evaluate pruned"} == set(stages)
    assert all(seconds >= 0 for seconds in stages.values())
    # stages never overlap: with what none claimed they add up to the run (rounding apart)
    assert abs(sum(stages.values()) + timings["other_seconds"] - timings["total_seconds"]) < 0.01
    # the prior and the refit itemised: each part inside its stage, never longer than it
    parts = timings["parts"]
    assert {"priors/layer ablations", "priors/block ablations", "surgery and refit/statistics", "surgery and refit/solves",
            "surgery and refit/next layer's inputs"} <= set(parts)  # fmt: skip
    assert all(0 <= seconds <= stages[name.partition("/")[0]] + 0.01 for name, seconds in parts.items())


def test_plan_replay_gives_the_identical_model(workspace):
    assert main(_prune_args(workspace, "orig", "--importance_method", "wanda")) == 0
    plan = workspace / "results" / "orig" / "plan.json"
    assert main(_prune_args(workspace, "replay", "--plan", str(plan))) == 0
    a = load_file(workspace / "results" / "orig" / "model" / "model.safetensors")
    b = load_file(workspace / "results" / "replay" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reconstruction_on_a_mixture_is_recorded_and_replayed(workspace):
    other = workspace / "other.txt"
    other.write_text(" ".join(reversed(TEXT.split())))
    mixture = f"{workspace / 'text.txt'}+{other}"
    assert main(_prune_args(workspace, "mix", "--importance_method", "magnitude", "--reconstruct_dataset", mixture,
                            "--reconstruct_num_samples", "8", "--reconstruct_seq_len", "32")) == 0  # fmt: skip
    plan = workspace / "results" / "mix" / "plan.json"
    settings = json.loads(plan.read_text())["reconstruction"]
    assert settings["dataset"] == mixture and settings["source"]["kind"] == "mixture" and settings["hash"]
    assert [part["files"] for part in settings["source"]["sources"]] == [[str(workspace / "text.txt")], [str(other)]]
    assert main(_prune_args(workspace, "mix_replay", "--plan", str(plan))) == 0
    a = load_file(workspace / "results" / "mix" / "model" / "model.safetensors")
    b = load_file(workspace / "results" / "mix_replay" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("select", ["obs", "fluctuation"])
def test_reconstruction_selection_records_the_units_it_applied_and_replays_identically(workspace, select):
    """--reconstruct_select obs / fluctuation keeps the criterion's per-layer counts, and plan.json records the
    units the refit chose, so a replay gives the same weights and the plan describes the model."""
    # one round: a second would score models the two refits left different
    recon = ("--reconstruct", "lstsq_bias", "--reconstruct_num_samples", "8", "--reconstruct_seq_len", "32", "--iterative_steps", "1")
    assert main(_prune_args(workspace, f"{select}_plan", "--importance_method", "magnitude", *recon)) == 0
    assert main(_prune_args(workspace, f"{select}_sel", "--importance_method", "magnitude", "--reconstruct_select", select, *recon)) == 0
    by_plan = json.loads((workspace / "results" / f"{select}_plan" / "plan.json").read_text())
    by_obs = json.loads((workspace / "results" / f"{select}_sel" / "plan.json").read_text())
    assert by_plan["reconstruction"]["select"] == "plan"  # auto with magnitude: the criterion is not re-measured
    removed = lambda plan: plan["params_before"] - plan["params_after"] + plan["added_params"]  # noqa: E731  (biases apart)
    assert by_obs["reconstruction"]["select"] == select and removed(by_obs) == removed(by_plan)
    counts = lambda plan: [(len(l["kv_groups"] or []), len(l["mlp_channels"] or [])) for l in plan["layers"]]  # noqa: E731
    assert counts(by_obs) == counts(by_plan) and by_obs["layers"] != by_plan["layers"]
    with open(workspace / "results" / f"{select}_sel" / "analysis" / "global_group_table.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    for index, layer in enumerate(by_obs["layers"]):  # the analysis marks the units the refit removed, not the plan's first choice
        for kind, field in (("kv_group", "kv_groups"), ("mlp_channel", "mlp_channels")):
            rows = [r for r in table if int(r["layer"]) == index and r["unit"] == kind]
            if layer[field] is not None and rows:
                assert {int(r["index"]) for r in rows if r["removed"] == "False"} == set(layer[field])
    model = load_checkpoint(workspace / "results" / f"{select}_sel" / "model")
    for index, layer in enumerate(by_obs["layers"]):
        if layer["mlp_channels"] is not None:
            assert layer_units(model, index, "mlp_channel").count == len(layer["mlp_channels"])
    assert main(_prune_args(workspace, f"{select}_replay", "--plan", str(workspace / "results" / f"{select}_sel" / "plan.json"))) == 0
    a = load_file(workspace / "results" / f"{select}_sel" / "model" / "model.safetensors")
    b = load_file(workspace / "results" / f"{select}_replay" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_plan_is_complete_before_surgery_and_never_patched(workspace, monkeypatch):
    """plan.json is the Plan as selection made it: surgery reads it and changes nothing but the count of the model
    as saved. Bias compensation on a family without o_proj/down_proj biases adds parameters, which the refit decides
    (it may keep a projection as it was): reconstruction reports them, and the plan's count then includes them."""
    import copy

    import prunellm.pruner as pruner

    made = []
    original = pruner.score_and_plan

    def recording(*args, **kwargs):
        plan, table = original(*args, **kwargs)
        made.append(copy.deepcopy(plan.to_dict()))
        return plan, table

    monkeypatch.setattr(pruner, "score_and_plan", recording)
    assert main(_prune_args(workspace, "biased", "--importance_method", "magnitude", "--reconstruct", "bias",
                            "--reconstruct_num_samples", "8", "--reconstruct_seq_len", "32", "--iterative_steps", "1")) == 0  # fmt: skip
    out = workspace / "results" / "biased"
    written = json.loads((out / "plan.json").read_text())
    counts = ("params_after", "added_params", "achieved_ratio")
    uncounted = lambda plan: {key: value for key, value in plan.items() if key not in counts}  # noqa: E731
    assert [uncounted(written)] == [uncounted(plan) for plan in made]  # reconstruction settings and their hash included, no timings
    assert made[0]["added_params"] == 0 and written["params_after"] - written["added_params"] == made[0]["params_after"]
    assert written["reconstruction"]["hash"] and "seconds" not in written["reconstruction"]
    report = json.loads((out / "analysis" / "reconstruction.json").read_text())
    model = load_checkpoint(out / "model")
    assert report["added_params"] == written["added_params"] > 0  # the tiny qwen2 builds o_proj/down_proj without biases
    assert sum(p.numel() for p in model.parameters()) == written["params_after"]
    # the replay reproduces the same weights from the same complete plan
    assert main(_prune_args(workspace, "biased_replay", "--plan", str(out / "plan.json"))) == 0
    assert json.loads((workspace / "results" / "biased_replay" / "plan.json").read_text()) == written
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(workspace / "results" / "biased_replay" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_from_an_earlier_lstsq_solver_is_refused(workspace, capsys):
    assert main(_prune_args(workspace, "oldsolver", "--importance_method", "magnitude", "--reconstruct", "lstsq")) == 0
    plan_path = workspace / "results" / "oldsolver" / "plan.json"
    plan = json.loads(plan_path.read_text())
    assert plan["reconstruction"]["mode"] == "lstsq" and plan["reconstruction"]["damp"] == "auto"
    del plan["reconstruction"]["solver"]  # as written before the ridge pulled toward the original weights
    old = workspace / "old_plan.json"
    old.write_text(json.dumps(plan))
    assert main(_prune_args(workspace, "oldsolver_replay", "--plan", str(old))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "earlier solver" in err and "without --plan" in err
    assert not (workspace / "results" / "oldsolver_replay").exists()


def test_existing_output_is_refused_without_overwrite(workspace, capsys):
    assert main(_prune_args(workspace, "twice", "--importance_method", "magnitude")) == 0
    before = (workspace / "results" / "twice" / "plan.json").read_text()
    assert main(_prune_args(workspace, "twice", "--importance_method", "magnitude")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --output_name 'twice'") and "--overwrite" in err[-1]
    assert (workspace / "results" / "twice" / "plan.json").read_text() == before
    assert main(_prune_args(workspace, "twice", "--importance_method", "random", "--overwrite")) == 0
    assert json.loads((workspace / "results" / "twice" / "plan.json").read_text())["criterion"] == "random"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--pruning_ratio", "1.5"], "--pruning_ratio"),
        (["--importance_method", "psychic"], "--importance_method psychic: is not a criterion"),
        (["--units", "heads"], "--units heads: is not valid"),
        (["--dataset", "no_such_corpus"], "--dataset 'no_such_corpus'"),
        # out of reach under the flags: refused from the model's shapes, before scoring (tests/test_faults_checks.py)
        (["--pruning_ratio", "0.9"], "--pruning_ratio 0.9 is out of reach: removing every unit these flags allow (--units mlp_channel"),
        # the user's ratio is named, not the share of a round (before any round is scored)
        (["--pruning_ratio", "0.9", "--iterative_steps", "3"], "--pruning_ratio 0.9 is out of reach"),
        (["--freeze_first_n_layers", "3"], "no layer that may be pruned"),
        (["--taylor_seq_len", "100000"], "--calibration_seq_len 100000 is longer than the model's context (256 tokens): use at most 256"),
        (["--reconstruct_seq_len", "257"], "--reconstruct_seq_len 257 is longer than the model's context"),
        (["--allocation", "layerwise", "--max_pruning_rate", "0.01", "--pruning_ratio", "0.5", "--iterative_steps", "1"],
         "--pruning_ratio 0.5 is out of reach: removing every unit these flags allow (--units mlp_channel, 3 of 3 layers, --max_pruning_rate 0.01 a layer)"),
        (["--reconstruct_damp", "often"], "--reconstruct_damp"),
        (["--importance_method", "tayl0r"], "--importance_method tayl0r: is not a criterion: use one of fluctuation, magnitude, obs, random, taylor"),
        (["--units", "kv_group,heads"], "--units kv_group,heads: is not valid: use a comma-separated subset of kv_group, mlp_channel"),
        (["--tau", "often"], "--tau often: is not valid: use auto, a number, inf or -inf"),
        (["--temperature", "hot"], "--temperature hot: is not valid: use 0 (off), a number > 0 or auto"),
        (["--temperature", "-1"], "--temperature -1: is not valid"),
        (["--allocation", "layerwise", "--pruning_distribution", "1-3"], "--pruning_distribution 1-3: is not valid: use A:M"),
        (["--run_evaluation", "ppl,bleu"], "--run_evaluation 'bleu' is not valid: use a comma-separated subset of ppl"),
        (["--reconstruct_dataset", "no_such_corpus"], "--reconstruct_dataset 'no_such_corpus'"),
        (["--reconstruct_select", "obs", "--reconstruct", "bias"], "--reconstruct_select obs chooses units for a least-squares refit"),
        (["--reconstruct_select", "fluctuation", "--reconstruct", "none"], "--reconstruct_select fluctuation chooses units during reconstruction"),
    ],
)
def test_bad_input_gives_one_line(workspace, capsys, extra, expected):
    args = _prune_args(workspace, "bad", *extra)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert not (workspace / "results" / "bad").exists()


@pytest.mark.parametrize(
    "extra, expected, wrong",
    [
        (["--taylor_seq_len", "64", "--reconstruct", "none"],
         "has 28 tokens with this tokenizer, but --calibration_seq_len 64 needs at least 65", "--seq_len"),
        (["--taylor_seq_len", "16"], "--reconstruct_seq_len 128 needs at least 129", "--seq_len"),  # checked before scoring
        (["--importance_method", "magnitude", "--reconstruct_seq_len", "64"],
         "--dataset '", "--reconstruct_dataset"),  # reconstruction text defaults to --dataset: name the flag given
        (["--importance_method", "magnitude", "--reconstruct_seq_len", "64"], "--reconstruct_seq_len 64 needs", "--seq_len"),
    ],
)  # fmt: skip
def test_too_short_text_names_the_flags_actually_used(workspace, capsys, extra, expected, wrong):
    short = workspace / "short.txt"
    short.write_text("the king and the queen walked to the castle " * 3)
    args = _prune_args(workspace, "short", *extra)
    args[args.index("--dataset") + 1] = str(short)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0] and wrong + " " not in err[0], err


def test_invalid_choice_is_one_line_with_the_valid_choices(workspace, capsys):
    with pytest.raises(SystemExit) as info:
        main(_prune_args(workspace, "bad", "--normalization", "sideways"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--normalization" in err[0] and "'none', 'block', 'layer'" in err[0], err


def test_metrics_and_run_evaluation_never_silently_override_each_other(workspace, capsys, monkeypatch):
    import prunellm.pruner

    monkeypatch.setattr(prunellm.pruner, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    assert main(_prune_args(workspace, "bad", "--run_evaluation", "ppl", "--metrics", "speed")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--run_evaluation ppl and --metrics speed disagree" in err[0], err
    from prunellm.options import EvalOptions

    assert prunellm.pruner.evaluation_metrics("", EvalOptions(metrics="ppl,memory")) == ["ppl", "memory"]  # --metrics alone
    assert prunellm.pruner.evaluation_metrics("ppl", EvalOptions()) == ["ppl"]
    assert prunellm.pruner.evaluation_metrics("", EvalOptions()) == []  # nothing asked: no evaluation


def test_min_above_max_rate_is_refused_before_any_work(workspace, capsys, monkeypatch):
    import prunellm.pruner

    monkeypatch.setattr(prunellm.pruner, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    args = _prune_args(workspace, "bad", "--allocation", "layerwise", "--min_pruning_rate", "0.5", "--max_pruning_rate", "0.2")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max_pruning_rate 0.2" in err[0] and "--min_pruning_rate 0.5" in err[0], err


def test_unknown_architecture_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    _tokenizer().save_pretrained(tmp_path / "gpt2")
    (tmp_path / "t.txt").write_text(TEXT)
    code = main(["prune", "--base_model", str(tmp_path / "gpt2"), "--output_dir", str(tmp_path / "r"), "--output_name", "x",
                 "--dataset", str(tmp_path / "t.txt"), "--importance_method", "magnitude"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "architecture 'gpt2' has no prunellm spec" in err and "llama" in err and "gpt2.yaml" in err


def test_eval_command_on_a_model_directory_and_text_file(workspace, tmp_path):
    out = tmp_path / "eval.json"
    code = main(["eval", "--model_path", str(workspace / "tiny"), "--metrics", "ppl", "--ppl_datasets", str(workspace / "text.txt"),
                 "--ppl_seq_len", "16", "--ppl_max_windows", "8", "--output", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    row = result["metrics"]["ppl"][0]
    assert row["windows"] == 8 and row["scored_tokens"] == 8 * 15 and row["ppl"] > 1
    assert result["model"]["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(workspace / "tiny").parameters())


def test_eval_rejects_nonpositive_seq_len(workspace, capsys):
    assert main(["eval", "--model_path", str(workspace / "tiny"), "--ppl_seq_len", "0"]) == 2
    assert "--ppl_seq_len" in capsys.readouterr().err


def test_legacy_pickle_needs_trust(tmp_path, capsys):
    path = tmp_path / "pruned_model.bin"
    torch.save({"model": "anything"}, path)
    assert main(["eval", "--model_path", str(path)]) == 2
    assert "--trust_pickle" in capsys.readouterr().err


def test_prune_with_accelerate_device_map(workspace):
    """--device auto loads through accelerate's device_map (all on CPU here) and scoring works on it."""
    assert main(_prune_args(workspace, "auto", "--device", "auto", "--importance_method", "taylor")) == 0
    plan = json.loads((workspace / "results" / "auto" / "plan.json").read_text())
    assert plan["calibration"]["hash"] and abs(plan["achieved_ratio"] - 0.015) < 0.005


def test_a_recipe_file_runs_the_same_pruning_as_the_flags(workspace, capsys):
    """`prunellm run recipe.yaml` takes the option groups of `prune --help` and gives the identical plan."""
    assert main(_prune_args(workspace, "flags", "--importance_method", "wanda", "--reconstruct", "none")) == 0
    recipe = workspace / "recipe.yaml"
    recipe.write_text(
        "command: prune\n"
        f"recipe:\n  base_model: {workspace / 'tiny'}\n  output_name: fromfile\n  dataset: {workspace / 'text.txt'}\n"
        "  taylor_num_samples: 8\n  taylor_seq_len: 32\n  pruning_ratio: 0.015\n  importance_method: wanda\n"
        "  reconstruct: none\n"
        f"run:\n  output_dir: {workspace / 'results'}\n"
    )
    assert main(["run", str(recipe)]) == 0
    flags = json.loads((workspace / "results" / "flags" / "plan.json").read_text())
    from_file = json.loads((workspace / "results" / "fromfile" / "plan.json").read_text())
    assert from_file["layers"] == flags["layers"] and from_file["params_after"] == flags["params_after"]
    # the grouped form (one mapping per pipeline step, as PruneRecipe nests them) gives the same plan and recipe
    recipe.write_text(
        "command: prune\n"
        f"recipe:\n  base_model: {workspace / 'tiny'}\n  output_name: grouped\n"
        f"  calibration: {{dataset: {workspace / 'text.txt'}, taylor_num_samples: 8, taylor_seq_len: 32}}\n"
        "  budget: {pruning_ratio: 0.015}\n  scoring: {importance_method: wanda}\n  reconstruction: {reconstruct: none}\n"
        f"run:\n  output_dir: {workspace / 'results'}\n"
    )
    assert main(["run", str(recipe)]) == 0
    grouped = json.loads((workspace / "results" / "grouped" / "plan.json").read_text())
    assert grouped["layers"] == flags["layers"] and grouped["recipe"] == {**from_file["recipe"], "output_name": "grouped"}
    capsys.readouterr()
    recipe.write_text("command: prune\nrecipe:\n  budget: {pruning_ratoi: 0.2}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe.budget.pruning_ratoi" in err[0], err
    recipe.write_text("command: prune\nrecipe:\n  pruning_ratoi: 0.2\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe.pruning_ratoi" in err[0] and "recipe.yaml" in err[0]
    recipe.write_text("command: prune\nrecovry: {}\n")
    assert main(["run", str(recipe)]) == 2
    assert "unknown group 'recovry'" in capsys.readouterr().err


def test_the_shipped_retraining_free_recipe_parses_into_its_groups():
    """recipes/retraining_free.yaml (the best measured combination, docs/benchmarks.md) is a valid recipe file."""
    from prunellm.cli import read_recipe_file

    command, groups = read_recipe_file(REPO / "recipes" / "retraining_free.yaml")
    recipe = groups["recipe"]
    assert command == "prune"
    assert (recipe.scoring.importance_method, recipe.budget.units) == ("fluctuation", "mlp_channel")
    assert (recipe.selection.normalization, recipe.reconstruction.reconstruct) == ("uniform", "lstsq_bias")
    assert recipe.priors.temperature == "auto"
    from prunellm.options import PruneRecipe

    default = PruneRecipe()  # the file spells out the CLI defaults: they must not drift apart
    fields = lambda r: (r.scoring.importance_method, r.budget.units, r.priors.temperature, r.selection.normalization,  # noqa: E731
                        r.reconstruction.reconstruct)  # fmt: skip
    assert fields(recipe) == fields(default)
    from prunellm.reconstruction import resolve_select

    applied = lambda r: resolve_select(r.reconstruction.reconstruct_select, r.scoring.importance_method, r.reconstruction.reconstruct)  # noqa: E731
    assert applied(recipe) == applied(default) == "fluctuation"
    assert recipe.budget.rounds() == default.budget.rounds() == 2
    assert default.budget.rounds(offload=True) == 1  # one streamed pass
    assert default.replace(pruning_ratio=0.3, iterative_steps=3).budget.rounds() == 3


def test_temperature_auto_records_the_matched_t_and_prunes_by_it(workspace):
    from prunellm.priors import matched_temperature, prior_multipliers

    args = ("--importance_method", "magnitude", "--units", "kv_group,mlp_channel", "--normalization", "block",
            "--layer_importance_num_samples", "4", "--block_importance_num_samples", "4", "--reconstruct", "none", "--iterative_steps", "1")  # fmt: skip
    assert main(_prune_args(workspace, "t_auto", "--temperature", "auto", *args)) == 0
    out = workspace / "results" / "t_auto"
    layers = json.loads((out / "layer_importance_loss.json").read_text())
    blocks = json.loads((out / "block_importance_loss.json").read_text())
    t = layers["temperature"]
    assert isinstance(t, float) and 0.0 < t
    base = prior_multipliers(layers["layers"], blocks["attention"], blocks["mlp"], 1.0, layers["tau"])
    assert any(v > 0 for v in base.values())
    # the spread auto matched: T = ln(score spread) / ln(prior spread), so the prior's spread is recorded too
    assert layers["prior_spread_p90_over_p10"] > 1.0
    # the same plan as the explicit T the run chose
    assert main(_prune_args(workspace, "t_fixed", "--temperature", repr(t), *args)) == 0
    fixed = json.loads((workspace / "results" / "t_fixed" / "plan.json").read_text())
    assert json.loads((out / "plan.json").read_text())["layers"] == fixed["layers"]
    assert matched_temperature(base, {}) == 0.0  # nothing to match: no prior


@pytest.mark.parametrize("tau, far, skipped", [("-inf", "-1e30", "layer ablations"), ("inf", "1e30", "block ablations")])
def test_a_pure_prior_skips_the_ablations_it_would_not_use(workspace, tau, far, skipped):
    """``--tau -inf`` takes every multiplier from its block's Δ and ``inf`` from its layer's: the other kind's ablations
    are not run (no stage for them, the file says so), and the plan is the one a tau far beyond every Δ gives with
    both kinds measured."""
    args = ("--importance_method", "magnitude", "--units", "kv_group,mlp_channel", "--normalization", "block",
            "--layer_importance_num_samples", "4", "--block_importance_num_samples", "4", "--reconstruct", "none", "--iterative_steps", "1")  # fmt: skip
    assert main(_prune_args(workspace, f"pure{tau}", "--tau", tau, *args)) == 0
    assert main(_prune_args(workspace, f"far{tau}", "--tau", far, *args)) == 0
    read = lambda name, file: json.loads((workspace / "results" / name / file).read_text())  # noqa: E731
    assert read(f"pure{tau}", "plan.json")["layers"] == read(f"far{tau}", "plan.json")["layers"]
    assert f"priors/{skipped}" not in read(f"pure{tau}", "logs/timings.json")["parts"]
    assert f"priors/{skipped}" in read(f"far{tau}", "logs/timings.json")["parts"]
    if skipped == "layer ablations":
        layers = read(f"pure{tau}", "layer_importance_loss.json")
        assert layers["layers"] is None and "--tau -inf" in layers["skipped"]
        assert read(f"pure{tau}", "layer_importance_loss.json")["temperature"] == read(f"far{tau}", "layer_importance_loss.json")["temperature"]
    else:
        blocks = read(f"pure{tau}", "block_importance_loss.json")
        assert "mlp" not in blocks and "--tau inf" in blocks["skipped"]


def test_prior_measure_kl_records_divergences_and_changes_only_the_prior(workspace):
    """--prior_measure kl (the default): the prior's files name the measure and hold KL divergences (positive for
    every block of a random model: each changes the distribution), which differ from the loss measure's Δ on the
    same windows."""
    args = ("--importance_method", "magnitude", "--units", "kv_group,mlp_channel", "--normalization", "block", "--temperature", "1",
            "--layer_importance_num_samples", "4", "--block_importance_num_samples", "4", "--reconstruct", "none", "--iterative_steps", "1")  # fmt: skip
    assert main(_prune_args(workspace, "kl", "--prior_measure", "kl", *args)) == 0
    assert main(_prune_args(workspace, "loss", "--prior_measure", "loss", *args)) == 0
    read = lambda name, file: json.loads((workspace / "results" / name / file).read_text())  # noqa: E731
    kl, loss = read("kl", "block_importance_loss.json"), read("loss", "block_importance_loss.json")
    assert kl["metric"] == read("kl", "layer_importance_loss.json")["metric"] == "kl_from_dense_zero_ablation"
    assert loss["metric"] == "delta_loss_zero_ablation"
    assert all(v > 0 for v in kl["attention"] + kl["mlp"] + read("kl", "layer_importance_loss.json")["layers"])
    assert kl["mlp"] != loss["mlp"]
    assert read("kl", "plan.json")["recipe"]["prior_measure"] == "kl"


def test_iterative_steps_prune_in_rounds_that_compose_count_and_replay(workspace):
    """--iterative_steps 3: three rounds, each scored and refitted on the model the one before left (the prior
    measured in round 1 and reused, the default --prior_rounds first); the plan's layers are the original indices all rounds keep, its count is the checkpoint's, the table
    lists each unit once, and the plan replays to the same weights."""
    recon = ("--reconstruct", "lstsq_bias", "--reconstruct_num_samples", "8", "--reconstruct_seq_len", "32")
    priors = ("--temperature", "auto", "--layer_importance_num_samples", "4", "--block_importance_num_samples", "4")
    args = _prune_args(workspace, "rounds", "--importance_method", "fluctuation", "--iterative_steps", "3", *recon, *priors)
    assert main(args) == 0
    out = workspace / "results" / "rounds"
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["rounds"]) == 3 and abs(plan["achieved_ratio"] - 0.015) < 0.002
    added = json.loads((out / "analysis" / "reconstruction.json").read_text())["added_params"]
    for before, after in zip(plan["rounds"], plan["rounds"][1:]):  # each round starts from the model the last left
        assert after["params_before"] >= before["params_after"]
    # the rounds' own counts also hold the compensation biases a later round removed with a whole block, which the
    # base model never had: whole down_proj biases (hidden size 64) apart, they add up to the plan's
    removed = plan["params_before"] - plan["params_after"] + plan["added_params"]  # what selection removed, biases apart
    beyond = sum(r["params_before"] - r["params_after"] for r in plan["rounds"]) - removed
    assert beyond >= 0 and beyond % 64 == 0
    model = load_checkpoint(out / "model")
    assert sum(p.numel() for p in model.parameters()) == plan["params_after"] and plan["added_params"] == added
    for index, layer in enumerate(plan["layers"]):
        assert layer_units(model, index, "mlp_channel").count == len(layer["mlp_channels"])
        widths = [len(r["layers"][index]["mlp_channels"]) for r in plan["rounds"]]
        assert widths == sorted(widths, reverse=True) and widths[-1] == len(layer["mlp_channels"])
    for step in (1, 2, 3):  # each round's prior files: round 1's measurement
        assert json.loads((out / "rounds" / str(step) / "layer_importance_loss.json").read_text()).get("measured_in", "rounds/1") == "rounds/1"
    with open(out / "analysis" / "global_group_table.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    keys = [(r["layer"], r["unit"], r["index"]) for r in table]
    assert len(keys) == len(set(keys)) == sum(layer_units(make_tiny_model("qwen2", num_hidden_layers=3), i, "mlp_channel").count for i in range(3))
    for index, layer in enumerate(plan["layers"]):
        assert {int(r["index"]) for r in table if int(r["layer"]) == index and r["removed"] == "False"} == set(layer["mlp_channels"])
    assert main(_prune_args(workspace, "rounds_replay", "--plan", str(out / "plan.json"))) == 0
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(workspace / "results" / "rounds_replay" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prior_rounds_first_measures_the_prior_once_and_reuses_it(workspace, monkeypatch):
    """--prior_rounds first: in two rounds the ablation passes run once (on the unpruned model) and round 2 selects
    with the same multipliers, its files those of round 1 saying where they were measured; the default (every)
    measures again on the model round 1 left, whose Δ differ. Round 1 is the same either way; first is the default."""
    import prunellm.pruner as pruner

    calls = []
    measure = pruner.compute_priors
    monkeypatch.setattr(pruner, "compute_priors", lambda *a, **k: calls.append(a[-1]) or measure(*a, **k))
    args = ("--importance_method", "magnitude", "--units", "kv_group,mlp_channel", "--normalization", "block", "--temperature", "1",
            "--layer_importance_num_samples", "4", "--block_importance_num_samples", "4", "--reconstruct", "none",
            "--iterative_steps", "2", "--pruning_ratio", "0.02")  # fmt: skip
    assert main(_prune_args(workspace, "every", *args, "--prior_rounds", "every")) == 0 and len(calls) == 2
    assert main(_prune_args(workspace, "first", *args, "--prior_rounds", "first")) == 0 and len(calls) == 3
    read = lambda name, step, file: json.loads((workspace / "results" / name / "rounds" / str(step) / file).read_text())  # noqa: E731
    for file in ("layer_importance_loss.json", "block_importance_loss.json"):
        assert read("first", 2, file) == {**read("first", 1, file), "measured_in": "rounds/1"}
        assert read("first", 1, file) == read("every", 1, file) and read("every", 2, file) != read("every", 1, file)
    assert main(_prune_args(workspace, "default", *args)) == 0 and len(calls) == 4
    plans = {name: json.loads((workspace / "results" / name / "plan.json").read_text()) for name in ("every", "first", "default")}
    assert plans["default"]["layers"] == plans["first"]["layers"]
    assert plans["first"]["rounds"][0] == plans["every"]["rounds"][0] and plans["first"]["recipe"]["prior_rounds"] == "first"


def test_iterative_steps_with_offload_is_refused_before_any_work(workspace, capsys):
    assert main(_prune_args(workspace, "rounds_offload", "--iterative_steps", "2", "--offload", "--device", "cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--iterative_steps" in err[0] and "--offload" in err[0]
    assert not (workspace / "results" / "rounds_offload").exists()
