"""Layer and block priors (H-GSP): how much the calibration loss rises when a whole layer or block is removed.

Removal is a true ablation: the block's output is replaced by zero, so the residual stream passes through
unchanged (for a whole layer: the layer returns its input). Δ is measured one of two ways (``measure``):
``loss``, the rise of the next-token loss on the calibration tokens, clamped at 0; or ``kl``, the mean KL
divergence of the ablated model's next-token distribution from the dense model's, KL(p_dense ‖ p_ablated) — the
rise of the loss the dense model expects on its own predictions, the same quantity's expectation over the whole
vocabulary instead of one sampled token (lower variance, never negative, and it counts a change of prediction
that happens to leave the calibration token's probability alone). Every unit's score is multiplied by
``ln(1 + Δ)^T`` with the layer's Δ when it is below ``tau`` and the block's Δ otherwise.
"""

from __future__ import annotations

import math
import weakref
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import UnitKey, only_sliced_params_require_grad, batches_of, capture_block_inputs, run_block
from .data import tensor_hash
from .errors import PrunellmError
from .models import input_device
from .specs import spec_for
from .sweep import IN_PLACE, MEASURES, Measure, Offload, Target, ablated, scored_positions
from .units import decoder_layers, get_module


FISHER_SAMPLES = 2  # label draws (backward passes) per calibration batch of ``measure="fisher"``


