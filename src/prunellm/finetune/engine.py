"""The one recovery fine-tuning engine: the Hugging Face ``Trainer``, full-parameter or LoRA through peft.

Mixed precision, gradient accumulation, gradient checkpointing, checkpoints, resume and multi-process runs
(``accelerate launch`` / ``torchrun``, DDP) all come from the library. This module only chooses its
arguments, builds the data, adds distillation (a ``compute_loss`` override), stops on a NaN loss, and saves
the result in prunellm's checkpoint format.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from ..checkpoint import save_model
from ..errors import PrunellmError
from ..evaluation import evaluate, save_results
from ..options import DistillOptions, EvalOptions, FinetuneData, LoraOptions, TrackingOptions, TrainOptions, split_list
from ..paths import atomic_dir, final_path, write_json_atomic
from ..specs import spec_for
from .data import PadCollator, TrainingData, training_data
from .distill import EXAMPLE_INDEX, DistillTrainer

log = logging.getLogger(__name__)


# --- checks that fail before any work ----------------------------------------------------------------------


def gradient_accumulation(training: TrainOptions, world_size: int | None = None) -> int:
    """Accumulation steps so that one optimizer step sees ``batch_size`` examples over all processes."""
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    micro, batch = training.micro_batch_size, training.batch_size
    if batch % micro:
        raise PrunellmError(f"--micro_batch_size {micro} does not divide --batch_size {batch}: use a divisor of {batch}")
    if batch % (micro * world):
        raise PrunellmError(
            f"--batch_size {batch} is not a multiple of --micro_batch_size {micro} × {world} processes: "
            f"use a batch size that is a multiple of {micro * world}"
        )
    return batch // (micro * world)


def check_launch(launcher_argv: list[str] | None = None) -> None:
    """Refuse ``accelerate launch --cpu --num_processes N`` (N > 1): accelerate then starts ONE process.

    With ``--cpu`` accelerate starts several processes only through mpirun; otherwise it runs the script once
    with ``ACCELERATE_USE_CPU`` and no ``WORLD_SIZE``, so the run would silently train on one process. The
    number asked for is read from the launcher's command line (the parent process), or ``launcher_argv``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        return
    argv = launcher_argv if launcher_argv is not None else _parent_argv()
    asked = 1
    for i, arg in enumerate(argv):
        name, _, inline = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = inline or (argv[i + 1] if i + 1 < len(argv) else "1")
            asked = int(value) if value.isdigit() else 1
    if asked > 1:
        raise PrunellmError(
            f"accelerate launch --cpu --num_processes {asked} starts one process, not {asked} (with --cpu accelerate "
            f"starts several only through mpirun): use 'accelerate launch --multi_gpu --num_processes {asked} ...' or "
            f"'torchrun --nproc_per_node {asked} ...' (without GPUs the engine trains on the CPU with gloo)"
        )


def _parent_argv() -> list[str]:
    """The launching process's command line (Linux ``/proc``; empty where it cannot be read)."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def resolve_checkpoint(
    value: str | None, checkpoints: Path, flag: str = "--resume_from_checkpoint", start_over: str = "remove that folder"
) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``last`` (the newest under ``checkpoints``).

    Without it, a ``checkpoints`` folder that already holds checkpoints (of an interrupted or earlier run) is refused:
    the new run's would mix with them (and the Trainer's rotation could delete the new ones).
    """
    if not value:
        if checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*")):
            raise PrunellmError(
                f"{checkpoints} holds the checkpoints of an earlier run: pass {flag} last to continue it, or {start_over} "
                "to start over"
            )
        return None
    if value.lower() in ("last", "latest", "true"):
        found = sorted(checkpoints.glob("checkpoint-*"), key=_step, reverse=True) if checkpoints.is_dir() else []
        for i, path in enumerate(found):
            if _complete(path):
                if i:  # a run stopped (killed, out of memory) while it saved these
                    log.warning("%s: skipping the incomplete %s", flag, ", ".join(p.name for p in found[:i]))
                return str(path)
        raise PrunellmError(f"{flag} {value}: no complete checkpoint-N folder in {checkpoints}")
    path = Path(value).expanduser()
    if not path.exists():
        raise PrunellmError(f"{flag} '{value}' does not exist: give a checkpoint-N folder (see {checkpoints}) or 'last'")
    if not (path / "trainer_state.json").is_file():
        raise PrunellmError(f"{flag} '{value}' is not a Trainer checkpoint (no trainer_state.json): give a checkpoint-N folder")
    if not _complete(path):
        raise PrunellmError(f"{flag} '{value}' is incomplete (its run stopped while saving it): give an earlier checkpoint-N folder")
    return str(path)


