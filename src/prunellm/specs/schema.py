"""The architecture spec schema: where each prunable piece lives in one model family.

A spec is data (one YAML file per family, validated here with ``extra="forbid"`` so a misspelt key fails
at load). Pruning code reads module paths and config keys from the spec and never branches on model_type.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttentionSpec(_Strict):
    """Module names inside one decoder layer's attention block."""

    module: str = Field(description="attention module, relative to the decoder layer")
    q: str
    k: str
    v: str
    o: str
    layer_idx_attr: str = Field("layer_idx", description="attribute holding the layer index used by the KV cache")
    head_norms: list[str] = Field(
        default_factory=list, description="per-head-dim norms shared by every head (Qwen3 q_norm/k_norm): untouched"
    )


class MlpSpec(_Strict):
    """Module names inside one decoder layer's gated MLP block."""

    module: str
    gate: str
    up: str
    down: str
    size_attr: str | None = Field("intermediate_size", description="MLP attribute holding its width, if any")


class ConfigKeys(_Strict):
    """Which config keys hold each size."""

    hidden: str = "hidden_size"
    num_layers: str = "num_hidden_layers"
    num_heads: str = "num_attention_heads"
    num_kv_heads: str = "num_key_value_heads"
    intermediate: str = "intermediate_size"
    head_dim: str = "head_dim"
    per_layer_lists: list[str] = Field(
        default_factory=lambda: ["layer_types"], description="config lists with one entry per layer"
    )


class ArchitectureSpec(_Strict):
    """Everything prunellm needs to know about one model family."""

    name: str
    model_types: list[str] = Field(description="config.model_type values this spec covers")
    layers: str = Field(description="path of the decoder layer list from the model root")
    embed: str
    final_norm: str
    lm_head: str
    attention: AttentionSpec
    mlp: MlpSpec
    layer_norms: list[str] = Field(description="norms inside a decoder layer (hidden-sized, never pruned)")
    config: ConfigKeys = Field(default_factory=ConfigKeys)
    untouched: list[str] = Field(
        default_factory=list, description="other parameter name patterns that pruning leaves as they are"
    )
