"""Offloaded scoring on the real SmolLM2-135M (30 layers, tied 49k embedding): read one layer at a time from the
converted cache folder's shards, it gives the in-memory scores and the identical plan."""

from __future__ import annotations

import pytest
import torch

import prunellm as pl
from prunellm.offload import load_lazy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = pl.load("smollm2-135m")
    return model, pl.calibrate(tokenizer, "shakespeare", num_samples=8, seq_len=64, seed=0)


@pytest.mark.parametrize("criterion", ["taylor_2nd", "wanda"])  # taylor_2nd's first term is taylor's scores
def test_offloaded_smollm2_matches_in_memory(smollm, criterion):
    model, ids = smollm
    reference = pl.score(model, ids, criterion, batch_size=4)
    lazy = load_lazy("smollm2-135m")
    offloaded = pl.score(lazy, ids, criterion, batch_size=4)
    for key, value in reference.scores.items():
        torch.testing.assert_close(offloaded.scores[key], value, rtol=1e-4, atol=1e-6 * float(value.abs().max()))
    if criterion == "taylor_2nd":
        first = {k: v.clone() for k, v in offloaded.stats.gradient_terms["first"].items()}
        for key, value in reference.stats.gradient_terms["first"].items():
            torch.testing.assert_close(first[key], value, rtol=1e-4, atol=1e-6 * float(value.abs().max()))
        assert offloaded.stats.mean_loss == pytest.approx(reference.stats.mean_loss, rel=1e-5)
    assert pl.select(lazy, offloaded, 0.2).layers == pl.select(model, reference, 0.2).layers


def test_offloaded_priors_and_layer_scores_of_smollm2_match_in_memory(smollm):
    # 30 ablation branches through the tied 49 k-word head read in vocabulary slices (the loss-only mode)
    from prunellm.errors import PrunellmError
    from prunellm.layers import layer_importance
    from prunellm.priors import ablation_deltas
    from prunellm.sweep import Offload

    model, ids = smollm
    ids = ids[:4, :32]
    lazy = load_lazy("smollm2-135m")
    for target in ("layer", "mlp"):
        reference = ablation_deltas(model, ids, target, batch_size=2)
        offloaded = ablation_deltas(lazy, ids, target, batch_size=2, offload=Offload("cpu"))
        torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(reference), rtol=1e-3, atol=1e-5)
    reference = layer_importance(model, ids, "block_influence", batch_size=2)
    offloaded = layer_importance(lazy, ids, "block_influence", batch_size=2, offload=Offload("cpu"))
    torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(reference), rtol=1e-4, atol=1e-7)
    with pytest.raises(PrunellmError, match="pass offload="):
        layer_importance(lazy, ids, "block_influence")