def _step(path: Path) -> int:
    number = path.name.removeprefix("checkpoint-")
    return int(number) if number.isdigit() else -1


def _complete(checkpoint: Path) -> bool:
    """Whether a Trainer checkpoint was saved to the end: the Trainer writes ``trainer_state.json`` last."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def lora_targets(model: nn.Module, requested: str = "") -> list[str]:
    """Module names LoRA adapts: ``requested`` (comma-separated) or every q/k/v/o and gate/up/down of the spec.

    Raises:
        PrunellmError: A requested name matches no linear module (the message lists those that exist).
    """
    names = split_list(requested)
    if not names:
        spec = spec_for(model.config)
        names = [spec.attention.q, spec.attention.k, spec.attention.v, spec.attention.o, spec.mlp.gate, spec.mlp.up, spec.mlp.down]
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [n for n in names if not any(full == n or full.endswith("." + n) for full in linear)]
    if missing:
        existing = sorted({full.rsplit(".", 1)[-1] for full in linear})
        raise PrunellmError(
            f"--lora_target_modules {','.join(missing)} match no linear module of this model: it has {', '.join(existing)}"
        )
    return names


def report_to(tracking: TrackingOptions) -> str:
    """The Trainer's ``report_to``; ``--wandb_project`` sets WANDB_PROJECT and implies wandb."""
    target = tracking.report_to
    if tracking.wandb_project:
        os.environ["WANDB_PROJECT"] = tracking.wandb_project
        target = "wandb" if target == "none" else target
    packages = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
    if target != "none" and not any(importlib.util.find_spec(p) for p in packages[target]):
        raise PrunellmError(f"--report_to {target} needs the '{packages[target][0]}' package: pip install {packages[target][0]}")
    return target


