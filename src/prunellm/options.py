"""Typed options: one field per option with its default and one-line help; the CLI is generated from them.

What to run (recipes: pruning, evaluation) is kept apart from how to run it (:class:`RunOptions`: device,
dtype, seed, output folder). Every model is strict (``extra="forbid"``): a misspelt key fails at load.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PrunellmError


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunOptions(_Options):
    """How to run: hardware, numerics, randomness and where results go."""

    output_dir: str = Field("results", description="parent folder; the run is written to <output_dir>/<output_name>/")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, or auto (accelerate device_map='auto' over all GPUs)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype while scoring (accumulation is always float32)"
    )
    seed: int = Field(42, description="seed for calibration sampling and random scores")
    overwrite: bool = Field(False, description="replace an existing output folder")
    offload: bool = Field(
        False, description="score, slice, reconstruct and save with one decoder layer at a time on --device, read from the model's safetensors shards"
    )
    offload_dir: str | None = Field(None, description="with --offload: keep per-layer hidden states in this folder, not in memory; a crashed gradient scoring run given the same folder resumes where it stopped")


class EvalOptions(_Options):
    """What to evaluate."""

    metrics: str = Field("ppl", description="comma-separated metrics: ppl, zeroshot, speed, memory")
    ppl_datasets: str = Field(
        "shakespeare", description="comma-separated evaluation texts: shakespeare, wikitext2, ptb, c4 or local files"
    )
    ppl_protocols: str = Field("128,2048/512", description="comma-separated window[/stride] protocols, e.g. 128,2048/512")
    ppl_seq_len: int | None = Field(None, description="shorthand for one non-overlapping protocol of this window length")
    ppl_max_windows: int | None = Field(None, description="score only the first N windows of each protocol (quick checks)")
    ppl_batch_size: int = Field(4, description="windows per forward pass")
    zeroshot_tasks: str = Field(
        "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
        description="comma-separated lm-eval tasks; offline: bigbench_strategyqa, bigbench_wikihow_step, bigbench_social_iqa",
    )
    num_fewshot: int = Field(0, description="in-context examples per zero-shot question (0 = zero-shot)")
    limit: int | None = Field(None, description="score only the first N examples of each zero-shot task (quick checks)")
    zeroshot_batch_size: int = Field(8, description="lm-eval requests per forward pass")
    zeroshot_include_path: str | None = Field(None, description="extra folder of lm-eval task YAMLs (local JSON/JSONL data)")
    speed_batch_sizes: str = Field("1,4", description="comma-separated batch sizes for speed and memory")
    speed_prompt_tokens: int = Field(128, description="prompt length of the speed/memory runs")
    speed_new_tokens: int = Field(32, description="greedy tokens generated per speed/memory run")
    speed_repeats: int = Field(3, description="timed runs per measurement (the median is kept)")
    speed_warmup: int = Field(1, description="untimed warm-up runs per batch size")
    compare_base: str | None = Field(None, description="also measure speed/memory of this dense model in the same run, with ratios")

    @field_validator("ppl_seq_len")
    @classmethod
    def _positive_seq_len(cls, value):
        if value is not None and value <= 0:
            raise ValueError("must be a positive number of tokens")
        return value

    @field_validator("ppl_max_windows", "ppl_batch_size", "limit", "zeroshot_batch_size", "speed_prompt_tokens",
                     "speed_repeats")
    @classmethod
    def _positive(cls, value):
        if value is not None and value <= 0:
            raise ValueError("must be at least 1")
        return value

    @field_validator("num_fewshot", "speed_warmup")
    @classmethod
    def _zero_or_more(cls, value):
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    @field_validator("speed_new_tokens")
    @classmethod
    def _decode_steps(cls, value):
        if value < 2:
            raise ValueError("must be at least 2 (the first token is prefill, the rest decode)")
        return value

    def protocol_names(self) -> list[str]:
        """The protocols to run (``--ppl_seq_len`` overrides ``--ppl_protocols``)."""
        if self.ppl_seq_len is not None:
            return [str(self.ppl_seq_len)]
        return [p.strip() for p in self.ppl_protocols.split(",") if p.strip()]


def split_list(value: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in str(value).split(",") if item.strip()]


# ---------------------------------------------------------------------------------------------------------------
# argparse generated from the option models


def parse_bool(text: str) -> bool:
    """Accept the seed's ``--flag True`` / ``--flag False`` as well as a bare ``--flag``."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel], title: str | None = None) -> None:
    """Add one ``--field`` per field of ``model`` (help and default from the field)."""
    group = parser.add_argument_group(title or model.__name__, (model.__doc__ or "").strip().splitlines()[0])
    for name, field in model.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        help_text = field.description or ""
        default = field.default
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if annotation is bool:
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif annotation in (int, float, str):
            kwargs.update(type=annotation)
        else:
            kwargs.update(type=str)
        group.add_argument(f"--{name}", help=f"{help_text} (default: {default})", **kwargs)


