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
    "checkpoints_beside",
    "finetune_after_pruning",
    "default_output_dir",
    "load_for_finetuning",
    "run_finetune",
]


def checkpoints_beside(out: Path) -> Path:
    """Where a fine-tuning run into ``out`` keeps its checkpoints while it runs: ``<out>.finetune_checkpoints``,
    beside ``out``, which is written atomically (it appears only when the run succeeds), so that an interrupted
    run leaves them for ``--resume_from_checkpoint last``. A successful run moves them into its own folder."""
    out = Path(out)
    return out.with_name(f"{out.name}.finetune_checkpoints")


def checkpoint_dir_after_pruning(run_dir: Path) -> Path:
    """Where ``prunellm prune --finetune`` keeps checkpoints while it runs (:func:`checkpoints_beside` the run
    folder), for ``--finetune_resume_from_checkpoint``."""
    return checkpoints_beside(run_dir)


def move_checkpoints(checkpoints: Path, into: Path) -> None:
    """A finished run's checkpoints from beside its output into ``into`` (an empty folder is just removed)."""
    if not checkpoints.is_dir():
        return
    if any(checkpoints.iterdir()):
        into.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.rename(into)
    else:
        checkpoints.rmdir()


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
    """``prunellm finetune``: load the pruned model, fine-tune, save and evaluate into ``--output_dir``.

    The output folder is written under a temporary name and appears only when the run succeeds (an existing one is
    refused unless ``--overwrite``; one that is or holds an input, always). Checkpoints go beside it, to
    :func:`checkpoints_beside`, while the run goes, so that an interrupted run keeps them for
    ``--resume_from_checkpoint last``; the finished run moves them into ``<output_dir>/checkpoints``.
    """
    from ..models import check_context
    from ..paths import atomic_dir, check_output
    from ..runs import log_to_file, write_command

    if not target.pruned_model:
        raise PrunellmError("--pruned_model is required: a prunellm results folder, a model directory, or a legacy .bin")
    check_launch()  # refuse bad input before loading anything
    gradient_accumulation(training)
    out = Path(target.output_dir) if target.output_dir else default_output_dir(target.pruned_model)
    checkpoints = checkpoints_beside(out)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:  # the other processes of a multi-process run write nothing but their part of each checkpoint
        inputs = [("--pruned_model", target.pruned_model), ("--distill_from", distill.distill_from),
                  ("--data_path", data.data_path), ("--dataset_name", data.dataset_name)]  # fmt: skip
        check_output(out, "--output_dir", target.overwrite, inputs=inputs)
        if target.overwrite and not target.resume_from_checkpoint and checkpoints.is_dir():
            import shutil

            if any(checkpoints.glob("checkpoint-*")):
                log.warning("--overwrite: discarding the checkpoints of an earlier run in %s", checkpoints)
            shutil.rmtree(checkpoints)
    resolve_checkpoint(target.resume_from_checkpoint, checkpoints, start_over="pass --overwrite")
    model, tokenizer = load_for_finetuning(target)
    check_context(model, **({"cutoff_len": data.cutoff_len} if data.data_path else {"seq_len": data.seq_len}))
    tuner = FineTuner(model, tokenizer, use_lora=target.method == "lora", lora=lora, training=training, tracking=tracking, distill=distill)
    if not main_process:
        return tuner.finetune(data=data, output_dir=out, checkpoint_dir=checkpoints, resume_from_checkpoint=target.resume_from_checkpoint)
    with atomic_dir(out) as tmp, log_to_file(tmp / "logs" / "finetune.log"):
        write_command(tmp, argv)
        log.info("fine-tuning %s (%s) into %s", target.pruned_model, target.method, out)
        if training.save_steps > 0:
            log.info("checkpoints go to %s while the run goes (an interrupted run keeps them: rerun with "
                     "--resume_from_checkpoint last)", checkpoints)  # fmt: skip
        try:
            metrics = tuner.finetune(
                data=data,
                output_dir=tmp,
                checkpoint_dir=checkpoints,
                resume_from_checkpoint=target.resume_from_checkpoint,
                evaluation=None if target.skip_evaluation else evaluation,
            )
        except BaseException:
            if checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*")):
                log.warning("the checkpoints in %s are kept: continue with --resume_from_checkpoint last", checkpoints)
            raise
        move_checkpoints(checkpoints, tmp / "checkpoints")
    return metrics
