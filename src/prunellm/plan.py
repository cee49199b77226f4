"""The pruning Plan: what to keep, why, and how to replay it on the original weights."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import PrunellmError
from .paths import write_json_atomic

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """Kept indices of one original decoder layer (``None`` = that unit kind is left as it is)."""

    kv_groups: list[int] | None = None
    mlp_channels: list[int] | None = None


UNIT_FIELDS = {"kv_group": "kv_groups", "mlp_channel": "mlp_channels"}
"""Unit kind -> the :class:`LayerPlan` field holding its kept indices."""


def kept_units_of(layers: list[LayerPlan]) -> dict[tuple[int, str], list[int]]:
    """Kept indices keyed by (layer, unit kind), for the kinds ``layers`` constrain."""
    return {
        (index, kind): getattr(entry, name)
        for index, entry in enumerate(layers)
        for kind, name in UNIT_FIELDS.items()
        if getattr(entry, name) is not None
    }


def set_kept_units_of(layers: list[LayerPlan], kept: dict[tuple[int, str], list[int]]) -> None:
    """Replace the kept indices of the (layer, kind) entries in ``kept`` (same counts: the budget is unchanged)."""
    for (index, kind), indices in kept.items():
        entry, name = layers[index], UNIT_FIELDS[kind]
        if getattr(entry, name) is not None and len(getattr(entry, name)) != len(indices):
            raise ValueError(f"layer {index} {kind}: {len(indices)} kept units replace {len(getattr(entry, name))}")
        setattr(entry, name, sorted(int(i) for i in indices))


def compose_rounds(rounds: list[list[LayerPlan]]) -> list[LayerPlan]:
    """The original indices kept after all ``rounds``, each round's indices counting the units the one before kept."""
    composed = [LayerPlan() for _ in rounds[0]]
    for layers in rounds:
        for total, step in zip(composed, layers):
            for name in UNIT_FIELDS.values():
                kept, before = getattr(step, name), getattr(total, name)
                if kept is not None:
                    setattr(total, name, list(kept) if before is None else [before[i] for i in kept])
    return composed


@dataclass
class RoundPlan:
    """One round of ``--iterative_steps``: kept indices into the model the previous round left, and its size."""

    layers: list[LayerPlan]
    params_before: int
    params_after: int


@dataclass
class Plan:
    """Kept units per layer, removed layers, the budget and everything needed to replay the pruning."""

    base_model: str
    method: str  # "global" | "layers" | "allocation"
    criterion: str
    target_ratio: float | None
    params_before: int
    # parameters of the model the plan gives: params_before minus what its units and layers take (the budget,
    # :attr:`removed_params`), plus ``added_params`` once surgery has recorded them: the count of the model as saved
    params_after: int
    layers: list[LayerPlan]  # one entry per ORIGINAL layer
    removed_layers: list[int] = field(default_factory=list)  # original indices, removed after slicing
    recipe: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    reconstruction: dict[str, Any] = field(default_factory=dict)
    # --iterative_steps N > 1: the N rounds, applied (each with the plan's reconstruction) one after the other;
    # ``layers`` then holds the original indices all rounds together keep
    rounds: list[RoundPlan] = field(default_factory=list)
    # compensation biases the reconstruction added (o_proj/down_proj biases the family does not build), counted in
    # ``params_after``; 0 until :meth:`record_added_params` (the refit decides them: they are known after surgery)
    added_params: int = 0
    version: int = PLAN_VERSION

    def kept_units(self) -> dict[tuple[int, str], list[int]]:
        """Kept indices keyed by (original layer, unit kind), for the kinds the plan constrains."""
        return kept_units_of(self.layers)

    def set_kept_units(self, kept: dict[tuple[int, str], list[int]]) -> None:
        """Replace the kept indices of the (layer, kind) entries in ``kept`` (same counts: the budget is unchanged)."""
        set_kept_units_of(self.layers, kept)

    def round_layers(self) -> list[list[LayerPlan]]:
        """What each round keeps, in the order they are applied (one round: the plan's ``layers``)."""
        return [step.layers for step in self.rounds] or [self.layers]

    @property
    def removed_params(self) -> int:
        """Parameters the plan's units and layers take away (the budget), compensation biases apart."""
        return self.params_before - self.params_after + self.added_params

    def record_added_params(self, added: int) -> None:
        """Count the ``added`` compensation biases surgery left into ``params_after``, which then is the count of
        the model as saved; :attr:`removed_params` stays as planned (a replay records the same)."""
        self.params_after += added - self.added_params
        self.added_params = added

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the model's total parameters removed (of the model as saved, once biases are recorded)."""
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["achieved_ratio"] = round(self.achieved_ratio, 6)
        return data

    def save(self, path: Path) -> None:
        """Write the plan as JSON (atomically)."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path | str, flag: str = "--plan") -> "Plan":
        """Read a plan written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PrunellmError(f"{flag} '{path}' is not a readable plan JSON: {exc}") from exc
        if data.get("version") != PLAN_VERSION:
            raise PrunellmError(f"{flag} '{path}' has plan version {data.get('version')}; this prunellm reads {PLAN_VERSION}")
        data.pop("achieved_ratio", None)
        try:
            data["layers"] = [LayerPlan(**entry) for entry in data["layers"]]
            data["rounds"] = [
                RoundPlan(**{**step, "layers": [LayerPlan(**entry) for entry in step["layers"]]}) for step in data.get("rounds", [])
            ]
            return cls(**data)
        except (TypeError, KeyError) as exc:
            raise PrunellmError(f"{flag} '{path}' does not match the plan schema: {exc}") from exc


def package_versions() -> dict[str, str]:
    """Versions that decide the numbers a plan produces."""
    import torch
    import transformers

    from . import __version__

    return {
        "prunellm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
