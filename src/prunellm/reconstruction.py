"""Retraining-free recovery: prune layer by layer and refit what the removed units contributed.

For each decoder layer in order, calibration hidden states are run through the *already pruned* earlier
layers (so later layers see the inputs they will really get), and for the two projections that read the
pruned units (o_proj reads the kept heads, down_proj the kept channels):

* ``bias`` (FLAP): add Σ_{j removed} W[:, j]·mean(x_j) to the projection's bias, which preserves the mean output
  over calibration tokens exactly;
* ``lstsq``: refit the kept columns so the projection's output on calibration inputs is preserved in the least
  squares sense, with a ridge that pulls toward the original weights W_S rather than toward zero:
  W'_Sᵀ = (H_SS + λI)⁻¹ (H_S,: Wᵀ + λ W_Sᵀ) with H = XᵀX accumulated in float64 and λ = damp·mean(diag H_SS)
  (Cholesky; λ is raised automatically when the system is ill-conditioned, and never NaN weights are written).
  λ → ∞ leaves the weights alone, λ → 0 is the plain refit. ``damp="auto"`` (the default) picks λ per projection
  by 2-fold cross-validation over the calibration batches (fit on one half, measure the output error on the
  other) from :data:`DAMP_GRID`, and leaves the projection alone when no λ beats no refit on held-out batches —
  a plain refit over-fits the calibration text and can raise the loss on other text.
  A refit that would not lower the layer's calibration reconstruction error is discarded.
* ``lstsq_bias``: the same refit with the projection's bias as one more, always kept, input column of constant 1
  (an intercept): the mean of what the removed units contributed (``bias``) and the refit of ``lstsq`` solved
  jointly, in one ridge system on the Gram matrix of [x, 1].

Memory is bounded by one layer's statistics (in×in float64) plus the calibration hidden states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import StopForward, UnitKey, batches_of, capture_block_inputs, run_block
from .errors import PrunellmError
from .hf_modeling import BIAS_COMPENSATION_KEY
from .models import input_device
from .specs import spec_for
from .surgery import prune_units, sync_config
from .units import decoder_layers, get_module, index_ranges, layer_units

log = logging.getLogger(__name__)

Mode = Literal["none", "bias", "lstsq", "lstsq_bias"]
LSTSQ_MODES = ("lstsq", "lstsq_bias")
Damp = Union[float, Literal["auto"]]
DAMP_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # λ / mean(diag H_SS) tried by damp="auto"
SOLVER = "ridge_to_original"  # recorded in plans: replaying a plan made by another solver would differ


@dataclass
class InputStats:
    """Σ x and Σ xxᵀ (float64) of one projection's input over calibration tokens (and per fold, for auto damping)."""

    sum: torch.Tensor
    gram: torch.Tensor | None
    tokens: int = 0
    fold_grams: list[torch.Tensor] | None = None
    fold_sums: list[torch.Tensor] | None = None
    fold_tokens: list[int] | None = None

    def augmented(self) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Gram matrices of [x, 1] (in + 1, in + 1): what a refit with an intercept (the projection's bias) solves."""

        def aug(gram: torch.Tensor, total: torch.Tensor, n: int) -> torch.Tensor:
            top = torch.cat([gram, total[:, None]], 1)
            return torch.cat([top, torch.cat([total, torch.tensor([float(n)], dtype=total.dtype)])[None, :]], 0)

        folds = None
        if self.fold_grams is not None:
            folds = [aug(g, t, n) for g, t, n in zip(self.fold_grams, self.fold_sums, self.fold_tokens)]
        return aug(self.gram, self.sum, self.tokens), folds


@dataclass
class ReconstructionReport:
    """What reconstruction did, per projection: error before/after (relative) and damping used."""

    mode: str
    layers: list[dict] = field(default_factory=list)
    # bias parameters compensation added where the family builds o_proj/down_proj without one (not in the plan:
    # the plan counts what is removed; this is what reconstruction puts back)
    added_params: int = 0


def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering decoder layer 0, per batch, and the keyword arguments each layer receives, per batch.

    Every layer's own arguments are kept: models that mix sliding-window and full-attention layers pass them
    different masks.
    """
    layers = decoder_layers(model)
    device = input_device(model)
    hidden, kwargs_list = [], []
    for batch in batches_of(input_ids, batch_size):
        first, per_layer = capture_block_inputs(model, layers, batch.to(device))
        hidden.append(first.detach())
        kwargs_list.append(per_layer)
    return hidden, kwargs_list


def _run_layer(layer: nn.Module, index: int, hidden: list[torch.Tensor], kwargs_list: list[list[dict]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [run_block(layer, h, kw[index]) for h, kw in zip(hidden, kwargs_list)]


def _collect_input_stats(
    layer: nn.Module, index: int, path: str, hidden: list[torch.Tensor], kwargs_list: list[list[dict]], need_gram: bool, folds: int = 1
) -> InputStats:
    """Run the layer up to ``path`` over every batch, accumulating Σx (and XᵀX) of ``path``'s input.

    Each batch's XᵀX is computed in float32 (fast BLAS) and summed into a float64 accumulator; with ``folds`` > 1
    batch b also goes to fold b mod ``folds`` (the total Gram is their sum).
    """
    linear = get_module(layer, path)
    n = linear.in_features
    stats = InputStats(sum=torch.zeros(n, dtype=torch.float64), gram=None)
    if need_gram and folds > 1:
        stats.fold_grams = [torch.zeros(n, n, dtype=torch.float64) for _ in range(folds)]
        stats.fold_sums = [torch.zeros(n, dtype=torch.float64) for _ in range(folds)]
        stats.fold_tokens = [0] * folds
    elif need_gram:
        stats.gram = torch.zeros(n, n, dtype=torch.float64)
    calls = [0]

    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
        stats.sum += x.sum(0).double().cpu()
        if stats.fold_grams is not None:
            stats.fold_grams[calls[0] % folds] += (x.T @ x).double().cpu()
            stats.fold_sums[calls[0] % folds] += x.sum(0).double().cpu()
            stats.fold_tokens[calls[0] % folds] += x.shape[0]
        elif need_gram:
            stats.gram += (x.T @ x).double().cpu()
        stats.tokens += x.shape[0]
        calls[0] += 1
        raise StopForward  # the rest of the layer is not needed (for o_proj: the whole MLP)

    handle = linear.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs_list):
                try:
                    run_block(layer, h, kw[index])
                except StopForward:
                    pass
    finally:
        handle.remove()
    if stats.fold_grams is not None:
        stats.gram = sum(stats.fold_grams[1:], stats.fold_grams[0].clone())
    return stats


@dataclass
class _System:
    """One Gram matrix H seen from a projection W and its kept columns S: what solving and scoring a refit needs."""

    h_ss: torch.Tensor  # H_SS (k, k)
    rhs: torch.Tensor  # H_S,: Wᵀ (k, out)
    target_sq: float  # ‖X Wᵀ‖² = tr(W H Wᵀ)

    @classmethod
    def build(cls, gram: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor) -> "_System":
        w = weight.double()
        rows = gram[kept]
        return cls(rows[:, kept], rows @ w.T, float(((w @ gram) * w).sum()))

    def __add__(self, other: "_System") -> "_System":
        return _System(self.h_ss + other.h_ss, self.rhs + other.rhs, self.target_sq + other.target_sq)

    def __sub__(self, other: "_System") -> "_System":
        return _System(self.h_ss - other.h_ss, self.rhs - other.rhs, self.target_sq - other.target_sq)

    def error(self, new_weight: torch.Tensor) -> float:
        """‖X Wᵀ − X_S W'ᵀ‖² = tr(W H Wᵀ) − 2 tr(W' H_S,: Wᵀ) + tr(W' H_SS W'ᵀ)."""
        wn = new_weight.double()
        return self.target_sq - 2 * float((wn.T * self.rhs).sum()) + float(((wn @ self.h_ss) * wn).sum())

    def solve(self, original: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
        """Ridge refit toward ``original`` (W_S, (out, k)); returns (W'_S, damping actually used)."""
        scale = float(self.h_ss.diagonal().mean()) or 1.0
        anchor = original.double().T  # (k, out)
        lam = damp
        for _ in range(8):
            system = self.h_ss + lam * scale * torch.eye(len(self.h_ss), dtype=torch.float64)
            factor, info = torch.linalg.cholesky_ex(system)
            pivots = factor.diagonal().abs()
            # a factorisation that "succeeds" on a numerically singular system has a vanishing pivot
            well_conditioned = int(info) == 0 and float((pivots.min() / pivots.max()) ** 2) > 1e-12
            if well_conditioned:
                solution = torch.cholesky_solve(self.rhs + lam * scale * anchor, factor).T  # (out, k)
                if torch.isfinite(solution).all():
                    return solution, lam
            lam = max(lam * 10, 1e-6)
        raise PrunellmError(f"least-squares reconstruction stayed singular up to damping {lam:g}: raise --reconstruct_damp")


def solve_lstsq(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Ridge least-squares refit of the kept columns: returns (W'_S, damping actually used).

    Solves (H_SS + λI) W'_Sᵀ = H_S,: Wᵀ + λ W_Sᵀ: keeps X Wᵀ on calibration inputs as well as X_S W'_Sᵀ can while
    staying near the original kept columns W_S (λ = damp · mean(diag H_SS); raised automatically while the system
    is numerically singular).
    """
    return _System.build(gram, weight, kept).solve(weight[:, kept], damp)


def choose_damp(weight: torch.Tensor, fold_grams: list[torch.Tensor], kept: torch.Tensor) -> tuple[float | None, dict]:
    """λ of :data:`DAMP_GRID` with the lowest held-out output error under k-fold cross-validation.

    Returns ``(None, errors)`` when no λ beats leaving the kept columns as they are on the held-out folds.
    """
    w = weight.cpu()
    folds = [_System.build(gram, w, kept) for gram in fold_grams]  # each fold's products once, not once per λ
    total = sum(folds[1:], folds[0])
    plain = w[:, kept]
    cv = dict.fromkeys(DAMP_GRID, 0.0)
    baseline = 0.0
    for held_out in folds:
        train = total - held_out
        baseline += held_out.error(plain)
        for damp in DAMP_GRID:
            solution, _ = train.solve(plain, damp)
            cv[damp] += held_out.error(solution)
    best = min(cv, key=cv.get)
    errors = {"cv_error_no_refit": baseline, "cv_error": {str(k): v for k, v in cv.items()}}
    return (best if cv[best] < baseline else None), errors


def compensate_projection(
    linear: nn.Linear, stats: InputStats, kept_columns: torch.Tensor, mode: Mode, damp: Damp
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """New (out, k) weight and bias for a projection that keeps only ``kept_columns`` of its input.

    Returns the weight, the bias (``None`` = unchanged) and a report entry. ``damp="auto"`` needs
    ``stats.fold_grams``.
    """
    weight = linear.weight.detach()
    removed = torch.ones(linear.in_features, dtype=torch.bool)
    removed[kept_columns] = False
    report: dict = {"kept_columns": int(kept_columns.numel()), "removed_columns": int(removed.sum())}
    new_weight, new_bias = weight[:, kept_columns].clone(), None
    if not removed.any():
        return new_weight, None, report
    if mode == "bias":
        mean = stats.sum / max(stats.tokens, 1)  # (in,) float64
        shift = (weight.double().cpu()[:, removed] @ mean[removed]).to(weight.dtype).to(weight.device)  # (out,)
        new_bias = shift if linear.bias is None else linear.bias.detach() + shift
    elif mode in LSTSQ_MODES:
        if stats.tokens < kept_columns.numel():
            raise PrunellmError(
                f"--reconstruct_num_samples x --reconstruct_seq_len gives {stats.tokens} tokens, fewer than the "
                f"{kept_columns.numel()} kept input columns of a projection: use at least {kept_columns.numel()} tokens"
            )
        w, gram, fold_grams, columns = weight.cpu(), stats.gram, stats.fold_grams, kept_columns
        if mode == "lstsq_bias":
            # the bias is one more input column, constant 1, that is always kept and refitted with the others
            bias = linear.bias.detach().cpu() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
            w = torch.cat([w, bias[:, None]], 1)  # (out, in + 1)
            gram, fold_grams = stats.augmented()
            columns = torch.cat([kept_columns, torch.tensor([linear.in_features])])
        system = _System.build(gram, w, columns)
        baseline, total = system.error(w[:, columns]), system.target_sq or 1.0
        if damp == "auto":
            if not fold_grams:
                raise PrunellmError("--reconstruct_damp auto needs per-fold statistics (collect them with folds=2)")
            chosen, cv = choose_damp(w, fold_grams, columns)
            report["cv_relative_error"] = {k: v / total for k, v in cv["cv_error"].items()} | {"no_refit": cv["cv_error_no_refit"] / total}
            if chosen is None:  # no damping generalises better than the original columns: leave them
                report.update(damp=None, error_before=baseline / total, error_after=baseline / total, kept_original=True)
                return new_weight, new_bias, report
            damp = chosen
        solution, used = system.solve(w[:, columns], float(damp))
        refit = system.error(solution)
        report.update(damp=used, error_before=baseline / total, error_after=min(refit, baseline) / total)
        if refit < baseline:
            solution = solution.to(weight.dtype).to(weight.device)
            if mode == "lstsq_bias":
                solution, new_bias = solution[:, :-1].contiguous(), solution[:, -1].contiguous()
            new_weight = solution
        else:  # never make the layer's calibration error worse
            report["kept_original"] = True
    return new_weight, new_bias, report


def prune_with_reconstruction(
    model: nn.Module,
    kept: dict[UnitKey, list[int]],
    input_ids: torch.Tensor,
    mode: Mode,
    damp: Damp = "auto",
    batch_size: int = 8,
    *,
    capture=None,
    on_layer=None,
) -> ReconstructionReport:
    """Prune every layer's units as ``kept`` says, in layer order, compensating o_proj/down_proj inputs.

    ``capture(model, input_ids, batch_size)`` and ``on_layer`` are the streamed save's (:mod:`prunellm.streaming`):
    the layer-0 inputs gathered without the whole embedding, and ``on_layer.enter(i)`` / ``on_layer.exit(i)``
    around layer i's work (read it from the shards; write it to the output shard and drop it).
    """
    if mode == "none":
        prune_units(model, kept)
        return ReconstructionReport(mode="none")
    if mode not in ("bias", *LSTSQ_MODES):
        raise PrunellmError(f"--reconstruct '{mode}' is not valid: use one of none, bias, lstsq, lstsq_bias")
    if damp != "auto" and (isinstance(damp, str) or damp < 0):
        raise PrunellmError(f"--reconstruct_damp {damp} is not valid: use auto or a number ≥ 0")
    spec = spec_for(model.config)
    layers = decoder_layers(model, spec)
    if mode in LSTSQ_MODES and damp == "auto":
        batch_size = max(1, min(batch_size, (len(input_ids) + 1) // 2))  # cross-validation needs two batches or more
    hidden, kwargs_list = (capture or capture_layer_inputs)(model, input_ids, batch_size)
    report = ReconstructionReport(mode=mode)
    compensated = False
    for index in tqdm(range(len(layers)), desc=f"reconstruction ({mode})", leave=False):
        if on_layer is not None:
            on_layer.enter(index)
        layer = layers[index]
        entry: dict = {"layer": index}
        for kind, proj in (
            ("kv_group", f"{spec.attention.module}.{spec.attention.o}"),
            ("mlp_channel", f"{spec.mlp.module}.{spec.mlp.down}"),
        ):
            key = (index, kind)
            units = layer_units(model, index, kind, spec)
            if key not in kept or len(kept[key]) == units.count:
                continue
            if not kept[key]:  # the whole block goes: a zero-output block, nothing to refit
                prune_units(model, {key: []})
                continue
            # statistics of the projection's input with the attention of this layer already pruned
            folds = 2 if mode in LSTSQ_MODES and damp == "auto" else 1
            stats = _collect_input_stats(layer, index, proj, hidden, kwargs_list, need_gram=mode in LSTSQ_MODES, folds=folds)
            keep = torch.as_tensor(sorted(kept[key]), dtype=torch.long)
            width = next(s.width for s in units.slices if s.module == proj)
            new_weight, new_bias, entry[kind] = compensate_projection(
                get_module(layer, proj), stats, index_ranges(keep, width), mode, damp
            )
            prune_units(model, {key: kept[key]})  # slices the unit's rows and the projection's columns
            projection = get_module(layer, proj)
            with torch.no_grad():
                projection.weight.copy_(new_weight)
            if new_bias is not None:
                report.added_params += new_bias.numel() if projection.bias is None else 0
                projection.bias = nn.Parameter(new_bias, requires_grad=projection.weight.requires_grad)
                compensated = True
        hidden = _run_layer(layer, index, hidden, kwargs_list)  # the next layer sees this layer's pruned output
        report.layers.append(entry)
        if on_layer is not None:
            on_layer.exit(index)
    if compensated:
        # o_proj/down_proj may now carry a bias their family's config does not build: the checkpoint must
        # record it per layer (see hf_modeling.resize_layers)
        setattr(model.config, BIAS_COMPENSATION_KEY, True)
        sync_config(model, spec)
    return report
