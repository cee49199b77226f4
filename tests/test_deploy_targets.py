"""``--deploy_target``: where the model runs shapes what selection keeps, and every export refusal names real flags."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import gguf
import pytest
import torch
from conftest import byte_level_bpe, make_tiny_model
from transformers import PreTrainedTokenizerFast

from prunellm.cli import build_parser
from prunellm.errors import PrunellmError
from prunellm.export.targets import DEPLOY_TARGETS, VLLM_HEAD_DIMS, deploy_target_names
from prunellm.cli import build_options
from prunellm.options import AllocationOptions, BudgetOptions, ExportOptions, LayersRecipe, PruneRecipe, SelectionOptions
from prunellm.pruner import check_deploy_target, check_reachable, reach_of, selection_constraints
from prunellm.specs import spec_for
from prunellm.selection import SelectionConstraints, normalized_values, select_global
from prunellm.surgery import layer_widths, prune_units
from prunellm.units import all_units, count_parameters

TEXT = ["The quick brown fox jumps over the lazy dog, and the dog does not mind at all."] * 20
COMMAND_OPTIONS = {"prune": PruneRecipe, "layers": LayersRecipe, "export": ExportOptions}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_bpe(TEXT, 300)


def tiny(family: str, tokenizer, **overrides):
    special = {f"{name}_token_id": tokenizer.eos_token_id for name in ("bos", "eos", "pad")}
    return make_tiny_model(family, vocab_size=len(tokenizer), **special, **overrides)


def assert_parses(command: str, *flags: str) -> None:
    """The suggested flags are accepted by argparse and by the options' validation of ``command``."""
    namespace = build_parser().parse_args([command, *flags])
    build_options(COMMAND_OPTIONS[command], namespace)


def random_selection(model, constraints: SelectionConstraints, ratio: float, seed: int = 0):
    units = list(all_units(model, ("kv_group", "mlp_channel")))
    generator = torch.Generator().manual_seed(seed)
    # KV groups score high, so the budget is taken from MLP channels, where the block matters
    scores = {(u.layer, u.kind): torch.rand(u.count, generator=generator) * (1000 if u.kind == "kv_group" else 1) for u in units}
    total = count_parameters(model)
    target = int(ratio * total)
    return select_global(units, normalized_values(units, scores, "none"), scores, target, constraints, total), target, units


# ---------------------------------------------------------------------------------------------------------------
# the table and the constraints it gives selection


def test_deploy_target_table_is_the_flag_values_and_block_sizes_are_ggufs():
    assert deploy_target_names() == tuple(DEPLOY_TARGETS)
    blocks = {name: DEPLOY_TARGETS[name].mlp_multiple for name in DEPLOY_TARGETS}
    assert blocks["llamacpp:q8_0"] == blocks["llamacpp:q4_0"] == 32
    assert blocks["llamacpp:q4_k_m"] == blocks["llamacpp:q6_k"] == 256
    assert blocks["any"] == blocks["hf"] == blocks["llamacpp:f16"] == blocks["vllm"] == 1
    for name in DEPLOY_TARGETS:
        assert_parses("prune", "--deploy_target", name)


@pytest.mark.parametrize(
    "target, round_to, expect",
    [("any", 1, SelectionConstraints()), ("any", 8, SelectionConstraints(round_to=8)), ("hf", 3, SelectionConstraints(round_to=3)),
     ("vllm", 1, SelectionConstraints(whole_attention=True)), ("llamacpp:q8_0", 8, SelectionConstraints(round_to=32)),
     ("llamacpp:q8_0", 48, SelectionConstraints(round_to=96)), ("llamacpp:q4_k_m", 64, SelectionConstraints(round_to=256))],
)  # fmt: skip
def test_constraints_combine_round_to_and_the_block_by_lcm(target, round_to, expect):
    assert selection_constraints(SelectionOptions(deploy_target=target, round_to=round_to)) == expect


@pytest.mark.parametrize(
    "target, intermediate, ratio", [("llamacpp:q8_0", 96, 0.2), ("llamacpp:q8_0", 96, 0.45), ("llamacpp:q4_k_m", 768, 0.3)]
)
def test_kept_mlp_widths_are_multiples_of_the_block_and_the_budget_is_met(target, intermediate, ratio):
    model = make_tiny_model("llama", num_hidden_layers=4, intermediate_size=intermediate)
    constraints = selection_constraints(SelectionOptions(deploy_target=target))
    block = DEPLOY_TARGETS[target].mlp_multiple
    selection, wanted, units = random_selection(model, constraints, ratio)
    widths = [len(selection.kept[(layer, "mlp_channel")]) for layer in range(4)]
    assert all(w % block == 0 for w in widths) and sum(widths) < 4 * intermediate
    mlp_cost = next(u.cost for u in units if u.kind == "mlp_channel")
    assert abs(selection.removed_params - wanted) <= block * mlp_cost  # within one block of channels of the budget


