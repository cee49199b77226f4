"""Prunable units resolved from a spec and a model.

A unit kind is a list of coupled slices: index ``i`` of a ``kv_group`` owns rows ``[i*w, (i+1)*w)`` of q
(w = g·d_h), of k and v (w = d_h), and the same columns of o; index ``i`` of an ``mlp_channel`` owns row ``i``
of gate and up and column ``i`` of down. Biases follow their rows. Scoring, cost accounting, surgery and
tests all read the same description, so they cannot disagree about what a unit is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from .hf_modeling import ZeroAttention, ZeroMLP, get_module, set_module  # noqa: F401  (re-exported)
from .specs import ArchitectureSpec, spec_for

UnitKind = Literal["kv_group", "mlp_channel"]
UNIT_KINDS: tuple[UnitKind, ...] = ("kv_group", "mlp_channel")


@dataclass(frozen=True)
class Slice:
    """One coupled slice: ``module`` (path from the decoder layer) cut along ``dim`` in chunks of ``width``."""

    module: str
    dim: int  # 0 = output rows (and the bias), 1 = input columns
    width: int


@dataclass(frozen=True)
class LayerUnits:
    """The units of one kind in one decoder layer."""

    layer: int
    kind: UnitKind
    count: int  # how many indices exist now
    cost: int  # exact parameters per index, biases included
    slices: tuple[Slice, ...]
    # parameters of the block that no index owns (the output projection's bias, q/k head norms): they go
    # only with the last index, when the block becomes a zero-output block
    block_cost: int = 0

    def removed_cost(self, n_removed: int) -> int:
        """Parameters that removing ``n_removed`` of the ``count`` indices takes away (the block's own with the last)."""
        return n_removed * self.cost + (self.block_cost if self.count and n_removed >= self.count else 0)


def decoder_layers(model: nn.Module, spec: ArchitectureSpec | None = None) -> nn.ModuleList:
    """The model's decoder layer list."""
    spec = spec or spec_for(model.config)
    return get_module(model, spec.layers)


def head_dim(config, spec: ArchitectureSpec) -> int:
    """Per-head width, explicit in the config or hidden / heads."""
    value = getattr(config, spec.config.head_dim, None)
    if value:
        return int(value)
    return getattr(config, spec.config.hidden) // getattr(config, spec.config.num_heads)


def _slice_cost(linear: nn.Linear, s: Slice) -> int:
    if s.dim == 0:
        return s.width * (linear.in_features + (1 if linear.bias is not None else 0))
    return s.width * linear.out_features


def layer_units(model: nn.Module, layer: int, kind: UnitKind, spec: ArchitectureSpec | None = None) -> LayerUnits:
    """Resolve the units of ``kind`` in decoder layer ``layer`` from the modules as they are now."""
    spec = spec or spec_for(model.config)
    block = decoder_layers(model, spec)[layer]
    if kind == "kv_group":
        a = spec.attention
        attn = get_module(block, a.module)
        if isinstance(attn, ZeroAttention):
            return LayerUnits(layer, kind, 0, 0, ())
        d_h = head_dim(model.config, spec)
        q, k = get_module(attn, a.q), get_module(attn, a.k)
        n_kv = k.out_features // d_h
        group = q.out_features // k.out_features  # query heads per KV head
        slices = (
            Slice(f"{a.module}.{a.q}", 0, group * d_h),
            Slice(f"{a.module}.{a.k}", 0, d_h),
            Slice(f"{a.module}.{a.v}", 0, d_h),
            Slice(f"{a.module}.{a.o}", 1, group * d_h),
        )
        count = n_kv
        block_module = attn
    else:
        m = spec.mlp
        mlp = get_module(block, m.module)
        if isinstance(mlp, ZeroMLP):
            return LayerUnits(layer, kind, 0, 0, ())
        count = get_module(mlp, m.gate).out_features
        slices = (Slice(f"{m.module}.{m.gate}", 0, 1), Slice(f"{m.module}.{m.up}", 0, 1), Slice(f"{m.module}.{m.down}", 1, 1))
        block_module = mlp
    cost = sum(_slice_cost(get_module(block, s.module), s) for s in slices)
    block_cost = sum(p.numel() for p in block_module.parameters()) - count * cost
    return LayerUnits(layer, kind, count, cost, slices, block_cost)


def all_units(model: nn.Module, kinds: tuple[UnitKind, ...] = UNIT_KINDS) -> Iterator[LayerUnits]:
    """Every (layer, kind) unit set of the model, in layer order."""
    spec = spec_for(model.config)
    for layer in range(len(decoder_layers(model, spec))):
        for kind in kinds:
            yield layer_units(model, layer, kind, spec)


def reduce_to_units(values: torch.Tensor, s: Slice, count: int, is_bias: bool = False) -> torch.Tensor:
    """Sum a per-element tensor shaped like a sliced weight (or bias) into one value per unit index.

    weight (out, in) with dim 0: view (count, width, in) -> sum over width and in;
    weight (out, in) with dim 1: view (out, count, width) -> sum over out and width;
    bias (out,) only exists for dim-0 slices: view (count, width).
    """
    values = values.float()
    if is_bias:
        return values.view(count, s.width).sum(1)
    if s.dim == 0:
        return values.reshape(count, s.width, -1).sum((1, 2))
    return values.reshape(values.shape[0], count, s.width).sum((0, 2))


def index_ranges(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Expand unit indices into element indices: unit i -> [i*width, (i+1)*width)."""
    offsets = torch.arange(width, device=indices.device)
    return (indices[:, None] * width + offsets[None, :]).reshape(-1)


def _distinct_parameters(modules: tuple[nn.Module, ...]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def count_parameters(*modules: nn.Module) -> int:
    """Number of distinct parameters of one or more modules together (a tied or shared weight counted once).
    The one parameter counter: plans, selection, analysis and evaluation all count with it."""
    return sum(p.numel() for p in _distinct_parameters(modules))


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameters of one or more modules together (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in _distinct_parameters(modules))
