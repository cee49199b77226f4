"""Typed options: one field per option with its default and one-line help; the CLI is generated from them.

What to run (recipes: pruning, evaluation) is kept apart from how to run it (:class:`RunOptions`: device,
dtype, seed, output folder). Every model is strict (``extra="forbid"``): a misspelt key fails at load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator



class _Options(BaseModel):
    """A strict option group. A field whose type is itself an option group nests that group; its flags stay flat
    (``--dataset`` sets ``calibration.dataset``), and so do the keys a recipe file or a constructor may give."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # group field -> {field of the group: (flag, help)}: the group's fields that get a flag, under another name
    # (only where a flat flag would collide, e.g. recovery's --finetune_num_samples); other groups expose every field
    group_flags: ClassVar[dict[str, dict[str, tuple[str, str]]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = _renamed_options(cls, data)
        groups = option_groups(cls)
        if not groups or not isinstance(data, dict):
            return data
        flags = option_flags(cls)
        out: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            # a mapping under a group's name is the group (`allocation: {…}`); anything else under a flag's name is
            # that flag (`--allocation layerwise` sets allocation.allocation)
            grouped = key in groups and isinstance(value, (dict, BaseModel))
            path = flags[key].path if key in flags and not grouped else (key,)
            if len(path) == 1:
                out[key] = value
            else:
                nested.setdefault(path[0], {})[path[1]] = value
        for name in groups:
            given, flat = out.get(name), nested.get(name, {})
            if given is not None and not isinstance(given, (dict, BaseModel)):
                continue  # not a mapping: the group's own validation says so
            if isinstance(given, BaseModel) and not flat:
                continue  # a built group stays as it is (also on assignment, validate_assignment)
            explicit = given.model_fields_set if isinstance(given, BaseModel) else set(given or {})
            twice = sorted(explicit & set(flat))
            if twice:
                raise ValueError(f"'{twice[0]}' is given both flat and in group '{name}': give it once")
            if given is None and not flat:
                continue
            if isinstance(given, BaseModel):  # a built group is complete: flat keys change some of it
                out[name] = {**given.model_dump(), **flat}
            else:  # a partial group keeps what this parent's default sets (recovery trains shorter than `finetune`)
                default = cls.model_fields[name].get_default(call_default_factory=True)
                out[name] = {**default.model_dump(exclude_unset=True), **(given or {}), **flat}
        return out

    def flat(self) -> dict[str, Any]:
        """``{flag: value}`` of every flag, in ``--help`` order (what plan.json records as the recipe)."""
        out = {}
        for flag, entry in option_flags(type(self)).items():
            value: Any = self
            for part in entry.path:
                value = getattr(value, part)
            out[flag] = value
        return out

    def replace(self, **changes: Any):
        """A validated copy with some options changed, named by flag (``recipe.replace(importance_method="wanda")``)."""
        data = self.model_dump()
        flags = option_flags(type(self))
        for key, value in changes.items():
            path = flags[key].path if key in flags else (key,)
            target = data
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
        return type(self).model_validate(data)


# options renamed for what they are, old name -> new name: the old flag and key still work (recipes, plans, scripts)
RENAMED_OPTIONS: dict[str, str] = {
    "taylor_num_samples": "calibration_num_samples",  # the windows of every criterion's scoring pass, not Taylor's only
    "taylor_seq_len": "calibration_seq_len",
}


def _renamed_options(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with old option names (:data:`RENAMED_OPTIONS`) under their new names, where ``cls`` has them."""
    known = set(cls.model_fields) | set(option_flags(cls))
    out = dict(data)
    for old, new in RENAMED_OPTIONS.items():
        if old in out and new in known:
            if new in out:
                raise ValueError(f"'{old}' is the old name of '{new}': give one of them")
            out[new] = out.pop(old)
    return out


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
        False, description="score (units, layers, ablation priors), slice, reconstruct and save with one decoder layer at a time on --device, read from the model's safetensors shards"
    )
    offload_dir: str | None = Field(None, description="with --offload: keep per-layer hidden states (and the ablation priors' branches) in this folder, not in memory; a crashed gradient scoring run given the same folder resumes where it stopped")


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
    ppl_bos: Literal["auto", "never"] = Field(
        "auto", description="auto: the tokenizer's leading special tokens (its BOS, if it adds one) before every window, as context; never: none (LLM-Pruner's protocol)"
    )
    zeroshot_tasks: str = Field(
        "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
        description="comma-separated lm-eval tasks; offline (data from PyPI, no hub): offline_word_analogies, offline_wordnet_definitions",
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
# the flat flag names of the option models (the command line's flags: cli.py builds argparse from them)


@dataclass(frozen=True)
class Flag:
    """One command-line flag of an option model: where its value lives and how ``--help`` shows it."""

    path: tuple[str, ...]  # ("dataset",) or ("calibration", "dataset")
    annotation: Any
    default: Any
    help: str
    section: str | None  # the nested group whose --help section it is in (None: the model's own section)


def option_groups(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The nested option groups of ``model``: field name -> group model."""
    return {
        name: field.annotation for name, field in model.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }  # fmt: skip


@functools.cache
def option_flags(model: type[BaseModel]) -> dict[str, Flag]:
    """Every flag of ``model`` in declaration order, nested groups' fields included (flat names)."""
    groups = option_groups(model)
    renamed = getattr(model, "group_flags", {})
    flags: dict[str, Flag] = {}
    for name, field in model.model_fields.items():
        if name not in groups:
            flags[name] = Flag((name,), field.annotation, field.default, field.description or "", None)
            continue
        default = field.get_default(call_default_factory=True)
        exposed = renamed.get(name) or {sub: (sub, None) for sub in groups[name].model_fields}
        for sub, (flag, help_text) in exposed.items():
            inner = groups[name].model_fields[sub]
            section = None if name in renamed else name
            flags[flag] = Flag((name, sub), inner.annotation, getattr(default, sub), help_text or inner.description or "", section)
    return flags


def _at_least_one(cls, value):
    if value is not None and value < 1:
        raise ValueError("must be at least 1")
    return value


def _auto_or_number(value, message: str) -> Union[float, Literal["auto"]]:
    """``"auto"`` (any case) or the value as a float; ``message`` is the error otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(message) from None


def _auto_or_non_negative(value, message: str) -> Union[float, Literal["auto"]]:
    """:func:`_auto_or_number`, refusing negative numbers with the same ``message``."""
    number = _auto_or_number(value, message)
    if number != "auto" and number < 0:
        raise ValueError(message)
    return number


def _not_negative(cls, value):
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


AUTO_ROUNDS = 2
"""Rounds of ``--iterative_steps auto``. Two beat one at 20 % and 30 % on SmolLM2 with the loss prior (issue 17
ablation) and on Gemma 3 270M at 5 % and 7.5 % (issue 39: without a prior, Shakespeare ÷ FLAP 0.835 / 0.831 in
two rounds against 0.915 / 0.918 in one); on SmolLM2 at 20 % with the Fisher prior one round was as good."""


class BudgetOptions(_Options):
    """How much is removed, and which unit kinds and layers may lose parameters."""

    pruning_ratio: float = Field(0.2, description="fraction of the model's TOTAL parameters to remove, in (0, 1)")
    units: str = Field("mlp_channel", description="comma-separated unit kinds that may be pruned: mlp_channel, kv_group")
    freeze_first_n_layers: int = Field(0, description="never prune the first N layers")
    freeze_last_n_layers: int = Field(0, description="never prune the last N layers")
    layer_start: int = Field(0, description="first layer that may be pruned")
    layer_end: int | None = Field(None, description="one past the last layer that may be pruned (default: all)")
    iterative_steps: int | Literal["auto"] = Field(
        "auto", description="prune in N rounds of equal steps of the ratio, each scoring (priors, T, refit included) the model the previous round left; auto: 2 (1 with --offload)"
    )

    _layers_not_negative = field_validator("freeze_first_n_layers", "freeze_last_n_layers", "layer_start")(_not_negative)

    @field_validator("iterative_steps", mode="before")
    @classmethod
    def _steps(cls, value):
        if value == "auto":
            return value
        try:
            steps = int(value)
        except (TypeError, ValueError):
            steps = 0
        if steps < 1 or str(steps) != str(value).strip():
            raise ValueError("must be auto or a whole number of rounds, at least 1")
        return steps

    def rounds(self, offload: bool = False) -> int:
        """``iterative_steps`` resolved: ``auto`` is :data:`AUTO_ROUNDS` in memory, 1 with ``--offload`` (one
        streamed pass over the shards)."""
        if self.iterative_steps == "auto":
            return 1 if offload else AUTO_ROUNDS
        return self.iterative_steps

    @field_validator("pruning_ratio")
    @classmethod
    def _ratio(cls, value):
        if not 0.0 < value < 1.0:
            raise ValueError("must be a fraction strictly between 0 and 1")
        return value

    @field_validator("units")
    @classmethod
    def _units(cls, value):
        from .units import UNIT_KINDS

        kinds = split_list(value)
        if not kinds or any(kind not in UNIT_KINDS for kind in kinds):
            raise ValueError(f"is not valid: use a comma-separated subset of {', '.join(UNIT_KINDS)}")
        return value


class ScoringOptions(_Options):
    """The importance criterion that scores every index of every unit."""

    importance_method: str = Field("fluctuation", description="criterion: taylor, taylor_2nd, taylor_mix, magnitude, wanda, fluctuation, obs, random (or one registered by a user)")
    magnitude_norm: Literal["l1", "l2"] = Field("l2", description="norm of the magnitude criterion")

    @field_validator("importance_method")
    @classmethod
    def _criterion(cls, value):
        from .criteria import REGISTRY  # the registry, so a criterion registered by a user is valid here too

        if value not in REGISTRY:
            raise ValueError(f"is not a criterion: use one of {', '.join(REGISTRY)}")
        return value


class CalibrationOptions(_Options):
    """Calibration windows of the scoring passes and the layer/block ablations (train part, never eval text)."""

    dataset: str = Field(
        "shakespeare", description="calibration text: shakespeare, wikitext2, ptb, c4, a local file/folder, or a mixture a+b"
    )
    calibration_num_samples: int = Field(128, description="calibration windows of the scoring pass, for every criterion (old name: --taylor_num_samples)")
    calibration_seq_len: int = Field(128, description="tokens per calibration window, scoring and the priors' ablations (old name: --taylor_seq_len)")
    gradient_batch_size: int = Field(4, description="calibration windows per forward(+backward) pass")
    # 8 windows each (was 16): half the prior's time; over three pairs (SmolLM2 at 20 %, two seeds; Gemma 3 at 5 %)
    # no worse on the peer table's texts (README, issue 39), Spearman 0.98-0.99 of Δ against 16 windows'
    layer_importance_num_samples: int = Field(8, description="calibration windows for the layer ablation prior")
    block_importance_num_samples: int = Field(8, description="calibration windows for the block ablation prior")
    use_gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")

    _positive = field_validator("calibration_num_samples", "calibration_seq_len", "gradient_batch_size",
                                "layer_importance_num_samples", "block_importance_num_samples")(_at_least_one)  # fmt: skip


class PriorOptions(_Options):
    """Layer/block Δloss priors (H-GSP) that scale every unit's score."""

    temperature: Union[float, Literal["auto"]] = Field(
        "auto", description="layer/block prior exponent T: 0 = no prior (skips the ablation passes), a number > 0, or auto "
        "(the T at which the prior's spread between blocks matches the scores' spread within a block)"
    )
    tau: Union[float, Literal["auto"]] = Field(
        "auto", description="prior switch: layer Δ below tau uses the layer prior, else the block's; auto, a number, inf, -inf"
    )
    prior_measure: Literal["loss", "kl", "fisher"] = Field(
        "kl", description="what Δ of a removed layer or block measures on the calibration windows: loss (the rise of the "
        "next-token loss, clamped at 0), kl (the mean KL divergence of the next-token distributions from the dense "
        "model's: the same rise in expectation over the vocabulary, lower variance), fisher (that KL to second order, "
        "every block from one forward and two backward passes a batch instead of a partial forward per ablation: about "
        "10x faster, as good on SmolLM2, worse on Gemma 3; in memory only)"
    )
    prior_positions: int = Field(
        32, description="with --prior_measure kl: the KL of every ablation is averaged over this many evenly spaced "
        "positions of each window (the LM head and softmax run on those only; the layers on all); 0 = every position"
    )

    prior_dtype: Literal["weights", "bfloat16"] = Field(
        "weights", description="with --prior_measure kl or loss: the dtype the ablations' layers compute in: weights (the "
        "model's own) or bfloat16 (measured on SmolLM2 on this CPU: 1.9x faster, layer and MLP Δ ranked the same, "
        "Spearman 0.998 and 0.9996 against float32, each Δ within 4 percent)"
    )
    prior_rounds: Literal["first", "every"] = Field(
        "first", description="with --iterative_steps above 1: measure the prior on the model of every round, or on the "
        "first round's (the unpruned model's) only and reuse its multipliers in the later rounds (one measurement instead "
        "of one a round; every round still scores, selects and refits the model it is given)"
    )

    _positions = field_validator("prior_positions")(_not_negative)

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value):
        return _auto_or_non_negative(value, "is not valid: use 0 (off), a number > 0 or auto")

    @field_validator("tau", mode="before")
    @classmethod
    def _tau(cls, value):
        return _auto_or_number(value, "is not valid: use auto, a number, inf or -inf")


class SelectionOptions(_Options):
    """How importance is compared across blocks, and what every pruned layer must keep."""

    normalization: Literal["none", "block", "layer", "standard", "block_standard", "uniform"] = Field(
        "uniform", description="divide importance/cost by its block's (or layer's) mean before global ranking; standard: "
        "z-score per unit kind over all layers; block_standard: z-score per block (FLAP AL-AM); uniform: percentile in its block"
    )
    min_kv_groups: int = Field(1, description="KV groups every layer keeps (0 allows removing a whole attention block)")
    round_to: int = Field(1, description="kept MLP channels per layer are a multiple of N")
    deploy_target: Literal[
        "any", "hf", "vllm", "llamacpp:f32", "llamacpp:f16", "llamacpp:q8_0", "llamacpp:q4_0", "llamacpp:q5_0",
        "llamacpp:q4_k_m", "llamacpp:q5_k_m", "llamacpp:q6_k",
    ] = Field(
        "any", description="where the model runs (prunellm/export/targets.py): any, hf; vllm: prune only what vLLM's "
        "nemotron-nas serves (MLP channels, whole attention blocks with --min_kv_groups 0); llamacpp:<type>: kept MLP "
        "widths are multiples of the GGUF type's block (32 for q8_0/q4_0/q5_0, 256 for q4_k_m/q5_k_m/q6_k), with --round_to by lcm"
    )

    _kv_not_negative = field_validator("min_kv_groups")(_not_negative)
    _round_positive = field_validator("round_to")(_at_least_one)


class ReconstructionOptions(_Options):
    """Retraining-free compensation of o_proj/down_proj after pruning, and its calibration windows."""

    reconstruct: Literal["none", "bias", "lstsq", "lstsq_bias"] = Field(
        "lstsq_bias", description="retraining-free compensation of o_proj/down_proj after pruning: none, bias (FLAP), lstsq, "
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
    reconstruct_target: Literal["pruned", "dense", "residual"] = Field(
        "pruned", description="what each refit preserves: pruned (the projection's own output on the pruned model's "
        "inputs), dense (the dense model's projection output), residual (the dense model's residual stream: corrects "
        "the error of earlier layers too)"
    )
    reconstruct_select: str = Field(
        "auto", description="which units each layer loses: plan (the criterion's), fluctuation (the plan's count per "
        "layer, the units of lowest fluctuation re-measured on the pruned model's inputs, layer by layer), obs (the "
        "plan's count per layer, chosen by greedy OBS on the pruned model's inputs, each removal followed by the "
        "optimal refit; lstsq modes), or one registered by a user; auto = the re-selection that measures the "
        "criterion again (fluctuation for fluctuation), else plan"
    )

    @field_validator("reconstruct_select")
    @classmethod
    def _reselection(cls, value):
        from .criteria import RESELECTIONS  # the registry, so a re-selection registered by a user is valid here too

        if value not in ("auto", "plan", *RESELECTIONS):
            raise ValueError(f"is not valid: use one of {', '.join(('auto', 'plan', *RESELECTIONS))}")
        return value

    _positive = field_validator("reconstruct_num_samples", "reconstruct_seq_len")(_at_least_one)

    @field_validator("reconstruct_damp", mode="before")
    @classmethod
    def _damp(cls, value):
        return _auto_or_non_negative(value, "must be auto or a number ≥ 0")


class AllocationOptions(_Options):
    """How the budget is spread over layers: one global ranking, or per-layer rates from layer importance."""

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

    _top_not_negative = field_validator("freeze_top_n_layers")(_not_negative)

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


class PruneRecipe(_Options):
    """What to prune and how (global structured pruning).

    One typed group per pipeline step (``recipe.calibration``, ``recipe.budget`` …); each step receives only its
    group. The flags, a recipe file and the constructor also take the options flat (``PruneRecipe(dataset="c4")``).
    """

    base_model: str = Field("smollm2-135m", description="smollm2-135m, a local model directory, or a hub id")
    output_name: str = Field("", description="run name; results go to <output_dir>/<output_name>/ (default: derived)")
    plan: str | None = Field(None, description="replay this plan.json on the original weights instead of scoring")
    run_evaluation: str = Field("", description="evaluate before and after pruning, e.g. ppl (empty: none)")
    budget: BudgetOptions = Field(default_factory=BudgetOptions)
    scoring: ScoringOptions = Field(default_factory=ScoringOptions)
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    priors: PriorOptions = Field(default_factory=PriorOptions)
    selection: SelectionOptions = Field(default_factory=SelectionOptions)
    allocation: AllocationOptions = Field(default_factory=AllocationOptions)
    reconstruction: ReconstructionOptions = Field(default_factory=ReconstructionOptions)


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
        None, description="continue an interrupted run: 'last' (the newest checkpoint in <output_dir>.finetune_checkpoints, "
        "kept there while a run goes) or a checkpoint-N path"
    )
    skip_evaluation: bool = Field(False, description="do not evaluate the fine-tuned model afterwards")
    trust_pickle: bool = Field(False, description="allow importing a legacy pickled .bin model (runs code from it)")
    overwrite: bool = Field(False, description="replace an existing output folder")


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
    distill_top_k: int = Field(
        64, ge=0, description="KL over the teacher's k likeliest tokens + the rest mass; 0: the full KL, teacher run on every batch"
    )
    distill_cache: bool = Field(True, description="run the teacher once per training window before training and reuse it (top-k > 0)")
    distill_cache_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of the cached teacher log-probabilities")


class FinetuneOptions(_Options):
    """Recovery fine-tuning right after pruning, in the same process (into <run>/finetuned/).

    The data and training settings are ``prunellm finetune``'s own groups (:class:`FinetuneData`,
    :class:`TrainOptions`) with a shorter default run; their ``--finetune_*`` flags are listed in ``group_flags``.
    The LoRA settings (--lora_r, --lora_alpha, --lora_dropout, --lora_target_modules) and tracking
    (--report_to, --wandb_project, --logging_steps) are the same option groups as ``prunellm finetune``'s.
    """

    finetune: bool = Field(False, description="fine-tune the pruned model, then evaluate it again")
    finetune_method: Literal["lora", "full"] = Field("lora", description="LoRA adapters (merged) or full-parameter training")
    data: FinetuneData = Field(default_factory=lambda: FinetuneData(num_samples=256, val_set_size=32))
    training: TrainOptions = Field(default_factory=lambda: TrainOptions(num_epochs=1.0, batch_size=16, save_steps=0))
    finetune_distill_alpha: float = Field(0.0, ge=0, le=1, description="> 0: distil from the unpruned --base_model with this KL weight")
    finetune_resume_from_checkpoint: str | None = Field(
        None, description="continue an interrupted run's fine-tuning: 'last' or a checkpoint-N folder of <output_name>.finetune_checkpoints"
    )

    group_flags: ClassVar[dict[str, dict[str, tuple[str, str]]]] = {
        "data": {
            "data_path": ("finetune_data_path", "Alpaca data (hub name, .json/.jsonl, bigbench_natural_instructions); empty = plain text"),
            "dataset_name": ("finetune_dataset", "plain text for language modelling when --finetune_data_path is empty"),
            "num_samples": ("finetune_num_samples", "plain text: training windows"),
            "seq_len": ("finetune_seq_len", "plain text: tokens per window"),
            "val_set_size": ("finetune_val_set_size", "held-out examples or eval-part windows for the validation loss"),
        },
        "training": {
            "num_epochs": ("finetune_epochs", "passes over the training data"),
            "max_steps": ("finetune_max_steps", "stop after N optimizer steps (overrides --finetune_epochs)"),
            "learning_rate": ("finetune_learning_rate", "peak learning rate"),
            "batch_size": ("finetune_batch_size", "examples per optimizer step"),
            "micro_batch_size": ("finetune_micro_batch_size", "examples per forward pass"),
            "save_steps": ("finetune_save_steps", "checkpoint every N steps into <output_dir>/<output_name>.finetune_checkpoints "
                           "(kept there if the run is interrupted, moved into <run>/finetuned/checkpoints when it succeeds; 0 = none)"),
            "save_total_limit": ("finetune_save_total_limit", "checkpoints kept"),
        },
    }  # fmt: skip


class ExportOptions(_Options):
    """What to export, in which serving format, and where."""

    model: str = Field("smollm2-135m", description="a prunellm results folder, a model directory, smollm2-135m, or a hub id")
    format: Literal["gguf", "vllm"] = Field(
        "gguf", description="gguf: one file for llama.cpp / Ollama; vllm: a nemotron-nas folder (config + safetensors) for vLLM"
    )
    output: str = Field("export", description="folder that receives the exported model")
    outtype: Literal["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"] = Field(
        "f16", description="weight matrices as f32, f16, q8_0 or llama.cpp's K-quant mixes q4_k_m, q5_k_m, q6_k (quantized "
        "by llama.cpp's own kernels, needs xllamacpp: the types llama-quantize chooses per tensor); every type but f32 "
        "and f16 is gguf only; norms and biases stay f32"
    )
    overwrite: bool = Field(False, description="replace an existing output folder (vllm) or .gguf file")