def build_options(model: type[BaseModel], namespace: argparse.Namespace) -> BaseModel:
    """Instantiate ``model`` from the parsed flags that belong to it; errors name the flag."""
    values = {name: getattr(namespace, name) for name in model.model_fields if hasattr(namespace, name)}
    try:
        return model(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = f"--{error['loc'][0]}" if error.get("loc") else model.__name__
        raise PrunellmError(f"{flag} {values.get(error['loc'][0], '') if error.get('loc') else ''}: {error['msg'].removeprefix('Value error, ')}") from None


class PruneRecipe(_Options):
    """What to prune and how (global structured pruning)."""

    base_model: str = Field("smollm2-135m", description="smollm2-135m, a local model directory, or a hub id")
    output_name: str = Field("", description="run name; results go to <output_dir>/<output_name>/ (default: derived)")
    pruning_ratio: float = Field(0.2, description="fraction of the model's TOTAL parameters to remove, in (0, 1)")
    importance_method: str = Field("taylor", description="criterion: taylor, taylor_2nd, taylor_mix, magnitude, wanda, fluctuation, obs, random (or one registered by a user)")
    magnitude_norm: Literal["l1", "l2"] = Field("l2", description="norm of the magnitude criterion")
    units: str = Field("kv_group,mlp_channel", description="comma-separated unit kinds that may be pruned")
    normalization: Literal["none", "block", "layer", "standard", "block_standard", "uniform"] = Field(
        "block", description="divide importance/cost by its block's (or layer's) mean before global ranking; standard: "
        "z-score per unit kind over all layers; block_standard: z-score per block (FLAP AL-AM); uniform: percentile in its block"
    )
    dataset: str = Field(
        "shakespeare", description="calibration text: shakespeare, wikitext2, ptb, c4, a local file/folder, or a mixture a+b"
    )
    taylor_num_samples: int = Field(128, description="calibration windows for scoring")
    taylor_seq_len: int = Field(128, description="tokens per calibration window")
    gradient_batch_size: int = Field(4, description="calibration windows per forward(+backward) pass")
    temperature: float = Field(0.0, description="layer/block prior exponent T (0 = no prior, skips the ablation passes)")
    tau: Union[float, Literal["auto"]] = Field(
        "auto", description="prior switch: layer Δ below tau uses the layer prior, else the block's; auto, a number, inf, -inf"
    )
    layer_importance_num_samples: int = Field(16, description="calibration windows for the layer ablation prior")
    block_importance_num_samples: int = Field(16, description="calibration windows for the block ablation prior")
    freeze_first_n_layers: int = Field(0, description="never prune the first N layers")
    freeze_last_n_layers: int = Field(0, description="never prune the last N layers")
    layer_start: int = Field(0, description="first layer that may be pruned")
    layer_end: int | None = Field(None, description="one past the last layer that may be pruned (default: all)")
    min_kv_groups: int = Field(1, description="KV groups every layer keeps (0 allows removing a whole attention block)")
    round_to: int = Field(1, description="kept MLP channels per layer are a multiple of N")
    deploy_target: Literal["any", "vllm"] = Field(
        "any", description="vllm: prune only what vLLM's nemotron-nas serves: MLP channels, whole attention blocks (with --min_kv_groups 0)"
    )
    use_gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    reconstruct: Literal["none", "bias", "lstsq", "lstsq_bias"] = Field(
        "lstsq", description="retraining-free compensation of o_proj/down_proj after pruning: none, bias (FLAP), lstsq, "
        "lstsq_bias (lstsq with the bias refitted as an intercept)"
    )
    reconstruct_dataset: str | None = Field(
        None, description="calibration text for reconstruction (default: --dataset); a mixture a+b generalises best"
    )
    reconstruct_num_samples: int = Field(64, description="calibration windows for reconstruction")
    reconstruct_seq_len: int = Field(128, description="tokens per reconstruction window")
    reconstruct_damp: Union[float, Literal["auto"]] = Field(
        "auto", description="ridge damping of the lstsq refit toward the original weights, relative to mean(diag XᵀX); "
        "auto = chosen per projection by 2-fold cross-validation on the calibration batches"
    )
    plan: str | None = Field(None, description="replay this plan.json on the original weights instead of scoring")
    allocation: Literal["global", "layerwise"] = Field(
        "global", description="global importance/cost ranking, or per-layer rates from layer importance (layer_pruning.py)"
    )
    layer_importance_method: Literal["removal", "activation"] = Field(
        "removal", description="layerwise: layer importance from removal Δloss or relative activation change"
    )
    pruning_strategy: Literal["inverse", "proportional", "uniform"] = Field(
        "inverse", description="layerwise: inverse = less important layers lose more; proportional; uniform"
    )
    layer_importance_weight: float = Field(1.0, description="layerwise: exponent applied to normalised layer importance")
    min_pruning_rate: float = Field(0.0, description="layerwise: lowest per-layer pruning rate")
    max_pruning_rate: float = Field(0.9, description="layerwise: highest per-layer pruning rate")
    freeze_top_n_layers: int = Field(0, description="layerwise: never prune the last (top) N layers")
    pruning_distribution: str = Field(
        "auto", description="layerwise: attention:MLP split of each layer's removed parameters, e.g. 1:3; auto = by their sizes"
    )
    run_evaluation: str = Field("", description="evaluate before and after pruning, e.g. ppl (empty: none)")

    @field_validator("pruning_ratio")
    @classmethod
    def _ratio(cls, value):
        if not 0.0 < value < 1.0:
            raise ValueError("must be a fraction strictly between 0 and 1")
        return value

    @field_validator("taylor_num_samples", "taylor_seq_len", "gradient_batch_size", "round_to",
                     "layer_importance_num_samples", "block_importance_num_samples",
                     "reconstruct_num_samples", "reconstruct_seq_len")
    @classmethod
    def _at_least_one(cls, value):
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("freeze_first_n_layers", "freeze_last_n_layers", "layer_start", "min_kv_groups", "freeze_top_n_layers")
    @classmethod
    def _not_negative(cls, value):
        if value < 0:
            raise ValueError("must be 0 or more")
        return value


    @field_validator("min_pruning_rate", "max_pruning_rate")
    @classmethod
    def _rate(cls, value):
        if not 0.0 <= value <= 1.0:
            raise ValueError("must lie in [0, 1]")
        return value

    @field_validator("max_pruning_rate")
    @classmethod
    def _max_not_below_min(cls, value, info):
        low = info.data.get("min_pruning_rate")
        if low is not None and value < low:
            raise ValueError(f"is below --min_pruning_rate {low}: give a maximum at least as large as the minimum")
        return value

    @field_validator("importance_method")
    @classmethod
    def _criterion(cls, value):
        from .criteria import REGISTRY  # the registry, so a criterion registered by a user is valid here too

        if value not in REGISTRY:
            raise ValueError(f"is not a criterion: use one of {', '.join(REGISTRY)}")
        return value

    @field_validator("units")
    @classmethod
    def _units(cls, value):
        from .units import UNIT_KINDS

        kinds = split_list(value)
        if not kinds or any(kind not in UNIT_KINDS for kind in kinds):
            raise ValueError(f"is not valid: use a comma-separated subset of {', '.join(UNIT_KINDS)}")
        return value

    @field_validator("tau", mode="before")
    @classmethod
    def _tau(cls, value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("is not valid: use auto, a number, inf or -inf") from None

    @field_validator("pruning_distribution")
    @classmethod
    def _distribution(cls, value):
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            attention, mlp = (float(x) for x in text.split(":"))
        except ValueError:
            raise ValueError("is not valid: use A:M like 1:3, or auto") from None
        if attention < 0 or mlp < 0 or attention + mlp == 0:
            raise ValueError("needs non-negative parts, not both zero")
        return value

    @field_validator("reconstruct_damp", mode="before")
    @classmethod
    def _damp(cls, value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError("must be auto or a number ≥ 0") from None
        if number < 0:
            raise ValueError("must be auto or a number ≥ 0")
        return number


class LayersRecipe(_Options):
    """What depth pruning removes: whole decoder layers ranked by a layer importance criterion."""

    base_model: str = Field("smollm2-135m", description="smollm2-135m, a local model directory, or a hub id")
    output_name: str = Field("", description="run name; results go to <output_dir>/<output_name>/ (default: derived)")
    layer_importance_method: Literal["block_influence", "ppl", "taylor"] = Field(
        "block_influence", description="block_influence (1 − cos(in, out)), ppl (Δloss of removal) or taylor"
    )
    n_remove_layers: int | None = Field(None, description="number of decoder layers to remove")
    pruning_ratio: float | None = Field(None, description="or: fraction of total parameters (nearest whole number of layers)")
    iterative: bool = Field(False, description="re-score the remaining layers after each removal (SLEB style)")
    dataset: str = Field(
        "shakespeare", description="calibration text: shakespeare, wikitext2, ptb, c4, a local file/folder, or a mixture a+b"
    )
    num_samples: int = Field(32, description="calibration windows")
    seq_len: int = Field(128, description="tokens per calibration window")
    batch_size: int = Field(4, description="calibration windows per forward pass")
    freeze_first_n_layers: int = Field(0, description="never remove the first N layers")
    freeze_last_n_layers: int = Field(0, description="never remove the last N layers")
    run_evaluation: str = Field("", description="evaluate before and after, e.g. ppl (empty: none)")

    @field_validator("num_samples", "seq_len", "batch_size")
    @classmethod
    def _at_least_one(cls, value):
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("pruning_ratio")
    @classmethod
    def _ratio(cls, value):
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError("must be a fraction strictly between 0 and 1")
        return value


# ---------------------------------------------------------------------------------------------------------------
# recovery fine-tuning (prunellm.finetune): small groups, each one a section of `prunellm finetune --help`


class FinetuneTarget(_Options):
    """Which model to fine-tune, how, and where the results go."""

    pruned_model: str = Field(
        "", description="a prunellm results folder, a model directory, smollm2-135m, a hub id, or a legacy .bin (--trust_pickle)"
    )
    output_dir: str = Field("", description="results folder (default: results/<name>_finetuned)")
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters (merged at the end) or full-parameter training")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights dtype while training")
    resume_from_checkpoint: str | None = Field(
        None, description="continue from <output_dir>/checkpoints/checkpoint-N (a path) or 'last'"
    )
    skip_evaluation: bool = Field(False, description="do not evaluate the fine-tuned model afterwards")
    trust_pickle: bool = Field(False, description="allow importing a legacy pickled .bin model (runs code from it)")


class FinetuneData(_Options):
    """Training data: Alpaca instructions (--data_path) or windows of plain text (--dataset_name)."""

    data_path: str = Field(
        "", description="Alpaca data: a hub name (yahma/alpaca-cleaned), a local .json/.jsonl file, or "
        "bigbench_natural_instructions; empty = plain text from --dataset_name"
    )  # fmt: skip
    dataset_name: str = Field(
        "shakespeare",
        description="plain text: shakespeare, wikitext2, ptb, c4, a local file, or a mixture a+b (train part; validation "
        "from the eval part, a file's tail, each part's own for a mixture)",
    )
    num_samples: int = Field(500, ge=1, description="plain text: training windows drawn from the train part")
    seq_len: int = Field(128, ge=1, description="plain text: tokens per window")
    cutoff_len: int = Field(256, ge=1, description="instructions: tokens per example (longer ones are cut)")
    val_set_size: int = Field(200, ge=0, description="held-out examples (instructions) or eval-part windows (plain text); 0 = none")
    train_on_inputs: bool = Field(False, description="instructions: also train on the prompt (default: prompt tokens get label -100)")
    add_eos_token: bool = Field(True, description="instructions: end every response with the EOS token")


class LoraOptions(_Options):
    """LoRA adapters (peft), with --method lora (prunellm prune: --finetune_method lora)."""

    lora_r: int = Field(8, ge=1, description="rank of the LoRA update")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    lora_target_modules: str = Field(
        "", description="comma-separated module names (e.g. q_proj,v_proj); empty = every attention and MLP projection of the family"
    )


class TrainOptions(_Options):
    """Optimisation: how long, how fast, in which precision, how often to check and save."""

    num_epochs: float = Field(2.0, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps (overrides --num_epochs)")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(64, ge=1, description="examples per optimizer step, over all processes")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward pass and process (the rest is gradient accumulation)")
    warmup_steps: float = Field(0.05, ge=0, description="linear warm-up: a number of steps (>= 1) or a fraction of all steps (< 1)")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description="decay after warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 mixed precision where the GPU supports it, else fp32 (fp16 without a scaler is never used)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory, slower)")
    group_by_length: bool = Field(False, description="batch examples of similar length together (less padding)")
    eval_steps: int | None = Field(None, ge=1, description="validation loss every N steps (default: before and after training)")
    save_steps: int = Field(200, ge=0, description="checkpoint every N steps into <output_dir>/checkpoints (0 = none)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    seed: int = Field(42, description="seed of initialisation, data order, sampling and dropout")


class TrackingOptions(_Options):
    """Experiment tracking (off by default); a progress bar is always shown."""

    report_to: Literal["none", "wandb", "tensorboard"] = Field("none", description="where to send loss and learning rate")
    wandb_project: str = Field("", description="WandB project (sets WANDB_PROJECT; implies --report_to wandb)")
    logging_steps: int = Field(10, ge=1, description="log loss and learning rate every N steps")


class DistillOptions(_Options):
    """Knowledge distillation from the unpruned model: loss = (1 − α)·LM + α·T²·KL(teacher ‖ student)."""

    distill_from: str | None = Field(None, description="teacher (the unpruned base model): smollm2-135m, a directory or a hub id")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term, in [0, 1]")
    distill_temperature: float = Field(2.0, gt=0, description="softmax temperature of both logits")


class FinetuneOptions(_Options):
    """Recovery fine-tuning right after pruning, in the same process (into <run>/finetuned/).

    The LoRA settings (--lora_r, --lora_alpha, --lora_dropout, --lora_target_modules) and tracking
    (--report_to, --wandb_project, --logging_steps) are the same option groups as ``prunellm finetune``'s.
    """

    finetune: bool = Field(False, description="fine-tune the pruned model, then evaluate it again")
    finetune_method: Literal["lora", "full"] = Field("lora", description="LoRA adapters (merged) or full-parameter training")
    finetune_data_path: str = Field("", description="Alpaca data (hub name, .json/.jsonl, bigbench_natural_instructions); empty = plain text")
    finetune_dataset: str = Field("shakespeare", description="plain text for language modelling when --finetune_data_path is empty")
    finetune_num_samples: int = Field(256, ge=1, description="plain text: training windows")
    finetune_seq_len: int = Field(128, ge=1, description="plain text: tokens per window")
    finetune_val_set_size: int = Field(32, ge=0, description="held-out examples or eval-part windows for the validation loss")
    finetune_epochs: float = Field(1.0, gt=0, description="passes over the training data")
    finetune_max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps (overrides --finetune_epochs)")
    finetune_learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    finetune_batch_size: int = Field(16, ge=1, description="examples per optimizer step")
    finetune_micro_batch_size: int = Field(4, ge=1, description="examples per forward pass")
    finetune_distill_alpha: float = Field(0.0, ge=0, le=1, description="> 0: distil from the unpruned --base_model with this KL weight")
    finetune_save_steps: int = Field(
        0, ge=0, description="checkpoint every N steps into <output_dir>/<output_name>.finetune_checkpoints (kept there "
        "if the run is interrupted, moved into <run>/finetuned/checkpoints when it succeeds; 0 = none)"
    )  # fmt: skip
    finetune_save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    finetune_resume_from_checkpoint: str | None = Field(
        None, description="continue an interrupted run's fine-tuning: 'last' or a checkpoint-N folder of <output_name>.finetune_checkpoints"
    )


class ExportOptions(_Options):
    """What to export, in which serving format, and where."""

    model: str = Field("smollm2-135m", description="a prunellm results folder, a model directory, smollm2-135m, or a hub id")
    format: Literal["gguf", "vllm"] = Field(
        "gguf", description="gguf: one file for llama.cpp / Ollama; vllm: a nemotron-nas folder (config + safetensors) for vLLM"
    )
    output: str = Field("export", description="folder that receives the exported model")
    outtype: Literal["f32", "f16", "q8_0"] = Field(
        "f16", description="weight matrices as f32, f16 or q8_0 (q8_0: gguf only; norms and biases stay f32)"
    )
