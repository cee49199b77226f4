"""Training data for recovery fine-tuning: Alpaca instructions or windows of plain text, tokenized with labels.

Every example is ``{"input_ids", "attention_mask", "labels"}`` without padding; :class:`PadCollator` pads a
batch on the right with the tokenizer's pad token (a real pad token, or EOS), mask 0 and label −100, so padding
never enters the loss. Prompt tokens of instructions get label −100 unless ``train_on_inputs``.

Validation never overlaps training: instructions are split by row; plain text trains on random windows of a
source's *train* part and validates on the first windows of its *eval* part (a local file, which has one part
only, is split by position: its last tokens are held out).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..bigbench import bigbench_dir
from ..data import (
    BUILTIN_SOURCES,
    _read_records,
    describe_source,
    equal_shares,
    leading_special_tokens,
    load_text,
    mixture_parts,
    random_windows,
    sample_calibration,
    tokenize_text,
)
from ..errors import PrunellmError
from ..evaluation import eval_tokens
from ..options import FinetuneData
from ..paths import cache_dir, write_text_atomic

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# the Stanford Alpaca / alpaca-lora prompt template, with and without an input
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

NATURAL_INSTRUCTIONS = "bigbench_natural_instructions"
NATURAL_INSTRUCTIONS_PER_TASK = 200


@dataclass
class TrainingData:
    """Tokenized training and validation examples and where they came from."""

    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]
    source: dict[str, Any]


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (everything before the response) for one example."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# --- offline instruction data ------------------------------------------------------------------------------


def build_natural_instructions(per_task: int = NATURAL_INSTRUCTIONS_PER_TASK, seed: int = 0) -> Path:
    """Write an Alpaca-format JSON from BIG-bench ``natural_instructions`` subtasks into the cache (once).

    ``task_prefix`` → ``instruction``, an example's ``input`` → ``input``, its (first) ``target`` → ``output``;
    ``per_task`` examples of each of the 61 subtasks, drawn with ``seed``. The source files carry the BIG-bench
    canary: a model tuned on this set must never be scored on BIG-bench tasks.

    Returns:
        The path of the JSON file (a list of ``{"instruction", "input", "output"}`` records).
    """
    path = cache_dir() / "instructions" / f"{NATURAL_INSTRUCTIONS}_{per_task}_{seed}.json"
    if path.is_file():
        return path
    root = bigbench_dir() / "natural_instructions"
    records: list[dict[str, str]] = []
    for task_file in sorted(root.glob("*/task.json")):
        task = json.loads(task_file.read_text(encoding="utf-8"))
        instruction = (task.get("task_prefix") or task.get("description") or "").strip()
        rows = []
        for example in task.get("examples", []):
            target = example.get("target")
            output = target[0] if isinstance(target, list) and target else target
            if instruction and isinstance(output, str) and output.strip():
                rows.append({"instruction": instruction, "input": str(example.get("input", "")).strip(), "output": output.strip()})
        records += random.Random(f"{seed}:{task_file.parent.name}").sample(rows, min(per_task, len(rows)))
    if not records:
        raise PrunellmError(f"--data_path {NATURAL_INSTRUCTIONS}: no natural_instructions subtasks under {root}")
    log.info("wrote %d instruction examples from %s (BIG-bench canary: never score on BIG-bench after tuning on them)", len(records), root)
    write_text_atomic(path, json.dumps(records, ensure_ascii=False) + "\n")
    return path


# name -> builder of a local Alpaca JSON file
INSTRUCTION_SETS: dict[str, Callable[[], Path]] = {NATURAL_INSTRUCTIONS: build_natural_instructions}


# --- instructions ------------------------------------------------------------------------------------------


def load_instruction_records(data_path: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Read Alpaca rows from a registered name, a local .json/.jsonl file, or a hub dataset; check every row.

    Raises:
        PrunellmError: Unreadable data, or a row without a text ``instruction`` or ``output`` (named by row).
    """
    if data_path in INSTRUCTION_SETS:
        path = INSTRUCTION_SETS[data_path]()
        rows, source = _read_records(path, "--data_path"), {"kind": "builtin", "name": data_path, "file": str(path)}
    elif Path(data_path).expanduser().exists():
        path = Path(data_path).expanduser()
        if not path.is_file() or path.suffix.lower() not in (".json", ".jsonl"):
            raise PrunellmError(f"--data_path '{data_path}' is not a .json or .jsonl file of Alpaca records")
        try:
            rows = _read_records(path, "--data_path")
        except json.JSONDecodeError as exc:
            raise PrunellmError(f"--data_path '{data_path}' is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
        source = {"kind": "local", "file": str(path.resolve())}
    else:
        rows, source = _load_hub_rows(data_path), {"kind": "hub", "hub_id": data_path, "split": "train"}
    return [_check_row(row, index, data_path) for index, row in enumerate(rows, start=1)], source


def _load_hub_rows(name: str) -> list[dict]:
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise PrunellmError(
            f"--data_path '{name}' is neither a file nor a hub dataset id: give a .json/.jsonl file, "
            f"a hub name like yahma/alpaca-cleaned, or one of {', '.join(INSTRUCTION_SETS)}"
        )
    try:
        import datasets

        return datasets.load_dataset(name, split="train").to_list()
    except Exception as exc:  # offline, gated, moved: all mean the same here
        raise PrunellmError(
            f"--data_path '{name}' could not be loaded from the Hugging Face hub ({type(exc).__name__}): "
            f"use a local .json/.jsonl file or --data_path {NATURAL_INSTRUCTIONS} (offline)"
        ) from exc


def _check_row(row: Any, index: int, data_path: str) -> dict[str, str]:
    if not isinstance(row, dict):
        raise PrunellmError(f"--data_path '{data_path}' row {index} is a {type(row).__name__}, not an object with instruction/input/output")
    for field in ("instruction", "output"):
        if not isinstance(row.get(field), str):
            got = "missing" if field not in row else f"a {type(row[field]).__name__}"
            raise PrunellmError(
                f"--data_path '{data_path}' row {index}: field '{field}' is {got} (keys: {', '.join(sorted(row)) or 'none'}); "
                "every row needs text 'instruction' and 'output' ('input' is optional)"
            )
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise PrunellmError(f"--data_path '{data_path}' row {index}: field 'input' is a {type(extra).__name__}, not text")
    return {"instruction": row["instruction"], "input": extra, "output": row["output"]}


def tokenize_instructions(tokenizer: Any, rows: list[dict[str, str]], options: FinetuneData) -> list[dict[str, list[int]]]:
    """Prompt + response token ids cut to ``cutoff_len``; prompt labels −100 unless ``train_on_inputs``.

    The prompt is tokenized with the tokenizer's special tokens (BOS where the family uses one) and the
    response without, so the prompt/response boundary is exact. Examples left without a response token after
    the cut (no trainable token) are dropped.
    """
    prompts = tokenizer([alpaca_prompt(r["instruction"], r["input"]) for r in rows], add_special_tokens=True)["input_ids"]
    responses = tokenizer([r["output"] for r in rows], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if options.add_eos_token else []
    examples = []
    for prompt, response in zip(prompts, responses):
        ids = (prompt + response + eos)[: options.cutoff_len]
        labels = (prompt if options.train_on_inputs else [IGNORE_INDEX] * len(prompt)) + response + eos
        labels = labels[: options.cutoff_len]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            continue  # no trainable token left after the cut (the first label is never predicted)
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


def instruction_data(tokenizer: Any, options: FinetuneData, seed: int) -> TrainingData:
    """Alpaca rows split into train/validation by a seeded shuffle, then tokenized."""
    rows, source = load_instruction_records(options.data_path)
    if options.val_set_size >= len(rows):
        raise PrunellmError(f"--val_set_size {options.val_set_size} leaves no training rows: --data_path has {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = len(rows) - options.val_set_size
    train = tokenize_instructions(tokenizer, [rows[i] for i in order[:cut]], options)
    validation = tokenize_instructions(tokenizer, [rows[i] for i in order[cut:]], options)
    if not train:
        raise PrunellmError(
            f"--cutoff_len {options.cutoff_len} leaves no training example: every prompt of --data_path is at least "
            f"that many tokens, so no trainable token remains; raise --cutoff_len"
        )
    if len(train) < cut:
        log.warning("--cutoff_len %d dropped %d of %d training examples (prompt too long)", options.cutoff_len, cut - len(train), cut)
    source.update(rows=len(rows), train_examples=len(train), validation_examples=len(validation), template="alpaca")
    return TrainingData(train, validation, source)


# --- plain text --------------------------------------------------------------------------------------------


def _windows_as_examples(windows: torch.Tensor) -> list[dict[str, list[int]]]:
    return [{"input_ids": w, "attention_mask": [1] * len(w), "labels": w} for w in windows.tolist()]


def _text_part(tokenizer: Any, name: str, n: int, length: int, seed: int, val_windows: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train windows, validation windows, where each came from) of one source (not a mixture).

    A built-in source validates on the first windows of its eval part; any other text holds out its tail, so no
    validation token is ever trained on.
    """
    prefix = leading_special_tokens(tokenizer)
    if name in BUILTIN_SOURCES:
        train = sample_calibration(tokenizer, name, n, length, seed, flag="--dataset_name")
        held_out = eval_tokens(tokenizer, name) if val_windows else torch.empty(0, dtype=torch.long)
        source = {"train": describe_source(name, "train", flag="--dataset_name"), "validation": describe_source(name, "eval", flag="--dataset_name")}
    else:
        tokens = tokenize_text(tokenizer, load_text(name, "train", flag="--dataset_name"))
        held = min(val_windows * length, tokens.numel() // 2)
        train_part, held_out = tokens[: tokens.numel() - held], tokens[tokens.numel() - held :]
        if train_part.numel() < length + 1:
            raise PrunellmError(f"--dataset_name '{name}' has {tokens.numel()} tokens: too short for --seq_len {length}")
        train = random_windows(train_part, n, length, seed, prefix)
        source = {"train": describe_source(name, "train", flag="--dataset_name"), "validation": f"last {held} tokens (never trained on)"}
    # validation: (n_val, seq_len), non-overlapping, each opening with the same leading special tokens as training's
    text_len = length - len(prefix)
    n_val = min(val_windows, held_out.numel() // text_len)
    validation = held_out[: n_val * text_len].reshape(n_val, text_len)
    if prefix:
        validation = torch.cat([torch.tensor(prefix, dtype=validation.dtype).expand(n_val, -1), validation], 1)
    return train, validation, source


def text_data(tokenizer: Any, options: FinetuneData, seed: int) -> TrainingData:
    """Random windows of a source's train part and validation windows held out from it.

    A mixture ``a+b`` takes an equal share of the training and of the validation windows from each part, each
    part validated on its own held-out text.
    """
    name, n, length = options.dataset_name, options.num_samples, options.seq_len
    parts = mixture_parts(name, "--dataset_name")
    if n < len(parts):
        raise PrunellmError(f"--dataset_name '{name}' mixes {len(parts)} texts, but --num_samples is {n}: use at least {len(parts)}")
    pieces = [
        _text_part(tokenizer, part, n_part, length, seed, val_part)
        for part, n_part, val_part in zip(parts, equal_shares(n, len(parts)), equal_shares(options.val_set_size, len(parts)))
    ]
    train, validation = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    source = pieces[0][2] if len(parts) == 1 else {"mixture": parts, "parts": [p[2] for p in pieces]}
    source.update(kind="text", num_samples=n, seq_len=length, validation_windows=len(validation))
    return TrainingData(_windows_as_examples(train), _windows_as_examples(validation), source)


def training_data(tokenizer: Any, options: FinetuneData, seed: int) -> TrainingData:
    """Instructions when ``data_path`` is set, plain text otherwise."""
    if options.data_path:
        return instruction_data(tokenizer, options, seed)
    return text_data(tokenizer, options, seed)


# --- batching ----------------------------------------------------------------------------------------------


@dataclass
class PadCollator:
    """Right-pad a batch: pad id for inputs, 0 in the attention mask, −100 in labels (never in the loss)."""

    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
            "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
        }  # each (B, T)
        for row, example in enumerate(examples):
            for key in batch:
                values = example[key]
                batch[key][row, : len(values)] = torch.as_tensor(values, dtype=torch.long)
        if "example_index" in examples[0]:  # distillation's key into its teacher cache, (B,)
            batch["example_index"] = torch.tensor([e["example_index"] for e in examples], dtype=torch.long)
        return batch
