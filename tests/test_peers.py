"""The peer table's own logic (ratio matching, parameter prediction, rendering), and the peers from their code.

The last test runs FLAP and LLM-Pruner from their pinned checkouts on a tiny Llama; it is skipped where no
checkout is cached and no local mirror is named (``PRUNELLM_PEER_MIRROR``): it never reaches the network.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_tiny_model

from benchmarks.peers import flap, llm_pruner, source
from benchmarks.peers.run import SECOND_FAMILY, SECOND_FAMILY_ROWS, match_setting, render
from prunellm.units import count_parameters

# SmolLM2-135M's sizes (benchmarks.common.MODEL)
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)  # fmt: skip
SMOLLM2_PARAMS = 134_515_008


def test_match_setting_takes_the_nearest_step_and_the_smaller_setting_on_a_tie():
    steps = lambda r: 10 * int(r * 10)  # noqa: E731 — a step function like a peer's whole heads and channels
    assert match_setting(steps, 34, step=0.05) == (0.3, 30)
    assert match_setting(steps, 36, step=0.05) == (0.4, 40)
    assert match_setting(steps, 35, step=0.05) == (0.3, 30)  # tie: the smaller setting
    assert match_setting(steps, 10_000, step=0.05) == (0.9, 90)  # the top plateau starts at 0.9


def test_flap_prediction_on_smollm2_removes_a_kv_group_only_from_a_third_on():
    per_channel, per_group = 3 * 576, 576 * 64 * (2 * 3 + 2)
    # 1/3 (floor(0.999) = 0 groups): MLP channels only, less the two biases FLAP adds per layer
    assert flap.removed_params(SMOLLM2, 0.333) == 30 * (511 * per_channel - 2 * 576)
    assert flap.removed_params(SMOLLM2, 0.34) == 30 * (per_group + 522 * per_channel - 2 * 576)
    # the issue-17 reference run removed 19.7 % at this setting
    assert round(flap.removed_params(SMOLLM2, 0.333) / SMOLLM2_PARAMS, 3) == 0.197


def test_llm_pruner_prediction_prunes_layers_4_to_28_only():
    assert llm_pruner.layer_range(30) == (4, 28)
    per_channel, per_group = 3 * 576, 576 * 64 * (2 * 3 + 2)
    # 192 KV channels: 192 - int(192 · 0.6715) = 64 = one KV head; 1536 - int(1536 · 0.6715) = 505 MLP channels
    assert llm_pruner.removed_params(SMOLLM2, 0.3285) == 24 * (per_group + 505 * per_channel)
    assert llm_pruner.removed_params(SMOLLM2, 0.3) == 24 * (0 * per_group + 461 * per_channel)


def test_clone_source_prefers_a_mirror_folder_then_github(tmp_path, monkeypatch):
    peer = source.PEERS["flap"]
    monkeypatch.delenv("PRUNELLM_PEER_MIRROR", raising=False)
    assert source.clone_source(peer) == "https://github.com/CASIA-IVA-Lab/FLAP"
    (tmp_path / "CASIA-IVA-Lab+FLAP" / "repo").mkdir(parents=True)
    assert source.clone_source(peer, tmp_path) == str(tmp_path / "CASIA-IVA-Lab+FLAP" / "repo")
    monkeypatch.setenv("PRUNELLM_PEER_MIRROR", str(tmp_path / "one-repo"))
    assert source.clone_source(peer) == str(tmp_path / "one-repo")
    with pytest.raises(KeyError, match="known peers are flap, llm_pruner"):
        source.checkout("sparsegpt")


def test_render_gives_one_line_per_method_with_both_ratios_and_errors():
    dense = {"shakespeare_eval": 60.0, "wikitext2_test": 50.0}
    row = lambda m, r, a, b: {"row": f"{m}/{r}", "method": m, "ratio": r, "removed": r, "seconds": 1.0,  # noqa: E731
                              "ppl": {"shakespeare_eval": a, "wikitext2_test": b}, "setting": {}}  # fmt: skip
    section = {
        "protocol": {"num_samples": 32, "seq_len": 128, "seed": 42, "windows": 64, "calibration": "WikiText-2 validation"},
        "dense": {"ppl": dense}, "prunellm_default": {"criterion": "taylor", "normalization": "block", "reconstruct": "lstsq"},
        "rows": [row("flap", 0.2, 120.0, 75.0), {**row("prunellm", 0.2, 90.0, 60.0), "prune_seconds": 12.34}, row("prunellm", 0.3, 180.0, 100.0),
                 {"row": "llm_pruner/0.2", "method": "llm_pruner", "ratio": 0.2, "seconds": 3.0, "error": "RuntimeError: x"}],
    }  # fmt: skip
    text = render(section)
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["| prunellm default"].endswith("| 20.0 % | 1.50 | 1.20 | 12.3 | 30.0 % | 3.00 | 2.00 | — |")  # prune s beside quality
    assert lines["| FLAP (WIFV, UL-UM, bias compensation), its own code"].endswith("| 20.0 % | 2.00 | 1.50 | — | — | — | — | — |")
    assert "| error | error |" in lines["| LLM-Pruner (Taylor param_first, block-wise, layers 4–28), its own code"]
    assert "error: RuntimeError: x" in text and "criterion `taylor`" in text


def test_the_peer_tables_are_opt_in_sections():
    from benchmarks.run import OPT_IN, SECTIONS

    assert {"peers_table", "peers_second_family"} <= set(SECTIONS) & set(OPT_IN)


def test_the_second_family_section_names_its_model_and_only_the_methods_it_runs():
    dense = {"shakespeare_eval": 70.0, "wikitext2_test": 100.0}
    row = lambda m, r, a, b: {"row": f"{m}/{r}", "method": m, "ratio": r, "removed": r, "seconds": 1.0,  # noqa: E731
                              "ppl": {"shakespeare_eval": a, "wikitext2_test": b}, "setting": {}}  # fmt: skip
    section = {
        "protocol": {"num_samples": 32, "seq_len": 128, "seed": 42, "windows": 64, "calibration": "WikiText-2 validation",
                     "model": SECOND_FAMILY},
        "dense": {"ppl": dense}, "prunellm_default": {"criterion": "fluctuation", "normalization": "uniform", "reconstruct": "lstsq_bias"},
        "rows": [row("flap", 0.05, 140.0, 150.0), row("prunellm", 0.05, 105.0, 120.0)],
    }  # fmt: skip
    text = render(section)
    methods = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert methods == ["| FLAP (WIFV, UL-UM, bias compensation), its own code", "| prunellm default",
                       "| prunellm default without the H-GSP prior (`--temperature 0`)"]  # fmt: skip
    assert SECOND_FAMILY in text.splitlines()[0] and "| prunellm default | 5.0 % | 1.50 | 1.20 |" in text
    assert [r.split("/")[0] for r in SECOND_FAMILY_ROWS] == ["flap", "prunellm", "prunellm_no_prior"] * 2
    assert "`prunellm_no_prior/0.05`, `flap/0.075`" in text  # not measured yet, and said so
    # the default's PPL ratio ÷ FLAP's, per text: 1.5 / 2.0 and 1.2 / 1.5
    assert "prunellm default ÷ FLAP's own code (held-out Shakespeare / WikiText-2 test): 0.750 / 0.800 at ~5 %." in text


def _checkout_or_skip(name: str):
    peer = source.PEERS[name]
    cached = (source.cache_root() / f"{peer.name}-{peer.commit}" / ".git").is_dir()
    if not cached and not os.environ.get("PRUNELLM_PEER_MIRROR"):
        pytest.skip(f"no checkout of {name} in {source.cache_root()} and no PRUNELLM_PEER_MIRROR (no network in tests)")
    return source.checkout(name)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # vocab ≥ 29893: llama3.py traces with LLaMA-1 token ids; 3 KV groups of 2 query heads, 16 wide
    config = LlamaConfig(vocab_size=32000, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=16, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_flap_and_llm_pruner_from_their_code_remove_what_their_adapters_predict():
    _checkout_or_skip("flap")
    _checkout_or_skip("llm_pruner")
    from prunellm.models import load_tokenizer

    base = _tiny_llama()
    ids = torch.randint(0, 32000, (8, 32), generator=torch.Generator().manual_seed(1))
    total = count_parameters(base)

    model = copy.deepcopy(base)
    flap.prune(model, ids, 0.5)
    assert total - count_parameters(model) == flap.removed_params(base.config, 0.5)
    assert [layer.self_attn.k_proj.out_features for layer in model.model.layers] == [32] * 4  # 2 of 3 KV heads kept
    assert [layer.self_attn.q_proj.out_features for layer in model.model.layers] == [64] * 4  # with their query heads
    assert torch.isfinite(model(ids[:2]).logits).all()

    model = copy.deepcopy(base)
    llm_pruner.prune(model, load_tokenizer("smollm2-135m"), ids, 0.5, layers=(1, 3))
    assert total - count_parameters(model) == llm_pruner.removed_params(base.config, 0.5, layers=(1, 3))
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == [128, 64, 64, 128]
    assert torch.isfinite(model(ids[:2]).logits).all()
    assert base.config._attn_implementation == model.config._attn_implementation  # eager only while it traced


@torch.no_grad()
def test_flap_from_its_code_runs_gemma3_with_each_layers_own_rotary_embedding():
    """Gemma 3 has one rotary embedding per attention type: FLAP calls the decoder layers one by one, and the
    adapter must give each the embedding of its own type, or FLAP's statistics come from another model."""
    _checkout_or_skip("flap")
    base = make_tiny_model("gemma3")  # layer 0 sliding (RoPE base 10 000), layer 1 full (1 000 000)
    ids = torch.randint(0, base.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in base.model.layers]  # fmt: skip
    hidden = base(ids[:1], output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    with flap._adapted(flap.load_prune_module(), base, ids):
        for i, layer in enumerate(base.model.layers):  # as FLAP calls them: no position_embeddings
            out = layer(hidden[i], position_ids=torch.arange(16)[None])
            torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, outputs[i])
    model = copy.deepcopy(base)
    flap.prune(model, ids, 0.25)
    assert count_parameters(base) - count_parameters(model) == flap.removed_params(base.config, 0.25)
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == [72, 72]  # 96 - int(0.25 · 96)
    assert torch.isfinite(model(ids[:2]).logits).all()


