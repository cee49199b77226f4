"""The default recipe's shortcuts change no weight: what they skip could not have changed the pruned model."""

from __future__ import annotations

import pytest
import torch
from conftest import STORY, save_tiny_model_dir

import prunellm as pl
from prunellm import pruner
from prunellm.options import PruneRecipe


def _small(tmp_path, **changes) -> dict:
    (tmp_path / "text.txt").write_text(STORY)
    return {"dataset": str(tmp_path / "text.txt"), "calibration_num_samples": 8, "calibration_seq_len": 32,
            "layer_importance_num_samples": 4, "block_importance_num_samples": 4, "reconstruct_num_samples": 16,
            "reconstruct_seq_len": 32, "pruning_ratio": 0.005, "units": "kv_group,mlp_channel", "min_kv_groups": 1, "iterative_steps": 2,
            **changes}  # fmt: skip


def test_the_skipped_scoring_pass_would_have_changed_nothing(family, tmp_path, monkeypatch):
    """Uniform normalisation with a re-selecting refit (the default): every block's count comes from the prior, the
    refit re-chooses the units, so the dense scoring pass is skipped. Forced to run and used, it gives the same
    weights bit for bit, in every family, with both unit kinds and two rounds."""
    folder = save_tiny_model_dir(tmp_path / "tiny", family, num_hidden_layers=3)
    recipe = pl.Recipe(base_model=str(folder), **_small(tmp_path))
    fast, fast_plan = pl.run(recipe)
    assert fast_plan.calibration["scoring"].startswith("skipped: --normalization uniform with --reconstruct_select fluctuation")
    monkeypatch.setattr(pruner, "scores_rechosen", lambda recipe: None)
    scored, scored_plan = pl.run(recipe)
    assert "scoring_seconds" in scored_plan.calibration and "scoring" not in scored_plan.calibration
    assert fast_plan.to_dict()["layers"] == scored_plan.to_dict()["layers"]
    assert fast_plan.params_after < fast_plan.params_before
    ours, theirs = fast.state_dict(), scored.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize(
    "changes",
    [{"normalization": "block"}, {"reconstruct_select": "plan"}, {"reconstruct": "none"}, {"allocation": "layerwise"},
     {"importance_method": "taylor"}],
)  # fmt: skip
def test_scores_are_measured_wherever_they_choose_units(changes):
    """Any other normalisation, the plan's own units, no refit, per-layer rates, or a criterion the refit cannot
    re-measure (Taylor needs gradients): the scores decide, so the pass runs."""
    assert pruner.scores_rechosen(PruneRecipe()) is not None
    assert pruner.scores_rechosen(PruneRecipe().replace(**changes)) is None
