"""What a results document says about the model itself (one parameter/byte accounting for every metric)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..units import count_parameters, weight_bytes


def model_facts(model: nn.Module, path: str) -> dict[str, Any]:
    """Parameter count, weight bytes and dtype of a model (tied weights counted once)."""
    return {
        "path": path,
        "params": count_parameters(model),
        "weight_bytes": weight_bytes(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_hidden_layers": getattr(model.config, "num_hidden_layers", None),
    }
