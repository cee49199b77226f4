"""The benchmark report states every goal as met or missed (with why) and keeps a peer's crash as its error."""

from __future__ import annotations

from benchmarks.headline import WHY_MISSED, goal_rows, render_headline


def _results(memory_ratio: float, decode_speedup: float, recon: float = 1.1) -> dict:
    ppl = {"wikitext2_test 128": 90.0, "shakespeare_eval 128": 70.0}
    return {
        "scoring": {
            "goals": {"time_ratio": 1.3, "memory_ratio": 2.0},
            "reference": {"memory_ratio": 4.1},
            "criteria": [{"criterion": "taylor", "time_ratio": 0.93, "memory_ratio": memory_ratio}],
        },
        "depth_width": {
            "goal": 1.15,
            "rows": [
                {"kind": "dense", "label": "dense", "achieved_ratio": 0.0, "ppl": ppl, "layers": 30, "params": 100,
                 "speed": {"1": {"decode": 10.0}, "4": {"decode": 30.0}}, "speedup": {"1": {"decode": 1.0, "prefill": 1.0}, "4": {"decode": 1.0, "prefill": 1.0}}},
                {"kind": "depth", "label": "block_influence", "achieved_ratio": 0.21, "ppl": ppl, "layers": 22, "params": 79,
                 "speed": {"1": {"decode": 12.0}, "4": {"decode": 39.0}},
                 "speedup": {"1": {"decode": decode_speedup, "prefill": 1.3}, "4": {"decode": decode_speedup + 0.1, "prefill": 1.2}}},
            
                {"kind": "width", "label": "taylor, round_to 64, reconstruct none", "achieved_ratio": 0.21, "layers": 30, "params": 79,
                 "ppl": {"wikitext2_test 128": 95.0},  # a row measured with fewer protocols than the dense one
                 "speed": {"1": {"decode": 12.0}, "4": {"decode": 39.0}},
                 "speedup": {"1": {"decode": 1.2, "prefill": 1.3}, "4": {"decode": 1.3, "prefill": 1.2}}},
            ],
        },
        "quality": {
            "dense": {"wikitext2_test 128": 60.0, "shakespeare_eval 128": 50.0},
            "rows": [{"group": "grid", "label": "taylor", "target_ratio": 0.2, "achieved_ratio": 0.2, "reconstruct": "none", "ppl": ppl,
                      "budget": "total_20pct", "ratio_to_dense": {"wikitext2_test 128": 1.5, "shakespeare_eval 128": 1.4}},
                     {"group": "grid", "label": "taylor", "target_ratio": 0.1, "achieved_ratio": 0.1, "reconstruct": "none", "ppl": ppl},
                     {"group": "reconstruct", "label": "taylor + bias", "target_ratio": 0.2, "achieved_ratio": 0.2, "reconstruct": "bias",
                      "ppl": ppl, "budget": "total_20pct", "ratio_to_dense": {"wikitext2_test 128": 1.3, "shakespeare_eval 128": 1.2},
                      "reconstruct_calibration": "Shakespeare train"},
                     {"group": "reconstruct", "label": "taylor + lstsq", "target_ratio": 0.2, "achieved_ratio": 0.2, "reconstruct": "lstsq",
                      "ppl": ppl, "budget": "total_20pct", "ratio_to_dense": {"wikitext2_test 128": 1.4, "shakespeare_eval 128": recon},
                      "reconstruct_calibration": "Shakespeare train"},
                     {"group": "reconstruct_mix", "label": "taylor + lstsq", "target_ratio": 0.2, "achieved_ratio": 0.2, "reconstruct": "lstsq",
                      "ppl": ppl, "budget": "total_20pct", "ratio_to_dense": {"wikitext2_test 128": 1.2, "shakespeare_eval 128": 1.25},
                      "reconstruct_calibration": "a mixture"}],
            "reconstruction_goals": {"total_20pct": 1.25},
        },
        "peer": {"target_params": 100, "version": "1.6.1",
                 "runs": [{"peer": "torch-pruning", "criterion": "taylor", "error": "RuntimeError: shapes do not match"}]},
    }  # fmt: skip


