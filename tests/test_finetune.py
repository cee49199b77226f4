"""The fine-tuning engine on pruned tiny models: it learns, it saves both ways, it resumes exactly, it runs on 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, make_tiny_model
from peft import PeftModel
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from prunellm.checkpoint import load_checkpoint, save_model
from prunellm.cli import main
from prunellm.data import load_text
from prunellm.errors import PrunellmError
from prunellm.finetune import FineTuner
from prunellm.finetune.data import PadCollator, tokenize_instructions
from prunellm.finetune.distill import sparse_kl, teacher_targets
from prunellm.finetune.engine import _DistillTrainer
from prunellm.models import load_tokenizer
from prunellm.options import DistillOptions, FinetuneData, FinetuneTarget, TrackingOptions, TrainOptions
from prunellm.surgery import layer_widths, prune_units

# non-uniform widths: layer 0 keeps 1 of 2 KV groups, layer 1 keeps half of its 96 MLP channels
KEPT = {(0, "kv_group"): [1], (1, "mlp_channel"): list(range(0, 96, 2))}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def pruned_model(tokenizer, family: str = "llama"):
    model = make_tiny_model(family, vocab_size=len(tokenizer))
    prune_units(model, KEPT)
    return model


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "plays.txt"
    path.write_text(load_text("shakespeare", "eval")[:60_000])  # real English; its tail is held out
    return path


def data(text_file: Path, **overrides) -> FinetuneData:
    return FinetuneData(**{"dataset_name": str(text_file), "num_samples": 64, "seq_len": 32, "val_set_size": 8, **overrides})


def training(**overrides) -> TrainOptions:
    return TrainOptions(**{"batch_size": 4, "micro_batch_size": 4, "max_steps": 12, "warmup_steps": 0, "save_steps": 0, **overrides})


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def lora_run(tokenizer, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = pruned_model(tokenizer)
    save_model(model, tokenizer, root / "pruned")
    tuner = FineTuner(model, tokenizer, use_lora=True, training=training(learning_rate=2e-2))
    metrics = tuner.finetune(data=data(text_file), output_dir=root / "out")
    return root, tuner, metrics


def test_lora_lowers_the_held_out_loss_of_a_pruned_model(lora_run):
    _, tuner, metrics = lora_run
    assert metrics["method"] == "lora" and metrics["steps"] == 12
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.1
    assert metrics["train_tokens"] == 12 * 4 * 32 and metrics["tokens_per_second"] > 0
    assert 0 < metrics["trainable_params"] < 30_000  # adapters only
    assert metrics["data"]["validation_windows"] == 8


def test_full_finetuning_lowers_the_held_out_loss_of_a_pruned_model(tokenizer, text_file, tmp_path):
    tuner = FineTuner(pruned_model(tokenizer, "qwen2"), tokenizer, use_lora=False, training=training(learning_rate=5e-3))
    metrics = tuner.finetune(data=data(text_file), output_dir=tmp_path)
    assert metrics["method"] == "full" and metrics["adapter_dir"] is None
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 1.0
    assert metrics["trainable_params"] == sum(p.numel() for p in tuner.model.parameters())


def test_merged_lora_equals_the_adapter_and_keeps_the_pruned_shapes(lora_run, tokenizer):
    root, tuner, metrics = lora_run
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    base = load_checkpoint(root / "pruned")
    with_adapter = PeftModel.from_pretrained(load_checkpoint(root / "pruned"), metrics["adapter_dir"])
    merged = load_checkpoint(metrics["model_dir"])
    assert not torch.allclose(logits(base, ids), logits(merged, ids), atol=1e-4)  # training changed something
    torch.testing.assert_close(logits(with_adapter, ids), logits(merged, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(tuner.model, ids), logits(merged, ids))
    plain = AutoModelForCausalLM.from_pretrained(metrics["model_dir"], trust_remote_code=True)
    torch.testing.assert_close(logits(plain, ids), logits(merged, ids))
    expected = [
        {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 96},
        {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48},
    ]
    assert layer_widths(merged) == layer_widths(plain) == expected
    assert plain.model.layers[1].mlp.down_proj.weight.shape == (64, 48)
    assert "lora" not in " ".join(name for name, _ in merged.named_parameters())


class _Interrupt(TrainerCallback):
    """Simulates a crash: raise at the end of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("use_lora,distill", [(True, False), (False, False), (False, True)], ids=["lora", "full", "full-distill"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tokenizer, text_file, tmp_path, use_lora, distill):
    options = training(max_steps=6, save_steps=3, learning_rate=1e-2, batch_size=4, micro_batch_size=2)
    lora_data = data(text_file, num_samples=32, val_set_size=0)
    # distillation: the resumed run rebuilds the teacher cache, which gives the same rows for the same windows
    kd = dict(distill=DistillOptions(distill_alpha=0.5, distill_top_k=8), teacher=make_tiny_model("llama", seed=1, vocab_size=len(tokenizer))) if distill else {}
    whole = FineTuner(pruned_model(tokenizer), tokenizer, use_lora=use_lora, training=options, **kd)
    whole.finetune(data=lora_data, output_dir=tmp_path / "whole")
    crashed = FineTuner(pruned_model(tokenizer), tokenizer, use_lora=use_lora, training=options, callbacks=[_Interrupt(4)], **kd)
    with pytest.raises(KeyboardInterrupt):
        crashed.finetune(data=lora_data, output_dir=tmp_path / "crashed")
    assert sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()) == ["checkpoint-3"]
    resumed = FineTuner(pruned_model(tokenizer), tokenizer, use_lora=use_lora, training=options, **kd)
    metrics = resumed.finetune(data=lora_data, output_dir=tmp_path / "crashed", resume_from_checkpoint="last")
    assert metrics["steps"] == 6 and metrics["train_tokens"] == 3 * 4 * 32
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_nan_loss_stops_with_the_step_and_a_hint(tokenizer, text_file, tmp_path):
    model = pruned_model(tokenizer)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    tuner = FineTuner(model, tokenizer, use_lora=True, training=training(max_steps=4), tracking=TrackingOptions(logging_steps=1))
    with pytest.raises(PrunellmError, match=r"loss became nan by step 1: lower --learning_rate"):
        tuner.finetune(data=data(text_file, num_samples=16, val_set_size=0), output_dir=tmp_path)


