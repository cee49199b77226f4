"""Apply a plan: physically slice weights and biases, drop layers, and update the config in the same step."""

from __future__ import annotations

import torch
from torch import nn

from .calibration import UnitKey
from .hf_modeling import BIAS_COMPENSATION_KEY, PRUNED_LAYERS_KEY, PRUNED_MODULES_KEY, ZeroAttention, ZeroMLP
from .specs import ArchitectureSpec, spec_for
from .units import decoder_layers, get_module, head_dim, index_ranges, layer_units, set_module


def _slice_linear(linear: nn.Linear, dim: int, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    with torch.no_grad():
        weight = linear.weight.index_select(dim, index).clone()
        linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
        if dim == 0:
            linear.out_features = weight.shape[0]
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone(), requires_grad=linear.bias.requires_grad)
        else:
            linear.in_features = weight.shape[1]


def prune_units(model: nn.Module, kept: dict[UnitKey, list[int]]) -> None:
    """Keep only the listed indices of each (layer, kind) unit set; an empty list makes a zero-output block."""
    spec = spec_for(model.config)
    layers = decoder_layers(model, spec)
    d_h = head_dim(model.config, spec)
    for (layer, kind), keep in sorted(kept.items()):
        units = layer_units(model, layer, kind, spec)
        if len(keep) == units.count:
            continue
        block = layers[layer]
        if not keep:
            if kind == "kv_group":
                attn = get_module(block, spec.attention.module)
                idx = getattr(attn, spec.attention.layer_idx_attr, layer)
                set_module(block, spec.attention.module, ZeroAttention(idx, d_h))
            else:
                set_module(block, spec.mlp.module, ZeroMLP())
            continue
        index = torch.as_tensor(sorted(keep), dtype=torch.long)
        for s in units.slices:
            _slice_linear(get_module(block, s.module), s.dim, index_ranges(index, s.width))
        if kind == "mlp_channel" and spec.mlp.size_attr:
            mlp = get_module(block, spec.mlp.module)
            if hasattr(mlp, spec.mlp.size_attr):
                setattr(mlp, spec.mlp.size_attr, len(keep))
    sync_config(model, spec)


def remove_layers(model: nn.Module, remove: list[int]) -> None:
    """Delete decoder layers, renumber the KV-cache layer indices and shorten per-layer config lists."""
    if not remove:
        return
    spec = spec_for(model.config)
    layers = decoder_layers(model, spec)
    gone = set(remove)
    keep = [i for i in range(len(layers)) if i not in gone]
    new_layers = nn.ModuleList([layers[i] for i in keep])
    set_module(model, spec.layers, new_layers)
    for new_index, block in enumerate(new_layers):
        attn = get_module(block, spec.attention.module)
        if hasattr(attn, spec.attention.layer_idx_attr):
            setattr(attn, spec.attention.layer_idx_attr, new_index)
        if hasattr(block, "layer_idx"):
            block.layer_idx = new_index
    config = model.config
    setattr(config, spec.config.num_layers, len(keep))
    for key in spec.config.per_layer_lists:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, key, [values[i] for i in keep])
    widths = getattr(config, PRUNED_LAYERS_KEY, None)
    if widths:
        setattr(config, PRUNED_LAYERS_KEY, [widths[i] for i in keep])
    sync_config(model, spec)


def layer_widths(model: nn.Module, spec: ArchitectureSpec | None = None) -> list[dict[str, int]]:
    """Heads, KV heads and MLP width of every decoder layer, read from the modules."""
    spec = spec or spec_for(model.config)
    widths = []
    for index in range(len(decoder_layers(model, spec))):
        kv = layer_units(model, index, "kv_group", spec)
        mlp = layer_units(model, index, "mlp_channel", spec)
        group = kv.slices[0].width // kv.slices[1].width if kv.count else 0
        widths.append({"num_attention_heads": kv.count * group, "num_key_value_heads": kv.count, "intermediate_size": mlp.count})
    return widths


def sync_config(model: nn.Module, spec: ArchitectureSpec | None = None) -> None:
    """Write the per-layer widths into the config: standard keys when uniform, per-layer lists otherwise."""
    spec = spec or spec_for(model.config)
    config = model.config
    keys = spec.config
    # head_dim must become explicit: transformers derives it from hidden / heads when absent
    setattr(config, keys.head_dim, head_dim(config, spec))
    widths = layer_widths(model, spec)
    compensated = bool(getattr(config, BIAS_COMPENSATION_KEY, False))
    uniform = all(w == widths[0] for w in widths) and widths[0]["num_key_value_heads"] > 0 and widths[0]["intermediate_size"] > 0
    if compensated:
        for width, layer in zip(widths, decoder_layers(model, spec)):
            width["bias_modules"] = [
                path
                for path in (f"{spec.attention.module}.{spec.attention.o}", f"{spec.mlp.module}.{spec.mlp.down}")
                if isinstance(get_module(layer, path.rpartition(".")[0]), nn.Module)
                and not isinstance(get_module(layer, path.rpartition(".")[0]), (ZeroAttention, ZeroMLP))
                and get_module(layer, path).bias is not None
            ]
    if uniform and not compensated:
        setattr(config, keys.num_heads, widths[0]["num_attention_heads"])
        setattr(config, keys.num_kv_heads, widths[0]["num_key_value_heads"])
        setattr(config, keys.intermediate, widths[0]["intermediate_size"])
        for key in (PRUNED_LAYERS_KEY, PRUNED_MODULES_KEY):
            if hasattr(config, key):
                delattr(config, key)
        return
    # the base class builds the layers from the standard keys, then resizes each one from the list;
    # the standard keys hold the widest layer (a valid head ratio for the base __init__)
    widest = max((w for w in widths if w["num_key_value_heads"] > 0), key=lambda w: w["num_key_value_heads"], default=None)
    if widest is not None:
        setattr(config, keys.num_heads, widest["num_attention_heads"])
        setattr(config, keys.num_kv_heads, widest["num_key_value_heads"])
    setattr(config, keys.intermediate, max(max(w["intermediate_size"] for w in widths), 1))
    setattr(config, PRUNED_LAYERS_KEY, widths)
    setattr(
        config,
        PRUNED_MODULES_KEY,
        {
            "layers": spec.layers,
            "attention": spec.attention.module,
            "q": spec.attention.q,
            "k": spec.attention.k,
            "v": spec.attention.v,
            "o": spec.attention.o,
            "mlp": spec.mlp.module,
            "gate": spec.mlp.gate,
            "up": spec.mlp.up,
            "down": spec.mlp.down,
            "mlp_size_attr": spec.mlp.size_attr,
        },
    )