def test_goals_show_met_or_missed_with_the_reason():
    rows = {goal: verdict for goal, _, verdict in goal_rows(_results(memory_ratio=3.3, decode_speedup=1.2))}
    assert rows["Taylor scoring time ÷ one forward+backward (≤ 1.3)"] == "met"
    memory = rows["Peak RSS during scoring ÷ weight bytes (≤ 2.0)"]
    assert memory.startswith("missed: ") and "4.1×" in memory  # the reference pass's own ratio is quoted
    speed = next(v for g, v in rows.items() if g.startswith("Speed ÷ dense"))
    assert speed == "met"  # the lower of batch 1 and 4 (1.2) is compared with the goal

    rows = {goal: verdict for goal, _, verdict in goal_rows(_results(memory_ratio=1.5, decode_speedup=1.1))}
    assert rows["Peak RSS during scoring ÷ weight bytes (≤ 2.0)"] == "met"
    speed = next(v for g, v in rows.items() if g.startswith("Speed ÷ dense"))
    assert speed == f"missed: {WHY_MISSED['speed']}"


def test_reconstruction_goal_per_calibration_takes_the_best_mode_and_needs_every_held_out_text():
    # bias has the best WikiText-2 ratio (1.3); the goal (1.25) is missed on it, whatever Shakespeare says
    shakespeare, mixture = [r for r in goal_rows(_results(3.3, 1.2, recon=1.0)) if r[0].startswith("Reconstruction")]
    assert "calibrated on Shakespeare train" in shakespeare[0]
    assert shakespeare[1] == "bias: wikitext2_test 1.3× (none 1.5×); shakespeare_eval 1.2× (none 1.4×)"
    assert shakespeare[2] == f"missed: {WHY_MISSED['reconstruction']}"
    assert "calibrated on a mixture" in mixture[0] and mixture[2] == "met"  # 1.2 and 1.25 ≤ 1.25


def test_headline_keeps_only_20_percent_rows_and_the_peer_error():
    text = render_headline(_results(memory_ratio=3.3, decode_speedup=1.2))
    quality = text.split("### Quality at 20 %")[1]
    assert quality.count("| taylor |") == 1  # the 10 % row is left out
    assert "error: RuntimeError: shapes do not match" in quality
    assert "| depth: block_influence |" in quality and "| dense |" in quality


def test_readme_blocks_are_rewritten_and_the_rest_is_kept(tmp_path):
    from benchmarks.run import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:goals -->\nold table\n<!-- /bench:goals -->\nmiddle\n"
                      "<!-- bench:depth_width -->\n<!-- /bench:depth_width -->\nend\n")  # fmt: skip
    update_readme(readme, _results(memory_ratio=3.3, decode_speedup=1.2))
    text = readme.read_text()
    assert text.startswith("intro\n<!-- bench:goals -->\n| goal |") and "old table" not in text
    assert "\nmiddle\n" in text and text.endswith("<!-- /bench:depth_width -->\nend\n")
    assert "**missed** (why: docs/benchmarks.md)" in text  # the memory goal
    assert "| depth: block_influence |" in text.split("<!-- bench:depth_width -->")[1]


def test_rows_measured_with_fewer_protocols_show_a_dash():
    from benchmarks.headline import render_readme_depth_width

    results = _results(memory_ratio=3.3, decode_speedup=1.2)
    row = "| width: taylor, round_to 64, reconstruct none | same params as depth | 0.21 | 95.0 | — |"
    assert row in render_headline(results)
    assert "| width: taylor, round_to 64, reconstruct none | 30 | 79 | 95.0 | — |" in render_readme_depth_width(results)


def test_evaluate_ppl_measures_only_its_tier():
    import torch

    from benchmarks.common import TIERS, evaluate_ppl
    from conftest import make_tiny_model

    model = make_tiny_model("llama", max_position_embeddings=4096)
    tokens = torch.randint(0, 128, (3000,), generator=torch.Generator().manual_seed(0))
    sets = {"wikitext2_test": tokens, "shakespeare_eval": tokens}
    full = evaluate_ppl(model, sets, "full")
    assert list(full) == list(TIERS["full"])
    assert evaluate_ppl(model, sets, "wikitext128") == {"wikitext2_test 128": full["wikitext2_test 128"]}
    assert evaluate_ppl(model, {"shakespeare_eval": tokens}, "128") == {"shakespeare_eval 128": full["shakespeare_eval 128"]}