def test_distillation_loss_is_kl_plus_lm_over_labelled_tokens(tokenizer, tmp_path):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi there."}, {"instruction": "Count.", "input": "to 3", "output": "1 2 3"}]
    batch = PadCollator(tokenizer.pad_token_id)(tokenize_instructions(tokenizer, rows, FinetuneData()))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    same = _DistillTrainer(model=model, args=args, teacher=make_tiny_model("llama", vocab_size=len(tokenizer)), distill=DistillOptions(distill_alpha=0.5))
    model.train()
    with torch.no_grad():
        lm = model(**batch).loss
        # teacher == student: KL = 0, the loss is (1 − α)·LM; padding and prompts are outside both terms
        torch.testing.assert_close(same.compute_loss(model, batch), 0.5 * lm, rtol=1e-5, atol=1e-5)
        other = _DistillTrainer(model=model, args=args, teacher=make_tiny_model("llama", seed=1, vocab_size=len(tokenizer)),
                                distill=DistillOptions(distill_alpha=0.5))  # fmt: skip
        assert other.compute_loss(model, batch) > 0.5 * lm
        model.eval()
        torch.testing.assert_close(other.compute_loss(model, batch), lm)  # validation: the plain LM loss


def test_distillation_from_the_unpruned_model_trains(tokenizer, text_file, tmp_path):
    teacher = make_tiny_model("llama", vocab_size=len(tokenizer))
    tuner = FineTuner(pruned_model(tokenizer), tokenizer, use_lora=False, training=training(max_steps=6, learning_rate=5e-3),
                      distill=DistillOptions(distill_alpha=0.5), teacher=teacher)  # fmt: skip
    metrics = tuner.finetune(data=data(text_file, num_samples=24), output_dir=tmp_path)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]


