"""Recovery data: the Alpaca template, prompt masking, padding outside the loss, held-out validation, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from prunellm.data import load_text
from prunellm.errors import PrunellmError
from prunellm.finetune import NATURAL_INSTRUCTIONS, alpaca_prompt, build_natural_instructions
from prunellm.finetune.data import (
    IGNORE_INDEX,
    PadCollator,
    instruction_data,
    load_instruction_records,
    text_data,
    tokenize_instructions,
)
from prunellm.finetune.engine import gradient_accumulation, lora_targets, report_to, resolve_checkpoint, use_bf16
from prunellm.models import load_tokenizer
from prunellm.options import FinetuneData, TrackingOptions, TrainOptions

ROWS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def test_alpaca_template_with_and_without_input():
    assert alpaca_prompt("Do it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo it.\n\n### Response:\n"
    )
    assert alpaca_prompt("Do it.", "this") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo it.\n\n### Input:\nthis\n\n### Response:\n"
    )


def test_prompt_tokens_are_masked_unless_train_on_inputs(tokenizer):
    masked = tokenize_instructions(tokenizer, ROWS, FinetuneData())
    for row, example in zip(ROWS, masked):
        prompt = tokenizer(alpaca_prompt(row["instruction"], row["input"]))["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert example["input_ids"] == prompt + response
        assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response
    everything = tokenize_instructions(tokenizer, ROWS, FinetuneData(train_on_inputs=True, add_eos_token=False))
    assert all(e["labels"] == e["input_ids"] and e["input_ids"][-1] != tokenizer.eos_token_id for e in everything)
    short = tokenize_instructions(tokenizer, ROWS, FinetuneData(cutoff_len=45))
    assert all(len(e["input_ids"]) == len(e["labels"]) <= 45 for e in short)


def test_padding_is_masked_and_never_changes_the_loss(tokenizer):
    model = make_tiny_model("llama", vocab_size=len(tokenizer)).eval()
    examples = tokenize_instructions(tokenizer, ROWS, FinetuneData())
    tight = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=1)([examples[0]])
    padded = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=64)([examples[0]])
    batch = PadCollator(tokenizer.pad_token_id)(examples)
    assert tokenizer.pad_token_id not in (None, 0) or tokenizer.pad_token == tokenizer.eos_token
    assert padded["input_ids"].shape[1] == 64 > tight["input_ids"].shape[1]
    for b in (padded, batch):
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        assert (b["attention_mask"][:, 0] == 1).all()  # right padding: real tokens first
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).loss, model(**tight).loss, rtol=1e-5, atol=1e-5)


def test_text_validation_never_overlaps_training(tokenizer, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(load_text("shakespeare", "eval")[:30_000])
    data = text_data(tokenizer, FinetuneData(dataset_name=str(text), num_samples=64, seq_len=32, val_set_size=8), seed=0)
    tokens = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    held = tokens[-8 * 32 :]
    assert [t for e in data.validation for t in e["input_ids"]] == held
    head = tokens[: len(tokens) - len(held)]
    joined = " ".join(map(str, head))
    assert len(data.train) == 64 and all(" ".join(map(str, e["input_ids"])) in joined for e in data.train[:8])
    assert all(e["labels"] == e["input_ids"] for e in data.train)


def test_a_mixture_validates_each_part_on_its_own_held_out_tail(tokenizer, tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    text = load_text("shakespeare", "eval")
    first.write_text(text[:20_000])
    second.write_text(text[40_000:60_000])
    options = FinetuneData(dataset_name=f"{first}+{second}", num_samples=10, seq_len=32, val_set_size=5)
    data = text_data(tokenizer, options, seed=0)
    validation = [e["input_ids"] for e in data.validation]
    assert len(data.train) == 10 and len(validation) == 5
    for path, n_train, n_val, train, held in ((first, 5, 3, data.train[:5], validation[:3]), (second, 5, 2, data.train[5:], validation[3:])):
        tokens = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
        assert [t for w in held for t in w] == tokens[-n_val * 32 :]  # this part's own tail
        head = " ".join(map(str, tokens[: len(tokens) - n_val * 32]))
        assert len(train) == n_train and all(" ".join(map(str, e["input_ids"])) in head for e in train)
    assert data.source["mixture"] == [str(first), str(second)] and len(data.source["parts"]) == 2
    with pytest.raises(PrunellmError, match=r"--dataset_name .* mixes 2 texts, but --num_samples is 1"):
        text_data(tokenizer, options.model_copy(update={"num_samples": 1}), seed=0)


def test_natural_instructions_become_an_alpaca_file(requires_bigbench, tokenizer):
    path = build_natural_instructions(per_task=2)
    records = json.loads(path.read_text())
    assert len(records) > 100 and set(records[0]) == {"instruction", "input", "output"}
    assert records[0]["instruction"].startswith("Definition:") and records[0]["output"]
    rows, source = load_instruction_records(NATURAL_INSTRUCTIONS)  # the registered name
    assert source["name"] == NATURAL_INSTRUCTIONS and len(rows) > 1000
    data = instruction_data(tokenizer, FinetuneData(data_path=str(path), val_set_size=10, cutoff_len=512), seed=0)
    assert len(data.validation) <= 10 and len(data.train) > 90


# --- bad input: one line naming the flag or the file ------------------------------------------------------------


def test_rows_without_instruction_or_output_are_named(tmp_path):
    path = tmp_path / "any name.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [ROWS[0], ROWS[1], {"instruction": "x", "input": ""}]))
    with pytest.raises(PrunellmError, match=r"row 3: field 'output' is missing"):
        load_instruction_records(str(path))
    other = tmp_path / "data.json"
    other.write_text(json.dumps([{"output": "y"}]))
    with pytest.raises(PrunellmError, match=r"row 1: field 'instruction' is missing"):
        load_instruction_records(str(other))


def test_cutoff_that_leaves_nothing_is_refused(tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS * 4))
    with pytest.raises(PrunellmError, match="--cutoff_len 8 leaves no training example"):
        instruction_data(tokenizer, FinetuneData(data_path=str(path), cutoff_len=8, val_set_size=2), seed=0)
    with pytest.raises(PrunellmError, match="--val_set_size 12 leaves no training rows"):
        instruction_data(tokenizer, FinetuneData(data_path=str(path), val_set_size=12), seed=0)


def test_batch_sizes_lora_targets_checkpoints_and_trackers_are_checked(tmp_path):
    with pytest.raises(PrunellmError, match="--micro_batch_size 3 does not divide --batch_size 8"):
        gradient_accumulation(TrainOptions(batch_size=8, micro_batch_size=3))
    with pytest.raises(PrunellmError, match="× 2 processes"):
        gradient_accumulation(TrainOptions(batch_size=9, micro_batch_size=3), world_size=2)
    assert gradient_accumulation(TrainOptions(batch_size=16, micro_batch_size=2), world_size=2) == 4
    model = make_tiny_model("qwen3")
    assert lora_targets(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(PrunellmError, match=r"c_attn match no linear module.*it has down_proj, gate_proj, k_proj, lm_head"):
        lora_targets(model, "q_proj,c_attn")
    with pytest.raises(PrunellmError, match="--resume_from_checkpoint '.*nowhere' does not exist"):
        resolve_checkpoint(str(tmp_path / "nowhere"), tmp_path / "checkpoints")
    with pytest.raises(PrunellmError, match="--resume_from_checkpoint last: no complete checkpoint-N folder"):
        resolve_checkpoint("last", tmp_path / "checkpoints")
    assert report_to(TrackingOptions()) == "none"
    assert use_bf16("fp32") is False and use_bf16("auto") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
