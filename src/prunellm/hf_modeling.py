"""Modeling code for checkpoints whose layers have different widths.

This file is self-contained (it imports only torch and transformers): :mod:`prunellm.checkpoint` copies it
next to a pruned checkpoint's weights, with one line appended that names the concrete class, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the model where prunellm is not
installed. prunellm itself imports the same code.

The config carries::

    prunellm_modules: {"attention": "self_attn", "q": "q_proj", ..., "mlp": "mlp", "gate": ..., "up": ..., "down": ...}
    prunellm_layers:  [{"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1200,
                        "bias_modules": ["self_attn.o_proj"]}, ...]   # bias_modules only after bias compensation

and every decoder layer's projections are resized from its entry. A block with no unit left (0 KV heads or
0 MLP channels) becomes a zero-output block, so the residual stream passes through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

PRUNED_LAYERS_KEY = "prunellm_layers"
PRUNED_MODULES_KEY = "prunellm_modules"
# set when retraining-free bias compensation gave o_proj/down_proj a bias the family's config does not build;
# each prunellm_layers entry then lists those projections under "bias_modules"
BIAS_COMPENSATION_KEY = "prunellm_bias_compensation"


class ZeroAttention(nn.Module):
    """An attention block whose every head was pruned: it outputs zeros.

    It still records an empty (0-head) entry in the KV cache so that the cache's sequence length, which
    generation reads from layer 0, stays right.
    """

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            batch, seq = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 0, seq, self.head_dim)  # (B, 0 heads, T, d_h)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    """An MLP block whose every channel was pruned: it outputs zeros."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted path of attribute names from ``root``."""
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at a dotted path."""
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, module)


def _resized_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features,
        out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def resize_layers(model: nn.Module, config) -> None:
    """Give every decoder layer the widths listed in ``config.prunellm_layers`` (weights uninitialised)."""
    widths = getattr(config, PRUNED_LAYERS_KEY, None)
    if not widths:
        return
    names = getattr(config, PRUNED_MODULES_KEY)
    layers = get_module(model, names["layers"])
    head_dim = config.head_dim
    for index, (layer, width) in enumerate(zip(layers, widths)):
        n_heads, n_kv, inter = width["num_attention_heads"], width["num_key_value_heads"], width["intermediate_size"]
        attn = get_module(layer, names["attention"])
        if n_kv == 0:
            set_module(layer, names["attention"], ZeroAttention(getattr(attn, "layer_idx", index), head_dim))
        else:
            q, k, v, o = (get_module(attn, names[key]) for key in ("q", "k", "v", "o"))
            set_module(attn, names["q"], _resized_linear(q, q.in_features, n_heads * head_dim))
            set_module(attn, names["k"], _resized_linear(k, k.in_features, n_kv * head_dim))
            set_module(attn, names["v"], _resized_linear(v, v.in_features, n_kv * head_dim))
            set_module(attn, names["o"], _resized_linear(o, n_heads * head_dim, o.out_features))
        mlp = get_module(layer, names["mlp"])
        if inter == 0:
            set_module(layer, names["mlp"], ZeroMLP())
        else:
            gate, up, down = (get_module(mlp, names[key]) for key in ("gate", "up", "down"))
            set_module(mlp, names["gate"], _resized_linear(gate, gate.in_features, inter))
            set_module(mlp, names["up"], _resized_linear(up, up.in_features, inter))
            set_module(mlp, names["down"], _resized_linear(down, inter, down.out_features))
            if names.get("mlp_size_attr") and hasattr(mlp, names["mlp_size_attr"]):
                setattr(mlp, names["mlp_size_attr"], inter)
        for path in width.get("bias_modules", []):
            linear = get_module(layer, path)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype))


def pruned_class(base: type) -> type:
    """A subclass of a transformers ``*ForCausalLM`` class that builds layers of per-layer widths."""

    class PrunedForCausalLM(base):
        def __init__(self, config):
            super().__init__(config)
            resize_layers(self, config)

    PrunedForCausalLM.__name__ = PrunedForCausalLM.__qualname__ = f"Pruned{base.__name__}"
    return PrunedForCausalLM