def test_any_selects_exactly_what_the_default_did():
    model = make_tiny_model("llama", num_hidden_layers=4)
    old = SelectionConstraints(min_kv_groups=1, round_to=1, whole_attention=False)  # what `any` meant before targets
    for options in (SelectionOptions(), SelectionOptions(deploy_target="any"), SelectionOptions(deploy_target="hf")):
        assert selection_constraints(options) == old
        assert random_selection(model, selection_constraints(options), 0.3)[0].kept == random_selection(model, old, 0.3)[0].kept


def test_reach_check_honours_the_block_and_names_deploy_target_any():
    """Layerwise, a 96-wide MLP keeps at least one 256 block: q4_k_m can only take KV groups there."""
    model = make_tiny_model("llama", num_hidden_layers=4)
    budget, layerwise = BudgetOptions(pruning_ratio=0.3), AllocationOptions(allocation="layerwise", max_pruning_rate=1.0)
    k_quant = SelectionOptions(deploy_target="llamacpp:q4_k_m")
    assert reach_of(model, budget, k_quant, layerwise).most < reach_of(model, budget, SelectionOptions(), layerwise).most
    check_reachable(model, budget, SelectionOptions(), layerwise)  # reachable without the target
    with pytest.raises(PrunellmError, match=r"--deploy_target any \(up to") as info:
        check_reachable(model, budget, k_quant, layerwise)
    assert "--deploy_target llamacpp:q4_k_m" in str(info.value)
    assert_parses("prune", "--deploy_target", "any", "--allocation", "layerwise")


# ---------------------------------------------------------------------------------------------------------------
# prune -> export: q8_0 keeps every ffn_down quantized


def prune_cli(tmp_path: Path, tokenizer, name: str, *flags: str) -> Path:
    from prunellm.cli import main

    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        tiny("llama", tokenizer, num_hidden_layers=4, intermediate_size=128).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        (tmp_path / "text.txt").write_text(" ".join(TEXT))
    args = ["prune", "--base_model", str(model_dir), "--output_dir", str(tmp_path / "results"), "--output_name", name,
            "--dataset", str(tmp_path / "text.txt"), "--taylor_num_samples", "4", "--taylor_seq_len", "32",
            "--pruning_ratio", "0.2", "--importance_method", "magnitude", "--temperature", "0", "--reconstruct", "none", *flags]  # fmt: skip
    assert main(args) == 0
    return tmp_path / "results" / name


def ffn_down_types(path: Path) -> dict[str, str]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors if ".ffn_down." in t.name and t.name.endswith("weight")}


