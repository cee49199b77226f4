"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, on the in-memory model.

The model is wrapped as it is (``HFLM(pretrained=model)``), so a pruned model with per-layer widths is scored
without being saved and reloaded by name. Every task records both ``acc`` and ``acc_norm`` (lm-eval's
byte-length-normalised accuracy) with their standard errors, and two averages are computed:

* ``llm_pruner``: LLM-Pruner's convention, ``acc_norm`` for hellaswag, arc_challenge and openbookqa and ``acc``
  for every other task (boolq, piqa, winogrande, arc_easy and the local tasks);
* ``acc_norm_where_available``: ``acc_norm`` for every task that has it, ``acc`` otherwise.

Offline tasks: the hub tasks (the default seven) need the Hugging Face hub. :data:`LOCAL_TASKS` are real
multiple-choice tasks made from BIG-bench task files that :mod:`prunellm.bigbench` installs from PyPI; they
are written once as lm-eval task definitions (YAML + JSONL) into ``cache_dir()/lm_eval_tasks/`` and found
through ``TaskManager(include_path=...)``. The first :data:`FEWSHOT_POOL` examples of each become the
few-shot (``train``) split, the rest the scored ``test`` split.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import random
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..bigbench import load_task
from ..errors import PrunellmError
from ..paths import atomic_dir, cache_dir

log = logging.getLogger(__name__)

DEFAULT_TASKS: tuple[str, ...] = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ACC_NORM_TASKS: frozenset[str] = frozenset({"hellaswag", "arc_challenge", "openbookqa"})
"""Tasks whose LLM-Pruner metric is ``acc_norm``; every other task uses ``acc``."""
AVERAGES: dict[str, str] = {
    "llm_pruner": "acc_norm for hellaswag, arc_challenge, openbookqa; acc for every other task (LLM-Pruner)",
    "acc_norm_where_available": "acc_norm for every task that reports it, acc otherwise",
}
FEWSHOT_POOL = 100
LOCAL_TASKS_VERSION = 1  # bump when the prompts or the files written change: the cache is rewritten


@dataclass(frozen=True)
class LocalTask:
    """An offline lm-eval task made from a BIG-bench task file.

    ``template`` formats the prompt from the example's ``input`` (stripped); each choice is appended after a
    space (lm-eval's ``target_delimiter``), e.g. ``"Question: ...\\nAnswer:"`` + ``" Yes"``.
    """

    name: str
    source: str
    template: str
    description: str


LOCAL_TASKS: dict[str, LocalTask] = {
    task.name: task
    for task in (
        LocalTask("bigbench_strategyqa", "strategyqa", "Question: {input}\nAnswer:", "Yes/No questions needing implicit reasoning (BoolQ-like)"),
        LocalTask("bigbench_wikihow_step", "goal_step_wikihow/step_inference", "{input}", "the most reasonable step towards a WikiHow goal, 4 choices (HellaSwag-like)"),
        LocalTask("bigbench_social_iqa", "social_iqa", "Question: {input}\nAnswer:", "reasoning about people's actions and feelings, 3 choices"),
    )
}


def lm_eval_version() -> str:
    """The installed lm-eval version, or a one-line error saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise PrunellmError("--metrics zeroshot needs lm-eval: pip install 'prunellm[zeroshot]' (lm-eval>=0.4.13)") from None
    return lm_eval.__version__


def _local_rows(task: LocalTask) -> list[dict[str, Any]]:
    """``{"query", "choices", "label"}`` rows of a BIG-bench task (examples without one right answer skipped)."""
    rows = []
    for example in load_task(task.source)["examples"]:
        choices = list(example["target_scores"])
        right = [i for i, c in enumerate(choices) if example["target_scores"][c] == 1]
        if len(right) != 1:
            continue
        query = task.template.format(input=example["input"].strip())
        rows.append({"query": query, "choices": [c.strip() for c in choices], "label": right[0]})
    return rows


def _task_yaml(task: LocalTask, folder: Path) -> str:
    data_files = {"train": str(folder / f"{task.name}.train.jsonl"), "test": str(folder / f"{task.name}.test.jsonl")}
    config = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "output_type": "multiple_choice",
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": LOCAL_TASKS_VERSION, "source": f"BIG-bench {task.source} (bigbench==1.0.0, Apache-2.0)"},
    }
    return f"# generated by prunellm from BIG-bench '{task.source}': {task.description}\n" + json.dumps(config, indent=2) + "\n"


def local_tasks_dir() -> Path:
    """The folder of offline lm-eval task definitions, written on first use (and when stale).

    Returns:
        ``cache_dir()/lm_eval_tasks`` holding ``<task>.yaml``, ``<task>.train.jsonl`` (few-shot pool) and
        ``<task>.test.jsonl`` for every task of :data:`LOCAL_TASKS`, and a ``manifest.json``.
    """
    folder = cache_dir() / "lm_eval_tasks"
    manifest = {"version": LOCAL_TASKS_VERSION, "folder": str(folder), "tasks": sorted(LOCAL_TASKS)}
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        if json.loads((folder / "manifest.json").read_text()) == manifest:
            return folder
    log.info("writing offline lm-eval task definitions into %s", folder)
    with atomic_dir(folder) as tmp:
        for task in LOCAL_TASKS.values():
            rows = _local_rows(task)
            for split, part in (("train", rows[:FEWSHOT_POOL]), ("test", rows[FEWSHOT_POOL:])):
                text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
                (tmp / f"{task.name}.{split}.jsonl").write_text(text, encoding="utf-8")
            # YAML is a superset of JSON: the config is written as JSON so no YAML quoting can go wrong
            (tmp / f"{task.name}.yaml").write_text(_task_yaml(task, folder), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


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
    # the offline tasks' files (BIG-bench, installed from PyPI on first use) only when one of them is asked for, so
    # that hub tasks and a misspelt name never wait on, or fail with, that install
    local = (str(local_tasks_dir()),) if any(name in LOCAL_TASKS for name in tasks) else ()
    paths = (*local, *(str(p) for p in include_path or []))
    manager = _task_manager(False, paths)
    if all(name in manager.all_tasks for name in tasks):
        return manager
    manager = _task_manager(True, paths)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted({*manager.all_tasks, *LOCAL_TASKS}), n=5, cutoff=0.5)
        hint = f"closest are {', '.join(close)}" if close else f"offline tasks are {', '.join(LOCAL_TASKS)}"
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
        log.warning("no zero-shot task could be loaded; offline tasks: --zeroshot_tasks %s", ",".join(LOCAL_TASKS))
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
        raise PrunellmError(f"--zeroshot_tasks is empty: give lm-eval task names, e.g. {','.join(DEFAULT_TASKS)} or {','.join(LOCAL_TASKS)}")
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