def test_prunellm_row_is_prunellm_run_with_the_recipes_defaults(tmp_path):
    """The peer table's prunellm row is ``prunellm.run`` (the CLI's code) with PruneRecipe's defaults on the
    protocol's text: the same weights as a user's call, overrides recorded, and scoring windows checked against the
    protocol's where the recipe scores."""
    from conftest import save_tiny_model_dir

    import prunellm as pl
    from benchmarks.common import WIKITEXT_VALID
    from benchmarks.peers.run import _prune_prunellm, prunellm_default
    from prunellm.data import sample_calibration
    from prunellm.options import PruneRecipe

    recipe, d = PruneRecipe(), prunellm_default()
    assert (d["criterion"], d["normalization"], d["reconstruct"], d["units"], d["temperature"]) == (
        recipe.scoring.importance_method, recipe.selection.normalization, recipe.reconstruction.reconstruct,
        recipe.budget.units, recipe.priors.temperature)  # fmt: skip
    assert d["iterative_steps"] == recipe.budget.iterative_steps == "auto" and d["prior_measure"] == recipe.priors.prior_measure
    assert (d["prior_positions"], d["prior_rounds"]) == (recipe.priors.prior_positions, recipe.priors.prior_rounds)
    folder = save_tiny_model_dir(tmp_path / "tiny", "llama", num_hidden_layers=2)
    base, tokenizer = pl.load(str(folder))
    ids = sample_calibration(tokenizer, str(WIKITEXT_VALID), 8, 32, 42)
    model, info = _prune_prunellm(base, tokenizer, ids, 0.005, {})
    assert info["setting"] == d | {"rounds": 2} and "priors" in info["stage_seconds"]["stages"]
    same, _ = pl.run(pl.Recipe(base_model=str(folder), pruning_ratio=0.005, dataset=str(WIKITEXT_VALID), calibration_num_samples=8,
                               calibration_seq_len=32, reconstruct_num_samples=8, reconstruct_seq_len=32), pl.load(str(folder))[0], tokenizer)  # fmt: skip
    theirs = same.state_dict()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in model.state_dict().items())
    assert count_parameters(base) == count_parameters(pl.load(str(folder))[0])  # the row prunes a copy
    _, info = _prune_prunellm(base, tokenizer, ids, 0.005, {}, importance_method="taylor", temperature=0)
    assert info["setting"]["temperature"] == 0 and info["setting"]["importance_method"] == "taylor"
    with pytest.raises(RuntimeError, match="not the protocol's calibration windows"):
        _prune_prunellm(base, tokenizer, ids[:, :16], 0.005, {}, importance_method="taylor")  # other windows than it scored


