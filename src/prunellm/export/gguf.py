"""Export a (pruned) model to one GGUF file that llama.cpp, Ollama and LM Studio load.

Which llama.cpp architecture a model becomes is data (:data:`TARGETS`, :data:`FAMILY_TARGETS`): the
family's standard architecture when every layer has the same widths (dense, depth-pruned, uniformly
pruned), else ``deci`` (the DeciLM / Nemotron-NAS graph), the llama.cpp architecture that reads
per-layer ``head_count``, ``head_count_kv`` and ``feed_forward_length`` arrays and builds every layer's
tensors at its own width (``llama``, ``qwen2`` and ``qwen3`` take the widths of layer 0 for all layers).

Zero-output blocks (:class:`~prunellm.hf_modeling.ZeroAttention` / ``ZeroMLP``): ``deci`` skips a layer's
attention when its head count is 0, exactly. Its FFN-free layer (width 0) also drops that layer's attention
output, so a removed MLP after a live attention block is written as an MLP of zeros instead (``down(silu(0) * 0)
= 0``: the same function), 1 channel wide, or one quant block (32) for q8_0 so that it quantizes too.

llama.cpp applies rotary embeddings to adjacent pairs (``rope_type`` normal) in ``llama`` and ``deci``;
Hugging Face rotates the two halves of each head: q/k rows (and biases) are permuted per head so both give
the same attention scores. ``qwen2``/``qwen3`` rotate halves as Hugging Face does (no permutation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, MODEL_TENSOR, TENSOR_NAMES
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import PrunellmError
from ..paths import atomic_file
from ..hf_modeling import ZeroAttention, ZeroMLP
from ..specs import spec_for
from ..surgery import layer_widths
from ..units import decoder_layers, get_module, head_dim
from .ggml import K_MIXES, check_available, fitting, mix_types
from .ggml import quantize as ggml_quantize
from .rope import ROPE_SCALING, check_rope, write_rope
from .tokenizer import gguf_vocab, write_vocab

log = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
              "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M, "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M, "q6_k": LlamaFileType.MOSTLY_Q6_K}  # fmt: skip

# optional parts of a layer, as found in the model: q/k/v biases, o_proj bias, MLP biases, q/k head norms
Feature = Literal["qkv_bias", "o_bias", "mlp_bias", "qk_norm", "untied_head"]


@dataclass(frozen=True)
class GgufTarget:
    """One llama.cpp architecture and what its graph can express."""

    arch: str
    interleaved_rope: bool  # rotates adjacent pairs: permute HF q/k rows
    per_layer: bool  # reads per-layer width arrays and skips 0-head attention
    allowed: frozenset[str]
    required: frozenset[str] = field(default_factory=frozenset)
    # its graph makes q (and o) hidden x hidden: query heads x head size must equal the hidden size
    q_is_hidden: bool = False
    # the MLP activation its graph computes (Hugging Face hidden_act name)
    activation: str = "silu"
    # Hugging Face rope types its graph applies (see .rope): llama3's rope_freqs tensor is read by llama and deci only
    rope_types: frozenset[str] = frozenset({"default", "linear"})


ALL_ROPE = frozenset(ROPE_SCALING)
BIASES = frozenset({"qkv_bias", "o_bias", "mlp_bias"})
TARGETS = {
    "llama": GgufTarget("llama", True, False, BIASES | {"untied_head"}, rope_types=ALL_ROPE),
    "qwen2": GgufTarget("qwen2", False, False, frozenset({"qkv_bias", "untied_head"}), frozenset({"qkv_bias"}), q_is_hidden=True),
    "qwen3": GgufTarget("qwen3", False, False, frozenset({"qk_norm", "untied_head"}), frozenset({"qk_norm"})),
    "deci": GgufTarget("deci", True, True, BIASES | {"untied_head"}, rope_types=ALL_ROPE),
    # embeddings scaled by sqrt(hidden) in the graph; its output is always token_embd (tied)
    "gemma": GgufTarget("gemma", False, False, frozenset(), activation="gelu_pytorch_tanh"),
}
# prunellm family (spec name) -> llama.cpp architectures to try, in order
FAMILY_TARGETS = {
    "llama": ("llama", "deci"),
    "mistral": ("llama", "deci"),
    "qwen2": ("qwen2", "deci"),
    "qwen3": ("qwen3", "deci"),
    "gemma": ("gemma", "deci"),
}
# Hugging Face RMSNorm scales by (offset + weight) in these families; llama.cpp's by the weight it reads
NORM_OFFSET = {"gemma": 1.0}


@dataclass
class LayerTensors:
    """One decoder layer in llama.cpp terms: its widths and named float32 arrays."""

    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: dict[str, np.ndarray]


def _name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = TENSOR_NAMES[kind].format(bid=layer) if layer is not None else TENSOR_NAMES[kind]
    return f"{base}.{suffix}"


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _interleave(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from halves (HF rotate_half) to adjacent pairs: (n*d, ...) -> same shape."""
    d = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, d // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def model_features(model: PreTrainedModel) -> dict[str, str]:
    """The optional layer parts this model has (see :data:`Feature`), each with the first tensor that has it."""
    spec = spec_for(model.config)
    found: dict[str, str] = {}
    for index, block in enumerate(decoder_layers(model, spec)):
        attn_path, mlp_path = spec.attention.module, spec.mlp.module
        attn = get_module(block, attn_path)
        if not isinstance(attn, ZeroAttention):
            for feature, name in (("qkv_bias", spec.attention.q), ("o_bias", spec.attention.o)):
                if getattr(get_module(attn, name), "bias", None) is not None:
                    found.setdefault(feature, f"layer {index} {attn_path}.{name}.bias")
            for name in spec.attention.head_norms:
                found.setdefault("qk_norm", f"layer {index} {attn_path}.{name}.weight")
        mlp = get_module(block, mlp_path)
        if not isinstance(mlp, ZeroMLP):
            for name in (spec.mlp.gate, spec.mlp.up, spec.mlp.down):
                if getattr(get_module(mlp, name), "bias", None) is not None:
                    found.setdefault("mlp_bias", f"layer {index} {mlp_path}.{name}.bias")
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        found["untied_head"] = spec.lm_head
    return found


