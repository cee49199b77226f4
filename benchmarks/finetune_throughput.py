"""Fine-tuning throughput of prunellm's engine relative to a plain HF Trainer + peft script.

Both sides train SmolLM2-135M with LoRA (r 8, alpha 16, dropout 0.05, every q/k/v/o/gate/up/down projection)
on the same ``num_samples`` windows of ``seq_len`` tokens of the Shakespeare train plays (the same seed, so the
same windows in the same order), micro-batch ``batch_size``, fp32, for ``steps`` optimizer steps:

* ``engine``: ``FineTuner(model, tokenizer, use_lora=True).finetune(...)`` (no validation, no checkpoints);
* ``plain``: ``get_peft_model`` + ``Trainer(model, TrainingArguments(...), train_dataset)``, nothing else.

Tokens/s = trained tokens ÷ the Trainer's own ``train_runtime`` on each side (saving and evaluation are outside
it). After one short untimed run of each, the two are timed alternately ``repeats`` times (which side goes first
alternates too), each on a freshly loaded model, with ``threads`` torch threads, and the fastest run of each is
kept (the one least disturbed by other processes on a shared machine). ``ratio`` = engine ÷ plain (goal ≥ 0.95);
``median_ratio`` compares the median runs instead.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 42
LEARNING_RATE = 1e-4


def _engine(num_samples: int, seq_len: int, batch_size: int, steps: int, out: Path) -> tuple[int, float]:
    from prunellm.finetune import FineTuner
    from prunellm.models import load_model, load_tokenizer
    from prunellm.options import FinetuneData, TrainOptions

    training = TrainOptions(batch_size=batch_size, micro_batch_size=batch_size, max_steps=steps, learning_rate=LEARNING_RATE,
                            warmup_steps=0, save_steps=0, precision="fp32", seed=SEED)  # fmt: skip
    tuner = FineTuner(load_model("smollm2-135m"), load_tokenizer("smollm2-135m"), use_lora=True, training=training)
    data = FinetuneData(dataset_name="shakespeare", num_samples=num_samples, seq_len=seq_len, val_set_size=0)
    metrics = tuner.finetune(data=data, output_dir=out)
    return metrics["train_tokens"], metrics["train_seconds"]


def _plain(num_samples: int, seq_len: int, batch_size: int, steps: int, out: Path) -> tuple[int, float]:
    """What a user would write with transformers + peft alone."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from prunellm.data import sample_calibration
    from prunellm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    windows = sample_calibration(tokenizer, "shakespeare", num_samples, seq_len, SEED).tolist()
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq_len] * num_samples, "labels": windows})
    model = load_model("smollm2-135m")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=LEARNING_RATE, report_to="none", save_strategy="no", seed=SEED, data_seed=SEED,
                             use_cpu=True, disable_tqdm=True)  # fmt: skip
    result = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator).train()
    return steps * batch_size * seq_len, result.metrics["train_runtime"]


def measure(num_samples: int = 64, seq_len: int = 64, batch_size: int = 4, steps: int = 16, repeats: int = 5, threads: int = 1) -> dict:
    """Time both sides alternately and return tokens/s of each and their ratio."""
    import torch

    torch.set_num_threads(threads)  # one thread per process is the least disturbed by neighbours on a shared machine
    runs: dict[str, list[float]] = {"engine": [], "plain": []}
    sides = [("engine", _engine), ("plain", _plain)]
    tokens = steps * batch_size * seq_len
    with tempfile.TemporaryDirectory(prefix="prunellm-bench-") as tmp:
        for name, fn in sides:  # warm-up
            fn(num_samples, seq_len, batch_size, 2, Path(tmp) / f"warm-{name}")
        for repeat in range(repeats):
            for name, fn in sides if repeat % 2 == 0 else sides[::-1]:  # neither side always goes first
                gc.collect()
                trained, seconds = fn(num_samples, seq_len, batch_size, steps, Path(tmp) / f"{name}-{repeat}")
                assert trained == tokens, (name, trained, tokens)
                runs[name].append(seconds)
    engine_tps, plain_tps = tokens / min(runs["engine"]), tokens / min(runs["plain"])
    return {
        "model": "smollm2-135m",
        "method": "lora r8 (all projections), fp32",
        "dataset": "shakespeare (train plays)",
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens": tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "engine_tokens_per_s": round(engine_tps, 1),
        "plain_tokens_per_s": round(plain_tps, 1),
        "engine_seconds": [round(t, 3) for t in runs["engine"]],
        "plain_seconds": [round(t, 3) for t in runs["plain"]],
        "ratio": round(engine_tps / plain_tps, 3),
        "median_ratio": round(statistics.median(runs["plain"]) / statistics.median(runs["engine"]), 3),
    }