def test_ablation_rows_name_units_and_target_and_old_rows_render_with_the_defaults():
    from benchmarks.ablation import parse_row, render

    assert parse_row("fluctuation@mlp/uniform/lstsq_bias:residual/0.3") == {
        "criterion": "fluctuation", "units": "mlp", "normalization": "uniform", "reconstruct": "lstsq_bias",
        "target": "residual", "select": "plan", "temperature": 0.0, "ratio": 0.3, "rounds": 1,
    }  # fmt: skip
    assert parse_row("fluctuation^auto@mlp/uniform/lstsq_bias+fluctuation/0.2*3")["rounds"] == 3
    assert parse_row("taylor^0.5@mlp/block/lstsq/0.2")["temperature"] == 0.5
    assert parse_row("fluctuation@mlp/uniform/lstsq_bias+obs/0.2")["select"] == "obs"
    assert parse_row("taylor/block/none/0.2")["units"] == "all" and parse_row("taylor/block/none/0.2")["target"] == "pruned"
    ppl = {"shakespeare_eval": 20.0, "wikitext2_test": 30.0}
    old = {"criterion": "taylor", "normalization": "block", "reconstruct": "lstsq", "removed": 0.2, "ppl": ppl, "seconds": 1}
    section = {"protocol": {"num_samples": 32, "seq_len": 128, "seed": 42, "windows": 64},
               "dense": {"ppl": {"shakespeare_eval": 10.0, "wikitext2_test": 10.0}}, "rows": [old]}  # fmt: skip
    assert "| taylor | all | block | lstsq | pruned | 20.0 % | 2.00 | 3.00 | 1 |" in render(section)
    section["rows"].append(old | {"reconstruct": "lstsq_bias", "select": "obs"})
    assert "| taylor | all | block | lstsq_bias + obs | pruned | 20.0 % |" in render(section)
    section["rows"].append(old | {"temperature": 0.5})
    assert "| taylor T=0.5 | all | block | lstsq | pruned |" in render(section)
    section["rows"].append(old | {"temperature": "auto", "temperature_used": [1.15, 1.2], "rounds": 2})
    assert "| taylor T=auto (1.15/1.20), 2 rounds | all | block | lstsq | pruned |" in render(section)


def test_ablation_rows_merge_into_results_and_other_dense_rows_are_refused():
    import pytest

    from benchmarks.ablation import merge_rows

    protocol = {"num_samples": 32, "seq_len": 128, "seed": 42, "windows": 64}
    old = {"protocol": protocol, "dense": {"row": "dense", "ppl": {"a": 59.028, "b": 62.43}},
           "rows": [{"row": "x/block/lstsq/0.2", "ppl": {"a": 90.0}}, {"row": "y/uniform/none/0.2", "ppl": {"a": 80.0}}]}
    new = {"protocol": protocol, "dense": {"row": "dense", "ppl": {"a": 59.029, "b": 62.431}},  # thread-count noise
           "rows": [{"row": "y/uniform/none/0.2", "ppl": {"a": 70.0}}, {"row": "z/uniform/lstsq/0.2", "ppl": {"a": 60.0}}]}
    merged = merge_rows(old, new)
    assert {r["row"]: r["ppl"]["a"] for r in merged["rows"]} == {"x/block/lstsq/0.2": 90.0, "y/uniform/none/0.2": 70.0, "z/uniform/lstsq/0.2": 60.0}
    assert merge_rows(None, new) is new
    with pytest.raises(SystemExit):
        merge_rows(old, new | {"dense": {"row": "dense", "ppl": {"a": 61.0, "b": 62.43}}})
    with pytest.raises(SystemExit):
        merge_rows(old, new | {"protocol": protocol | {"windows": 32}})
    # a run that adds a text (the Bible where bible-kjv is installed) merges on the texts both have
    third = new | {"dense": {"row": "dense", "ppl": {"a": 59.029, "b": 62.431, "c": 20.0}}}
    assert merge_rows(old, third)["dense"]["ppl"] == {"a": 59.029, "b": 62.431, "c": 20.0}
    with pytest.raises(SystemExit):
        merge_rows(old, new | {"dense": {"row": "dense", "ppl": {"c": 20.0}}})