def test_pruned_for_q8_0_exports_every_ffn_down_in_q8_0(tokenizer, tmp_path, caplog):
    from prunellm.checkpoint import load_checkpoint
    from prunellm.export.gguf import export_gguf

    caplog.set_level(logging.INFO, logger="prunellm.export.gguf")
    default = json.loads((prune_cli(tmp_path, tokenizer, "any") / "plan.json").read_text())
    run = prune_cli(tmp_path, tokenizer, "q8", "--deploy_target", "llamacpp:q8_0")
    model = load_checkpoint(run / "model")
    widths = [w["intermediate_size"] for w in layer_widths(model, spec_for(model.config))]
    assert all(w % 32 == 0 for w in widths) and sum(widths) < 4 * 128
    plan = json.loads((run / "plan.json").read_text())
    assert "llamacpp:q8_0" in json.dumps(plan) and "llamacpp:q8_0" not in json.dumps(default)
    path = export_gguf(model, tokenizer, tmp_path / "out", "q8_0")
    assert set(ffn_down_types(path).values()) == {"Q8_0"} and len(ffn_down_types(path)) == 4
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_q8_0_fallback_is_one_warning_naming_the_deploy_target(tokenizer, tmp_path, caplog):
    from prunellm.export.gguf import export_gguf

    caplog.set_level(logging.INFO, logger="prunellm.export.gguf")
    model = tiny("llama", tokenizer)
    prune_units(model, {(0, "mlp_channel"): list(range(84)), (1, "mlp_channel"): list(range(60))})
    path = export_gguf(model, tokenizer, tmp_path, "q8_0")
    assert ffn_down_types(path) == {"blk.0.ffn_down.weight": "F16", "blk.1.ffn_down.weight": "F16"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "2 of" in warnings[0] and "(2 ffn_down" in warnings[0] and "--deploy_target llamacpp:q8_0" in warnings[0]
    assert_parses("prune", "--deploy_target", "llamacpp:q8_0")


def test_a_removed_mlp_after_live_attention_is_one_q8_0_block_of_zeros(tokenizer, tmp_path):
    """deci needs an MLP there (width 0 would drop the attention output): 32 zero channels quantize as Q8_0."""
    from prunellm.export.gguf import export_gguf

    model = tiny("llama", tokenizer)
    prune_units(model, {(0, "mlp_channel"): list(range(64)), (1, "mlp_channel"): []})
    path = export_gguf(model, tokenizer, tmp_path, "q8_0")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["deci.feed_forward_length"].contents() == [64, 32]
    assert set(ffn_down_types(path).values()) == {"Q8_0"}
    xllamacpp = pytest.importorskip("xllamacpp")
    del xllamacpp
    from prunellm.export.llamacpp import LlamaCpp

    ids = tokenizer("The quick brown fox")["input_ids"]
    assert len(LlamaCpp(path).complete(ids, 4).tokens) == 4


# ---------------------------------------------------------------------------------------------------------------
# vLLM: head sizes its CPU attention runs


def test_vllm_export_refuses_head_dim_16_naming_format_gguf(tokenizer, tmp_path):
    from prunellm.export.vllm import export_vllm

    model = tiny("qwen2", tokenizer)  # hidden 64 / 4 heads: head_dim 16
    assert 16 not in VLLM_HEAD_DIMS
    with pytest.raises(PrunellmError, match="head_dim is 16") as info:
        export_vllm(model, tokenizer, tmp_path / "vllm")
    message = str(info.value)
    assert "\n" not in message and "--format gguf" in message and not (tmp_path / "vllm").exists()
    assert_parses("export", "--format", "gguf")


def test_deploy_target_vllm_refuses_head_dim_16_before_calibration():
    model = make_tiny_model("qwen2")
    with pytest.raises(PrunellmError, match="head_dim 16") as info:
        check_reachable(model, BudgetOptions(pruning_ratio=0.1), SelectionOptions(deploy_target="vllm", min_kv_groups=0), AllocationOptions())
    assert "--deploy_target llamacpp:f16" in str(info.value) and "--format gguf" in str(info.value)
    assert_parses("prune", "--deploy_target", "llamacpp:f16")
    check_deploy_target(SelectionOptions(deploy_target="vllm"), AllocationOptions(), make_tiny_model("qwen2", head_dim=32))


# ---------------------------------------------------------------------------------------------------------------
# every refusal's remedy is a flag that exists


def test_non_uniform_qwen3_gguf_refusal_suggests_prunellm_layers(tokenizer):
    from prunellm.export.gguf import choose_target

    model = tiny("qwen3", tokenizer)
    prune_units(model, {(0, "mlp_channel"): list(range(80)), (1, "mlp_channel"): list(range(60))})
    with pytest.raises(PrunellmError, match="prune with prunellm layers") as info:
        choose_target(model)
    assert "--pruning_distribution uniform" not in str(info.value)
    assert_parses("layers")


def test_vllm_refusals_suggest_flags_that_parse(tokenizer, tmp_path):
    from prunellm.export import export_model
    from prunellm.export.vllm import export_vllm

    model = tiny("llama", tokenizer, head_dim=32)
    prune_units(model, {(1, "kv_group"): [0]})
    with pytest.raises(PrunellmError, match="--deploy_target vllm"):
        export_vllm(model, tokenizer, tmp_path / "a")
    assert_parses("prune", "--deploy_target", "vllm", "--min_kv_groups", "0")
    qwen3 = tiny("qwen3", tokenizer, head_dim=32)
    prune_units(qwen3, {(0, "mlp_channel"): list(range(50))})
    with pytest.raises(PrunellmError, match="--format gguf"):
        export_vllm(qwen3, tokenizer, tmp_path / "b")
    with pytest.raises(PrunellmError, match="vLLM takes --outtype f32 or f16"):
        export_model(model=str(tmp_path), format="vllm", outtype="q8_0")
    assert_parses("export", "--format", "vllm", "--outtype", "f16")
    with pytest.raises(PrunellmError, match="--allocation global"):
        check_deploy_target(SelectionOptions(deploy_target="vllm"), AllocationOptions(allocation="layerwise"))
    assert_parses("prune", "--deploy_target", "vllm", "--allocation", "global")


def test_every_flag_an_export_message_names_exists():
    """Every ``--flag`` written in src/prunellm/export/ is an option of prune, layers or export (hyphenated ones, like
    ``vllm serve --trust-remote-code``, are other programs')."""
    subparsers = build_parser()._subparsers._group_actions[0].choices
    known = {flag for name in ("prune", "layers", "export") for action in subparsers[name]._actions for flag in action.option_strings}
    source = Path(__file__).resolve().parents[1] / "src" / "prunellm" / "export"
    named = {m for path in source.glob("*.py") for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9_]+(?![\w-])", path.read_text())}
    assert named and named <= known, sorted(named - known)
