"""Surgery and save streamed layer by layer: a Plan applied to a model that never exists whole in memory.

Each decoder layer of a :func:`~prunellm.offload.load_lazy` skeleton is read from the input shards onto the compute
device, sliced by the same surgery as the in-memory path (:func:`~prunellm.surgery.prune_units`; with
``reconstruct``, refitted by :func:`~prunellm.reconstruction.prune_with_reconstruction` on calibration hidden states
that flow through the already pruned layers, one layer boundary held at a time), written to the output
safetensors shard and dropped again; the skeleton keeps the pruned shapes (meta tensors), from which the config is
written. The embedding, final norm and head are copied tensor by tensor. The result is the checkpoint
:func:`~prunellm.checkpoint.save_model` writes for the in-memory pruned model: same tensor names, dtype and
config, loaded by :func:`prunellm.load_pruned` or transformers alike.

Memory: one decoder layer (or the embedding, or the head): output tensors go straight to disk, each shard's
header written last into room reserved at its front. With reconstruction, also one layer boundary's calibration
hidden states (twice with the ``dense``/``residual`` targets: the dense stream beside the pruned one) and one
projection's float64 Gram matrix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import UnitKey, batches_of
from .checkpoint import SHARD_BYTES, ShardWriter, finish_checkpoint
from .errors import PrunellmError
from .offload import Onloader, vocab_rows, buffers_on, is_lazy, layer_inputs, to_meta
from .paths import atomic_dir
from .plan import Plan
from .reconstruction import prune_with_reconstruction
from .specs import spec_for
from .surgery import prune_units, remove_layers
from .units import decoder_layers

log = logging.getLogger(__name__)

class _LayerStream:
    """``enter(i)``: decoder layer i read onto the device; ``exit(i)``: its (pruned) tensors to the output shard
    under its index after layer removal, then dropped (the skeleton keeps their shapes)."""

    def __init__(self, model: nn.Module, onloader: Onloader, writer: ShardWriter, removed: list[int]) -> None:
        self.spec = spec_for(model.config)
        self.layers = decoder_layers(model, self.spec)
        self.onloader, self.writer = onloader, writer
        kept = [i for i in range(len(self.layers)) if i not in set(removed)]
        self.new_index = {old: new for new, old in enumerate(kept)}

    def enter(self, index: int) -> None:
        self.onloader.materialize(self.layers[index])

    def exit(self, index: int) -> None:
        layer = self.layers[index]
        if index in self.new_index:
            for name, tensor in layer.state_dict(prefix=f"{self.spec.layers}.{self.new_index[index]}.").items():
                self.writer.add(name, tensor)
        to_meta(layer)


def save_pruned_streamed(
    model: nn.Module,
    plan: Plan,
    tokenizer,
    out_dir: str | Path,
    *,
    calibration: torch.Tensor | None = None,
    reconstruct: str = "none",
    damp: float | str = "auto",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    shard_bytes: int = SHARD_BYTES,
    select: str = "plan",
    target: str = "pruned",
) -> dict:
    """Apply ``plan`` to the :func:`~prunellm.offload.load_lazy` skeleton ``model`` one decoder layer at a time and
    write the pruned checkpoint to ``out_dir`` (atomically) as it goes; returns the reconstruction report
    (``mode``, ``added_params``, ``layers``) as :func:`prunellm.prune` does; with ``select`` other than ``plan`` the units each
    layer chose are applied and ``plan`` is updated to them, as :func:`prunellm.prune` does. ``target`` is what
    each refit preserves (``dense``/``residual``: the dense hidden states are carried beside the pruned ones).

    Afterwards ``model`` is the pruned skeleton (meta tensors of the pruned shapes, config updated), so parameter
    counts and the per-layer analysis read it as they read the in-memory pruned model.
    """
    if not is_lazy(model):
        raise PrunellmError("save_pruned_streamed reads a model's layers from its shards: pass prunellm.offload.load_lazy(path)")
    if reconstruct != "none" and calibration is None:
        raise PrunellmError(f"reconstruct='{reconstruct}' needs calibration windows: pass calibration=calibrate(...)")
    if len(plan.layers) != len(decoder_layers(model)):
        raise PrunellmError(f"the plan has {len(plan.layers)} layers, the model {len(decoder_layers(model))}: it was made for another model")
    device = torch.device(device)
    spec = spec_for(model.config)
    onloader = Onloader(model, device)
    kept: dict[UnitKey, list[int]] = plan.kept_units()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp, ShardWriter(tmp, shard_bytes) as writer:  # an error or a stop signal removes tmp
        _copy_outside_layers(model, spec, onloader, writer)
        stream = _LayerStream(model, onloader, writer, plan.removed_layers)
        with buffers_on(model, device):
            if reconstruct == "none":
                for index in tqdm(range(len(stream.layers)), desc="streamed surgery", unit="layer", leave=False):
                    if index not in stream.new_index:  # a removed layer is not read at all (depth pruning)
                        continue
                    stream.enter(index)
                    prune_units(model, {key: value for key, value in kept.items() if key[0] == index})
                    stream.exit(index)
                report = {"mode": "none", "added_params": 0, "layers": []}
            else:

                def capture(model, input_ids, batch_size):  # layer-0 inputs without the whole embedding
                    return layer_inputs(model, onloader, batches_of(input_ids, batch_size))

                result = prune_with_reconstruction(
                    model, kept, calibration, reconstruct, damp, batch_size, target=target, select=select, capture=capture,
                    on_layer=stream,
                )  # fmt: skip
                if select != "plan":
                    plan.set_kept_units(result.kept)
                report = {"mode": reconstruct, "added_params": result.added_params, "layers": result.layers}
        remove_layers(model, plan.removed_layers)
        writer.close()
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        finish_checkpoint(model, tokenizer, tmp)
    log.info("streamed the pruned model into %s (%d shards)", out_dir, len(writer.shards))
    return report


def _copy_outside_layers(model: nn.Module, spec, onloader: Onloader, writer: ShardWriter) -> None:
    """The tensors outside the decoder layers (embedding, final norm, head) copied in the model's dtype, in row
    slices of ``VOCAB_SLICE_BYTES``; a tied head has no tensor of its own in the shards and gets none in the
    output, as ``save_pretrained`` writes it."""
    prefix = f"{spec.layers}."
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(prefix):
            continue
        module_name, _, pname = name.rpartition(".")
        module = modules[module_name]
        if pname in module._parameters and name in onloader.weights:
            if tensor.dim() == 0:
                parts = iter([onloader.weights.read([name], torch.device("cpu"))[name]])
            else:
                length = tensor.shape[0]
                rows = vocab_rows(length, max(1, tensor[0].numel()), tensor.element_size())
                parts = (onloader.rows(module, pname, start, min(start + rows, length)) for start in range(0, max(length, 1), rows))
            writer.add(name, tensor, parts)
        elif tensor.device.type != "meta":  # a persistent buffer the skeleton holds for real
            writer.add(name, tensor)
