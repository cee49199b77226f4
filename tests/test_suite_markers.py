"""The real-model tests can be left out (`-m "not real_model"`), and the default run keeps every test."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from conftest import REPO

# every test that loads real pretrained weights (SmolLM2-135M, Gemma 3 270M; not just a tokenizer)
REAL_MODEL_FILES = {
    "tests/test_real_model.py", "tests/test_finetune_real.py", "tests/test_offload_real.py", "tests/test_export_real.py",
    "tests/test_second_family.py",  # the real Gemma 3 270M
}
REAL_MODEL_TESTS = {
    "tests/test_models.py::test_converted_model_matches_gguf_logits",
    "tests/test_zeroshot.py::test_cli_scores_dense_smollm2_above_chance_on_offline_tasks_without_the_hub",
    "tests/test_api.py::test_api_on_smollm2_evaluates_a_valid_results_document",
}
# one collection of the default run, each test with whether `-m real_model` selects it
COLLECT = """
import json, pytest
class Marks:
    items = []
    def pytest_collection_finish(self, session):
        self.items = [(i.nodeid.split("[")[0], i.get_closest_marker("real_model") is not None) for i in session.items]
marks = Marks()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[marks])
print("COLLECTED" + json.dumps([code, marks.items]))
"""


def test_real_model_tests_are_separable_and_the_default_runs_them():
    done = subprocess.run([sys.executable, "-c", COLLECT], cwd=REPO, capture_output=True, text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("COLLECTED")), None)
    assert line is not None, (done.stdout + done.stderr)[-3000:]
    code, items = json.loads(line.removeprefix("COLLECTED"))
    assert code == 0
    real = {test for test, marked in items if marked}
    fast = {test for test, marked in items if not marked}
    assert {t.split("::")[0] for t in real} == REAL_MODEL_FILES | {t.split("::")[0] for t in REAL_MODEL_TESTS}
    assert {t for t in real if t.split("::")[0] not in REAL_MODEL_FILES} == REAL_MODEL_TESTS
    assert not {t for t in fast if t.split("::")[0] in REAL_MODEL_FILES} and len(fast) > 100
    # and no test (or fixture) that loads the real weights escaped the marker
    needle = 'load_model("smollm2-135m")'
    for path in sorted((REPO / "tests").glob("test_*.py")):
        rel = f"tests/{path.name}"
        if path.name == "test_suite_markers.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and needle in ast.unparse(node).replace("'", '"'):
                loads_weights = f"{rel}::{node.name}" if node.name.startswith("test_") else rel
                assert loads_weights in real or rel in REAL_MODEL_FILES, f"{loads_weights} loads SmolLM2 but is not real_model"
