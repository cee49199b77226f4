"""Export a pruned (or dense) model to serving engines: llama.cpp (GGUF) and vLLM (nemotron-nas).

``prunellm export --model RESULTS_OR_MODEL_DIR --format gguf|vllm --output DIR [--outtype f32|f16|q8_0|q4_k_m|q5_k_m|q6_k]``
and :func:`export_model` do the same. What each engine can express is data in :mod:`.gguf` and :mod:`.vllm`;
a model they cannot express is refused with one line naming the layer and what breaks it.

The output (the ``.gguf`` file, or the vLLM folder) is written under a temporary name and renamed when complete;
an existing one is refused unless ``--overwrite``, and one that is the model's folder, or inside or around it,
always (:func:`prunellm.paths.check_output`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import PrunellmError
from ..options import ExportOptions

log = logging.getLogger(__name__)


def export_name(model_dir: str | Path) -> str:
    """A file stem for a model folder: a results folder's name rather than its ``model/`` sub-folder."""
    path = Path(model_dir).resolve()
    name = path.parent.name if path.name == "model" else path.name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "model"


def export_model(options: ExportOptions | None = None, **overrides) -> Path:
    """Export ``options.model`` in ``options.format`` into ``options.output``; returns the written file or folder.

    Args:
        options: an :class:`~prunellm.options.ExportOptions` (model, format, output, outtype).
        **overrides: the same fields as keyword arguments, e.g. ``export_model(model="results/x", format="vllm")``.
    """
    from ..models import load_model, load_tokenizer, resolve_model_path
    from ..paths import check_output

    options = ExportOptions(**{**(options.model_dump() if options else {}), **overrides})
    if options.format == "vllm" and options.outtype not in ("f32", "f16"):
        raise PrunellmError(f"--outtype {options.outtype} is for --format gguf: vLLM takes --outtype f32 or f16")
    model_dir = resolve_model_path(options.model, flag="--model")
    inputs = [("--model", options.model), ("--model", model_dir)]
    name = export_name(model_dir)
    if options.format == "gguf":  # the output is one file in the --output folder (several exports may share it)
        final = Path(options.output) / f"{name}-{options.outtype}.gguf"
        check_output(final, "--output", options.overwrite, inputs=inputs, kind="file")
    else:
        check_output(options.output, "--output", options.overwrite, inputs=inputs)
    tokenizer = load_tokenizer(options.model, flag="--model")  # a folder without one fails before the weights load
    model = load_model(options.model, flag="--model")
    if options.format == "gguf":
        from .gguf import export_gguf

        return export_gguf(model, tokenizer, options.output, options.outtype, name=name)  # written atomically
    from .vllm import export_vllm

    return export_vllm(model, tokenizer, options.output, options.outtype)


__all__ = ["export_model", "export_name", "PrunellmError"]
