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
  jointly, in one ridge system on the Gram matrix of [x, 1]. As in ridge regression the intercept is not shrunk:
  λ → ∞ gives ``bias`` exactly (W_S kept, the bias shifted), λ → 0 the plain refit, and ``auto`` also tries λ = ∞.

What a refit preserves is its *target* (``target``):

* ``pruned`` (default): the projection's own output on the pruned model's inputs, X Wᵀ — each projection is
  refitted to do what it did before on what it now receives;
* ``dense``: the dense model's output of that projection on the dense model's inputs — the refit also absorbs the
  error the already pruned earlier layers left in its input;
* ``residual``: the dense model's residual stream after the block — o_proj makes h + attn(h) match the dense
  model's, down_proj the layer's output — so each refit corrects every error accumulated so far (pre-norm residual
  blocks: a projection's output is added to the stream as it is, true of every family spec).

Which units each layer loses (``select``): ``plan`` — the plan's; ``fluctuation`` — the plan's count per layer and
projection kind, the units of lowest fluctuation Var(x_j)·‖W[:, j]‖² on the layer's *pruned-model* inputs (the
plan's criterion measured it on the dense model's: re-scored in sequence, each layer's choice sees the error the
earlier layers' pruning left); ``obs`` — the plan's count, chosen by greedy OBS on those inputs.

For ``dense`` and ``residual`` a dense copy of the calibration hidden states runs beside the pruned one: each layer
runs on it before it is pruned, so the streamed save (one layer read at a time) carries both streams layer by
layer too.
Memory is bounded by one layer's statistics (in×in and in×out float64) plus the calibration hidden states.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import StopForward, UnitKey, batches_of, capture_block_inputs, run_block
from .criteria import RESELECTIONS, PrunedInputs, Reselection
from .errors import PrunellmError
from .hf_modeling import BIAS_COMPENSATION_KEY
from .models import input_device
from .plan import Plan, compose_rounds, kept_units_of, set_kept_units_of
from .runs import stage
from .specs import ArchitectureSpec, spec_for
from .surgery import prune_units, sync_config
from .units import decoder_layers, get_module, index_ranges, layer_units

log = logging.getLogger(__name__)

Mode = Literal["none", "bias", "lstsq", "lstsq_bias"]
Target = Literal["pruned", "dense", "residual"]
TARGETS = ("pruned", "dense", "residual")
LSTSQ_MODES = ("lstsq", "lstsq_bias")
Damp = Union[float, Literal["auto"]]
DAMP_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # λ / mean(diag H_SS) that damp="auto" may choose
DAMP_START = 1.0  # where damp="auto" starts its walk down the grid (the λ most projections choose)
SOLVER = "ridge_to_original_free_intercept"  # recorded in plans: replaying a plan made by another solver would differ


@dataclass
class InputStats:
    """Σ x and Σ xxᵀ (float64) of one projection's input over calibration tokens (and per fold, for auto damping)."""

    sum: torch.Tensor
    gram: torch.Tensor | None
    tokens: int = 0
    fold_grams: list[torch.Tensor] | None = None
    fold_sums: list[torch.Tensor] | None = None
    fold_tokens: list[int] | None = None
    # with an explicit target Y (``target`` other than "pruned"): Σ x yᵀ (in, out), Σ‖y‖², Σ y — total and per fold
    cross: torch.Tensor | None = None
    target_sq: float = 0.0
    target_sum: torch.Tensor | None = None
    fold_cross: list[torch.Tensor] | None = None
    fold_target_sq: list[float] | None = None
    fold_target_sum: list[torch.Tensor] | None = None

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
    # the units each layer kept: the plan's, or with select="obs" the ones reconstruction chose
    kept: dict = field(default_factory=dict)


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


def _add_gram_upper(total: torch.Tensor, x: torch.Tensor) -> None:
    """Add XᵀX of x (tokens, n) to ``total`` (float64, on the CPU) without its lower-left block: the columns in two
    halves, the two diagonal blocks and the upper-right one, three quarters of the work of x.T @ x (the down
    projections' Gram matrices are most of the refit's statistics); :func:`_mirrored` completes the sum. BLAS syrk
    would do half, but scipy's OpenBLAS threads contend with torch's on a small CPU: slower in use."""
    half = x.shape[1] // 2
    left, right = x[:, :half], x[:, half:]
    total[:half, :half] += (left.T @ left).double().cpu()
    total[:half, half:] += (left.T @ right).double().cpu()
    total[half:, half:] += (right.T @ right).double().cpu()


def _mirrored(gram: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix of a sum of :func:`_add_gram_upper`: the lower-left block is the upper-right's transpose."""
    half = gram.shape[0] // 2
    gram[half:, :half] = gram[:half, half:].T
    return gram


def _run_layer(layer: nn.Module, index: int, hidden: list[torch.Tensor], kwargs_list: list[list[dict]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [run_block(layer, h, kw[index]) for h, kw in zip(hidden, kwargs_list)]


@dataclass
class _Replay:
    """A layer's pruned output from what its down projection's statistics pass already computed: the attention's
    output and the down projection's input, per batch. The layer runs with its attention returning the kept output
    and its MLP returning the refitted down projection of the kept channels' inputs (a channel's input does not
    depend on which other channels are kept), so only the norms and residual sums run again, in the family's own
    order, instead of the whole layer (about a third of the refit's layer work)."""

    spec: ArchitectureSpec
    inputs: list[torch.Tensor] = field(default_factory=list)
    attention_outputs: list = field(default_factory=list)

    def attention(self, layer: nn.Module) -> nn.Module:
        return get_module(layer, self.spec.attention.module)

    def run(self, layer: nn.Module, index: int, kwargs_list: list[list[dict]], hidden: list[torch.Tensor], kept_columns: torch.Tensor) -> list[torch.Tensor]:
        """The layer's output per batch with its current (pruned, refitted) down projection."""
        attention, mlp = self.attention(layer), get_module(layer, self.spec.mlp.module)
        down = get_module(mlp, self.spec.mlp.down)
        outputs = []
        with torch.no_grad():
            for h, kw, x, attended in zip(hidden, kwargs_list, self.inputs, self.attention_outputs):
                attention.forward = lambda *args, _out=attended, **kwargs: _out
                mlp.forward = lambda *args, _x=x, **kwargs: down(_x.index_select(-1, kept_columns.to(_x.device)))
                try:
                    outputs.append(run_block(layer, h, kw[index]))
                finally:
                    del attention.forward, mlp.forward  # the class's forward again
        return outputs


# what a target function gets for one batch: the batch index, the projection's input x (tokens, in) and, when the
# whole layer ran, the layer's output and the projection's output (each (tokens, hidden)); returns y (tokens, out)
TargetFn = Callable[[int, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def _collect_input_stats(
    layer: nn.Module,
    index: int,
    path: str,
    hidden: list[torch.Tensor],
    kwargs_list: list[list[dict]],
    need_gram: bool,
    folds: int = 1,
    target: TargetFn | None = None,
    target_needs_output: bool = False,
    replay: "_Replay | None" = None,
) -> InputStats:
    """Run the layer up to ``path`` over every batch, accumulating Σx (and XᵀX) of ``path``'s input.

    Each batch's XᵀX is computed in float32 (fast BLAS) and summed into a float64 accumulator; with ``folds`` > 1
    batch b also goes to fold b mod ``folds`` (the total Gram is their sum). With ``target``, Σ x yᵀ, Σ‖y‖² and
    Σ y of the target outputs are accumulated too (``target_needs_output``: the whole layer runs, and the target
    function receives the layer's and the projection's outputs). ``replay``: keeps each batch's input of ``path``
    and the attention's output, so the layer's pruned output can follow without rerunning it (:class:`_Replay`).
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
    if target is not None:
        out = linear.out_features
        k = max(folds, 1)
        stats.fold_cross = [torch.zeros(n, out, dtype=torch.float64) for _ in range(k)]
        stats.fold_target_sq = [0.0] * k
        stats.fold_target_sum = [torch.zeros(out, dtype=torch.float64) for _ in range(k)]
    calls = [0]
    seen: dict[str, torch.Tensor] = {}

    def accumulate(x: torch.Tensor, y: torch.Tensor | None) -> None:
        fold = calls[0] % folds
        stats.sum += x.sum(0).double().cpu()
        if stats.fold_grams is not None:
            _add_gram_upper(stats.fold_grams[fold], x)
            stats.fold_sums[fold] += x.sum(0).double().cpu()
            stats.fold_tokens[fold] += x.shape[0]
        elif need_gram:
            _add_gram_upper(stats.gram, x)
        if y is not None:
            stats.fold_cross[fold] += (x.T @ y).double().cpu()
            stats.fold_target_sq[fold] += float(y.double().square().sum())
            stats.fold_target_sum[fold] += y.sum(0).double().cpu()
        stats.tokens += x.shape[0]

    def pre_hook(module, args):
        if replay is not None:
            replay.inputs.append(args[0].detach())
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
        if target_needs_output:
            seen["x"] = x
            return
        accumulate(x, target(calls[0], x, None, None) if target is not None else None)
        calls[0] += 1
        raise StopForward  # the rest of the layer is not needed (for o_proj: the whole MLP)

    def post_hook(module, args, output):
        seen["projection"] = output.detach().reshape(-1, output.shape[-1]).float()

    handles = [linear.register_forward_pre_hook(pre_hook)]
    if replay is not None:
        handles.append(replay.attention(layer).register_forward_hook(lambda module, args, output: replay.attention_outputs.append(output)))
    if target_needs_output:
        handles.append(linear.register_forward_hook(post_hook))
    try:
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs_list):
                try:
                    out_h = run_block(layer, h, kw[index])
                except StopForward:
                    continue
                x = seen.pop("x")
                y = target(calls[0], x, out_h.reshape(-1, out_h.shape[-1]).float(), seen.pop("projection"))
                accumulate(x, y)
                calls[0] += 1
    finally:
        for handle in handles:
            handle.remove()
    if stats.fold_grams is not None:
        stats.fold_grams = [_mirrored(gram) for gram in stats.fold_grams]
        stats.gram = sum(stats.fold_grams[1:], stats.fold_grams[0].clone())
    elif stats.gram is not None:
        stats.gram = _mirrored(stats.gram)
    if target is not None:
        stats.cross = sum(stats.fold_cross[1:], stats.fold_cross[0].clone())
        stats.target_sq = sum(stats.fold_target_sq)
        stats.target_sum = sum(stats.fold_target_sum[1:], stats.fold_target_sum[0].clone())
        if folds <= 1:
            stats.fold_cross = stats.fold_target_sq = stats.fold_target_sum = None
    return stats


@dataclass
class _System:
    """One Gram matrix H seen from a projection W and its kept columns S: what solving and scoring a refit needs."""

    h_ss: torch.Tensor  # H_SS (k, k)
    rhs: torch.Tensor  # H_S,: Wᵀ (k, out)
    target_sq: float  # ‖X Wᵀ‖² = tr(W H Wᵀ)
    # the last kept column is an intercept (constant 1, the bias): the ridge leaves it free, as ridge regression
    # leaves its intercept, so λ → ∞ keeps W_S and moves the bias by the mean of what was removed (``bias``)
    free_last: bool = False

    @classmethod
    def build(cls, gram: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, free_last: bool = False) -> "_System":
        """The system whose target is the projection's own output X Wᵀ."""
        w = weight.double()
        rows = gram[kept]
        return cls(rows[:, kept], rows @ w.T, float(((w @ gram) * w).sum()), free_last)

    @classmethod
    def build_for_target(
        cls, gram: torch.Tensor, cross: torch.Tensor, target_sq: float, kept: torch.Tensor, free_last: bool = False
    ) -> "_System":
        """The system whose target Y was given: Xᵀ Y (``cross``, (in, out)) and ‖Y‖²."""
        rows = gram[kept]
        return cls(rows[:, kept], cross[kept], float(target_sq), free_last)

    def __add__(self, other: "_System") -> "_System":
        return _System(self.h_ss + other.h_ss, self.rhs + other.rhs, self.target_sq + other.target_sq, self.free_last)

    def __sub__(self, other: "_System") -> "_System":
        return _System(self.h_ss - other.h_ss, self.rhs - other.rhs, self.target_sq - other.target_sq, self.free_last)

    def cast(self, dtype: torch.dtype) -> "_System":
        return _System(self.h_ss.to(dtype), self.rhs.to(dtype), self.target_sq, self.free_last)

    def error(self, new_weight: torch.Tensor) -> float:
        """‖X Wᵀ − X_S W'ᵀ‖² = tr(W H Wᵀ) − 2 tr(W' H_S,: Wᵀ) + tr(W' H_SS W'ᵀ) (products in the system's dtype,
        sums in float64)."""
        wn = new_weight.to(self.h_ss.dtype)
        cross = float((wn.T * self.rhs).sum(dtype=torch.float64))
        return self.target_sq - 2 * cross + float(((wn @ self.h_ss) * wn).sum(dtype=torch.float64))

    def solve(self, original: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
        """Ridge refit toward ``original`` (W_S, (out, k)); returns (W'_S, damping actually used). A float32 system
        too ill-conditioned for float32 is solved in float64 instead."""
        dtype = self.h_ss.dtype
        penalised = torch.ones(len(self.h_ss), dtype=dtype)
        if self.free_last:
            penalised[-1] = 0.0
        scale = float(self.h_ss.diagonal()[penalised > 0].mean()) if bool((penalised > 0).any()) else 1.0
        scale = scale or 1.0
        anchor = original.to(dtype).T  # (k, out)
        if math.isinf(damp):
            return self._solve_intercept_only(anchor), damp
        lam = damp
        for _ in range(8):
            ridge = lam * scale * penalised
            system = self.h_ss + torch.diag(ridge)
            factor, info = torch.linalg.cholesky_ex(system)
            pivots = factor.diagonal().abs()
            # a factorisation that "succeeds" on a numerically singular system has a vanishing pivot
            well_conditioned = int(info) == 0 and float((pivots.min() / pivots.max()) ** 2) > _CONDITION_FLOOR.get(dtype, 1e-12)
            if well_conditioned:
                solution = torch.cholesky_solve(self.rhs + ridge[:, None] * anchor, factor).T  # (out, k)
                if torch.isfinite(solution).all():
                    return solution, lam
            if dtype != torch.float64:
                return self.cast(torch.float64).solve(original, damp)
            lam = max(lam * 10, 1e-6)
        raise PrunellmError(f"least-squares reconstruction stayed singular up to damping {lam:g}: raise --reconstruct_damp")

    def _solve_intercept_only(self, anchor: torch.Tensor) -> torch.Tensor:
        """λ = ∞ with a free intercept: W_S stays, the intercept absorbs the mean error (FLAP's bias compensation)."""
        if not self.free_last:
            return anchor.T.clone()
        solution = anchor.clone()
        h_free = float(self.h_ss[-1, -1]) or 1.0
        solution[-1] = (self.rhs[-1] - self.h_ss[-1, :-1] @ anchor[:-1]) / h_free
        return solution.T


# 1 / the condition number (squared pivot ratio) below which a system counts as singular in that dtype
_CONDITION_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6}


def solve_lstsq(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Ridge least-squares refit of the kept columns: returns (W'_S, damping actually used).

    Solves (H_SS + λI) W'_Sᵀ = H_S,: Wᵀ + λ W_Sᵀ: keeps X Wᵀ on calibration inputs as well as X_S W'_Sᵀ can while
    staying near the original kept columns W_S (λ = damp · mean(diag H_SS); raised automatically while the system
    is numerically singular).
    """
    return _System.build(gram, weight, kept).solve(weight[:, kept], damp)


def choose_damp(
    weight: torch.Tensor,
    fold_grams: list[torch.Tensor],
    kept: torch.Tensor,
    fold_systems: list["_System"] | None = None,
    free_last: bool = False,
) -> tuple[float | None, dict]:
    """λ of :data:`DAMP_GRID` with the lowest held-out output error under k-fold cross-validation.

    The held-out error of a ridge refit falls and then rises with λ, so the grid is walked downhill from
    :data:`DAMP_START` and stops at the first λ whose neighbour is worse: three λ of the grid's five or six on most
    projections instead of all (about half the refit's solves), the same λ wherever the error has one minimum on the
    grid. The report lists the λ evaluated.
    Returns ``(None, errors)`` when no λ beats leaving the kept columns as they are on the held-out folds.
    ``fold_systems`` (systems for an explicit target) replace the ones built from ``fold_grams`` and ``weight``;
    ``free_last``: the last kept column is an unpenalised intercept (see :class:`_System`).
    """
    w = weight.cpu()
    # each fold's products once, not once per λ
    folds = fold_systems if fold_systems is not None else [_System.build(gram, w, kept, free_last) for gram in fold_grams]
    total = sum(folds[1:], folds[0])
    trains = [total - held_out for held_out in folds]
    # the walk in float32, half the time of float64 on a CPU (sums stay float64; a system too ill-conditioned for
    # float32 is solved in float64): it only ranks λ, the chosen one is solved in float64 by the caller; two errors
    # closer than float32 can tell apart are compared again in float64
    systems = {torch.float64: (trains, folds),
               torch.float32: ([t.cast(torch.float32) for t in trains], [h.cast(torch.float32) for h in folds])}  # fmt: skip
    plain = w[:, kept]
    grid = DAMP_GRID + ((math.inf,) if free_last else ())  # ∞: the intercept alone moves (``bias``)
    cv: dict[tuple[float, torch.dtype], float] = {}

    def held_out_error(damp: float, dtype: torch.dtype = torch.float32) -> float:
        if (damp, dtype) not in cv:
            fit, held = systems[dtype]
            cv[damp, dtype] = sum(h.error(t.solve(plain, damp)[0]) for t, h in zip(fit, held))
        return cv[damp, dtype]

    def lower(a: float, b: float) -> bool:
        """Whether λ = a has the lower held-out error than λ = b."""
        ea, eb = held_out_error(a), held_out_error(b)
        if abs(ea - eb) <= _FLOAT32_TIE * max(abs(ea), abs(eb)):
            ea, eb = held_out_error(a, torch.float64), held_out_error(b, torch.float64)
        return ea < eb

    start = best = grid.index(DAMP_START)
    for step in (-1, 1):
        while 0 <= best + step < len(grid) and lower(grid[best + step], grid[best]):
            best += step
        if best != start:  # went downhill one way: the other way is uphill from the start
            break
    chosen = grid[best]
    baseline = sum(h.error(plain) for h in folds)  # float64: no solve
    if abs(held_out_error(chosen) - baseline) <= _FLOAT32_TIE * abs(baseline):
        held_out_error(chosen, torch.float64)
    precise = {damp: cv.get((damp, torch.float64), error) for (damp, dtype), error in cv.items()}
    errors = {"cv_error_no_refit": baseline, "cv_error": {str(k): precise[k] for k in sorted(precise)}}
    return (chosen if precise[chosen] < baseline else None), errors


# relative difference of two held-out errors below which float32 cannot rank them (measured: ~2e-5)
_FLOAT32_TIE = 1e-3


def _augment_target(cross: torch.Tensor, target_sum: torch.Tensor) -> torch.Tensor:
    """Xᵀ Y of [x, 1]: one more row, Σ y."""
    return torch.cat([cross, target_sum[None, :]], 0)


def _without_bias(cross: torch.Tensor, target_sq: float, target_sum: torch.Tensor, x_sum: torch.Tensor, tokens: int, bias: torch.Tensor):
    """Xᵀ(Y − 1bᵀ) and ‖Y − 1bᵀ‖²: the target a refit of the weight alone must meet when the bias b stays."""
    b = bias.double()
    return cross - x_sum[:, None] * b[None, :], target_sq - 2 * float(b @ target_sum) + tokens * float(b @ b)


def _target_systems(
    stats: InputStats, columns: torch.Tensor, intercept: bool, bias: torch.Tensor | None
) -> tuple["_System", list["_System"] | None]:
    """The total and per-fold systems of a projection whose target Y was collected (``stats.cross``); ``bias``:
    the projection's bias, kept as it is (``intercept=False``)."""
    if not intercept and bias is not None:
        cross, target_sq = _without_bias(stats.cross, stats.target_sq, stats.target_sum, stats.sum, stats.tokens, bias.cpu())
        total = _System.build_for_target(stats.gram, cross, target_sq, columns)
        folds = None
        if stats.fold_grams and stats.fold_cross:
            folds = []
            for g, c, sq, ts, xs, n in zip(stats.fold_grams, stats.fold_cross, stats.fold_target_sq, stats.fold_target_sum,
                                           stats.fold_sums, stats.fold_tokens):  # fmt: skip
                fc, fsq = _without_bias(c, sq, ts, xs, n, bias.cpu())
                folds.append(_System.build_for_target(g, fc, fsq, columns))
        return total, folds
    if intercept:
        gram, fold_grams = stats.augmented()
        cross = _augment_target(stats.cross, stats.target_sum)
        fold_cross = (
            [_augment_target(c, t) for c, t in zip(stats.fold_cross, stats.fold_target_sum)] if stats.fold_cross else None
        )
    else:
        gram, fold_grams, cross, fold_cross = stats.gram, stats.fold_grams, stats.cross, stats.fold_cross
    total = _System.build_for_target(gram, cross, stats.target_sq, columns, intercept)
    folds = None
    if fold_grams and fold_cross:
        folds = [_System.build_for_target(g, c, sq, columns, intercept) for g, c, sq in zip(fold_grams, fold_cross, stats.fold_target_sq)]
    return total, folds


def compensate_projection(
    linear: nn.Linear, stats: InputStats, kept_columns: torch.Tensor, mode: Mode, damp: Damp, refit_unpruned: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """New (out, k) weight and bias for a projection that keeps only ``kept_columns`` of its input.

    Returns the weight, the bias (``None`` = unchanged) and a report entry. ``damp="auto"`` needs
    ``stats.fold_grams``. With a collected target (``stats.cross``) the refit preserves that target instead of
    the projection's own output; ``refit_unpruned`` refits a projection that lost no input too (only useful with
    such a target: it then corrects the error of earlier layers).
    """
    weight = linear.weight.detach()
    removed = torch.ones(linear.in_features, dtype=torch.bool)
    removed[kept_columns] = False
    report: dict = {"kept_columns": int(kept_columns.numel()), "removed_columns": int(removed.sum())}
    new_weight, new_bias = weight[:, kept_columns].clone(), None
    explicit = stats.cross is not None
    if not removed.any() and not (refit_unpruned and explicit):
        return new_weight, None, report
    if mode == "bias":
        if explicit:  # the intercept that makes the mean output equal the target's mean
            mean_x, mean_y = stats.sum / max(stats.tokens, 1), stats.target_sum / max(stats.tokens, 1)
            shift = (mean_y - weight.double().cpu()[:, kept_columns] @ mean_x[kept_columns]).to(weight.dtype).to(weight.device)
            new_bias = shift
        else:
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
        if explicit:
            system, fold_systems = _target_systems(stats, columns, mode == "lstsq_bias", linear.bias.detach() if linear.bias is not None else None)
        elif damp == "auto" and fold_grams:  # the total system is the folds' sum (every term is linear in H)
            fold_systems = [_System.build(g, w, columns, mode == "lstsq_bias") for g in fold_grams]
            system = sum(fold_systems[1:], fold_systems[0])
        else:
            system, fold_systems = _System.build(gram, w, columns, mode == "lstsq_bias"), None
        baseline, total = system.error(w[:, columns]), system.target_sq or 1.0
        if damp == "auto":
            if not fold_grams:
                raise PrunellmError("--reconstruct_damp auto needs per-fold statistics (collect them with folds=2)")
            chosen, cv = choose_damp(w, fold_grams, columns, fold_systems, free_last=mode == "lstsq_bias")
            report["cv_relative_error"] = {k: v / total for k, v in cv["cv_error"].items()} | {"no_refit": cv["cv_error_no_refit"] / total}
            if chosen is None:  # no damping generalises better than the original columns: leave them
                report.update(damp=None, error_before=baseline / total, error_after=baseline / total, kept_original=True)
                return new_weight, new_bias, report
            damp = chosen
        solution, used = system.solve(w[:, columns], float(damp))
        refit = system.error(solution)
        report.update(damp=used if math.isfinite(used) else "inf", error_before=baseline / total, error_after=min(refit, baseline) / total)
        if refit < baseline:
            solution = solution.to(weight.dtype).to(weight.device)
            if mode == "lstsq_bias":
                solution, new_bias = solution[:, :-1].contiguous(), solution[:, -1].contiguous()
            new_weight = solution
        else:  # never make the layer's calibration error worse
            report["kept_original"] = True
    return new_weight, new_bias, report


@dataclass
class _DenseLayer:
    """What the dense model's layer did on the dense stream, per batch: its output and its down_proj's output."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    mlp_outputs: list[torch.Tensor]

    def attention_output(self, b: int) -> torch.Tensor:
        """h_mid − h: what the attention block added to the stream (o_proj's output, bias included)."""
        return self.outputs[b] - self.mlp_outputs[b] - self._flat(self.inputs[b])

    def mid(self, b: int) -> torch.Tensor:
        return self.outputs[b] - self.mlp_outputs[b]

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).float()


def check_reselection(select: str, mode: str) -> Reselection | None:
    """The registered re-selection ``--reconstruct_select`` names (``None``: ``plan``), refused where the refit
    ``mode`` cannot serve it."""
    if select == "plan":
        return None
    if select not in RESELECTIONS:
        raise PrunellmError(f"--reconstruct_select '{select}' is not valid: use one of {', '.join(('plan', *RESELECTIONS))}")
    if mode == "none":
        raise PrunellmError(f"--reconstruct_select {select} chooses units during reconstruction: use --reconstruct bias, lstsq or lstsq_bias, not none")
    reselection = RESELECTIONS[select]
    if reselection.least_squares_only and mode not in LSTSQ_MODES:
        raise PrunellmError(f"--reconstruct_select {select} chooses units for a least-squares refit: use --reconstruct lstsq or lstsq_bias, not {mode}")
    return reselection


def resolve_select(select: str, criterion: str, mode: str) -> str:
    """``--reconstruct_select auto``: the registered re-selection that measures the plan's criterion again on each
    layer's pruned-model inputs (:data:`~prunellm.criteria.RESELECTIONS`, ``rescores``), else keep the plan's units."""
    if select != "auto":
        return select
    again = next((r.name for r in RESELECTIONS.values() if r.rescores == criterion), None)
    return again if again is not None and mode != "none" else "plan"


def _run_dense_layer(layer: nn.Module, index: int, down: str, hidden: list[torch.Tensor], kwargs_list: list[list[dict]]) -> _DenseLayer:
    """Run the (still unpruned) layer on the dense stream, keeping its outputs and its MLP's output per batch."""
    outputs, mlp_outputs = [], []
    handle = get_module(layer, down).register_forward_hook(
        lambda module, args, output: mlp_outputs.append(output.detach().reshape(-1, output.shape[-1]).float())
    )
    try:
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs_list):
                out = run_block(layer, h, kw[index])
                outputs.append(out.reshape(-1, out.shape[-1]).float())
    finally:
        handle.remove()
    return _DenseLayer(hidden, outputs, mlp_outputs)


def _target_fns(target: Target, dense: _DenseLayer, pruned_inputs: list[torch.Tensor]) -> dict[str, tuple[TargetFn, bool]]:
    """Per projection kind ("kv_group" → o_proj, "mlp_channel" → down_proj): the target function and whether it
    needs the layer's outputs on the pruned stream."""
    flat = _DenseLayer._flat
    if target == "dense":
        return {
            "kv_group": (lambda b, x, out, proj: dense.attention_output(b), False),
            "mlp_channel": (lambda b, x, out, proj: dense.mlp_outputs[b], False),
        }
    # residual: the stream after the block must match the dense model's
    return {
        "kv_group": (lambda b, x, out, proj: dense.mid(b) - flat(pruned_inputs[b]), False),
        "mlp_channel": (lambda b, x, out, proj: dense.outputs[b] - (out - proj), True),
    }


def prune_with_reconstruction(
    model: nn.Module,
    kept: dict[UnitKey, list[int]],
    input_ids: torch.Tensor,
    mode: Mode,
    damp: Damp = "auto",
    batch_size: int = 8,
    target: Target = "pruned",
    refit_unpruned: bool = False,
    select: str = "plan",
    *,
    capture=None,
    on_layer=None,
) -> ReconstructionReport:
    """Prune every layer's units as ``kept`` says, in layer order, compensating o_proj/down_proj inputs.

    ``target`` is what each refit preserves (see the module docstring); ``refit_unpruned`` also refits projections
    that lost no input (``dense``/``residual`` targets only: it corrects the error earlier layers left).
    ``capture(model, input_ids, batch_size)`` and ``on_layer`` are the streamed save's (:mod:`prunellm.streaming`):
    the layer-0 inputs gathered without the whole embedding, and ``on_layer.enter(i)`` / ``on_layer.exit(i)``
    around layer i's work (read it from the shards; write it to the output shard and drop it).
    """
    reselection = check_reselection(select, mode)
    if mode == "none":
        prune_units(model, kept)
        return ReconstructionReport(mode="none", kept=dict(kept))
    if mode not in ("bias", *LSTSQ_MODES):
        raise PrunellmError(f"--reconstruct '{mode}' is not valid: use one of none, bias, lstsq, lstsq_bias")
    if target not in TARGETS:
        raise PrunellmError(f"--reconstruct_target '{target}' is not valid: use one of {', '.join(TARGETS)}")
    if damp != "auto" and (isinstance(damp, str) or damp < 0):
        raise PrunellmError(f"--reconstruct_damp {damp} is not valid: use auto or a number ≥ 0")
    spec = spec_for(model.config)
    layers = decoder_layers(model, spec)
    if mode in LSTSQ_MODES and damp == "auto":
        batch_size = max(1, min(batch_size, (len(input_ids) + 1) // 2))  # cross-validation needs two batches or more
    with stage("layer-0 inputs"):
        hidden, kwargs_list = (capture or capture_layer_inputs)(model, input_ids, batch_size)
    dense_hidden = list(hidden) if target != "pruned" else None
    report = ReconstructionReport(mode=mode)
    kept = dict(kept)  # select="obs" replaces a layer's choice; report.kept is what was applied
    compensated = False
    o_path, down_path = f"{spec.attention.module}.{spec.attention.o}", f"{spec.mlp.module}.{spec.mlp.down}"
    for index in tqdm(range(len(layers)), desc=f"reconstruction ({mode})", leave=False):
        if on_layer is not None:
            on_layer.enter(index)
        layer = layers[index]
        entry: dict = {"layer": index}
        targets = {}
        replay, replay_columns = None, None
        if dense_hidden is not None:
            dense = _run_dense_layer(layer, index, down_path, dense_hidden, kwargs_list)
            targets = _target_fns(target, dense, hidden)
        for kind, proj in (("kv_group", o_path), ("mlp_channel", down_path)):
            key = (index, kind)
            units = layer_units(model, index, kind, spec)
            pruned_here = key in kept and len(kept[key]) < units.count
            if not pruned_here and not (refit_unpruned and targets and units.count > 0):
                continue
            if pruned_here and not kept[key]:  # the whole block goes: a zero-output block, nothing to refit
                prune_units(model, {key: []})
                continue
            # statistics of the projection's input with the attention of this layer already pruned
            folds = 2 if mode in LSTSQ_MODES and damp == "auto" else 1
            fn, needs_output = targets.get(kind, (None, False))
            # the down projection's pass stops where the layer's last projection starts: what it saw gives the output
            replay = _Replay(spec) if kind == "mlp_channel" and not needs_output else None
            with stage("statistics"):
                stats = _collect_input_stats(
                    layer, index, proj, hidden, kwargs_list, need_gram=mode in LSTSQ_MODES or reselection is not None, folds=folds,
                    target=fn, target_needs_output=needs_output, replay=replay,
                )  # fmt: skip
            columns = next(s for s in units.slices if s.module == proj)
            width = columns.width
            if pruned_here and reselection is not None:  # the re-selection step: measure, choose, record (report.kept)
                inputs = PrunedInputs(get_module(layer, proj), columns, units.count, stats.sum, stats.gram, stats.tokens,
                                      intercept=mode == "lstsq_bias")  # fmt: skip
                kept[key] = reselection.choose(inputs, len(kept[key]))
            indices = kept[key] if pruned_here else list(range(units.count))
            keep = torch.as_tensor(sorted(indices), dtype=torch.long)
            kept_columns = index_ranges(keep, width)
            with stage("solves"):  # the damping search's included
                new_weight, new_bias, entry[kind] = compensate_projection(
                    get_module(layer, proj), stats, kept_columns, mode, damp, refit_unpruned=refit_unpruned
                )
            if replay is not None:
                replay_columns = kept_columns
            if pruned_here:
                prune_units(model, {key: kept[key]})  # slices the unit's rows and the projection's columns
            projection = get_module(layer, proj)
            with torch.no_grad():
                projection.weight.copy_(new_weight)
            if new_bias is not None:
                report.added_params += new_bias.numel() if projection.bias is None else 0
                projection.bias = nn.Parameter(new_bias, requires_grad=projection.weight.requires_grad)
                compensated = True
        with stage("next layer's inputs"):
            if replay is not None and len(replay.inputs) == len(hidden):
                hidden = replay.run(layer, index, kwargs_list, hidden, replay_columns)  # this layer's pruned output
            else:
                hidden = _run_layer(layer, index, hidden, kwargs_list)  # the next layer sees this layer's pruned output
        if dense_hidden is not None:
            dense_hidden = [o.reshape(h.shape).to(h.dtype) for o, h in zip(dense.outputs, dense_hidden)]
        report.layers.append(entry)
        if on_layer is not None:
            on_layer.exit(index)
    report.kept = kept
    if compensated:
        # o_proj/down_proj may now carry a bias their family's config does not build: the checkpoint must
        # record it per layer (see hf_modeling.resize_layers)
        setattr(model.config, BIAS_COMPENSATION_KEY, True)
        sync_config(model, spec)
    return report


def projection_biases(model: nn.Module) -> dict[tuple[int, str], int]:
    """(layer, path) -> bias size of every o_proj/down_proj that has a bias now (a zero-output block has neither)."""
    spec = spec_for(model.config)
    found = {}
    for index, layer in enumerate(decoder_layers(model, spec)):
        for path in (f"{spec.attention.module}.{spec.attention.o}", f"{spec.mlp.module}.{spec.mlp.down}"):
            linear = getattr(get_module(layer, path.rpartition(".")[0]), path.rpartition(".")[2], None)
            if isinstance(linear, nn.Linear) and linear.bias is not None:
                found[index, path] = linear.bias.numel()
    return found


def added_bias_params(model: nn.Module, native: dict[tuple[int, str], int]) -> int:
    """Parameters of the compensation biases ``model`` carries now: its o_proj/down_proj biases that ``native``
    (:func:`projection_biases` before pruning) lacks. Counted on the final model, not summed over rounds: a bias
    one round added goes with its block when a later round removes the whole block."""
    return sum(size for key, size in projection_biases(model).items() if key not in native)


def prune_plan_rounds(
    model: nn.Module,
    plan: Plan,
    input_ids: torch.Tensor | None,
    mode: Mode,
    damp: Damp = "auto",
    batch_size: int = 8,
    target: Target = "pruned",
    select: str = "plan",
) -> ReconstructionReport:
    """Apply every round of ``plan`` (one, unless it was made with ``--iterative_steps``) by
    :func:`prune_with_reconstruction`, each round on the model the one before left. With ``select`` other than
    ``plan`` the rounds' units become the ones applied, and the plan's ``layers`` their composition."""
    rounds = plan.round_layers()
    total = ReconstructionReport(mode=mode)
    native = projection_biases(model)
    for step, layers in enumerate(rounds, 1):
        report = prune_with_reconstruction(model, kept_units_of(layers), input_ids, mode, damp, batch_size, target=target, select=select)
        if select != "plan":
            set_kept_units_of(layers, report.kept)
        total.layers += [{**entry, "round": step} for entry in report.layers] if len(rounds) > 1 else report.layers
    if plan.rounds:
        plan.layers = compose_rounds(rounds)
    total.kept = plan.kept_units()
    total.added_params = added_bias_params(model, native)
    return total