def test_the_row_at_flaps_count_removes_what_flaps_row_removed_and_is_compared_to_it(tmp_path):
    """``prunellm_at_flap/R`` reads FLAP's removed count from the same run's file (dense count less FLAP's); without
    a FLAP row it names the row to measure first. Its line ÷ FLAP follows the default's."""
    from benchmarks.peers.run import ROWS, removed_by

    out = tmp_path / "peers.jsonl"
    out.write_text('{"row": "dense", "params": 1000}\n{"row": "flap/0.2", "params": 805, "removed": 0.195}\n'
                   '{"row": "flap/0.3", "error": "RuntimeError: x"}\n')  # fmt: skip
    assert removed_by(str(out), "flap/0.2") == 195
    with pytest.raises(ValueError, match="'flap/0.3' has no successful row"):
        removed_by(str(out), "flap/0.3")
    assert ROWS.index("flap/0.2") < ROWS.index("prunellm_at_flap/0.2")
    dense = {"shakespeare_eval": 60.0, "wikitext2_test": 50.0}
    row = lambda m, r, a, b: {"row": f"{m}/{r}", "method": m, "ratio": r, "removed": 0.195, "seconds": 1.0,  # noqa: E731
                              "ppl": {"shakespeare_eval": a, "wikitext2_test": b}, "setting": {}}  # fmt: skip
    section = {
        "protocol": {"num_samples": 32, "seq_len": 128, "seed": 42, "windows": 64, "calibration": "WikiText-2 validation"},
        "dense": {"ppl": dense}, "prunellm_default": {"criterion": "fluctuation", "normalization": "uniform", "reconstruct": "lstsq"},
        "rows": [row("flap", 0.2, 120.0, 75.0), row("prunellm_at_flap", 0.2, 90.0, 60.0)],
    }  # fmt: skip
    text = render(section)
    assert "| prunellm default at FLAP's parameter count | 19.5 % | 1.50 | 1.20 |" in text
    assert "* prunellm default at FLAP's parameter count ÷ FLAP's own code (held-out Shakespeare / WikiText-2 test): 0.750 / 0.800 at ~20 %." in text