def test_sparse_kl_over_the_whole_vocabulary_is_the_full_kl():
    student, teacher = torch.randn(2, 40, 300, generator=torch.Generator().manual_seed(0)).mul(3).unbind()
    t = 2.0
    full = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(sparse_kl(student, teacher_targets(teacher, 300, t), t), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_kl(student, teacher_targets(teacher, 10_000, t), t), full, rtol=1e-5, atol=1e-5)  # k clamps to V
    # k < V: the top-k tokens plus one rest bucket, against the formula in float64
    k = 16
    p, q = F.softmax(teacher.double() / t, -1), F.softmax(student.double() / t, -1)
    top = p.topk(k, -1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    expected = (p_top * (p_top / q_top).log()).sum() + (p_rest * (p_rest / q_rest).log()).sum()
    got = sparse_kl(student, teacher_targets(teacher, k, t), t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert 0 < got < full  # merging the tail into one bucket can only lose information
    # the same teacher as student: 0, including the rest bucket
    assert sparse_kl(teacher, teacher_targets(teacher, k, t), t).abs() < 1e-5


def test_cached_rows_follow_the_examples_through_shuffled_padded_batches(tokenizer, tmp_path):
    """Instructions (prompt labels −100, different lengths) batched in another order read their own cache rows."""
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi there."}, {"instruction": "Count.", "input": "to 3", "output": "1 2 3"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sea on a clear day."}]  # fmt: skip
    examples = [{**e, "example_index": i} for i, e in enumerate(tokenize_instructions(tokenizer, rows, FinetuneData()))]
    collator = PadCollator(tokenizer.pad_token_id)
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    teacher = make_tiny_model("llama", seed=1, vocab_size=len(tokenizer))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    options = DistillOptions(distill_alpha=0.5, distill_top_k=32, distill_cache_dtype="float32")
    live = _DistillTrainer(model=model, args=args, teacher=teacher, distill=options, data_collator=collator)
    cached = _DistillTrainer(model=model, args=args, teacher=teacher, distill=options, data_collator=collator)
    cache = cached.build_teacher_cache(examples)
    assert cache.positions == sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    assert cache.nbytes == cache.positions * (32 * 8 + 4)
    batch = collator([examples[2], examples[0], examples[1]])
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(cached.compute_loss(model, dict(batch)), live.compute_loss(model, {k: v for k, v in batch.items() if k != "example_index"}))


def test_a_teacher_cache_that_does_not_fit_is_refused_with_the_fix(tokenizer, tmp_path, monkeypatch):
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2**20})())
    examples = [{"input_ids": list(range(33)), "attention_mask": [1] * 33, "labels": list(range(33))}]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = _DistillTrainer(model=make_tiny_model("llama", vocab_size=len(tokenizer)), args=args, distill=DistillOptions(distill_top_k=10**6),
                              teacher=make_tiny_model("llama", vocab_size=len(tokenizer)), data_collator=PadCollator(0))  # fmt: skip
    with pytest.raises(PrunellmError, match=r"32 labelled positions × top-49152\), more than half .* lower --distill_top_k"):
        trainer.build_teacher_cache(examples)


def _losses(tuner: FineTuner, **finetune) -> tuple[list[float], dict]:
    seen: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                seen.append(logs["loss"])

    tuner.callbacks.append(Record())
    return seen, tuner.finetune(**finetune)


