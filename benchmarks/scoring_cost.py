"""Scoring cost on the real model: wall time and peak memory of each criterion's calibration pass.

Each measurement runs in a fresh process so peak RSS is not contaminated by earlier work. Reported:

* ``time_ratio`` = scoring wall time ÷ one plain forward+backward over the same calibration data
  (goal ≤ 1.3);
* ``memory_ratio`` = (peak RSS during scoring − RSS after loading the model) + weight bytes, ÷ weight bytes
  — i.e. the memory the model and its scoring occupy relative to the weights (goal ≤ 2.0); the
  process's total peak RSS (Python + torch runtime included) is reported beside it.

Run through ``python -m benchmarks.run`` or directly: ``python -m benchmarks.scoring_cost --criterion taylor``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import ROOT, peak_rss_mb, reset_peak_rss, rss_mb


def measure(criterion: str, num_samples: int, seq_len: int, batch_size: int) -> dict:
    """One measurement in this process (call in a fresh process)."""
    import torch

    from prunellm.calibration import collect_gradient_stats
    from prunellm.offload import activation_stats
    from prunellm.criteria import get_criterion
    from prunellm.data import sample_calibration
    from prunellm.models import load_model, load_tokenizer
    from prunellm.units import all_units

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    calibration = sample_calibration(tokenizer, "shakespeare", num_samples, seq_len, seed=0)
    model = load_model("smollm2-135m")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    units = list(all_units(model))
    spec = None if criterion == "forward_backward" else get_criterion(criterion)
    import gc

    gc.collect()
    rss_loaded = rss_mb()
    reset_peak_rss()
    if criterion == "forward_backward":
        started = time.perf_counter()
        for batch in calibration.split(batch_size):
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        elapsed = time.perf_counter() - started
    else:
        started = time.perf_counter()
        if "gradients" in spec.needs:
            collect_gradient_stats(model, calibration, units, terms=spec.gradient_terms, batch_size=batch_size)
        elif "activations" in spec.needs:
            activation_stats(model, calibration, units, batch_size=batch_size)
        elapsed = time.perf_counter() - started
    peak = peak_rss_mb()
    weight_mb = weight_bytes / 2**20
    return {
        "criterion": criterion,
        "seconds": round(elapsed, 2),
        "weight_mb": round(weight_mb, 1),
        "rss_after_load_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(peak, 1),
        "memory_ratio": round((peak - rss_loaded + weight_mb) / weight_mb, 3),
        "total_rss_ratio": round(peak / weight_mb, 3),
        "tokens": num_samples * seq_len,
        "batch_size": batch_size,
    }


def run_isolated(criterion: str, num_samples: int, seq_len: int, batch_size: int) -> dict:
    """Run :func:`measure` in a fresh Python process and return its result."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scoring_cost", "--criterion", criterion, "--num_samples", str(num_samples),
         "--seq_len", str(seq_len), "--batch_size", str(batch_size), "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criterion", default="taylor", help="a criterion name, or forward_backward for the reference pass")
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    result = measure(args.criterion, args.num_samples, args.seq_len, args.batch_size)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
