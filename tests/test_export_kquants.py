"""GGUF K-quants (``--outtype q4_k_m|q5_k_m|q6_k``): llama.cpp's kernels, llama-quantize's choice of type per tensor."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import byte_level_bpe

from prunellm.errors import PrunellmError
from prunellm.export.ggml import K_MIXES, mix_types, more_bits
from prunellm.surgery import prune_units

xllamacpp = pytest.importorskip("xllamacpp", reason="K-quants and llama.cpp need the serve extra (pip install xllamacpp)")
from prunellm.export.gguf import export_gguf  # noqa: E402
from prunellm.export.llamacpp import LlamaCpp  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog.", "Pruning removes channels and heads from a model."] * 20


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_bpe(TEXT, 300)


def llama_256(tokenizer, layers: int = 8) -> LlamaForCausalLM:
    """A Llama whose rows are multiples of 256 (hidden 256, MLP 512), so every matrix takes its K type."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_the_mix_is_the_one_llama_quantize_chose_for_gemma_3_tensor_for_tensor(tmp_path):
    """The embedded Gemma 3 270M ships as the Q4_K_M file llama.cpp made: the types :func:`mix_types` gives its
    tensors (18 layers; rows of 640 fall back, 1024 and 2048 do not) are the file's, every one of them."""
    from prunellm.assets import EMBEDDED_MODELS, _embedded_gguf_path

    try:
        path = _embedded_gguf_path(EMBEDDED_MODELS["gemma3-270m"], tmp_path)
    except PrunellmError as exc:
        pytest.skip(str(exc))
    reader = gguf.GGUFReader(str(path))
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # GGUF lists ne0 first
    theirs = {t.name: t.tensor_type for t in reader.tensors}
    ours = mix_types(shapes, "q4_k_m", tied="output.weight" not in shapes)
    assert ours == theirs
    assert {theirs[f"blk.{i}.ffn_down.weight"] for i in range(18)} == {T.Q4_K, T.Q6_K}  # the mix is not uniform


def test_more_bits_picks_llama_cpps_layers():
    assert [i for i in range(18) if more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]
    assert [i for i in range(8) if more_bits(i, 8)] == [0, 3, 6, 7]


@pytest.mark.parametrize("outtype", sorted(K_MIXES))
def test_a_k_quant_export_holds_llama_cpps_types_and_the_weights_and_runs_in_llama_cpp(tokenizer, tmp_path, outtype):
    model = llama_256(tokenizer)
    path = export_gguf(model, tokenizer, tmp_path, outtype)
    reader = gguf.GGUFReader(str(path))
    base, larger = K_MIXES[outtype]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == T.Q6_K  # tied: the output head's type
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [larger if more_bits(i, 8) else base for i in range(8)]
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == [larger if more_bits(i, 8) else base for i in range(8)]
    assert types["blk.0.ffn_up.weight"] == types["blk.3.attn_q.weight"] == base
    assert reader.fields["general.file_type"].contents() == {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[outtype]
    weights = {"blk.2.ffn_down.weight": model.model.layers[2].mlp.down_proj.weight,
               "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,
               "token_embd.weight": model.model.embed_tokens.weight}  # fmt: skip
    tensors = {t.name: t for t in reader.tensors}
    for name, weight in weights.items():
        values = dequantize(tensors[name].data, tensors[name].tensor_type).reshape(weight.shape)
        original = weight.detach().numpy()
        error = np.sqrt(((values - original) ** 2).mean()) / np.sqrt((original**2).mean())
        assert error < {T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.03}[tensors[name].tensor_type], (name, error)
    ids = tokenizer("The quick brown fox")["input_ids"]
    assert len(LlamaCpp(path).complete(ids, 4).tokens) == 4


def test_widths_that_are_not_multiples_of_256_fall_back_as_llama_quantize_does_and_say_which_target_avoids_it(tokenizer, tmp_path, caplog):
    model = llama_256(tokenizer, layers=2)
    prune_units(model, {(0, "mlp_channel"): list(range(0, 512, 2))[:192], (1, "mlp_channel"): list(range(256))})  # 320 and 256 wide
    caplog.set_level(logging.WARNING, logger="prunellm.export.gguf")
    path = export_gguf(model, tokenizer, tmp_path, "q4_k_m")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert not more_bits(0, 2) and more_bits(1, 2)
    assert types["blk.0.ffn_down.weight"] == T.Q5_0  # Q4_K -> Q5_0: 320 is a multiple of 32, not of 256
    assert types["blk.1.ffn_down.weight"] == T.Q6_K
    warning = next(r.getMessage() for r in caplog.records if "--outtype q4_k_m" in r.getMessage())
    assert "1 ffn_down" in warning and "written as Q5_0" in warning and "--deploy_target llamacpp:q4_k_m" in warning


def test_k_quants_are_gguf_only_and_named_in_the_refusal(tmp_path):
    from prunellm.export import export_model

    with pytest.raises(PrunellmError, match="--outtype q4_k_m is for --format gguf") as info:
        export_model(model=str(tmp_path / "nothing"), format="vllm", output=str(tmp_path / "out"), outtype="q4_k_m")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("outtype", ["q4_k_m", "q8_0", "f16"])
def test_the_served_model_holds_the_files_weights_and_computes_near_the_float_model(tokenizer, tmp_path, outtype):
    """benchmarks.serving.served_model: every matrix re-encoded as the file holds it (checked byte for byte, q/k rows
    as a set), de-quantized into transformers; a file of other weights is refused."""
    from benchmarks.serving import served_model

    model = llama_256(tokenizer, layers=2)
    path = export_gguf(model, tokenizer, tmp_path, outtype)
    served = served_model(model, path)
    ids = torch.tensor([tokenizer("The quick brown fox jumps")["input_ids"]])
    with torch.no_grad():
        exact, approx = model(ids).logits, served(ids).logits
    error = float((approx - exact).norm() / exact.norm())
    assert 0 < error < {"q4_k_m": 0.3, "q8_0": 0.02, "f16": 0.002}[outtype], error
    assert torch.equal(served.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    other = llama_256(tokenizer, layers=2)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(2)
    with pytest.raises(AssertionError, match="blk.1.ffn_down.weight"):
        served_model(other, path)


def test_the_quantized_serving_table_gives_speed_ratios_and_the_served_files_ppl():
    from benchmarks.serving import render_quantized

    row = lambda t, label, d, p: {"outtype": t, "label": label, "removed": 0.0 if label == "dense" else 0.2, "file_mb": 100.0,  # noqa: E731
                                  "prefill_tok_s": p, "decode_tok_s": d, "prefill_ratio": 1.1, "decode_ratio": round(d / 100, 3),
                                  "served_ppl": {"shakespeare_eval": 70.0, "wikitext2_test": 60.0}}  # fmt: skip
    section = {"prompt_tokens": 128, "new_tokens": 64, "threads": 1, "rounds": 5, "ratio": 0.2,
               "texts": ["shakespeare_eval", "wikitext2_test"],
               "rows": [row("q4_k_m", "dense", 100.0, 900.0), row("q4_k_m", "default recipe", 125.0, 990.0)]}  # fmt: skip
    lines = render_quantized(section).splitlines()
    assert "| q4_k_m | default recipe | 20.0% | 100.0 | 990.0 (1.1×) | 125.0 (1.25×) | 70.00 | 60.00 |" in lines