def _norm_array(weight: torch.Tensor, family: str) -> np.ndarray:
    return _array(weight) + np.float32(NORM_OFFSET.get(family, 0.0))


@dataclass(frozen=True)
class ModelFacts:
    """What decides a model's llama.cpp architecture, read once from the model."""

    family: str
    widths: list[dict[str, int]]  # per layer, as surgery.layer_widths reads them
    narrow_q: tuple[int, int] | None  # (layer, query width) of the first layer whose query heads x head size != hidden
    hidden: int
    activation: str
    rope_type: str
    features: dict[str, str]  # Feature -> the first tensor that has it

    @property
    def uniform(self) -> bool:
        first = self.widths[0]
        return all(w == first for w in self.widths) and all(w["num_key_value_heads"] and w["intermediate_size"] for w in self.widths)


def model_facts(model: PreTrainedModel) -> ModelFacts:
    spec = spec_for(model.config)
    widths = layer_widths(model, spec)
    d_h, hidden = head_dim(model.config, spec), int(model.config.hidden_size)
    narrow = next(((i, w["num_attention_heads"] * d_h) for i, w in enumerate(widths) if w["num_attention_heads"] * d_h != hidden), None)
    activation = str(getattr(model.config, "hidden_activation", None) or model.config.hidden_act)
    return ModelFacts(spec.name, widths, narrow, hidden, activation, check_rope(model.config), model_features(model))