def test_cached_teacher_trains_like_the_live_teacher_and_runs_it_once_per_window(text_file, tmp_path):
    """k = vocabulary: the cached teacher's trajectory is the live full KL's; over 2 epochs the teacher sees each window once."""
    tokenizer = _word_tokenizer(text_file.read_text(), size=200)
    teacher = make_tiny_model("llama", seed=1, vocab_size=len(tokenizer))
    windows = 0

    def count(module, args, kwargs, output):
        nonlocal windows
        windows += kwargs["input_ids"].shape[0]

    teacher.register_forward_hook(count, with_kwargs=True)
    options = training(max_steps=None, num_epochs=2.0, learning_rate=5e-3)  # 16 windows / 4 = 4 steps per epoch
    runs = {}
    for name, distill in (("live", DistillOptions(distill_top_k=0)),
                          ("cached", DistillOptions(distill_top_k=len(tokenizer), distill_cache_dtype="float32"))):  # fmt: skip
        windows = 0
        tuner = FineTuner(pruned_model(tokenizer), tokenizer, use_lora=False, training=options, distill=distill, teacher=teacher,
                          tracking=TrackingOptions(logging_steps=1))  # fmt: skip
        losses, metrics = _losses(tuner, data=data(text_file, num_samples=16, val_set_size=0), output_dir=tmp_path / name)
        runs[name] = (losses, metrics, windows)
    (live, live_metrics, live_windows), (cached, metrics, cached_windows) = runs["live"], runs["cached"]
    assert len(live) == len(cached) == 8 and live_metrics["steps"] == metrics["steps"] == 8
    assert cached == pytest.approx(live, rel=1e-4)
    assert live_windows == 2 * 16 and cached_windows == 16  # live: every batch of both epochs; cached: one pass
    assert live_metrics["teacher_cache_seconds"] is None and metrics["teacher_cache_seconds"] > 0
    assert metrics["teacher_cache_bytes"] == 16 * 31 * (len(tokenizer) * 8 + 4)
    assert 0 < metrics["tokens_per_second_with_cache"] < metrics["tokens_per_second"]


def test_a_second_run_on_the_same_windows_reuses_the_teacher_cache(tokenizer, text_file, tmp_path):
    teacher = make_tiny_model("llama", seed=1, vocab_size=len(tokenizer))
    tuner = FineTuner(pruned_model(tokenizer), tokenizer, use_lora=True, training=training(max_steps=2), distill=DistillOptions(distill_top_k=4),
                      teacher=teacher)  # fmt: skip
    first = tuner.finetune(data=data(text_file, num_samples=8, val_set_size=0), output_dir=tmp_path / "a")
    cache = tuner.teacher_cache
    tuner.model = pruned_model(tokenizer)
    tuner.use_lora = False  # another method on the same windows
    second = tuner.finetune(data=data(text_file, num_samples=8, val_set_size=0), output_dir=tmp_path / "b")
    assert tuner.teacher_cache is cache and first["teacher_cache_seconds"] > 0 and second["teacher_cache_seconds"] == 0
    third = tuner.finetune(data=data(text_file, num_samples=8, val_set_size=0, seq_len=16), output_dir=tmp_path / "c")
    assert tuner.teacher_cache is not cache and third["teacher_cache_seconds"] > 0  # other windows: a new cache


# --- command line ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pruned") / "tiny_p20" / "model"
    save_model(pruned_model(tokenizer), tokenizer, path)
    return path.parent


def test_cli_finetunes_alpaca_data_into_the_results_layout(pruned_dir, tmp_path, monkeypatch, capsys):
    # Alpaca rows with and without an input (the recovery set's form; no download needed)
    rows = [{"instruction": f"Add {a} and {a + 3}.", "input": "", "output": str(2 * a + 3)} for a in range(20)]
    rows += [{"instruction": "Repeat the word.", "input": word, "output": f"{word} {word}"} for word in ("king", "queen", "castle") * 7][:20]
    data_file = tmp_path / "recovery set.jsonl"  # any name
    data_file.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path)
    args = ["finetune", "--pruned_model", str(pruned_dir), "--data_path", str(data_file), "--cutoff_len", "256",
            "--val_set_size", "4", "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3", "--lora_r", "4",
            "--group_by_length", "--train_on_inputs", "False", "--ppl_datasets", str(data_file), "--ppl_seq_len", "32",
            "--ppl_max_windows", "2", "--metrics", "ppl", "--logging_steps", "1"]  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "results" / "tiny_p20_finetuned"  # the default: results/<name>_finetuned
    for rel in ("model/config.json", "model/modeling_prunellm.py", "lora_adapter/adapter_config.json",
                "finetune_results.json", "evaluation_results.json", "logs/finetune.log", "logs/command.sh"):  # fmt: skip
        assert (out / rel).is_file(), rel
    results = json.loads((out / "finetune_results.json").read_text())
    assert results["steps"] == 3 and results["data"]["template"] == "alpaca" and results["gradient_accumulation_steps"] == 2
    assert "held-out loss after" in capsys.readouterr().err
    assert "step 3/3: loss" in (out / "logs" / "finetune.log").read_text()


