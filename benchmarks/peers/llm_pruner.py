"""LLM-Pruner (Ma et al., NeurIPS 2023, https://github.com/horseee/LLM-Pruner) run from its own code on our model.

``prune`` runs ``main`` of the pinned checkout's ``llama3.py`` (its grouped-query-attention script) with
``--block_wise --pruner_type taylor --taylor param_first``: its vendored ``LLMPruner.torch_pruning`` traces the
model, groups each layer's KV heads (``k_proj`` roots, consecutive ``head_dim`` channels, query heads and o_proj
columns following through the ``repeat_kv`` expand) and MLP channels (``gate_proj`` roots) in the layers
``[start, end)``, scores them by first-order Taylor importance of one backward pass over the calibration
windows, and removes ``--pruning_ratio`` of each root's channels uniformly. Nothing in its code is patched; what
its ``main`` reaches for is replaced in the module's namespace at run time (:func:`_adapted`), and why:

* ``LlamaForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` return our already loaded model
  (float32, CPU: ``--device cpu`` skips its ``model.half()``) and a copy of our tokenizer (it overwrites the
  tokenizer's pad token id);
* ``get_examples('bookcorpus', …)`` (a Hugging Face ``datasets`` download) returns our calibration windows;
* ``LoggerWithDepth`` (files under ``prune_log/``) logs to Python logging; ``PPLMetric`` (downloads WikiText-2
  and PTB) is skipped: the benchmark evaluates the pruned model itself;
* ``LLMPruner.models`` (its copies of old modeling files, which do not import under transformers 5) and
  ``LLMPruner.datasets`` are never imported;
* the model runs with ``use_cache=False`` (transformers 5 returns a ``DynamicCache`` its tracer cannot flatten)
  and eager attention while it traces (SDPA's ``enable_gqa`` path has no ``repeat_kv`` expand to follow from
  the KV heads to the query heads); the attention implementation is restored afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import math
import sys

import torch
from torch import nn

from benchmarks.peers import source

logger = logging.getLogger("benchmarks.peers.llm_pruner")
SCRIPT = "prunellm_peer_llm_pruner_llama3"
# llama3.py imports its package by this name (``import LLMPruner.torch_pruning as tp``)
PACKAGE = "LLMPruner"


def load_script(mirror: str | None = None):
    """LLM-Pruner's ``llama3.py`` as a module, its ``LLMPruner`` package imported from the pinned checkout."""
    folder = source.checkout("llm_pruner", mirror)
    if SCRIPT in sys.modules:
        return sys.modules[SCRIPT]
    # models/ and datasets/ are not needed by llama3.py's pruning path and need old transformers / downloads
    source.stub_module(f"{PACKAGE}.models", __path__=[])
    source.stub_module(f"{PACKAGE}.datasets", __path__=[])
    source.stub_module(f"{PACKAGE}.datasets.example_samples", get_examples=_no_examples)
    source.stub_module(f"{PACKAGE}.evaluator", __path__=[])
    source.stub_module(f"{PACKAGE}.evaluator.ppl", PPLMetric=_skip_ppl)
    package = source.import_package(PACKAGE, folder / PACKAGE)
    package.models = sys.modules[f"{PACKAGE}.models"]
    spec = importlib.util.spec_from_file_location(SCRIPT, folder / "llama3.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[SCRIPT] = module
    spec.loader.exec_module(module)
    return module


def _no_examples(*args, **kwargs):
    raise RuntimeError("LLM-Pruner's get_examples downloads bookcorpus: benchmarks.peers.llm_pruner passes calibration windows")


def _skip_ppl(*args, **kwargs) -> dict:
    return {}


class _Logger:
    """LLM-Pruner's ``LoggerWithDepth`` interface, on Python logging (no log folder)."""

    def __init__(self, *args, **kwargs):
        self.best_checkpoint_path = None

    def log(self, message) -> None:
        logger.info("%s", message)


@contextlib.contextmanager
def _adapted(script, model: nn.Module, tokenizer, windows: torch.Tensor):
    class _Model:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return model

    class _Tokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return copy.deepcopy(tokenizer)

    def get_examples(dataset, tokenizer, n_samples, seq_len=128):
        assert n_samples == len(windows), (n_samples, len(windows))
        return windows

    replaced = {"LlamaForCausalLM": _Model, "AutoTokenizer": _Tokenizer, "get_examples": get_examples,
                "LoggerWithDepth": _Logger, "PPLMetric": _skip_ppl}  # fmt: skip
    saved = {name: getattr(script, name) for name in replaced}
    saved_memory = torch.cuda.memory_allocated
    attention = model.config._attn_implementation
    use_cache = model.config.use_cache
    for name, value in replaced.items():
        setattr(script, name, value)
    torch.cuda.memory_allocated = lambda *args, **kwargs: 0  # its last log line; raises on a CPU-only build
    model.config.use_cache = False
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(script, name, value)
        torch.cuda.memory_allocated = saved_memory
        model.config.use_cache = use_cache
        model.set_attn_implementation(attention)


def arguments(ratio: float, num_examples: int, layer_start: int, layer_end: int, seed: int = 42) -> argparse.Namespace:
    """llama3.py's parsed command line for ``--block_wise --pruner_type taylor --taylor param_first`` on the CPU."""
    return argparse.Namespace(
        base_model="(in memory)", save_ckpt_log_name="prunellm_benchmark", pruning_ratio=ratio, pruner_type="taylor",
        temperature=1.0, top_p=0.95, max_seq_len=128, channel_wise=False, block_wise=True, layer_wise=False, layer=12,
        block_attention_layer_start=layer_start, block_attention_layer_end=layer_end,
        block_mlp_layer_start=layer_start, block_mlp_layer_end=layer_end, iterative_steps=1, grouping_strategy="sum",
        global_pruning=False, taylor="param_first", num_examples=num_examples, device="cpu", test_before_train=False,
        eval_device="cpu", test_after_train=False, seed=seed, save_model=False,
        torch_version=float(".".join(torch.__version__.split(".")[:2])),
    )  # fmt: skip


def layer_range(num_layers: int) -> tuple[int, int]:
    """The pruned layers ``[start, end)``: its README's Llama-3 recipe (4 to 30 of 32 layers) scaled to the model,
    i.e. the first 4 and the last 2 layers untouched (4 to 28 of SmolLM2's 30)."""
    return 4, num_layers - 2


def prune(model: nn.Module, tokenizer, windows: torch.Tensor, ratio: float, *, mirror: str | None = None,
          seed: int = 42, layers: tuple[int, int] | None = None) -> None:  # fmt: skip
    """Prune ``model`` in place with LLM-Pruner's ``llama3.py`` at ``--pruning_ratio ratio``; its gradients are cleared.

    ``layers``: the pruned layers ``[start, end)`` (default :func:`layer_range`)."""
    script = load_script(mirror)
    start, end = layers or layer_range(model.config.num_hidden_layers)
    args = arguments(ratio, len(windows), start, end, seed)
    with _adapted(script, model, tokenizer, windows):
        script.main(args)
    model.zero_grad(set_to_none=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()


def removed_params(config, ratio: float, layers: tuple[int, int] | None = None) -> int:
    """Parameters llama3.py at ``--pruning_ratio ratio`` removes, from the config.

    In each layer of :func:`layer_range` its local pruner removes ``n − int(n · (1 − ratio))`` of each root's
    ``n`` output channels, rounded down to whole ``head_dim`` groups for ``k_proj`` (KV heads, each taking its
    query heads and o_proj columns along) and channel by channel for ``gate_proj`` (with up_proj rows and
    down_proj columns).
    """
    hidden, head_dim = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    kv_channels = kv * head_dim
    heads = (kv_channels - int(kv_channels * (1 - ratio))) // head_dim
    channels = config.intermediate_size - int(config.intermediate_size * (1 - ratio))
    start, end = layers or layer_range(config.num_hidden_layers)
    return (end - start) * (heads * hidden * head_dim * (2 * group + 2) + channels * 3 * hidden)


def describe() -> dict:
    peer = source.PEERS["llm_pruner"]
    return {"repository": peer.url, "commit": peer.commit, "patch": None,
            "settings": "llama3.py --block_wise --pruner_type taylor --taylor param_first (layers 4–28, one backward "
                        "pass over the calibration windows)"}  # fmt: skip


__all__ = ["arguments", "describe", "layer_range", "load_script", "prune", "removed_params"]
_ = math
