"""Offline BIG-bench task files (installed once into the cache by :mod:`prunellm.assets`), read by task name.

Used for offline multiple-choice evaluation (``strategyqa``, ``goal_step_wikihow/step_inference``, ``social_iqa``,
``winowhy``) and a real instruction set (``natural_instructions/*``) for recovery tests.
"""

from __future__ import annotations

import json
import logging

from .assets import bigbench_dir
from .errors import PrunellmError

log = logging.getLogger(__name__)


def load_task(task: str) -> dict:
    """The parsed ``task.json`` of a BIG-bench task, e.g. ``strategyqa`` or ``goal_step_wikihow/step_inference``."""
    path = bigbench_dir() / task / "task.json"
    if not path.is_file():
        available = sorted(str(p.parent.relative_to(bigbench_dir())) for p in bigbench_dir().rglob("task.json"))
        raise PrunellmError(f"BIG-bench task '{task}' is not installed: available are {', '.join(available[:12])} ...")
    return json.loads(path.read_text(encoding="utf-8"))
