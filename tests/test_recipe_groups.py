"""The typed recipe groups: every flag lives in exactly one group, flat and grouped forms are the same recipe, and
each pipeline step receives only the groups it reads (never the whole recipe)."""

from __future__ import annotations

import inspect
import typing

import pytest

from prunellm import api, pruner
from prunellm.errors import PrunellmError
from prunellm.options import CalibrationOptions, FinetuneData, FinetuneOptions, PruneRecipe, TrainOptions, option_flags, option_groups

# the steps of the width workflow; only the orchestrators (score_and_plan, width_plan, plan_from_selection, which
# records the recipe in the plan) and the run layer take the whole recipe
STEPS = (
    pruner.eligible_layers, pruner.unit_kinds, pruner.collect_stats, pruner.offloaded_run_stats, pruner.ablation_windows,
    pruner.compute_priors, pruner.selection_constraints, pruner.select_by_layer_rates, pruner.reconstruction_settings,
)  # fmt: skip


@pytest.mark.parametrize("step", STEPS, ids=lambda f: f.__name__)
def test_each_step_receives_only_its_groups(step):
    hints = typing.get_type_hints(step)
    groups = set(option_groups(PruneRecipe).values())
    typed = [hints[name] for name in inspect.signature(step).parameters if name in hints]
    assert PruneRecipe not in typed
    assert any(hint in groups for hint in typed), f"{step.__name__} takes no recipe group"


def test_every_flag_is_one_field_of_one_group():
    flags = option_flags(PruneRecipe)
    paths = [entry.path for entry in flags.values()]
    assert len(set(paths)) == len(paths)
    nested = {(group, field) for group, model in option_groups(PruneRecipe).items() for field in model.model_fields}
    assert nested <= set(paths)  # no group field without a flag
    assert PruneRecipe().flat().keys() == flags.keys()


def test_flat_and_grouped_forms_are_the_same_recipe():
    flat = PruneRecipe(dataset="c4", taylor_num_samples=8, pruning_ratio=0.3, importance_method="wanda", allocation="layerwise")
    grouped = PruneRecipe(
        calibration={"dataset": "c4", "taylor_num_samples": 8}, budget={"pruning_ratio": 0.3},
        scoring={"importance_method": "wanda"}, allocation={"allocation": "layerwise"},
    )  # fmt: skip
    assert flat == grouped and PruneRecipe(**flat.flat()) == flat
    assert flat.replace(tau="inf").priors.tau == float("inf") and flat.priors.tau == "auto"
    flat.base_model = "elsewhere"  # assignment validates and keeps the built groups
    assert isinstance(flat.calibration, CalibrationOptions) and flat.calibration.dataset == "c4"
    with pytest.raises(ValueError, match="pruning_ratio"):
        flat.budget = {"pruning_ratio": 2}
    with pytest.raises(ValueError, match="both flat and in group"):
        PruneRecipe(dataset="c4", calibration={"dataset": "ptb"})
    with pytest.raises(ValueError, match="pruning_ratio"):
        PruneRecipe(budget={"pruning_ratio": 1.5})


def test_recovery_uses_the_engine_groups_with_its_own_defaults():
    options = FinetuneOptions()
    assert isinstance(options.data, FinetuneData) and isinstance(options.training, TrainOptions)
    assert (options.data.num_samples, options.data.val_set_size) == (256, 32)
    assert (options.training.num_epochs, options.training.batch_size, options.training.save_steps) == (1.0, 16, 0)
    # a partial group keeps recovery's defaults for what it leaves out; an engine field without a flag is reachable
    partial = FinetuneOptions(data={"cutoff_len": 64}, finetune_seq_len=32)
    assert (partial.data.cutoff_len, partial.data.seq_len, partial.data.num_samples) == (64, 32, 256)
    assert "finetune_num_samples" in option_flags(FinetuneOptions) and "num_samples" not in option_flags(FinetuneOptions)


def test_the_api_recipe_is_the_grouped_recipe():
    assert api.Recipe is PruneRecipe
    with pytest.raises(PrunellmError, match="--units"):
        pruner.unit_kinds(PruneRecipe().budget.model_copy(update={"units": "heads"}))


def test_renamed_calibration_options_keep_their_old_names():
    from prunellm.cli import build_parser

    new = PruneRecipe(calibration_num_samples=8, calibration_seq_len=32)
    assert new.calibration.calibration_num_samples == 8 and new.calibration.calibration_seq_len == 32
    assert PruneRecipe(taylor_num_samples=8, taylor_seq_len=32) == new  # an old recipe file or script
    assert PruneRecipe(calibration={"taylor_num_samples": 8, "calibration_seq_len": 32}) == new
    assert "taylor_num_samples" not in new.flat() and new.flat()["calibration_num_samples"] == 8  # plans record the new name
    with pytest.raises(ValueError, match="'taylor_num_samples' is the old name of 'calibration_num_samples'"):
        PruneRecipe(taylor_num_samples=8, calibration_num_samples=16)
    parser = build_parser()
    old = parser.parse_args(["prune", "--taylor_num_samples", "8", "--taylor_seq_len", "32"])
    renamed = parser.parse_args(["prune", "--calibration_num_samples", "8", "--calibration_seq_len", "32"])
    assert old.calibration_num_samples == renamed.calibration_num_samples == 8
    assert old.calibration_seq_len == renamed.calibration_seq_len == 32
