"""Recovery fine-tuning: one engine (:class:`FineTuner`, on the HF Trainer) behind three faces.

* Python: ``FineTuner(model, tokenizer, use_lora=True).finetune(dataset_name="shakespeare", ...)``;
* ``prunellm finetune`` / ``finetune_lora.py``: :func:`run_finetune` on a saved (pruned) model;
* ``prunellm prune --finetune``: :func:`finetune_after_pruning`, in the same process, into ``<run>/finetuned/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PrunellmError
from ..options import (
    DistillOptions,
    EvalOptions,
    FinetuneData,
    FinetuneOptions,
    FinetuneTarget,
    LoraOptions,
    TrackingOptions,
    TrainOptions,
)
from .data import NATURAL_INSTRUCTIONS, alpaca_prompt, build_natural_instructions
from .engine import FineTuner, check_launch, gradient_accumulation, resolve_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "NATURAL_INSTRUCTIONS",
    "FineTuner",
    "alpaca_prompt",
    "build_natural_instructions",
    "checkpoint_dir_after_pruning",
    "finetune_after_pruning",
    "default_output_dir",
    "load_for_finetuning",
    "run_finetune",
]


def checkpoint_dir_after_pruning(run_dir: Path) -> Path:
    """Where ``prunellm prune --finetune`` keeps checkpoints while it runs: beside the run folder, which is
    written atomically, so that an interrupted run leaves them for ``--finetune_resume_from_checkpoint``."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f"{run_dir.name}.finetune_checkpoints")


def finetune_after_pruning(
    model: nn.Module,
    tokenizer: Any,
    run_dir: Path,
    options: FinetuneOptions,
    eval_options: EvalOptions | None = None,
    *,
    base_model: str | None = None,
    seed: int = 42,
    lora: LoraOptions | None = None,
    tracking: TrackingOptions | None = None,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune a just-pruned in-memory model into ``<run_dir>/finetuned/`` and evaluate it (``eval_options``).

    ``options.data`` and ``options.training`` are the engine's own groups (the run's seed replaces the training
    seed). The model is trained in place (full) or gets LoRA adapters merged into it. ``base_model`` is the unpruned
    model, the teacher when ``finetune_distill_alpha > 0``. ``lora`` and ``tracking`` are the same option groups
    as ``prunellm finetune``'s. Checkpoints (``finetune_save_steps``) go to ``checkpoint_dir`` (default
    ``<run_dir>/finetuned/checkpoints``); ``finetune_resume_from_checkpoint`` continues from one of them.

    Returns:
        The metrics of :meth:`FineTuner.finetune`; ``evaluation`` holds the recovered model's results.
    """
    if options.training.batch_size % options.training.micro_batch_size:
        raise PrunellmError(
            f"--finetune_micro_batch_size {options.training.micro_batch_size} does not divide "
            f"--finetune_batch_size {options.training.batch_size}: use a divisor of it"
        )
    data = options.data
    training = options.training.model_copy(update={"seed": seed})
    distill = None
    if options.finetune_distill_alpha > 0:
        distill = DistillOptions(distill_from=base_model, distill_alpha=options.finetune_distill_alpha)
    tuner = FineTuner(
        model, tokenizer, use_lora=options.finetune_method == "lora", lora=lora, training=training, tracking=tracking, distill=distill
    )
    return tuner.finetune(
        data=data,
        output_dir=Path(run_dir) / "finetuned",
        evaluation=eval_options,
        checkpoint_dir=checkpoint_dir,
        resume_from_checkpoint=options.finetune_resume_from_checkpoint,
    )


def default_output_dir(pruned_model: str) -> Path:
    """``results/<name>_finetuned``: ``<name>`` is the results folder, model directory, or legacy file's folder."""
    from ..models import resolve_model_path

    if pruned_model.endswith((".bin", ".pt", ".pth")):
        path = Path(pruned_model).resolve()
        return Path("results") / f"{path.parent.name or path.stem}_finetuned"
    path = Path(resolve_model_path(pruned_model, "--pruned_model"))
    name = path.parent.name if path.name == "model" and path.exists() else path.name
    return Path("results") / f"{name}_finetuned"


def load_for_finetuning(target: FinetuneTarget) -> tuple[nn.Module, Any]:
    """Load ``--pruned_model`` (results folder, model directory, hub id, or legacy pickle) and its tokenizer."""
    from ..checkpoint import import_legacy_pickle
    from ..models import load_model, load_tokenizer, torch_dtype

    ref = target.pruned_model
    if ref.endswith((".bin", ".pt", ".pth")):
        from ..surgery import sync_config

        model, tokenizer = import_legacy_pickle(ref, target.trust_pickle)
        if tokenizer is None:
            raise PrunellmError(f"--pruned_model '{ref}' carries no tokenizer: re-save it with its tokenizer")
        sync_config(model)  # the pickled modules' widths into the config, so the saved model reloads
        model.to(torch_dtype(target.dtype))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    return load_model(ref, dtype=target.dtype, flag="--pruned_model"), load_tokenizer(ref, "--pruned_model")


def run_finetune(
    target: FinetuneTarget,
    data: FinetuneData,
    lora: LoraOptions,
    training: TrainOptions,
    tracking: TrackingOptions,
    distill: DistillOptions,
    evaluation: EvalOptions,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """``prunellm finetune``: load the pruned model, fine-tune, save and evaluate into ``--output_dir``."""
    from ..models import check_context
    from ..runs import log_to_file, write_command

    if not target.pruned_model:
        raise PrunellmError("--pruned_model is required: a prunellm results folder, a model directory, or a legacy .bin")
    check_launch()  # refuse bad input before loading anything
    gradient_accumulation(training)
    out = Path(target.output_dir) if target.output_dir else default_output_dir(target.pruned_model)
    resolve_checkpoint(target.resume_from_checkpoint, out / "checkpoints")
    model, tokenizer = load_for_finetuning(target)
    check_context(model, **({"cutoff_len": data.cutoff_len} if data.data_path else {"seq_len": data.seq_len}))
    tuner = FineTuner(model, tokenizer, use_lora=target.method == "lora", lora=lora, training=training, tracking=tracking, distill=distill)
    if int(os.environ.get("RANK", "0")) != 0:  # the other processes of a multi-process run only train
        return tuner.finetune(data=data, output_dir=out, resume_from_checkpoint=target.resume_from_checkpoint)
    write_command(out, argv)
    with log_to_file(out / "logs" / "finetune.log"):
        log.info("fine-tuning %s (%s) into %s", target.pruned_model, target.method, out)
        return tuner.finetune(
            data=data,
            output_dir=out,
            resume_from_checkpoint=target.resume_from_checkpoint,
            evaluation=None if target.skip_evaluation else evaluation,
        )