def test_cli_refuses_bad_input_in_one_line(pruned_dir, tmp_path, capsys):
    base = ["finetune", "--pruned_model", str(pruned_dir), "--output_dir", str(tmp_path / "o")]
    cases = [
        (["--batch_size", "10", "--micro_batch_size", "4"], "--micro_batch_size 4 does not divide --batch_size 10"),
        (["--resume_from_checkpoint", str(tmp_path / "gone")], "--resume_from_checkpoint"),
        (["--lora_target_modules", "wq,wk"], "match no linear module"),
        (["--report_to", "wandb"], "--report_to wandb needs the 'wandb' package"),
    ]
    for extra, message in cases:
        if message.startswith("--report_to") and __import__("importlib").util.find_spec("wandb"):
            continue
        assert main(base + extra + ["--max_steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    assert main(["finetune", "--pruned_model", str(tmp_path / "legacy.bin")]) == 2
    assert "--trust_pickle" in capsys.readouterr().err


def test_legacy_pickle_is_finetuned_into_a_safe_checkpoint(tokenizer, text_file, tmp_path):
    legacy = tmp_path / "llm_pruner_run" / "pytorch_model.bin"
    legacy.parent.mkdir()
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    prune_units(model, KEPT)
    model.config.num_key_value_heads = 2  # LLM-Pruner left the config stale; sync_config rewrites it
    torch.save({"model": model, "tokenizer": tokenizer}, legacy)
    args = ["finetune", "--pruned_model", str(legacy), "--trust_pickle", "--method", "full", "--dataset_name", str(text_file),
            "--num_samples", "8", "--seq_len", "32", "--val_set_size", "2", "--batch_size", "4", "--max_steps", "1",
            "--skip_evaluation", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    assert layer_widths(load_checkpoint(tmp_path / "out" / "model"))[0]["num_key_value_heads"] == 1


def test_two_process_cpu_run_trains_and_saves_once(pruned_dir, text_file, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    # accelerate's `--cpu` starts several processes only through mpirun; `--multi_gpu` starts them with torchrun,
    # and the engine picks the CPU (gloo) backend because the machine has no GPU
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / "finetune_lora.py"), "--pruned_model", str(pruned_dir), "--dataset_name",
               str(text_file), "--num_samples", "16", "--seq_len", "32", "--val_set_size", "4", "--batch_size", "4",
               "--micro_batch_size", "2", "--max_steps", "2", "--skip_evaluation", "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    results = json.loads((out / "finetune_results.json").read_text())
    assert results["processes"] == 2 and results["steps"] == 2 and results["gradient_accumulation_steps"] == 1
    assert results["train_tokens"] == 2 * 4 * 32  # 2 steps × 4 windows over both processes × 32 tokens
    assert output.count("saved the fine-tuned model") == 1
    assert layer_widths(load_checkpoint(out / "model"))[1]["intermediate_size"] == 48
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written folders


def test_prune_with_finetune_recovers_in_the_same_process(tokenizer, text_file, tmp_path, capsys):
    dense = tmp_path / "dense"
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    args = ["prune", "--base_model", str(dense), "--output_dir", str(tmp_path / "results"), "--output_name", "p", "--dataset",
            str(text_file), "--taylor_num_samples", "4", "--taylor_seq_len", "32", "--pruning_ratio", "0.01", "--reconstruct",
            "none", "--run_evaluation", "ppl", "--ppl_datasets", str(text_file), "--ppl_seq_len", "32", "--ppl_max_windows", "4",
            "--finetune", "True", "--finetune_method", "full", "--finetune_dataset", str(text_file), "--finetune_num_samples",
            "32", "--finetune_seq_len", "32", "--finetune_val_set_size", "4", "--finetune_batch_size", "4",
            "--finetune_max_steps", "8", "--finetune_learning_rate", "5e-3"]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "results" / "p"
    for rel in ("model/config.json", "finetuned/model/config.json", "finetuned/evaluation_results.json", "finetuned/finetune_results.json"):
        assert (run / rel).is_file(), rel
    assert not (run / "finetuned" / "checkpoints").exists()
    pruned = json.loads((run / "evaluation_results.json").read_text())["metrics"]["ppl"][0]["ppl"]
    recovered = json.loads((run / "finetuned" / "evaluation_results.json").read_text())["metrics"]["ppl"][0]["ppl"]
    assert recovered < pruned
    summary = capsys.readouterr().err
    assert "PPL base" in summary and "PPL pruned" in summary and "PPL recovered" in summary


def test_finetune_flag_forms(tmp_path):
    from prunellm.cli import build_parser
    from prunellm.cli import build_options
    from prunellm.options import FinetuneOptions

    def parsed(*flags: str) -> FinetuneOptions:
        return build_options(FinetuneOptions, build_parser().parse_args(["prune", *flags]))

    assert parsed().finetune is False and parsed("--finetune").finetune is True
    assert parsed("--finetune", "True").finetune is True and parsed("--finetune", "False").finetune is False
    assert parsed("--finetune_method", "full", "--finetune_epochs", "2").training.num_epochs == 2.0
    # recovery's flags set the engine's own groups, with recovery's shorter defaults
    assert parsed().data.num_samples == 256 and parsed().training.batch_size == 16 and parsed().training.save_steps == 0


def _word_tokenizer(text: str, size: int = 400):
    """A word-level tokenizer of the ``size`` most common words (a tiny vocabulary keeps the LM head cheap)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w, _ in Counter(text.split()).most_common(size)]
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def test_the_seeds_finetuner_call_runs_as_written(monkeypatch, tmp_path, request):
    """``FineTuner(model, tokenizer, device, use_lora).finetune(dataset_name='wikitext', num_samples=500, lr=1e-5, epochs=1)``."""
    import prunellm.data

    shared = REPO.parent / "shared" / "data" / "wikitext-2"
    texts = {part: (shared / name).read_text() if (shared / name).is_file() else load_text("shakespeare", part)[:400_000]
             for part, name in (("train", "valid.txt"), ("eval", "test.txt"))}  # fmt: skip
    hub_calls = []

    def hub_text(source, part, flag):  # the hub stands in: WikiText-2 from ../shared where it exists
        hub_calls.append((source, prunellm.data._HUB_SOURCES[source].path, part))
        return texts[part]

    monkeypatch.setattr(prunellm.data, "_load_hub_text", hub_text)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64k tokens through a hidden-64 model: tiny matmuls, where threads only contend
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    tokenizer = _word_tokenizer(texts["train"])
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    prune_units(model, KEPT)
    device = "cpu"
    use_lora = True
    # the seed's lines, exactly
    tuner = FineTuner(model, tokenizer, device, use_lora)
    metrics = tuner.finetune(dataset_name='wikitext', num_samples=500, lr=1e-5, epochs=1)  # fmt: skip
    assert {call[1] for call in hub_calls} == {"wikitext"} and {call[2] for call in hub_calls} == {"train", "eval"}
    assert metrics["method"] == "lora" and metrics["processes"] == 1
    assert metrics["steps"] == 8  # ceil(500 windows / the batch of 64), one epoch
    assert metrics["train_tokens"] == 500 * 128
    assert metrics["data"]["train"]["hub_id"] == "wikitext"
    assert (tmp_path / "results" / "finetuned" / "model" / "config.json").is_file()


def test_finetuner_positional_signature_is_the_seeds(tokenizer):
    from prunellm.options import LoraOptions

    model = pruned_model(tokenizer)
    assert FineTuner(model, tokenizer, "cpu", False).use_lora is False
    assert FineTuner(model, tokenizer, "auto", True).use_lora is True
    # one set of defaults: the Python face trains as `prunellm finetune` does without flags
    assert FineTuner(model, tokenizer, "cpu").use_lora is (FinetuneTarget().method == "lora") is True
    assert FineTuner(model, tokenizer).training == TrainOptions()
    with pytest.raises(PrunellmError, match="device 'True' is not valid: use auto, cpu, cuda or cuda:N"):
        FineTuner(model, tokenizer, True)
    with pytest.raises(PrunellmError, match="use_lora must be True or False"):
        FineTuner(model, tokenizer, "cpu", "yes")
    with pytest.raises(TypeError):
        FineTuner(model, tokenizer, "cpu", True, LoraOptions())  # options are keyword-only
    if not torch.cuda.is_available():
        with pytest.raises(PrunellmError, match="torch sees none"):
            FineTuner(model, tokenizer, "cuda:0")


def test_prune_with_finetune_takes_the_same_option_groups(tokenizer, text_file, tmp_path, capsys):
    """LoRA settings, tracking, checkpoints and resume reach the one engine from `prunellm prune --finetune`."""
    dense = tmp_path / "dense"
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    results = tmp_path / "results"

    def args(name, *extra):
        return ["prune", "--base_model", str(dense), "--output_dir", str(results), "--output_name", name, "--dataset",
                str(text_file), "--taylor_num_samples", "4", "--taylor_seq_len", "32", "--pruning_ratio", "0.01", "--reconstruct",
                "none", "--finetune", "--finetune_dataset", str(text_file), "--finetune_num_samples", "16", "--finetune_seq_len",
                "32", "--finetune_val_set_size", "2", "--finetune_batch_size", "4", "--finetune_max_steps", "4", *extra]  # fmt: skip

    # a resume with nothing to resume from fails in one line before any work, naming the flag and the folder
    capsys.readouterr()
    assert main(args("r", "--finetune_resume_from_checkpoint", "last")) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "it/s" not in line]
    assert len(err) == 1 and "--finetune_resume_from_checkpoint last" in err[0] and "r.finetune_checkpoints" in err[0], err
    assert not (results / "r").exists()

    lora = ["--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj"]
    assert main(args("r", *lora, "--finetune_save_steps", "2", "--logging_steps", "1", "--report_to", "none")) == 0
    run = results / "r"
    adapter = json.loads((run / "finetuned" / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert sorted(p.name for p in (run / "finetuned" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (results / "r.finetune_checkpoints").exists()  # moved into the run when it succeeded
    log = (run / "logs" / "prune.log").read_text()
    assert "step 1/4: loss" in log and "step 4/4: loss" in log  # --logging_steps 1

    # an interrupted run leaves its checkpoints beside the (absent) run folder; resuming continues from them
    (run / "finetuned" / "checkpoints").rename(results / "r2.finetune_checkpoints")
    assert main(args("r2", *lora, "--finetune_save_steps", "2", "--finetune_resume_from_checkpoint", "last")) == 0
    resumed = json.loads((results / "r2" / "finetuned" / "finetune_results.json").read_text())
    assert resumed["steps"] == 4 and resumed["train_tokens"] == 0  # resumed at step 4 of 4: nothing left to train


def test_accelerate_cpu_with_several_processes_is_refused(pruned_dir, text_file, tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs the script once: say so and how to start two, do not train on one."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / "finetune_lora.py"), "--pruned_model", str(pruned_dir), "--dataset_name",
               str(text_file), "--num_samples", "16", "--seq_len", "32", "--max_steps", "1", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1, (done.stdout + done.stderr)[-3000:]
    assert "--num_processes 2 starts one process" in errors[0] and "--multi_gpu --num_processes 2" in errors[0]
    assert not (tmp_path / "o").exists()


def test_check_launch_reads_the_launchers_flags(monkeypatch):
    from prunellm.finetune.engine import check_launch

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_launch(["accelerate", "launch", "--cpu", "script.py"])  # one process asked, one started: fine
    check_launch(["accelerate", "launch", "--cpu", "--num_processes=1", "script.py"])
    with pytest.raises(PrunellmError, match="--num_processes 3 starts one process"):
        check_launch(["accelerate", "launch", "--cpu", "--num_processes=3", "script.py"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # really two processes (torchrun, --multi_gpu): nothing to refuse
    check_launch(["accelerate", "launch", "--cpu", "--num_processes", "2", "script.py"])


def test_cli_refuses_windows_longer_than_the_context(pruned_dir, tmp_path, capsys):
    assert main(["finetune", "--pruned_model", str(pruned_dir), "--seq_len", "4096", "--output_dir", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == ["error: --seq_len 4096 is longer than the model's context (256 tokens): use at most 256"]