def test_the_ratio_to_flap_carries_a_paired_interval_where_both_rows_kept_their_windows():
    from benchmarks.peers.run import _ratio_to

    flap_row = {"ppl": {"t": 100.0}, "window_nll": {"t": [500.0, 600.0, 550.0, 580.0]}}
    ours = {"ppl": {"t": 80.0}, "window_nll": {"t": [480.0, 560.0, 540.0, 530.0]}}
    text = _ratio_to(ours, flap_row, "t")
    ratio, low, high = (float(x) for x in text.replace("[", "").replace("]", "").replace(",", "").split())
    assert ratio == 0.8 and low < high and low <= 1.0
    assert _ratio_to({"ppl": {"t": 80.0}}, flap_row, "t") == "0.800"  # a row measured before windows were kept


def test_variants_of_the_default_are_rows_of_their_own_and_a_table_of_speed_beside_quality():
    """Each variant is one change of the recipe by flag name (the row runs ``prunellm.run`` with it); the table lists
    PPL ÷ FLAP's per text with prune seconds and their multiple of FLAP's, the default first."""
    import prunellm as pl
    from benchmarks.peers.run import LABELS, METHODS, VARIANTS

    for method, overrides in VARIANTS.items():
        assert method in METHODS and method in LABELS
        assert pl.Recipe().replace(**overrides) != pl.Recipe()  # every override is a recipe flag with a valid value
    dense = {"shakespeare_eval": 60.0, "wikitext2_test": 50.0}
    row = lambda m, a, b, s: {"row": f"{m}/0.2", "method": m, "ratio": 0.2, "removed": 0.2, "seconds": 1.0,  # noqa: E731
                              "prune_seconds": s, "ppl": {"shakespeare_eval": a, "wikitext2_test": b}, "setting": {}}  # fmt: skip
    section = {
        "protocol": {"num_samples": 32, "seq_len": 128, "seed": 42, "windows": 64, "calibration": "WikiText-2 validation"},
        "dense": {"ppl": dense}, "prunellm_default": {"criterion": "fluctuation", "normalization": "uniform", "reconstruct": "lstsq"},
        "rows": [row("flap", 120.0, 75.0, 5.0), row("prunellm_one_round", 96.0, 67.5, 50.0), row("prunellm", 90.0, 60.0, 100.0)],
    }  # fmt: skip
    lines = render(section).splitlines()
    start = lines.index("| at ~20 % | held-out Shakespeare ÷ FLAP | WikiText-2 test ÷ FLAP | prune s | × FLAP's time |")
    assert lines[start + 2] == "| prunellm default | 0.750 | 0.800 | 100.0 | 20× |"
    assert lines[start + 3] == f"| {LABELS['prunellm_one_round']} | 0.800 | 0.900 | 50.0 | 10× |"
