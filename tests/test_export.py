"""Export to llama.cpp (GGUF) and vLLM: what is written runs there and computes what transformers computes."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from conftest import make_tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prunellm.errors import PrunellmError
from prunellm.export.gguf import choose_target, export_gguf
from prunellm.surgery import prune_units, remove_layers

xllamacpp = pytest.importorskip("xllamacpp", reason="llama.cpp tests need the serve extra (pip install xllamacpp)")
from prunellm.export.llamacpp import LlamaCpp  # noqa: E402

TEXT = [
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "Pruning removes channels and heads from a language model; serving it should be faster.",
    "Numbers like 12345 and 2026 appear in text, and so do symbols: #, $, % and émigré words!",
] * 20
PROMPT = "The quick brown fox"
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the GPT-2 kind) trained in code on a few sentences: 320 tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    backend.train_from_iterator(TEXT, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny(family: str, tokenizer, **overrides):
    # a larger init than transformers' 0.02 gives peaked next-token distributions, so greedy choices are not
    # decided by float rounding between the two implementations
    # the special ids must be the tokenizer's: generate() keeps eos_token_id out of the first min_new_tokens
    special = {f"{name}_token_id": tokenizer.eos_token_id for name in ("bos", "eos", "pad")}
    return make_tiny_model(family, vocab_size=len(tokenizer), initializer_range=0.3, **special, **overrides)


def transformers_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def assert_llamacpp_matches(model, tokenizer, tmp_path, outtype="f32", n=32) -> gguf.GGUFReader:
    path = export_gguf(model, tokenizer, tmp_path, outtype)
    server = LlamaCpp(path, threads=1, exact=outtype == "f32")
    ids = tokenizer(PROMPT)["input_ids"]
    assert server.tokenize(PROMPT) == ids
    assert server.tokenize(TEXT[2]) == tokenizer(TEXT[2])["input_ids"]
    assert server.complete(ids, n).tokens == transformers_greedy(model, ids, n)
    return gguf.GGUFReader(str(path))


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def uneven_plan(model) -> dict:
    """Layer 0 keeps both KV groups and 84 of 96 channels, layer 1 its second KV group and 60 channels."""
    return {
        (0, "mlp_channel"): [i for i in range(96) if i % 8 != 3],
        (1, "mlp_channel"): [i for i in range(96) if i % 3 != 1][:60],
        (1, "kv_group"): [1],
    }


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_dense_model_runs_in_llamacpp_as_its_standard_architecture(family, tokenizer, tmp_path):
    model = tiny(family, tokenizer)
    reader = assert_llamacpp_matches(model, tokenizer, tmp_path)
    assert field(reader, "general.architecture") == {"mistral": "llama"}.get(family, family)
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    tied = model.config.tie_word_embeddings
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not tied)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_non_uniform_widths_run_in_llamacpp_as_deci(family, tokenizer, tmp_path):
    model = tiny(family, tokenizer)
    prune_units(model, uneven_plan(model))
    reader = assert_llamacpp_matches(model, tokenizer, tmp_path)
    arch = field(reader, "general.architecture")
    assert arch == "deci"
    assert field(reader, f"{arch}.feed_forward_length") == [84, 60]
    assert field(reader, f"{arch}.attention.head_count") == [4, 2]
    assert field(reader, f"{arch}.attention.head_count_kv") == [2, 1]


@pytest.mark.parametrize(
    "emptied",
    [
        {(0, "mlp_channel"): []},  # an MLP-free layer after live attention
        {(1, "kv_group"): []},  # an attention-free layer
        {(0, "kv_group"): [], (0, "mlp_channel"): []},  # a whole layer that is the identity
    ],
    ids=["zero_mlp", "zero_attention", "zero_layer"],
)
def test_zero_output_blocks_run_in_llamacpp(emptied, tokenizer, tmp_path):
    model = tiny("llama", tokenizer)
    prune_units(model, emptied)
    reader = assert_llamacpp_matches(model, tokenizer, tmp_path)
    n_ff = field(reader, "deci.feed_forward_length")
    heads = field(reader, "deci.attention.head_count")
    if (0, "mlp_channel") in emptied:
        assert n_ff[0] == (0 if (0, "kv_group") in emptied else 1)  # 1 zero channel: deci would drop the attention
    if (0, "kv_group") in emptied:
        assert heads[0] == 2  # layer 0 sets llama.cpp's head size: one KV group of zeros
    if (1, "kv_group") in emptied:
        assert heads[1] == 0


def test_depth_pruned_and_uniformly_pruned_models_keep_the_standard_architecture(tokenizer, tmp_path):
    model = tiny("qwen2", tokenizer, num_hidden_layers=3)
    remove_layers(model, [1])
    prune_units(model, {(i, "mlp_channel"): list(range(0, 96, 2)) for i in range(2)})
    reader = assert_llamacpp_matches(model, tokenizer, tmp_path)
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "qwen2.block_count") == 2
    assert field(reader, "qwen2.feed_forward_length") == 48


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_smaller_outtypes_load_and_mostly_agree(outtype, tokenizer, tmp_path):
    model = tiny("llama", tokenizer, hidden_size=128, intermediate_size=128)
    prune_units(model, {(0, "mlp_channel"): list(range(100))})  # 100 is not a multiple of 32: f16 rows for Q8_0
    path = export_gguf(model, tokenizer, tmp_path, outtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    wanted = gguf.GGMLQuantizationType.Q8_0 if outtype == "q8_0" else gguf.GGMLQuantizationType.F16
    assert types["blk.1.ffn_up.weight"] == wanted
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 100
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    ids = tokenizer(PROMPT)["input_ids"]
    got = LlamaCpp(path).complete(ids, 8).tokens
    assert len(got) == 8 and got[0] == transformers_greedy(model, ids, 1)[0]


def test_qwen3_with_per_layer_widths_is_refused_in_one_line(tokenizer):
    model = tiny("qwen3", tokenizer)
    prune_units(model, uneven_plan(model))
    with pytest.raises(PrunellmError, match="'deci' has no qk_norm") as info:
        choose_target(model)
    assert "\n" not in str(info.value) and "'qwen3' needs the same widths" in str(info.value)


def test_family_without_a_target_is_refused(tokenizer):
    with pytest.raises(PrunellmError, match="gemma"):
        choose_target(tiny("gemma", tokenizer))


def test_sentencepiece_tokenizers_are_refused(tokenizer, tmp_path):
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(PrunellmError, match="byte-level BPE"):
        export_gguf(tiny("llama", tokenizer), sp, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_writes_atomically_and_records_special_tokens(tokenizer, tmp_path):
    path = export_gguf(tiny("llama", tokenizer), tokenizer, tmp_path, "f32", name="tiny")
    assert path.name == "tiny-f32.gguf" and [p.name for p in tmp_path.iterdir()] == ["tiny-f32.gguf"]
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert len(field(reader, "tokenizer.ggml.tokens")) == len(tokenizer)
    assert json.dumps(field(reader, "tokenizer.ggml.add_bos_token")) == "false"


def test_cli_exports_a_saved_non_uniform_checkpoint(tokenizer, tmp_path, capsys):
    from prunellm.checkpoint import save_model
    from prunellm.cli import main

    model = tiny("llama", tokenizer)
    prune_units(model, uneven_plan(model))
    save_model(model, tokenizer, tmp_path / "results" / "tiny-uneven" / "model")
    code = main(["export", "--model", str(tmp_path / "results" / "tiny-uneven"), "--format", "gguf",
                 "--output", str(tmp_path / "out"), "--outtype", "f32"])  # fmt: skip
    assert code == 0
    path = tmp_path / "out" / "tiny-uneven-f32.gguf"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)  # the path, last (after the log)
    ids = tokenizer(PROMPT)["input_ids"]
    assert LlamaCpp(path, exact=True).complete(ids, 16).tokens == transformers_greedy(model, ids, 16)


def test_cli_refuses_q8_0_for_vllm_in_one_line(tmp_path, capsys):
    from prunellm.cli import main

    assert main(["export", "--model", str(tmp_path), "--format", "vllm", "--outtype", "q8_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --outtype q8_0") and "\n" not in err