def why_not(target: GgufTarget, facts: ModelFacts) -> str | None:
    """What of the model ``target``'s graph cannot express (one phrase), or None when it expresses all of it."""
    name, features = f"'{target.arch}'", set(facts.features)
    if not facts.uniform and not target.per_layer:
        return f"{name} needs the same widths in every layer"
    if target.q_is_hidden and facts.narrow_q is not None:
        layer, width = facts.narrow_q
        return f"{name} needs query heads x head size = hidden size (layer {layer}: {width} of {facts.hidden})"
    if facts.activation != target.activation:
        return f"{name} computes a {target.activation} MLP, not {facts.activation}"
    if features - target.allowed:
        return f"{name} has no {', '.join(f'{f} ({facts.features[f]})' for f in sorted(features - target.allowed))}"
    if target.required - features:
        return f"{name} requires {', '.join(sorted(target.required - features))}"
    if facts.rope_type not in target.rope_types:
        return f"{name} has no {facts.rope_type} rope scaling"
    return None


def choose_target(model: PreTrainedModel) -> GgufTarget:
    """The first llama.cpp architecture of the model's family that expresses it, or a one-line error why none does."""
    family = spec_for(model.config).name
    if family not in FAMILY_TARGETS:
        raise PrunellmError(
            f"GGUF export supports the families {', '.join(FAMILY_TARGETS)}; '{family}' has no llama.cpp target "
            "in prunellm/export/gguf.py (FAMILY_TARGETS)"
        )
    facts = model_facts(model)
    reasons = []
    for target in (TARGETS[name] for name in FAMILY_TARGETS[family]):
        reason = why_not(target, facts)
        if reason is None:
            if reasons:
                log.info("writing this %s model as llama.cpp '%s': %s", family, target.arch, "; ".join(reasons))
            return target
        reasons.append(reason)
    widths = facts.widths
    first_odd = next((i for i, w in enumerate(widths) if w != widths[0]), 0)
    # llama.cpp's graph for this family takes one width for all layers: depth pruning keeps every layer's widths
    hint = "" if facts.uniform else "; to export it, prune with prunellm layers (whole layers; every other layer keeps its widths)"
    raise PrunellmError(
        f"this {family} model cannot be written as GGUF: {'; '.join(reasons)} (layer {first_odd}: {widths[first_odd]}){hint}"
    )


def layer_tensors(model: PreTrainedModel, index: int, target: GgufTarget, zero_ff: int = 1) -> LayerTensors:
    """One decoder layer's llama.cpp tensors (float32, Hugging Face (out, in) layout); ``zero_ff``: the width of the
    all-zero MLP that stands for a removed one after a live attention block (a quant block, so it quantizes too)."""
    spec = spec_for(model.config)
    block = decoder_layers(model, spec)[index]
    d_h = head_dim(model.config, spec)
    attn_norm, ffn_norm = (_norm_array(get_module(block, name).weight, spec.name) for name in spec.layer_norms[:2])
    T = MODEL_TENSOR
    out: dict[str, np.ndarray] = {}
    attn = get_module(block, spec.attention.module)
    hidden = attn_norm.shape[0]
    n_head = n_kv = 0
    zero_attention = isinstance(attn, ZeroAttention)
    if zero_attention and index == 0:
        # llama.cpp derives the head size from layer 0's head count: give it one KV group of zeros (output 0)
        n_kv, n_head = 1, model.config.num_attention_heads // model.config.num_key_value_heads
        out[_name(T.ATTN_NORM, index)] = attn_norm
        for kind, rows in ((T.ATTN_Q, n_head * d_h), (T.ATTN_K, d_h), (T.ATTN_V, d_h)):
            out[_name(kind, index)] = np.zeros((rows, hidden), np.float32)
        out[_name(T.ATTN_OUT, index)] = np.zeros((hidden, n_head * d_h), np.float32)
    elif not zero_attention:
        q, k, v, o = (get_module(attn, getattr(spec.attention, key)) for key in ("q", "k", "v", "o"))
        n_head, n_kv = q.out_features // d_h, k.out_features // d_h
        out[_name(T.ATTN_NORM, index)] = attn_norm
        for kind, linear, heads in ((T.ATTN_Q, q, n_head), (T.ATTN_K, k, n_kv), (T.ATTN_V, v, None), (T.ATTN_OUT, o, None)):
            for suffix, param in (("weight", linear.weight), ("bias", linear.bias)):
                if param is None:
                    continue
                data = _array(param)
                if heads is not None and target.interleaved_rope:
                    data = _interleave(data, heads)
                out[_name(kind, index, suffix)] = data
        for kind, norm in zip((T.ATTN_Q_NORM, T.ATTN_K_NORM), spec.attention.head_norms):
            data = _norm_array(get_module(attn, norm).weight, spec.name)
            out[_name(kind, index)] = _interleave(data, 1) if target.interleaved_rope else data
    mlp = get_module(block, spec.mlp.module)
    if isinstance(mlp, ZeroMLP):
        if zero_attention:
            n_ff = 0  # the whole layer is the identity: deci skips its FFN (and the attention outputs 0)
        else:
            # deci drops the attention output of an FFN-free layer: an all-zero MLP outputs 0 exactly
            n_ff = zero_ff
            out[_name(T.FFN_NORM, index)] = ffn_norm
            out[_name(T.FFN_GATE, index)] = np.zeros((n_ff, hidden), np.float32)
            out[_name(T.FFN_UP, index)] = np.zeros((n_ff, hidden), np.float32)
            out[_name(T.FFN_DOWN, index)] = np.zeros((hidden, n_ff), np.float32)
    else:
        gate, up, down = (get_module(mlp, getattr(spec.mlp, key)) for key in ("gate", "up", "down"))
        n_ff = gate.out_features
        out[_name(T.FFN_NORM, index)] = ffn_norm
        for kind, linear in ((T.FFN_GATE, gate), (T.FFN_UP, up), (T.FFN_DOWN, down)):
            out[_name(kind, index)] = _array(linear.weight)
            if linear.bias is not None:
                out[_name(kind, index, "bias")] = _array(linear.bias)
    return LayerTensors(n_head, n_kv, n_ff, out)


