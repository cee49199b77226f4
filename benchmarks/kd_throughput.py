"""Distillation's training throughput relative to plain full fine-tuning (issue 37: cached teacher ≥ 0.8×).

Three variants train SmolLM2-135M (full fine-tuning, fp32, the dense model as its own student, so the student's cost
is the plain run's) on the same ``num_samples`` windows of ``seq_len`` tokens of the Shakespeare train plays, for
``steps`` optimizer steps of ``batch_size`` windows (``epochs`` passes over the windows):

* ``plain``: ``FineTuner(model, tokenizer, "cpu", False)`` without a teacher;
* ``live``: distillation from the unpruned SmolLM2-135M with ``distill_top_k 0``: the teacher runs on every batch
  and the KL is over the full vocabulary (the engine's behaviour before the cache);
* ``cached``: distillation with ``distill_top_k k`` (64): one teacher pass over the windows before training, the
  top-k + rest-bucket KL during it.

Tokens/s = trained tokens ÷ the Trainer's ``train_runtime`` ("training only"); for ``cached`` also ÷
(``train_runtime`` + the teacher pass, ``teacher_cache_seconds``) ("with the cache pass"). The variants run
interleaved (plain, live, cached, plain, …) ``repeats`` times, each on a freshly loaded student, so load from other
processes hits them alike; the fastest run of each is kept and the median ratios are given too.

    .venv/bin/python -m benchmarks.kd_throughput --steps 4 --batch_size 4 --seq_len 128 --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
from pathlib import Path

SEED = 42
LEARNING_RATE = 1e-5
VARIANTS = ("plain", "live", "cached")


def _run(variant: str, teacher, num_samples: int, seq_len: int, batch_size: int, steps: int, top_k: int, out: Path) -> dict:
    from prunellm.finetune import FineTuner
    from prunellm.models import load_model, load_tokenizer
    from prunellm.options import DistillOptions, FinetuneData, TrainOptions

    training = TrainOptions(batch_size=batch_size, micro_batch_size=batch_size, max_steps=steps, learning_rate=LEARNING_RATE,
                            warmup_steps=0, save_steps=0, precision="fp32", seed=SEED)  # fmt: skip
    distill = {"plain": None, "live": DistillOptions(distill_top_k=0), "cached": DistillOptions(distill_top_k=top_k)}[variant]
    tuner = FineTuner(load_model("smollm2-135m"), load_tokenizer("smollm2-135m"), "cpu", False, training=training, distill=distill,
                      teacher=teacher if distill else None)  # fmt: skip
    data = FinetuneData(dataset_name="shakespeare", num_samples=num_samples, seq_len=seq_len, val_set_size=0)
    return tuner.finetune(data=data, output_dir=out)


def measure(steps: int = 4, batch_size: int = 4, seq_len: int = 128, epochs: int = 2, top_k: int = 64, repeats: int = 2,
            threads: int | None = None) -> dict:  # fmt: skip
    """Time the three variants interleaved; tokens/s of each and their ratios to plain full fine-tuning."""
    import torch

    from prunellm.models import load_model

    if threads:
        torch.set_num_threads(threads)
    num_samples = max(batch_size, steps * batch_size // epochs)
    teacher = load_model("smollm2-135m")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="prunellm-kd-bench-") as tmp:
        for repeat in range(repeats):
            for variant in VARIANTS:
                gc.collect()
                metrics = _run(variant, teacher, num_samples, seq_len, batch_size, steps, top_k, Path(tmp) / f"{variant}-{repeat}")
                runs[variant].append({"tokens": metrics["train_tokens"], "train_seconds": metrics["train_seconds"],
                                      "cache_seconds": metrics["teacher_cache_seconds"] or 0.0,
                                      "cache_bytes": metrics["teacher_cache_bytes"], "train_loss": metrics["train_loss"]})  # fmt: skip

    def tps(variant: str, with_cache: bool = False) -> list[float]:
        return [r["tokens"] / (r["train_seconds"] + (r["cache_seconds"] if with_cache else 0.0)) for r in runs[variant]]

    best = {v: max(tps(v)) for v in VARIANTS}
    best["cached_with_cache_pass"] = max(tps("cached", True))
    median = {v: statistics.median(tps(v)) for v in VARIANTS}
    median["cached_with_cache_pass"] = statistics.median(tps("cached", True))
    return {
        "model": "smollm2-135m (teacher) → smollm2-135m dense (student), full fine-tuning, fp32, CPU",
        "dataset": "shakespeare (train plays)",
        "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "windows": num_samples, "epochs": steps * batch_size / num_samples,
        "top_k": top_k, "repeats": repeats, "threads": torch.get_num_threads(),
        "cache_mb": round(runs["cached"][0]["cache_bytes"] / 2**20, 2),
        "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
        "median_tokens_per_s": {k: round(v, 1) for k, v in median.items()},
        "ratio_to_plain": {k: round(v / best["plain"], 3) for k, v in best.items() if k != "plain"},
        "median_ratio_to_plain": {k: round(v / median["plain"], 3) for k, v in median.items() if k != "plain"},
        "runs": runs,
        "goal": {"cached / plain": 0.8},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    section = measure(args.steps, args.batch_size, args.seq_len, args.epochs, args.top_k, args.repeats, args.threads)
    text = json.dumps(section, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
