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
from .registry import register, sum_over_slices

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