# outtype -> the quantized type of its weight matrices (the K mixes: the type of most of them)
QUANT_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, **{name: mix[0] for name, mix in K_MIXES.items()}}


def tensor_types(tensors: dict[str, np.ndarray], outtype: OutType, tied: bool) -> dict[str, GGMLQuantizationType]:
    """The type of every tensor: norms and biases F32; matrices f32, f16, Q8_0 (F16 where a row is not a multiple of
    its block), or the K mix llama-quantize would choose (:func:`prunellm.export.ggml.mix_types`)."""
    if outtype in K_MIXES:
        return mix_types({name: data.shape for name, data in tensors.items()}, outtype, tied)
    matrix = {"f32": T.F32, "f16": T.F16}.get(outtype, T.Q8_0)
    return {name: T.F32 if data.ndim == 1 else fitting(matrix, data.shape[-1]) for name, data in tensors.items()}


def _encode(data: np.ndarray, kind: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """The array as ``kind`` and its raw type (None: from the numpy dtype); Q8_0 by gguf-py, K-quants by ggml."""
    if kind in (T.F32, T.F16):
        return data.astype(np.float32 if kind == T.F32 else np.float16), None
    if kind == T.Q8_0:
        return quantize(data, kind), kind
    return ggml_quantize(data, kind), kind


def warn_fallbacks(fallbacks: dict[str, GGMLQuantizationType], matrices: int, outtype: OutType) -> None:
    """One warning for the matrices a quantized outtype wrote in another type than it chose (their rows are not a
    multiple of its block), naming the ``--deploy_target`` that avoids it for ``ffn_down``."""
    if not fallbacks:
        return
    from .targets import mlp_target_for

    block = GGML_QUANT_SIZES[QUANT_TYPES[outtype]][0]
    down = [n for n in fallbacks if n.startswith("blk.") and ".ffn_down." in n]
    fix = (f"; prune with --deploy_target {mlp_target_for(outtype)} to keep every MLP width a multiple of {block}"
           if down else "")  # fmt: skip
    written = "/".join(sorted({kind.name for kind in fallbacks.values()}))
    log.warning(
        "--outtype %s: %d of %d weight matrices (%d ffn_down, first %s) have rows that are not a multiple of %d and were "
        "written as %s, as llama-quantize writes them%s", outtype, len(fallbacks), matrices, len(down), next(iter(fallbacks)),
        block, written, fix,
    )  # fmt: skip


def export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output: str | Path,
    outtype: OutType = "f16",
    name: str = "model",
) -> Path:
    """Write ``model`` and its tokenizer as one GGUF file (temporary file, then rename).

    Args:
        model: a Hugging Face causal LM of a supported family, dense or pruned by prunellm.
        tokenizer: its (byte-level BPE) tokenizer.
        output: the folder that receives ``<name>-<outtype>.gguf``.
        outtype: ``f32``, ``f16``, ``q8_0`` for the weight matrices (norms and biases stay float32), or llama.cpp's
            K-quant mixes ``q4_k_m``, ``q5_k_m``, ``q6_k`` (quantized by ggml, in the types llama-quantize chooses).
        name: the file's stem and its ``general.name``.

    Returns:
        The path of the GGUF file.
    """
    if outtype not in FILE_TYPES:
        raise PrunellmError(f"--outtype {outtype} is not a GGUF type prunellm writes: use one of {', '.join(FILE_TYPES)}")
    if outtype in K_MIXES:
        check_available()  # before any work
    config = model.config
    spec = spec_for(config)
    target = choose_target(model)
    vocab = gguf_vocab(tokenizer, model.get_input_embeddings().weight.shape[0])
    n_layers = len(decoder_layers(model, spec))
    zero_ff = GGML_QUANT_SIZES[QUANT_TYPES[outtype]][0] if outtype in QUANT_TYPES else 1
    layers = [layer_tensors(model, i, target, zero_ff) for i in range(n_layers)]
    d_h = head_dim(config, spec)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == embed.data_ptr()

    final = Path(output) / f"{name}-{outtype}.gguf"
    with atomic_file(final) as tmp:  # a temporary name that records its owner: a killed export's is removed later
        writer = GGUFWriter(tmp, target.arch)
        writer.add_name(name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(embed.shape[1]))
        writer.add_block_count(n_layers)
        if target.per_layer:
            writer.add_feed_forward_length([layer.n_ff for layer in layers])
            writer.add_head_count([layer.n_head for layer in layers])
            writer.add_head_count_kv([layer.n_head_kv for layer in layers])
        else:
            writer.add_feed_forward_length(layers[0].n_ff)
            writer.add_head_count(layers[0].n_head)
            writer.add_head_count_kv(layers[0].n_head_kv)
        writer.add_key_length(d_h)
        writer.add_value_length(d_h)
        writer.add_rope_dimension_count(d_h)
        rope_tensors = write_rope(writer, config)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(len(vocab.tokens))
        writer.add_file_type(FILE_TYPES[outtype])
        write_vocab(writer, vocab)

        tensors = {**rope_tensors, _name(MODEL_TENSOR.TOKEN_EMBD): _array(embed)}
        for layer in layers:
            tensors.update(layer.tensors)
        tensors[_name(MODEL_TENSOR.OUTPUT_NORM)] = _norm_array(get_module(model, spec.final_norm).weight, spec.name)
        if not tied:  # llama.cpp reuses token_embd when output.weight is absent
            tensors[_name(MODEL_TENSOR.OUTPUT)] = _array(head)
        kinds = tensor_types(tensors, outtype, tied)
        for tensor_name, data in tensors.items():
            encoded, raw_dtype = _encode(data, kinds[tensor_name])
            writer.add_tensor(tensor_name, encoded, raw_dtype=raw_dtype)
        block = GGML_QUANT_SIZES[QUANT_TYPES[outtype]][0] if outtype in QUANT_TYPES else 1
        fallbacks = {name: kinds[name] for name, data in tensors.items() if data.ndim > 1 and data.shape[-1] % block}
        warn_fallbacks(fallbacks, sum(data.ndim > 1 for data in tensors.values()), outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("wrote %s (llama.cpp architecture '%s', %s)", final, target.arch, outtype)
    return final
