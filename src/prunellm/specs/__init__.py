"""Architecture specs: one YAML file per model family in this folder, looked up by ``config.model_type``."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from ..errors import PrunellmError
from .schema import ArchitectureSpec, AttentionSpec, ConfigKeys, MlpSpec

SPEC_DIR = Path(__file__).parent

__all__ = ["ArchitectureSpec", "AttentionSpec", "ConfigKeys", "MlpSpec", "all_specs", "spec_for"]


@functools.cache
def all_specs() -> dict[str, ArchitectureSpec]:
    """Every shipped spec, keyed by the model_type values it covers."""
    table: dict[str, ArchitectureSpec] = {}
    for path in sorted(SPEC_DIR.glob("*.yaml")):
        spec = ArchitectureSpec.model_validate(yaml.safe_load(path.read_text()))
        for model_type in spec.model_types:
            if model_type in table:
                raise ValueError(f"model_type '{model_type}' is claimed by two spec files ({path.name})")
            table[model_type] = spec
    return table


def spec_for(config) -> ArchitectureSpec:
    """The spec for a transformers config; an unknown family is refused, never guessed."""
    model_type = getattr(config, "model_type", None)
    specs = all_specs()
    if model_type not in specs:
        raise PrunellmError(
            f"architecture '{model_type}' has no prunellm spec: supported are {', '.join(sorted(specs))}; "
            f"to add it, write {SPEC_DIR}/{model_type}.yaml following llama.yaml"
        )
    return specs[model_type]
