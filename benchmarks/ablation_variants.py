"""Issue 17: variants of the default recipe that were measured and not adopted, kept so that their figures reproduce.

Each variant changes one step of an :mod:`benchmarks.ablation` row (same protocol, same calibration windows, same
held-out texts) by replacing one library function for the duration of the row (``unittest.mock.patch``): none of
them is a prunellm option, because none beat the default on every held-out text. Rows are appended to the same
JSON-lines file as the ablation's (``--into_results`` merges them into ``benchmarks/results.json``)::

    PYTHONPATH=src python -m benchmarks.ablation_variants --out variants.jsonl [--rows fisher_rows ...]

* ``fisher_rows``: fluctuation with every output dimension d of down_proj weighted by the diagonal empirical Fisher
  of the residual stream after the layer, E[(∂L/∂h_d)²]: Var(x_j)·Σ_d F_d·W[d, j]² — the second-order estimate of
  the loss a channel's mean-compensated removal costs, in scoring and in re-scoring;
* ``fisher_rows_global``: the same scores ranked across layers as they are (loss units are comparable across
  layers), without the prior;
* ``fisher_token``: the per-token empirical Fisher with mean compensation, Σ_t (∂L/∂x_tj)²·(x_tj − μ_j)² of
  down_proj's inputs (Fisher pruning, Theis et al. 2018, with FLAP's mean), ranked across layers, no prior, no
  re-scoring;
* ``ridge_obs``: re-scoring by the error the ridge refit leaves when channel j alone is removed,
  ‖W[:, j]‖²·(1/[(C + λI)⁻¹]_jj − λ), C the centred input covariance, λ = mean(diag C): between fluctuation
  (λ → ∞) and OBS (λ → 0);
* ``prior_windows_32``: the H-GSP prior's Δloss on 32 windows per ablation instead of 16.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from typing import Callable, Iterator
from unittest import mock

import torch

from benchmarks import ablation

DEFAULT = "fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.2*2"


def _gradient_pass(model, ids: torch.Tensor, hooks: Callable[[], list], batch_size: int = 4) -> None:
    """Forward + backward over ``ids`` with the weights frozen (only hidden states get gradients); ``hooks()``
    registers the hooks that read them and returns their handles."""
    handles = hooks()
    handles.append(model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_()))
    wanted = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for batch in ids.split(batch_size):
            model(input_ids=batch, labels=batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(wanted[name])


def residual_fisher(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """E[(∂L/∂h_d)²] of each decoder layer's output (the residual stream down_proj writes to), ``(hidden,)`` each."""
    from prunellm.units import decoder_layers

    layers = decoder_layers(model)
    sums = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in layers]

    def hooks() -> list:
        def on_output(index: int):
            def hook(module, args, out):
                hidden = out[0] if isinstance(out, tuple) else out

                def grab(grad):
                    sums[index].add_(grad.detach().double().pow(2).sum((0, 1)))

                hidden.register_hook(grab)

            return hook

        return [layer.register_forward_hook(on_output(i)) for i, layer in enumerate(layers)]

    _gradient_pass(model, ids, hooks)
    return [s.float() for s in sums]


