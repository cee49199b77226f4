"""A damaged model folder, in many seeded-random ways, is refused with one line naming the damaged file.

Each case copies a saved tiny model (``config.json``, ``model.safetensors``, ``tokenizer.json``) into its own folder
(hard links; the damaged file is replaced, never edited in place), damages one file and runs ``prunellm eval`` on
it: status 2, one ``error:`` line that names the file, no traceback.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import link_tree, make_tiny_model

from prunellm.cli import main
from prunellm.models import load_tokenizer

TEXT = " ".join("the king and the queen walked to the castle while the people sang of war and peace".split() * 60)
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
TRIES = 8  # seeded cases per (kind, file)
CASES = [("delete", name, 0) for name in REQUIRED] + [
    (kind, name, seed) for kind in ("truncate", "flip") for name in REQUIRED for seed in range(TRIES)
]  # 3 + 2 × 3 × 8 = 51


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corruption")
    tokenizer = load_tokenizer("smollm2-135m")
    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def _header_end(data: bytes) -> int:
    """Where a safetensors file's tensor data starts: 8 bytes of header length, then the JSON header."""
    return 8 + int.from_bytes(data[:8], "little")


def damage(folder: Path, kind: str, name: str, seed: int) -> str:
    """Damage ``folder/name`` in the ``kind`` way chosen by ``seed``; returns what was done, for failure messages."""
    file = folder / name
    if kind == "delete":
        file.unlink()
        return f"deleted {name}"
    data = bytearray(file.read_bytes())
    rng = random.Random(f"{kind}-{name}-{seed}")
    if kind == "truncate":
        # JSON: cut anywhere before the closing brace (cutting only the trailing newline leaves valid JSON);
        # safetensors: any cut, the header describes every byte of the data
        stop = data.rindex(b"}") if name.endswith(".json") else len(data)
        cut = rng.randrange(0, stop)
        del data[cut:]
        what = f"truncated {name} to {cut} bytes"
    else:
        # flip the top bit of one byte of a JSON file or of the safetensors header (length + JSON): in UTF-8 text
        # that always leaves an invalid byte sequence, so the damage is always detectable; a lower bit can turn one
        # valid value into another (64 -> 65, 'a' -> 'c') that no loader can tell from the original
        stop = _header_end(bytes(data)) if name == "model.safetensors" else len(data)
        at = rng.randrange(0, stop)
        data[at] ^= 0x80
        what = f"flipped bit 7 of byte {at} of {name}"
    file.unlink()
    file.write_bytes(bytes(data))
    return what


def _eval(folder: Path, text: Path, out: Path) -> list[str]:
    return ["eval", "--model_path", str(folder), "--metrics", "ppl", "--ppl_datasets", str(text), "--ppl_seq_len", "16",
            "--ppl_max_windows", "1", "--output", str(out)]  # fmt: skip


@pytest.mark.parametrize(("kind", "name", "seed"), CASES, ids=[f"{k}-{n}-{s}" for k, n, s in CASES])
def test_damaged_model_folder_is_one_line_naming_the_file(saved, tmp_path, capsys, kind, name, seed):
    folder = link_tree(saved / "model", tmp_path / "model")
    what = damage(folder, kind, name, seed)
    code = main(_eval(folder, saved / "text.txt", tmp_path / "results.json"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, f"{what}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], f"{what}: {err}"


@pytest.mark.parametrize("seed", range(3))
def test_flipped_tensor_bytes_load_or_fail_in_one_line(saved, tmp_path, capsys, seed):
    # Hugging Face checkpoints carry no checksums, so a flipped byte in the tensor data is undetectable: the model
    # loads with one changed weight (exit 0) or, should a later check refuse it, fails in one line (exit 2).
    # Never a traceback.
    folder = link_tree(saved / "model", tmp_path / "model")
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    at = random.Random(f"payload-{seed}").randrange(_header_end(bytes(data)), len(data))
    data[at] ^= 1 << random.Random(f"bit-{seed}").randrange(8)
    file.unlink()
    file.write_bytes(bytes(data))
    code = main(_eval(folder, saved / "text.txt", tmp_path / "results.json"))
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 0:
        assert json.loads((tmp_path / "results.json").read_text())["metrics"]["ppl"]
    else:
        assert [line for line in err.splitlines() if line.startswith("error: ")], err