def test_ablation_variants_fisher_matches_autograd_and_patches_only_for_the_row():
    """The not-adopted variants (benchmarks/ablation_variants.py) measure what their names say: the per-token Fisher
    of down_proj's inputs equals Σ_t (∂L/∂x)²·(x − mean x)² taken from autograd directly, the residual Fisher equals
    Σ (∂L/∂h)² of each layer's output, and the library is itself again once a variant's row is done."""
    import torch
    from conftest import make_tiny_model

    import prunellm.criteria.fluctuation as fluctuation
    import prunellm.reconstruction as reconstruction
    from benchmarks import ablation_variants as variants

    model = make_tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs, outputs = {}, {}
    layers = model.model.layers
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0])) for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
              for i, layer in enumerate(layers)]  # fmt: skip
    loss = model(input_ids=ids, labels=ids).loss
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [inputs[i] for i in range(len(layers))] + [outputs[i] for i in range(len(layers))])
    token, residual = variants.token_fisher(model, ids), variants.residual_fisher(model, ids)
    for i in range(len(layers)):
        x, g = inputs[i].detach().double().flatten(0, 1), grads[i].double().flatten(0, 1)
        expected = (g.pow(2) * (x - x.mean(0)).pow(2)).sum(0)
        assert torch.allclose(token[i].double(), expected, rtol=1e-4, atol=1e-12)
        h = grads[len(layers) + i].double().flatten(0, 1)
        assert torch.allclose(residual[i].double(), h.pow(2).sum(0), rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # the gradient pass gives the weights back as they were

    originals = (fluctuation.slice_fluctuation, reconstruction.RESELECTIONS["fluctuation"])
    for name in variants.VARIANTS:
        with variants.VARIANTS[name][2]():
            pass
    assert (fluctuation.slice_fluctuation, reconstruction.RESELECTIONS["fluctuation"]) == originals


def test_prior_agreement_compares_each_cheaper_way_with_the_exact_ablations():
    from benchmarks.prior_agreement import POSITIONS, agreement, render

    exact = [8.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    same_order = agreement(exact, [v / 2 for v in exact])
    assert same_order["spearman"] == 1.0 and same_order["top5_shared"] == 5
    reversed_order = agreement(exact, [1 / v for v in exact])
    assert reversed_order["spearman"] < 0 and reversed_order["top5_shared"] < 5
    section = {"model": "m", "windows": [16, 128], "threads": 2, "seconds": {"kl": 300.0, "fisher": 30.0, f"kl_{POSITIONS}_positions": 200.0},
               "estimates": {"fisher": {"mlp": reversed_order}, f"kl_{POSITIONS}_positions": {"mlp": same_order}}}  # fmt: skip
    text = render(section)
    assert f"| kl_{POSITIONS}_positions (200 s) | mlp | 1.000 |" in text and "| fisher (30 s) | mlp |" in text
    assert "exact 8.00, fisher 0.12" in text


def test_scaling_fits_the_exponent_of_prune_seconds_on_parameters_and_renders_each_row():
    from benchmarks.scaling import exponent, render

    def row(model, params, seconds, mode="memory"):
        return {"model": model, "mode": mode, "params": params, "layers": 30, "prune_seconds": seconds, "peak_rss_gb": 1.5,
                "stages": {"priors": seconds / 2, "surgery and refit": seconds / 2},
                "parts": {"priors/layer ablations": seconds / 4, "surgery and refit/solves": seconds / 8}}  # fmt: skip

    quadratic = [row("a", 1e8, 10.0), row("b", 2e8, 40.0), row("c", 4e8, 160.0)]
    assert abs(exponent(quadratic) - 2.0) < 1e-9
    assert exponent([row("a", 1e8, 10.0)]) is None  # one size fits no slope
    offloaded = row("a", 1e8, 30.0, "offload")
    text = render({"ratio": 0.2, "rows": [*quadratic, offloaded], "exponent_in_memory": exponent(quadratic)})
    assert "| a | 100 M | 30 | offload | 30 | 8 / — | 15 (— / 4) | 30 | 1.5 |" in text
    assert "**2.00**" in text