def token_fisher(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Σ_t (∂L/∂x_tj)²·(x_tj − μ_j)² of each layer's down_proj input, ``(intermediate,)`` each."""
    from prunellm.units import decoder_layers

    layers = decoder_layers(model)
    sums: list[list] = [[0.0, 0.0, 0.0, 0.0, 0] for _ in layers]  # Σ g²x², Σ g²x, Σ g², Σ x, tokens

    def hooks() -> list:
        def on_input(index: int):
            def hook(module, args):
                x = args[0]

                def grab(grad):
                    xs = x.detach().double().reshape(-1, x.shape[-1])
                    g2 = grad.detach().double().reshape(-1, x.shape[-1]).pow(2)
                    s = sums[index]
                    s[0], s[1], s[2] = s[0] + (g2 * xs * xs).sum(0), s[1] + (g2 * xs).sum(0), s[2] + g2.sum(0)
                    s[3], s[4] = s[3] + xs.sum(0), s[4] + xs.shape[0]

                x.register_hook(grab)

            return hook

        return [layer.mlp.down_proj.register_forward_pre_hook(on_input(i)) for i, layer in enumerate(layers)]

    _gradient_pass(model, ids, hooks)
    out = []
    for g2x2, g2x, g2, xsum, tokens in sums:
        mean = xsum / tokens
        out.append((g2x2 - 2 * mean * g2x + mean * mean * g2).clamp_min(0).float())
    return out


@contextlib.contextmanager
def fisher_rows() -> Iterator[None]:
    """Fluctuation with down_proj's output rows weighted by :func:`residual_fisher`, measured on the model each
    round scores (the weights ride on the modules into the pruned copy that re-scoring reads)."""
    import prunellm
    import prunellm.criteria.fluctuation as fluctuation
    from prunellm.units import decoder_layers, reduce_to_units

    score = prunellm.score

    def weighted_score(model, ids, criterion, **kwargs):
        for layer, weights in zip(decoder_layers(model), residual_fisher(model, ids)):
            layer.mlp.down_proj.fisher_rows = weights
        return score(model, ids, criterion, **kwargs)

    def slice_fluctuation(linear, variance, s, count):
        weight = linear.weight.detach().float().pow(2)
        rows = getattr(linear, "fisher_rows", None)
        if rows is not None:
            weight = weight * rows.to(weight)[:, None]
        return reduce_to_units(weight * variance.to(weight.device)[None, :], s, count)

    with mock.patch.object(prunellm, "score", weighted_score), mock.patch.object(fluctuation, "slice_fluctuation", slice_fluctuation):
        yield


@contextlib.contextmanager
def fisher_token() -> Iterator[None]:
    """The MLP channels' scores replaced by :func:`token_fisher` of the model each round scores."""
    import prunellm

    score = prunellm.score

    def fisher_score(model, ids, criterion, **kwargs):
        scores = score(model, ids, criterion, **kwargs)
        fisher = token_fisher(model, ids)
        for layer, kind in list(scores.scores):
            if kind == "mlp_channel":
                scores.scores[(layer, kind)] = fisher[layer]
        return scores

    with mock.patch.object(prunellm, "score", fisher_score):
        yield


@contextlib.contextmanager
def ridge_obs() -> Iterator[None]:
    """Re-scoring by the ridge refit's single-removal error at λ = mean(diag C)."""
    import dataclasses

    from prunellm.criteria import RESELECTIONS
    from prunellm.units import reduce_to_units

    def choice(inputs, keep):
        mean = inputs.total / inputs.tokens
        covariance = inputs.gram / inputs.tokens - torch.outer(mean, mean)  # (in, in) float64, intercept free
        lam = covariance.diagonal().mean()
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(covariance + lam * torch.eye(len(covariance), dtype=covariance.dtype)))
        left = (1 / inverse.diagonal() - lam).clamp_min(0)  # Var(x_j | the others) under the ridge
        per_column = left * inputs.linear.weight.detach().double().pow(2).sum(0)
        score = reduce_to_units(per_column[None, :].float(), inputs.columns, inputs.count).cpu()
        return sorted(torch.topk(score, keep).indices.tolist())

    # the re-selection the fluctuation criterion's plans get (``auto``), choosing by this instead
    with mock.patch.dict(RESELECTIONS, {"fluctuation": dataclasses.replace(RESELECTIONS["fluctuation"], choose=choice)}):
        yield


@contextlib.contextmanager
def prior_windows_32() -> Iterator[None]:
    """The prior's layer and block ablations on 32 windows each."""
    with mock.patch.object(ablation, "prior_deltas", functools.partial(ablation.prior_deltas, num_samples=32)):
        yield


# name -> (what the criterion column says, the ablation row it changes, the patch)
VARIANTS: dict[str, tuple[str, str, Callable]] = {
    "fisher_rows": ("fluctuation, Fisher-weighted rows", DEFAULT, fisher_rows),
    "fisher_rows_global": ("fluctuation, Fisher-weighted rows", "fluctuation@mlp/none/lstsq_bias+fluctuation/0.2*2", fisher_rows),
    "fisher_token": ("per-token Fisher, mean-compensated", "fluctuation@mlp/none/lstsq_bias/0.2*2", fisher_token),
    "ridge_obs": ("fluctuation, re-scored by ridge OBS", DEFAULT, ridge_obs),
    "prior_windows_32": ("fluctuation, prior on 32 windows", DEFAULT, prior_windows_32),
}


def measure(out: str, names: tuple[str, ...], threads: int = 2) -> None:
    """Measure every variant not yet in ``out`` (JSON lines, with the ablation's dense row)."""
    from prunellm.units import count_parameters

    base, tokenizer, token_sets, ids, total, done, emit = ablation.start(out, threads)
    for name in names:
        label, row, patch = VARIANTS[name]
        if f"variant:{name}" in done:
            continue
        fields = ablation.parse_row(row)
        started = time.perf_counter()
        with patch():
            model, plan, extra = ablation.prune_row(base, tokenizer, ids, fields, {})
        emit({
            "row": f"variant:{name}", **fields, "criterion": label, "removed": round(1 - count_parameters(model) / total, 4),
            "ppl": ablation.evaluate(model, token_sets, tokenizer), "seconds": round(time.perf_counter() - started, 1),
            "widths": {"mlp_channels": [None if layer.mlp_channels is None else len(layer.mlp_channels) for layer in plan.layers]},
            **extra,
        })  # fmt: skip
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON-lines file; variants already in it are not measured again")
    parser.add_argument("--rows", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--into_results", action="store_true", help="add the file's rows to benchmarks/results.json's ablation")
    args = parser.parse_args()
    if args.into_results:
        ablation.into_results("ablation", ablation.read_rows(args.out), merge=True)
        return
    measure(args.out, tuple(args.rows), args.threads)


if __name__ == "__main__":
    main()
