"""Where a pruned model runs (``--deploy_target``), as data: what each engine needs of the kept widths.

One row per target of :class:`~prunellm.options.SelectionOptions` ``deploy_target``. Selection reads
:attr:`DeployTarget.mlp_multiple` (kept MLP widths are multiples of it, combined with ``--round_to`` by lcm)
and :attr:`DeployTarget.whole_attention`; the exports read :data:`VLLM_HEAD_DIMS` and :func:`mlp_target_for`.

Why these numbers:

- llama.cpp quantizes a matrix row by row in blocks along its input dimension: ``ffn_down``'s input is the MLP
  width, so a width that is not a multiple of the block size leaves that tensor unquantized (f16) — the block
  sizes are gguf-py's ``GGML_QUANT_SIZES`` (32 for Q8_0/Q4_0/Q5_0, 256 for the K-quants). ``q4_k_m`` and
  ``q5_k_m`` files mix K-quant types (Q4_K/Q5_K with Q6_K), all on blocks of 256.
- vLLM's ``nemotron-nas`` keeps every query head of an attention block (:mod:`.vllm`): whole blocks only.
- vLLM-CPU's attention kernel is compiled for a fixed list of head sizes (``CPU_ATTN_DISPATCH_CASE_HEADDIM`` in
  vLLM's ``csrc/cpu/cpu_attn.cpp``: 32, 64, 80, 96, 112, 128, 160, 192, 224, 256; any other fails at the first
  request with "Unsupported CPU attention configuration: head_dim=…", e.g. 16 with vLLM-CPU 0.32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# head sizes vLLM-CPU's attention kernel is compiled for (see the module docstring for the source)
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def _block(kind: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[kind][0]


@dataclass(frozen=True)
class DeployTarget:
    """What one serving target needs of a pruned model."""

    name: str
    mlp_multiple: int = 1  # kept MLP widths are multiples of this (the quant block along ffn_down's input)
    whole_attention: bool = False  # a layer's KV groups go all together or not at all
    head_dims: tuple[int, ...] | None = None  # head sizes the engine's attention runs (None: any)
    summary: str = ""


T = GGMLQuantizationType
DEPLOY_TARGETS: dict[str, DeployTarget] = {
    t.name: t
    for t in (
        DeployTarget("any", summary="no constraint"),
        DeployTarget("hf", summary="transformers: any width"),
        DeployTarget("vllm", whole_attention=True, head_dims=VLLM_HEAD_DIMS, summary="vLLM nemotron-nas: MLP channels, whole attention blocks"),
        DeployTarget("llamacpp:f32", summary="llama.cpp f32: any width"),
        DeployTarget("llamacpp:f16", summary="llama.cpp f16: any width"),
        DeployTarget("llamacpp:q8_0", _block(T.Q8_0), summary="llama.cpp Q8_0: blocks of 32"),
        DeployTarget("llamacpp:q4_0", _block(T.Q4_0), summary="llama.cpp Q4_0: blocks of 32"),
        DeployTarget("llamacpp:q5_0", _block(T.Q5_0), summary="llama.cpp Q5_0: blocks of 32"),
        DeployTarget("llamacpp:q4_k_m", math.lcm(_block(T.Q4_K), _block(T.Q6_K)), summary="llama.cpp Q4_K_M: blocks of 256"),
        DeployTarget("llamacpp:q5_k_m", math.lcm(_block(T.Q5_K), _block(T.Q6_K)), summary="llama.cpp Q5_K_M: blocks of 256"),
        DeployTarget("llamacpp:q6_k", _block(T.Q6_K), summary="llama.cpp Q6_K: blocks of 256"),
    )
}


def deploy_target(name: str) -> DeployTarget:
    """The :class:`DeployTarget` called ``name`` (a value of ``--deploy_target``)."""
    return DEPLOY_TARGETS[name]


def mlp_target_for(outtype: str) -> str | None:
    """The ``--deploy_target`` whose MLP widths a GGUF of ``outtype`` quantizes whole (None: every width does)."""
    name = f"llamacpp:{outtype}"
    return name if name in DEPLOY_TARGETS and DEPLOY_TARGETS[name].mlp_multiple > 1 else None


def deploy_target_names() -> tuple[str, ...]:
    """The values ``--deploy_target`` accepts (the options' Literal; a test keeps it equal to the table)."""
    from ..options import SelectionOptions

    return get_args(SelectionOptions.model_fields["deploy_target"].annotation)
