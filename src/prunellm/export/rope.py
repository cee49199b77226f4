"""RoPE scaling in GGUF: which Hugging Face ``rope_type`` llama.cpp can express, and how.

Each exported type is one entry of :data:`ROPE_SCALING` (data, not branches), following what llama.cpp's
``convert_hf_to_gguf.py`` writes, so llama.cpp runs the file as it runs its own conversions:

* ``default``: nothing beyond ``rope.freq_base``;
* ``linear`` (positions divided by ``factor``): ``rope.scaling.type = linear`` and ``rope.scaling.factor``;
* ``llama3`` (Llama 3.1 / 3.2: frequencies divided by a per-dimension factor between 1 and ``factor``):
  a ``rope_freqs.weight`` tensor of those factors, (head_dim / 2,), which llama.cpp's ``llama`` and ``deci``
  graphs pass to ``ggml_rope_ext``. The factors are read off transformers' own frequencies (default / scaled),
  so llama.cpp rotates by exactly the angles transformers does.

Other types (``dynamic``, ``yarn``, ``longrope``, partial rotary) are refused by :func:`check_rope`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGUFWriter, MODEL_TENSOR, RopeScalingType, TENSOR_NAMES
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..errors import PrunellmError

# writes a rope type's metadata and returns the extra tensors it needs (name -> float32 array)
RopeWriter = Callable[[GGUFWriter, PretrainedConfig, dict], dict[str, np.ndarray]]


def rope_parameters(config: PretrainedConfig) -> dict:
    """The model's RoPE settings as one flat dict (transformers 5 ``rope_parameters``), ``{}`` when absent."""
    rope = getattr(config, "rope_parameters", None)
    return dict(rope) if isinstance(rope, dict) else {}


def rope_theta(config: PretrainedConfig) -> float:
    rope = rope_parameters(config)
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _default(writer: GGUFWriter, config: PretrainedConfig, rope: dict) -> dict[str, np.ndarray]:
    return {}


def _linear(writer: GGUFWriter, config: PretrainedConfig, rope: dict) -> dict[str, np.ndarray]:
    writer.add_rope_scaling_type(RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    return {}


def _llama3(writer: GGUFWriter, config: PretrainedConfig, rope: dict) -> dict[str, np.ndarray]:
    # llama.cpp divides each frequency by its factor: factor = default frequency / transformers' llama3 frequency
    dim = int(_rotary_dim(config))
    plain = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim / 2,)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    factors = (plain.double() / scaled.double()).to(torch.float32).numpy()
    return {f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight": factors}


def _rotary_dim(config: PretrainedConfig) -> int:
    """The rotated size per head, as transformers' rope functions read it."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


ROPE_SCALING: dict[str, RopeWriter] = {"default": _default, "linear": _linear, "llama3": _llama3}


def check_rope(config: PretrainedConfig) -> str:
    """The model's rope type if GGUF export can express it, else a one-line :class:`PrunellmError`."""
    rope = rope_parameters(config)
    rope_type = str(rope.get("rope_type", "default"))
    if rope_type not in ROPE_SCALING:
        raise PrunellmError(
            f"GGUF export writes the rope types {', '.join(ROPE_SCALING)}; this model uses rope scaling '{rope_type}', "
            "which has no writer in prunellm/export/rope.py (ROPE_SCALING)"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise PrunellmError(f"GGUF export rotates whole heads; this model rotates a part ({rope['partial_rotary_factor']}) of each")
    return rope_type


def write_rope(writer: GGUFWriter, config: PretrainedConfig) -> dict[str, np.ndarray]:
    """Add ``rope.freq_base`` and the scaling metadata; returns the tensors the scaling needs (``rope_freqs``)."""
    writer.add_rope_freq_base(rope_theta(config))
    return ROPE_SCALING[check_rope(config)](writer, config, rope_parameters(config))
