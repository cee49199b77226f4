"""FLAP (An et al., AAAI 2024, https://github.com/CASIA-IVA-Lab/FLAP) run from its own code on our model.

``prune`` calls FLAP's ``lib.prune.prune_flap`` of the pinned checkout (``source.PEERS["flap"]``) on a
transformers-5 ``LlamaForCausalLM`` in float32 on the CPU. What differs from FLAP's ``main.py``, and why:

* ``flap.patch`` (applied to the checkout): FLAP hard-codes 128-wide heads of multi-head attention (LLaMA-1) and
  prunes the same rows of q, k and v. On a grouped-query model the removable attention unit is one KV group
  (1 KV head + its ``num_key_value_groups`` query heads: 3 × 64 = 192 o_proj columns on SmolLM2), so the patch
  scores groups of ``head_dim × num_key_value_groups`` columns, counts groups instead of ``num_heads``, and keeps
  q rows / o_proj columns by the group mask and k/v rows by the KV-head mask. Its fp16 copy of the mean inputs
  (used for the bias compensation) keeps the model's dtype instead (float32 here).
* at run time (:func:`_adapted`): ``lib.data`` (Hugging Face ``datasets`` downloads) is never imported and
  ``get_loaders`` returns our calibration windows; ``Tensor.cuda`` is the identity (FLAP sorts on the GPU); each
  decoder layer gets ``position_embeddings`` from ``model.model.rotary_emb`` when FLAP calls it without them
  (transformers 5 computes rotary embeddings once in the model; FLAP calls the layers directly), of the layer's
  attention type where the model has one per type (Gemma 3: sliding / full).
* its ``get_llm`` loads FLAP's copy of the LLaMA modeling file, whose only change is a bias in ``o_proj`` and
  ``down_proj`` (zero-initialised, filled by the compensation): :func:`add_zero_biases` does the same to our model.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
from pathlib import Path

import torch
from torch import nn

from benchmarks.peers import source

PACKAGE = "prunellm_peer_flap"


def load_prune_module(mirror: str | None = None):
    """FLAP's ``lib/prune.py`` from the pinned, patched checkout (its ``lib.data`` replaced by a stub)."""
    folder = source.checkout("flap", mirror)
    source.import_package(PACKAGE, folder)
    source.import_package(f"{PACKAGE}.lib", folder / "lib")
    source.stub_module(f"{PACKAGE}.lib.data", get_loaders=_no_loaders)
    return source.import_module(f"{PACKAGE}.lib.prune")


def _no_loaders(*args, **kwargs):
    raise RuntimeError("FLAP's data loaders download their corpora: benchmarks.peers.flap passes calibration windows")


def add_zero_biases(model: nn.Module) -> None:
    """A zero bias on every ``o_proj`` and ``down_proj`` (FLAP's modeling file builds them; its compensation fills them)."""
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            linear = getattr(parent, name)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))


@contextlib.contextmanager
def _adapted(prune_module, model: nn.Module, windows: torch.Tensor):
    """FLAP's environment on our CPU model: calibration windows, no CUDA, rotary embeddings for each layer."""

    def get_loaders(name, nsamples, seed, seqlen, tokenizer):
        # FLAP's loader returns (trainloader, testenc): a list of (input ids (1, seqlen), targets) pairs
        assert nsamples == len(windows) and seqlen == windows.shape[1], (nsamples, seqlen, tuple(windows.shape))
        return [(w.unsqueeze(0), None) for w in windows], None

    # Gemma 3's rotary embedding has one frequency set per attention type (sliding / full): the layer's own
    rotary = model.model.rotary_emb
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    layer_types = getattr(model.config, "layer_types", None)

    def add_position_embeddings(index: int):
        def hook(module, args, kwargs):
            if kwargs.get("position_embeddings") is None:
                hidden = args[0] if args else kwargs["hidden_states"]  # (1, T, hidden)
                positions = kwargs.get("position_ids")
                if positions is None:
                    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
                extra = (layer_types[index],) if per_type else ()
                kwargs["position_embeddings"] = rotary(hidden, positions, *extra)
            return args, kwargs

        return hook

    handles = [layer.register_forward_pre_hook(add_position_embeddings(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    saved_cuda, saved_loaders = torch.Tensor.cuda, prune_module.get_loaders
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    prune_module.get_loaders = get_loaders
    try:
        yield
    finally:
        torch.Tensor.cuda = saved_cuda
        prune_module.get_loaders = saved_loaders
        for handle in handles:
            handle.remove()


def prune(model: nn.Module, windows: torch.Tensor, ratio: float, *, metrics: str = "WIFV", structure: str = "UL-UM",
          mirror: str | None = None, seed: int = 0) -> None:  # fmt: skip
    """Prune ``model`` in place with FLAP's ``prune_flap`` at its ``--pruning_ratio ratio``, bias compensation on.

    Args:
        windows: ``(num_samples, seq_len)`` calibration token ids (FLAP's ``--nsamples`` = ``num_samples``).
        ratio: FLAP's ``--pruning_ratio`` (per layer for ``UL-UM``; see :func:`removed_params` for what it removes).
    """
    prune_module = load_prune_module(mirror)
    torch.manual_seed(seed)
    add_zero_biases(model)
    model.seqlen = windows.shape[1]  # set by FLAP's get_llm
    args = argparse.Namespace(pruning_ratio=ratio, metrics=metrics, structure=structure, nsamples=len(windows),
                              remove_heads=-1, unstr=False, seed=seed)  # fmt: skip
    model.eval()
    with _adapted(prune_module, model, windows):
        prune_module.prune_flap(args, model, tokenizer=None, device=torch.device("cpu"))
    del model.seqlen


def removed_params(config, ratio: float) -> int:
    """Parameters FLAP ``UL-UM`` at ``--pruning_ratio ratio`` removes (net of the biases it adds), from the config.

    Per layer it keeps the scores ``>=`` the ``int(ratio · n)``-th smallest of ``n``: ``int(ratio · kv_heads)``
    KV groups and ``int(ratio · intermediate)`` MLP channels go (ties aside), and it adds a bias of ``hidden`` to
    o_proj and down_proj.
    """
    hidden, head_dim = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    per_group = hidden * head_dim * (2 * group + 2)  # q rows + o_proj columns (group heads each), k and v rows
    per_channel = 3 * hidden  # gate and up rows, down column
    per_layer = math.floor(ratio * kv) * per_group + math.floor(config.intermediate_size * ratio) * per_channel - 2 * hidden
    return config.num_hidden_layers * per_layer


def describe() -> dict:
    peer = source.PEERS["flap"]
    return {"repository": peer.url, "commit": peer.commit, "patch": f"benchmarks/peers/{peer.patch}",
            "settings": "--prune_method flap --metrics WIFV --structure UL-UM (bias compensation)"}  # fmt: skip


__all__ = ["add_zero_biases", "describe", "load_prune_module", "prune", "removed_params"]
_ = Path