@torch.no_grad()
def mean_loss(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """Token-weighted mean next-token loss over calibration windows (no padding)."""
    device = input_device(model)
    total, count = 0.0, 0
    for batch in batches_of(input_ids, batch_size):
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * n
        count += n
    return total / count


def ablation_deltas(
    model: nn.Module,
    input_ids: torch.Tensor,
    target: Target,
    batch_size: int = 4,
    layers: list[int] | None = None,
    *,
    offload: Offload | None = None,
    measure: Measure = "loss",
    positions: int | None = None,
) -> list[float]:
    """Δ of ablating ``target`` in each layer: the loss's rise clamped at 0 (``measure="loss"``) or the mean KL
    divergence of the ablated next-token distributions from the dense ones (``"kl"``).

    Per batch, the dense hidden states are walked through the layers once; the ablation of layer L reruns only
    layers L.. from the hidden state entering L (about half the work of a full forward per ablation, memory of
    one batch's hidden states). Models whose head is more than ``lm_head(final_norm(h))`` (logit soft-capping)
    use full forward passes instead. ``offload`` (:class:`prunellm.sweep.Offload`; needed for a
    :func:`~prunellm.offload.load_lazy` skeleton): the same Δ with one decoder layer on the device at a time.
    ``positions`` (``kl`` only): the KL is averaged over that many evenly spaced positions of each window
    (:func:`scored_positions`) instead of all; the layers still run on every position (causal attention needs
    them), only the LM head and the softmax, several layers' worth of work per ablation, run on fewer.
    """
    return ablation_deltas_of(model, input_ids, (target,), batch_size, layers, offload=offload, measure=measure,
                              positions=positions)[target]  # fmt: skip


def ablation_deltas_of(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: tuple[Target, ...],
    batch_size: int = 4,
    layers: list[int] | None = None,
    *,
    offload: Offload | None = None,
    measure: Measure = "loss",
    positions: int | None = None,
) -> dict[Target, list[float]]:
    """:func:`ablation_deltas` of several targets on the same windows; offloaded, one sweep serves them all (every
    layer read once). Computed once per weights, forward hooks and windows: the layer prior and the layerwise
    allocation ask for the same layer ablations."""
    if measure not in MEASURES:
        raise PrunellmError(f"--prior_measure '{measure}' is not valid: use {', '.join(MEASURES[:-1])} or {MEASURES[-1]}")
    indices = list(range(len(decoder_layers(model)))) if layers is None else list(layers)
    version = (_weights_version(model), _hooks_version(model))
    cached = _DELTAS.setdefault(model, {})
    for stale in [key for key in cached if key[-1] != version]:  # older weights' entries can never match again
        del cached[stale]
    kl_positions = positions if measure == "kl" and scored_positions(input_ids.shape[1], positions) is not None else None
    dtype = getattr(offload, "dtype", None)  # a placement that computes in another dtype measures other deltas
    keys = {target: (target, measure, kl_positions, batch_size, tuple(indices), tensor_hash(input_ids), dtype, version) for target in targets}
    missing = tuple(target for target in targets if keys[target] not in cached)
    if missing and measure == "fisher":
        if offload is not None:
            raise PrunellmError(
                "--prior_measure fisher needs the model in memory (one backward pass through all layers): with "
                "--offload use --prior_measure kl (exact ablations, one layer on the device at a time)"
            )
        estimates = _fisher_deltas(model, input_ids, missing, batch_size, indices)
        for target in missing:
            cached[keys[target]] = [max(value, 0.0) for value in estimates[target]]
    elif missing:
        if (offload is None or offload.device is None) and getattr(model.config, "final_logit_softcapping", None):  # a head the sweep cannot slice
            losses = {}
            for target in missing:
                base, losses[target] = _ablated_losses_full(model, input_ids, target, batch_size, indices, measure, kl_positions)
        else:
            base, losses = (offload or IN_PLACE).ablated_losses(model, input_ids, missing, batch_size, indices, measure, kl_positions)
        for target in missing:
            cached[keys[target]] = [max(loss - base, 0.0) for loss in losses[target]]
    return {target: list(cached[keys[target]]) for target in targets}


# model -> {(target, measure, positions, batch, layers, calibration hash, (weights version, hooks version)): deltas}; weak, so no model is kept alive
_DELTAS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced, resized or modified in place (torch's version counter)."""
    return tuple((p.data_ptr(), tuple(p.shape), p._version) for p in model.parameters())


def _hooks_version(model: nn.Module) -> tuple:
    """Changes whenever a forward hook is added or removed (handle ids only grow): hooks change the forward without
    touching a weight, e.g. the layers that ``--iterative`` depth pruning has dropped so far pass their input on."""
    return tuple(
        (name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    )


def _fisher_deltas(
    model: nn.Module, input_ids: torch.Tensor, targets: tuple[Target, ...], batch_size: int, indices: list[int],
    samples: int = FISHER_SAMPLES,
) -> dict[Target, list[float]]:
    """Every ablation's KL(p_dense ‖ p_ablated), estimated from one forward and ``samples`` backward passes a batch.

    The change δ that an ablation makes to the residual stream leaving its own layer is computed exactly (that one
    layer rerun with the block zeroed, or for a whole layer its input minus its output); its effect on the next-token
    distributions of every later position is taken to second order, KL ≈ ½ δᵀFδ, where F is the Fisher information
    of the window's next-token distributions at that point of the stream. With labels y drawn from the model's own
    distributions, E_y[(∇ log p(y)·δ)²] = δᵀFδ, so one backward pass per draw gives the estimate of every
    ablation at once. Second order is exact as δ → 0 and underestimates the few blocks whose removal breaks the
    model outright (SmolLM2's first MLP); their rank stays near the top (docs/benchmarks.md, issue 39).
    Deterministic: the draws use a generator seeded the same way every call.
    """
    spec = spec_for(model.config)
    blocks = decoder_layers(model, spec)
    norm, head = get_module(model, spec.final_norm), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    device = input_device(model)
    generator = torch.Generator(device=device).manual_seed(0)
    totals = {target: dict.fromkeys(indices, 0.0) for target in targets}
    count = 0
    with only_sliced_params_require_grad(model, ()):
        for batch in tqdm(list(batches_of(input_ids, batch_size)), desc="prior (Fisher estimate)", leave=False):
            batch = batch.to(device)
            hidden, kwargs = capture_block_inputs(model, blocks, batch)
            stream = [hidden.detach().requires_grad_(True)]
            with torch.enable_grad():
                for layer, block in enumerate(blocks):
                    stream.append(run_block(block, stream[-1], kwargs[layer]))
                logits = head(norm(stream[-1]))
                log_probs = _next_token_log_probs(torch.tanh(logits / cap) * cap if cap else logits)
            changes = {}
            with torch.no_grad():
                for target in targets:
                    for layer in indices:
                        if target == "layer":
                            changed = stream[layer]
                        else:
                            with ablated(model, layer, target):
                                changed = run_block(blocks[layer], stream[layer], kwargs[layer])
                        changes[(target, layer)] = changed - stream[layer + 1]
                cumulative = log_probs.detach().exp().flatten(0, 1).cumsum(-1)  # inverse-CDF draws (multinomial is slow on CPU)
                cumulative /= cumulative[:, -1:].clone()
            for draw in range(samples):
                uniform = torch.rand(cumulative.shape[0], 1, generator=generator, device=device)
                labels = torch.searchsorted(cumulative, uniform).clamp_(max=cumulative.shape[1] - 1).view(*log_probs.shape[:-1], 1)
                picked = log_probs.gather(-1, labels).sum()
                grads = torch.autograd.grad(picked, stream[1:], retain_graph=draw < samples - 1)
                for (target, layer), delta in changes.items():
                    along = (grads[layer].float() * delta.float()).sum(dim=(1, 2)).double()  # one per window
                    totals[target][layer] += float(along.pow(2).sum()) / (2 * samples)
            count += batch.shape[0] * (batch.shape[1] - 1)
    return {target: [totals[target][i] / count for i in indices] for target in targets}


def _ablated_losses_full(
    model: nn.Module, input_ids: torch.Tensor, target: Target, batch_size: int, indices: list[int], measure: Measure = "loss",
    positions: int | None = None,
) -> tuple[float, list[float]]:
    """(dense loss, loss with each ablation) by full forward passes of the model (any head); ``measure="kl"``: (0,
    mean KL divergence from the dense model's next-token distributions at :func:`scored_positions`), batch by batch
    (the head on those positions only, HF's ``logits_to_keep``)."""
    if measure == "loss":
        losses = []
        for layer in tqdm(indices, desc=f"{target} ablation", leave=False):
            with ablated(model, layer, target):
                losses.append(mean_loss(model, input_ids, batch_size))
        return mean_loss(model, input_ids, batch_size), losses
    device = input_device(model)
    totals, count = [0.0] * len(indices), 0
    with torch.no_grad():
        for batch in tqdm(list(batches_of(input_ids, batch_size)), desc=f"{target} ablation (KL)", leave=False):
            batch = batch.to(device)
            picked = scored_positions(batch.shape[1], positions)
            keep = torch.arange(batch.shape[1] - 1, device=device) if picked is None else picked.to(device)
            reference = _log_probs(model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits)
            n = batch.shape[0] * (batch.shape[1] - 1)
            for i, layer in enumerate(indices):
                with ablated(model, layer, target):
                    totals[i] += mean_kl(reference, _log_probs(model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits)) * n
            count += n
    return 0.0, [t / count for t in totals]


def _next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(B, T−1, V) float32 log-probabilities of the next token at every position but the last."""
    return _log_probs(logits[:, :-1])


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities over the vocabulary (last dimension)."""
    return torch.log_softmax(logits.float(), dim=-1)


def mean_kl(reference: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over positions of KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), both given as log-probabilities (…, V)."""
    return float((reference.exp() * (reference - log_probs)).sum(dim=-1).mean())


def resolve_tau(tau: str | float, layer_deltas: list[float]) -> float:
    """``auto`` = 25th percentile of the layer Δ; ``inf``/``-inf`` give pure layer/block mode."""
    if isinstance(tau, str) and tau.strip().lower() == "auto":
        return float(torch.quantile(torch.tensor(layer_deltas, dtype=torch.float64), 0.25))
    try:
        return float(tau)
    except ValueError:
        raise PrunellmError(f"--tau '{tau}' is not valid: use auto, a number, inf or -inf") from None


def spread(values: torch.Tensor) -> float:
    """The 90th over the 10th percentile of the positive ``values`` (1.0 when fewer than two are positive)."""
    positive = values.double()[values > 0]
    if positive.numel() < 2:
        return 1.0
    low, high = torch.quantile(positive, torch.tensor([0.1, 0.9], dtype=torch.float64))
    return float(high / low)


def matched_temperature(base: dict[UnitKey, float], values: dict[UnitKey, torch.Tensor]) -> float:
    """``--temperature auto``: the T at which the prior's spread between blocks equals the scores' within a block.

    ``base``: ``ln(1+Δ)`` per block (T = 1); ``values``: each block's normalised importance/cost without the prior.
    A block multiplied by m is cut where its units' values fall below θ/m, so blocks whose multipliers differ by
    the within-block p90/p10 spread of the values go from keeping almost all to keeping almost none of their units:
    T = ln(median within-block spread) / ln(p90/p10 of ln(1+Δ) over the pruned blocks) lets the prior span that
    range once, neither ignored (T → 0) nor deciding alone (measured on SmolLM2 with Taylor: ln(1+Δ) spreads ×13.8,
    the scores ×2.0 within a block, so T = 1 ranks layers by the prior alone). 0 when either has no spread.
    """
    within = [spread(v) for v in values.values() if v.numel() > 1]
    between = prior_spread(base, values)
    if not within or between <= 1.0:
        return 0.0
    score = float(torch.tensor(within, dtype=torch.float64).median())
    return max(0.0, math.log(score) / math.log(between)) if score > 1.0 else 0.0


def prior_spread(base: dict[UnitKey, float], blocks) -> float:
    """p90/p10 of ``ln(1+Δ)`` (``base``, T = 1) over the pruned ``blocks``: how unevenly the blocks matter
    (SmolLM2-135M's MLPs ×6.8, Gemma 3 270M's ×3.3; ``auto`` stretches it over the scores' spread either way)."""
    return spread(torch.tensor([base[key] for key in blocks], dtype=torch.float64))


def resolve_temperature(
    temperature: float | Literal["auto"],
    deltas: tuple[list[float], list[float], list[float]],
    tau: float,
    values: dict[UnitKey, torch.Tensor] | None,
) -> float:
    """A number as it is; ``auto``: :func:`matched_temperature` of the layer/attention/MLP ``deltas`` against
    ``values`` (the normalised scores without the prior)."""
    if temperature != "auto":
        return float(temperature)
    if values is None:
        raise ValueError("--temperature auto needs the normalised scores (values=)")
    return matched_temperature(prior_multipliers(*deltas, 1.0, tau), values)


def prior_multipliers(
    layer_deltas: list[float],
    attention_deltas: list[float],
    mlp_deltas: list[float],
    temperature: float,
    tau: float,
) -> dict[UnitKey, float]:
    """``ln(1+Δ)^T`` per (layer, kind): layer Δ when below ``tau``, else the block's own Δ."""
    out: dict[UnitKey, float] = {}
    for layer, layer_delta in enumerate(layer_deltas):
        for kind, block_deltas in (("kv_group", attention_deltas), ("mlp_channel", mlp_deltas)):
            delta = layer_delta if layer_delta < tau else block_deltas[layer]
            out[(layer, kind)] = math.log1p(delta) ** temperature
    return out