def training_device(device: Any) -> str:
    """``FineTuner``'s ``device``: ``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    text = str(device).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise PrunellmError(f"device '{device}' is not valid: use auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise PrunellmError(f"device '{device}' asks for a GPU, but torch sees none: use cpu or auto")
    return str(parsed)


def use_bf16(precision: str) -> bool:
    """bf16 mixed precision: asked for, or ``auto`` on a GPU that supports it. fp16 is never chosen."""
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


# --- Trainer pieces ----------------------------------------------------------------------------------------


class _LogAndStopOnNan(TrainerCallback):
    """Send loss and learning rate to prunellm's log; stop with the step and a hint when the loss is not finite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and not math.isfinite(logs["loss"]):
            raise PrunellmError(
                f"the training loss became {logs['loss']} by step {state.global_step}: lower --learning_rate, "
                "use --precision fp32, or check the data (empty responses, bad tokens)"
            )
        if state.is_world_process_zero and "loss" in logs:
            log.info("step %d/%d: loss %.4f, learning rate %.3g", state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", 0.0))
        if state.is_world_process_zero and "eval_loss" in logs:
            log.info("step %d: validation loss %.4f", state.global_step, logs["eval_loss"])


class _Progress(ProgressCallback):
    """The library's progress bar without its raw printing of every log dict (prunellm's log reports them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


_DistillTrainer = DistillTrainer  # the name earlier code and tests import


def training_arguments(
    out: Path, training: TrainOptions, tracking: TrackingOptions, accumulation: int, has_validation: bool, device: str = "auto",
    checkpoint_dir: Path | None = None,
) -> TrainingArguments:
    """The library's arguments for one run (checkpoints under ``checkpoint_dir``, default ``out/checkpoints``) on ``device``."""
    device = training_device(device)
    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(torch.device(device))  # the Trainer trains on the current GPU of a one-process run
    save = training.save_steps > 0
    periodic_eval = has_validation and training.eval_steps is not None
    return TrainingArguments(
        output_dir=str(checkpoint_dir or out / "checkpoints"),
        per_device_train_batch_size=training.micro_batch_size,
        per_device_eval_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=training.num_epochs,
        max_steps=training.max_steps or -1,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        bf16=use_bf16(training.precision),
        fp16=False,
        use_cpu=device == "cpu",  # on a machine without GPUs this also makes `accelerate launch`/torchrun use gloo on CPU machines
        activation_checkpointing=training.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        logging_steps=tracking.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach the log (and _LogAndStopOnNan)
        report_to=report_to(tracking),
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=training.eval_steps if periodic_eval else None,
        save_strategy="steps" if save else "no",
        save_steps=training.save_steps if save else 500,
        save_total_limit=training.save_total_limit,
        seed=training.seed,
        data_seed=training.seed,
        remove_unused_columns=False,  # our examples hold exactly input_ids, attention_mask, labels
        prediction_loss_only=True,  # never gather (B, T, vocab) logits during validation
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
    )


# --- the engine --------------------------------------------------------------------------------------------


class FineTuner:
    """Recovery fine-tuning of a (pruned) causal LM: full-parameter or LoRA, on the HF Trainer.

    The positional arguments are the seed's, ``FineTuner(model, tokenizer, device, use_lora)``; everything after
    them is keyword-only.

    Args:
        model: The model to train, e.g. a pruned model from :func:`prunellm.load_pruned`.
        tokenizer: Its tokenizer; a missing pad token becomes EOS (padding is masked, never id 0).
        device: ``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. Under
            ``accelerate launch``/``torchrun`` each process takes its own GPU.
        use_lora: Train LoRA adapters (merged into the weights at the end) instead of every parameter; the default,
            as on the command line (``--method lora``).
        lora: LoRA rank, alpha, dropout and target modules.
        training: Optimisation settings (epochs, learning rate, batch sizes, precision, checkpoints, seed).
            Without it: :class:`TrainOptions`'s defaults, the command line's.
        tracking: ``report_to`` and logging interval.
        distill: Distillation weight and temperature; on when ``distill_from`` names a teacher or ``teacher`` is given.
        teacher: An already loaded teacher (the unpruned model) for distillation.
        callbacks: Extra ``TrainerCallback`` objects.

    Example:
        >>> tuner = FineTuner(model, tokenizer, "cpu", True)  # the seed's call
        >>> metrics = tuner.finetune(dataset_name="wikitext", num_samples=500, lr=1e-5, epochs=1)
        >>> metrics["eval_loss"], metrics["model_dir"]
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str = "auto",
        use_lora: bool = True,
        *,
        lora: LoraOptions | None = None,
        training: TrainOptions | None = None,
        tracking: TrackingOptions | None = None,
        distill: DistillOptions | None = None,
        teacher: nn.Module | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        if not isinstance(use_lora, bool):
            raise PrunellmError(
                f"use_lora must be True or False, not {use_lora!r}: the signature is FineTuner(model, tokenizer, device, use_lora)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.device = training_device(device)  # a bad device fails here, before any work
        self.use_lora = use_lora
        self.lora = lora or LoraOptions()
        self.training = training or TrainOptions()
        self.tracking = tracking or TrackingOptions()
        self.distill = distill
        self.teacher = teacher
        self.callbacks = list(callbacks)
        self.teacher_cache = None  # distillation's cached teacher targets, reused by a later finetune() on the same windows
        self.teacher_cache_key: tuple | None = None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # masked by the attention mask and label −100

    def finetune(
        self,
        dataset_name: str | None = None,
        num_samples: int | None = None,
        lr: float | None = None,
        epochs: float | None = None,
        *,
        data_path: str | None = None,
        data: FinetuneData | None = None,
        output_dir: str | Path = "results/finetuned",
        resume_from_checkpoint: str | None = None,
        evaluation: EvalOptions | None = None,
        checkpoint_dir: str | Path | None = None,
    ) -> dict[str, Any]:
        """Train, save ``<output_dir>/model/`` (+ ``lora_adapter/``), optionally evaluate; return the metrics.

        ``dataset_name``, ``num_samples``, ``data_path``, ``lr`` and ``epochs`` override the matching fields of
        ``data`` and of the ``training`` options given to the constructor (``None`` keeps them: without
        ``training`` the command line's defaults; without ``data`` 500 windows of Shakespeare, which
        needs no hub; ``dataset_name="wikitext"`` is WikiText-2 from the hub). ``checkpoint_dir`` (default
        ``<output_dir>/checkpoints``) holds the Trainer's checkpoints and is where ``last`` is looked for.

        Returns:
            ``train_loss``, ``eval_loss_before``, ``eval_loss`` (held-out), ``tokens_per_second``,
            ``train_tokens``, ``steps``, ``trainable_params``, ``model_dir``, ``adapter_dir``, ``evaluation`` …
        """
        overrides = {"dataset_name": dataset_name, "num_samples": num_samples, "data_path": data_path}
        data = (data or FinetuneData()).model_copy(update={k: v for k, v in overrides.items() if v is not None})
        data = FinetuneData.model_validate(data.model_dump())
        training = self.training.model_copy(update={k: v for k, v in {"learning_rate": lr, "num_epochs": epochs}.items() if v is not None})
        training = TrainOptions.model_validate(training.model_dump())
        out = Path(output_dir)
        checkpoints = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
        report_to(self.tracking)  # refuse a missing tracker before any work
        resume = resolve_checkpoint(resume_from_checkpoint, checkpoints)
        check_launch()
        accumulation = gradient_accumulation(training)
        targets = lora_targets(self.model, self.lora.lora_target_modules) if self.use_lora else []
        if not self.use_lora and any(p.dtype == torch.float16 for p in self.model.parameters()):
            raise PrunellmError("full fine-tuning of float16 weights has no loss scaler: load the model in float32 or bfloat16")
        examples = training_data(self.tokenizer, data, training.seed)
        teacher = self._teacher()
        model = self._trainable(targets)
        args = training_arguments(out, training, self.tracking, accumulation, bool(examples.validation), self.device, checkpoints)
        trainer = self._trainer(model, args, examples, teacher)
        use_cache = getattr(self.model.config, "use_cache", None)
        self.model.config.use_cache = False  # no KV cache while training
        for config in (self.model.config, getattr(self.model, "generation_config", None)):
            if config is not None:  # the pad id the batches use (saved with the model)
                config.pad_token_id = self.tokenizer.pad_token_id

        cache = self._teacher_cache(trainer, examples)
        before = trainer.evaluate()["eval_loss"] if examples.validation and resume is None else None
        tokens_at_start = json.loads((Path(resume) / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0) if resume else 0
        result = trainer.train(resume_from_checkpoint=resume)
        after = trainer.evaluate()["eval_loss"] if examples.validation else None

        runtime = result.metrics.get("train_runtime", 0.0)
        tokens = trainer.state.num_input_tokens_seen - tokens_at_start
        metrics: dict[str, Any] = {
            "method": "lora" if self.use_lora else "full",
            "train_loss": result.training_loss,
            "eval_loss_before": before,
            "eval_loss": after,
            "steps": trainer.state.global_step,
            "train_tokens": tokens,
            "train_seconds": round(runtime, 3),
            "tokens_per_second": round(tokens / runtime, 2) if runtime else None,
            # distillation's teacher pass before training (outside train_seconds), and tokens/s counting it
            "teacher_cache_seconds": round(cache.seconds, 3) if cache else None,
            "teacher_cache_bytes": cache.nbytes if cache else None,
            "tokens_per_second_with_cache": round(tokens / (runtime + cache.seconds), 2) if cache and runtime else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "bf16": args.bf16,
            "processes": args.world_size,
            "gradient_accumulation_steps": accumulation,
            "lora_target_modules": targets,
            "data": examples.source,
            "output_dir": str(final_path(out)),  # where it is once a temporary output folder is renamed
            "model_dir": None,
            "adapter_dir": None,
            "evaluation": None,
        }
        self.model = self._save(trainer, out, checkpoints, metrics, evaluation, use_cache)
        return metrics

    # -- steps of finetune() --

    def _teacher(self) -> nn.Module | None:
        # distillation is on when a teacher is given (``teacher`` or ``distill_from``) and its weight is not 0
        if self.distill is None or self.distill.distill_alpha == 0 or (self.teacher is None and not self.distill.distill_from):
            return None
        teacher = self.teacher
        if teacher is None:
            from ..models import load_model

            teacher = load_model(self.distill.distill_from, flag="--distill_from")
        if teacher.config.vocab_size != self.model.config.vocab_size:
            raise PrunellmError(
                f"--distill_from has a vocabulary of {teacher.config.vocab_size}, the model {self.model.config.vocab_size}: "
                "distil from the model this one was pruned from"
            )
        self.teacher = teacher
        return teacher

    def _teacher_cache(self, trainer: Trainer, examples: TrainingData):
        """One teacher pass over the training windows, reused by every epoch (or the cache of an earlier run on them)."""
        if not isinstance(trainer, DistillTrainer) or not self.distill.distill_cache or not self.distill.distill_top_k:
            return None
        key = (self.distill.distill_top_k, self.distill.distill_temperature, self.distill.distill_cache_dtype, id(trainer.teacher),
               hash(tuple(tuple(e["input_ids"]) + (-1,) + tuple(e["labels"]) for e in examples.train)))  # fmt: skip
        if self.teacher_cache is not None and self.teacher_cache_key == key:  # e.g. LoRA then full on the same data
            log.info("reusing the teacher cache of the previous run on the same windows")
            trainer.teacher_cache = replace(self.teacher_cache, seconds=0.0)  # this run paid nothing for it
            return trainer.teacher_cache
        self.teacher_cache, self.teacher_cache_key = trainer.build_teacher_cache(examples.train), key
        return self.teacher_cache

    def _trainable(self, targets: list[str]) -> nn.Module:
        if not self.use_lora:
            self.model.requires_grad_(True)
            return self.model
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=self.lora.lora_r,
            lora_alpha=self.lora.lora_alpha,
            lora_dropout=self.lora.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(self.training.seed)  # the adapters' initialisation
        return get_peft_model(self.model, config)

    def _trainer(self, model: nn.Module, args: TrainingArguments, examples: TrainingData, teacher: nn.Module | None) -> Trainer:
        from datasets import Dataset

        kwargs: dict[str, Any] = dict(
            model=model,
            args=args,
            # distillation keys its teacher cache by the example's index, which the collator passes through
            train_dataset=Dataset.from_list([{**e, EXAMPLE_INDEX: i} for i, e in enumerate(examples.train)] if teacher is not None else examples.train),
            eval_dataset=Dataset.from_list(examples.validation) if examples.validation else None,
            data_collator=PadCollator(self.tokenizer.pad_token_id),
            processing_class=self.tokenizer,
            callbacks=[_LogAndStopOnNan(), *self.callbacks],
        )
        trainer = DistillTrainer(teacher=teacher, distill=self.distill, **kwargs) if teacher is not None else Trainer(**kwargs)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_Progress)
        return trainer

    def _save(
        self, trainer: Trainer, out: Path, checkpoints: Path, metrics: dict[str, Any], evaluation: EvalOptions | None, use_cache
    ) -> PreTrainedModel:
        """Adapter, merged model, evaluation and metrics into ``out`` (main process only); return the merged model."""
        main = trainer.is_world_process_zero()
        if main and checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # the Trainer makes it even when it saves nothing
        if main and self.use_lora:  # the adapter alone, before merging it away
            with atomic_dir(out / "lora_adapter") as tmp:
                trainer.model.save_pretrained(tmp)
            metrics["adapter_dir"] = str(final_path(out / "lora_adapter"))
        merged = trainer.model.merge_and_unload() if self.use_lora else trainer.model
        merged.config.use_cache = use_cache
        if main:
            save_model(merged, self.tokenizer, out / "model")
            metrics["model_dir"] = str(final_path(out / "model"))
            log.info("saved the fine-tuned model to %s", metrics["model_dir"])
            if evaluation is not None:
                merged.eval()
                metrics["evaluation"] = evaluate(merged, self.tokenizer, evaluation, model_path=metrics["model_dir"])
                save_results(metrics["evaluation"], out / "evaluation_results.json")
            write_json_atomic(out / "finetune_results.json", metrics)
        trainer.accelerator.wait_for_everyone()  # the other processes wait until the files are there
        return merged
