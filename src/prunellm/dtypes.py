"""Weight dtypes as flag values (shared by model loading and checkpoints, so neither imports the other)."""

from __future__ import annotations

from typing import Literal

import torch

from .errors import PrunellmError

DType = Literal["float32", "bfloat16", "float16", "auto"]


def torch_dtype(name: DType) -> torch.dtype | str:
    """Map a dtype flag value to a torch dtype (``auto`` is passed through to transformers)."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if name not in table:
        raise PrunellmError(f"--dtype '{name}' is not valid: use one of {', '.join(table)}")
    return table[name]
