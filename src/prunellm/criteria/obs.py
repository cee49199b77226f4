"""OBS: the output error a unit's removal leaves after the best least-squares update of the columns that stay.

A unit owns input columns G of its output projection W (o_proj for a KV group, down_proj for an MLP channel).
With H = XᵀX of that projection's calibration inputs, removing G and refitting the other columns optimally
(what ``--reconstruct lstsq`` does) leaves ``‖X Wᵀ − X_S W'ᵀ‖² = tr(W_G ([H⁻¹]_GG)⁻¹ W_Gᵀ)``; for one column
this is ``‖W[:, j]‖² / [H⁻¹]_jj`` (Optimal Brain Surgeon; SlimGPT, ZipLM apply it to structured units). Every
score is a squared error in the residual stream over the same calibration tokens, so heads and channels of all
layers compare directly. H is damped by :data:`DAMP` · mean(diag H) before inversion (float64).
"""

from __future__ import annotations

import torch

from ..calibration import module_key
from .registry import PrunedInputs, register, register_reselection, sum_over_slices

DAMP = 0.01


def obs_errors(weight: torch.Tensor, gram: torch.Tensor, width: int, damp: float = DAMP) -> torch.Tensor:
    """``(in // width,)`` OBS errors of removing each block of ``width`` input columns of ``weight`` (out, in)."""
    h = gram.double()
    h = h + damp * float(h.diagonal().mean() or 1.0) * torch.eye(len(h), dtype=torch.float64)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.double()
    count = w.shape[1] // width
    if width == 1:
        return (w.pow(2).sum(0) / h_inv.diagonal()).float()
    out = torch.empty(count, dtype=torch.float64)
    for i in range(count):
        cols = slice(i * width, (i + 1) * width)
        w_g = w[:, cols]  # (out, width)
        out[i] = (w_g @ torch.linalg.solve(h_inv[cols, cols], w_g.T)).trace()
    return out.float()


ROUNDS = 32  # greedy OBS removes a layer's units in this many rounds (each followed by the exact update)


def greedy_obs_removal(
    weight: torch.Tensor, gram: torch.Tensor, width: int, remove: int, fixed: int = 0, damp: float = DAMP,
    rounds: int = ROUNDS,
) -> tuple[list[int], list[float]]:
    """Blocks of ``width`` input columns of ``weight`` (out, in) to remove, chosen in ``rounds`` greedy OBS rounds.

    Each round removes the blocks whose removal, followed by the optimal least-squares update of every column
    still there, adds the least output error on calibration inputs (Gram ``gram``) — ``remove / rounds`` of them,
    the lowest one-shot OBS errors — then applies that joint update to the weights and to H⁻¹ (block downdate), so
    the next round sees what the earlier removals left: removals that compensate each other are found, unlike
    one-shot scores (SlimGPT, ZipLM; ``rounds=remove`` is the one-at-a-time greedy). The last ``fixed`` columns
    (an intercept column of constant 1) are never removed but are updated. Returns the removed block indices in
    removal order and each round's error increase (their running sum is the error the optimal refit of the
    columns left has).
    """
    h = gram.double()
    h = h + damp * float(h.diagonal().mean() or 1.0) * torch.eye(len(h), dtype=torch.float64)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.double().clone()
    count = (w.shape[1] - fixed) // width
    if not 0 <= remove <= count:
        raise ValueError(f"cannot remove {remove} of {count} blocks")
    alive = torch.ones(count, dtype=torch.bool)
    order: list[int] = []
    increases: list[float] = []
    rounds = max(1, min(rounds, remove))
    for r in range(rounds):
        take = (remove * (r + 1)) // rounds - (remove * r) // rounds
        if take == 0:
            continue
        if width == 1:
            diag = h_inv.diagonal()[:count]
            errors = w[:, :count].pow(2).sum(0) / torch.where(alive, diag, torch.ones_like(diag))
        else:
            errors = torch.full((count,), float("inf"), dtype=torch.float64)
            for i in torch.nonzero(alive).flatten().tolist():
                cols = slice(i * width, (i + 1) * width)
                errors[i] = (w[:, cols] @ torch.linalg.solve(h_inv[cols, cols], w[:, cols].T)).trace()
        errors = torch.where(alive, errors, torch.full_like(errors, float("inf")))
        chosen = torch.topk(errors, take, largest=False).indices
        cols = (chosen[:, None] * width + torch.arange(width)[None, :]).flatten()
        w_s = w[:, cols]
        step = torch.linalg.solve(h_inv[cols][:, cols], h_inv[cols, :])  # (|S|, in): the joint update's direction
        increases.append(float((w_s * (w_s @ torch.linalg.inv(h_inv[cols][:, cols]).T)).sum()))
        w -= w_s @ step
        h_inv -= h_inv[:, cols] @ step
        w[:, cols] = 0
        h_inv[cols, :] = 0
        h_inv[:, cols] = 0
        alive[chosen] = False
        order.extend(chosen.tolist())
    return order, increases


@register(
    "obs",
    {"activations"},
    "OBS (experimental: did not beat random on SmolLM2 without reconstruction): output error after the optimal "
    "least-squares update, tr(W_G [H⁻¹]_GG⁻¹ W_Gᵀ), H = XᵀX of o/down inputs",
    activation_terms={"gram"},
)
def obs(model, units, stats, options):
    def slice_score(unit, s, linear):
        if s.dim != 1:
            return None
        return obs_errors(linear.weight.detach().float().cpu(), stats.act_gram[module_key(unit.layer, s.module)], s.width)

    return sum_over_slices(model, units, slice_score)


@register_reselection(
    "obs", "the plan's count per layer, chosen by greedy OBS on the pruned model's inputs, each removal followed by the "
    "optimal refit", least_squares_only=True,
)
def reselect_by_obs(inputs: PrunedInputs, keep: int) -> list[int]:
    """The ``keep`` units greedy OBS keeps on the pruned model's inputs, with OBS's own light damping (:data:`DAMP`):
    damping it as much as cross-validation picks for the plan's refit was measured worse on every held-out text
    (docs/benchmarks.md). With a free intercept the bias column is refitted with the others and never removed."""
    weight, gram, fixed = inputs.linear.weight.detach().cpu(), inputs.gram, 0
    if inputs.intercept:
        bias = inputs.linear.bias
        bias = bias.detach().cpu() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
        weight, gram, fixed = torch.cat([weight, bias[:, None]], 1), inputs.augmented_gram(), 1
    removed = set(greedy_obs_removal(weight, gram, inputs.columns.width, inputs.count - keep, fixed=fixed)[0])
    return [i for i in range(inputs.count) if i not in removed]

