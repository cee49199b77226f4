"""No lost or half-written outputs: killed runs (SIGTERM / SIGKILL) of prune, finetune and export as real processes,
one overwrite rule for every command, writability checked before any work, and one place for a run's results."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, STORY, save_tiny_model_dir

from prunellm import paths
from prunellm.cli import main
from prunellm.paths import Owner, check_output, clear_leftovers, final_path

ENV = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model directory, a text file, and a pruned results folder ``results/run`` made in this process."""
    root = tmp_path_factory.mktemp("faults")
    save_tiny_model_dir(root / "tiny", num_hidden_layers=3)
    (root / "text.txt").write_text(STORY)
    assert main(_prune_args(root, root / "results", "run")) == 0
    return root


def _prune_args(ws: Path, results: Path, name: str, *extra: str) -> list[str]:
    return [
        "prune", "--base_model", str(ws / "tiny"), "--output_dir", str(results), "--output_name", name,
        "--dataset", str(ws / "text.txt"), "--calibration_num_samples", "4", "--calibration_seq_len", "16",
        "--pruning_ratio", "0.015", "--importance_method", "magnitude", "--reconstruct", "none", "--iterative_steps", "1",
        "--temperature", "0", *extra,
    ]  # fmt: skip


def _finetune_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--pruned_model", str(ws / "results" / "run"), "--output_dir", str(out), "--dataset_name",
        str(ws / "text.txt"), "--num_samples", "8", "--seq_len", "16", "--val_set_size", "0", "--batch_size", "2",
        "--micro_batch_size", "2", "--lora_r", "2", "--skip_evaluation", *extra,
    ]  # fmt: skip


def _snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) -> sha256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _hidden(out: Path) -> list[str]:
    """The hidden ``.NAME.*`` siblings of ``out`` (temporary or set-aside folders and files)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _old_output(out: Path) -> dict[str, str]:
    """A pre-existing output at ``out`` (a folder with a file, or a file) that a killed run must leave as it was."""
    if out.suffix == ".gguf":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"an older export")
    else:
        (out / "model").mkdir(parents=True)
        (out / "model" / "weights.bin").write_bytes(os.urandom(4096))
    return _snapshot(out)


def _kill_when(args: list[str], out: Path, inside: str, sig: int, logs: Path) -> tuple[int, str]:
    """Run ``prunellm ARGS`` as a process; send ``sig`` once the temporary sibling of ``out`` holds ``inside`` (a glob;
    an absolute one is looked for on its own). Returns the exit status and stderr."""
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "prunellm.cli", *args], cwd=REPO, env=ENV, stdout=stdout, stderr=stderr)
        sent, deadline = False, time.monotonic() + 300
        while process.poll() is None and not sent and time.monotonic() < deadline:
            if inside.startswith("/"):
                sent = bool(list(Path("/").glob(inside[1:])))
            else:
                sent = any(any(tmp.glob(inside)) for tmp in out.parent.glob(f".{out.name}.tmp-*"))
            if sent:
                process.send_signal(sig)
            time.sleep(0.005)
        if not sent:
            process.kill()
        code = process.wait(timeout=120)
    err = (logs / "stderr").read_text()
    assert sent, f"{inside} never appeared beside {out}: {err[-3000:]}"
    return code, err


@pytest.fixture
def warnings_():
    """prunellm's warning messages (a handler on the package logger survives the CLI's logging set-up)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("prunellm")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def _one_removal_line(lines: list[str], name: str) -> None:
    removals = [line for line in lines if line.startswith("removed ")]
    assert len(removals) == 1 and "\n" not in removals[0] and name in removals[0], lines


def _last_error(err: str) -> str:
    """The one ``error:`` line (a progress bar the interruption left open may be redrawn after it)."""
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


# --- killed runs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["logs/prune.log", ".model.tmp-*/*"], ids=["started", "saving-model"])
def test_sigterm_during_prune_removes_its_temporary_folder_and_keeps_the_old_output(ws, tmp_path, inside):
    out = tmp_path / "results" / "p"
    before = _old_output(out)
    code, err = _kill_when(_prune_args(ws, out.parent, "p", "--overwrite"), out, inside, signal.SIGTERM, tmp_path)
    assert code == 128 + signal.SIGTERM
    assert _last_error(err) == f"error: interrupted by SIGTERM; nothing was written to {out}"
    assert _hidden(out) == [] and _snapshot(out) == before


def test_sigkill_during_prune_leaves_a_folder_the_next_run_removes(ws, tmp_path, warnings_):
    out = tmp_path / "results" / "p"
    code, _ = _kill_when(_prune_args(ws, out.parent, "p"), out, ".model.tmp-*/*", signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL
    (left,) = _hidden(out)
    assert left.startswith(".p.tmp-") and not out.exists()
    assert main(_prune_args(ws, out.parent, "p")) == 0  # no --overwrite needed: nothing was written
    _one_removal_line(warnings_, left)
    assert _hidden(out) == [] and (out / "model" / "config.json").is_file()


def test_sigterm_during_finetune_keeps_its_checkpoints_for_resume(ws, tmp_path, capsys):
    out = tmp_path / "ft"
    checkpoints = tmp_path / "ft.finetune_checkpoints"
    args = _finetune_args(ws, out, "--max_steps", "3", "--save_steps", "1")
    # stopped while it saves checkpoint-2 or trains on: checkpoint-1 is complete, checkpoint-2 may not be
    code, err = _kill_when(args, out, str(checkpoints / "checkpoint-2"), signal.SIGTERM, tmp_path)
    assert code == 128 + signal.SIGTERM
    assert _last_error(err) == f"error: interrupted by SIGTERM; nothing was written to {out}"
    assert _hidden(out) == [] and not out.exists() and (checkpoints / "checkpoint-1").is_dir()
    assert main(args) == 2  # a fresh run would mix its checkpoints with these
    line = _last_error(capsys.readouterr().err)
    assert str(checkpoints) in line and "--resume_from_checkpoint last" in line and "--overwrite" in line
    assert main([*args, "--resume_from_checkpoint", "last"]) == 0
    assert not checkpoints.exists() and (out / "checkpoints" / "checkpoint-3").is_dir()  # moved into the finished run
    results = json.loads((out / "finetune_results.json").read_text())
    assert results["steps"] == 3 and results["model_dir"] == str(out / "model")  # the final path, not the temporary one


def test_sigkill_during_finetune_keeps_the_old_output_and_the_next_run_cleans_up(ws, tmp_path, warnings_):
    out = tmp_path / "ft"
    before = _old_output(out)
    args = _finetune_args(ws, out, "--max_steps", "1", "--save_steps", "0", "--overwrite")
    code, _ = _kill_when(args, out, ".model.tmp-*/*", signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL and _snapshot(out) == before
    (left,) = _hidden(out)
    assert main(args) == 0
    _one_removal_line(warnings_, left)
    assert _hidden(out) == [] and (out / "model" / "config.json").is_file() and not (out / "model" / "weights.bin").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_export_keeps_the_old_file_and_leaves_nothing_behind(ws, tmp_path, sig, warnings_):
    out = tmp_path / "export" / "run-f32.gguf"  # export_name of results/run
    before = _old_output(out)
    args = ["export", "--model", str(ws / "results" / "run"), "--output", str(out.parent), "--outtype", "f32", "--overwrite"]
    code, err = _kill_when(args, out, "*", sig, tmp_path)
    assert _snapshot(out) == before
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM and _hidden(out) == []
        assert _last_error(err) == f"error: interrupted by SIGTERM; nothing was written to {out}"
        return
    (left,) = _hidden(out)
    assert main(args) == 0
    _one_removal_line(warnings_, left)
    assert _hidden(out) == [] and out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["sigint", "sighup"])
def test_a_stop_signal_in_process_unwinds_with_one_line_and_no_leftover(ws, tmp_path, monkeypatch, capsys, sig):
    import prunellm.pruner

    def signalled(*args, **kwargs):  # the signal arrives while the run writes its analysis into the temporary folder
        os.kill(os.getpid(), sig)
        time.sleep(5)
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(prunellm.pruner, "write_analysis", signalled)
    out = tmp_path / "results" / "p"
    handlers = [signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)]
    assert main(_prune_args(ws, out.parent, "p")) == 128 + sig
    name = signal.Signals(sig).name
    assert _last_error(capsys.readouterr().err) == f"error: interrupted by {name}; nothing was written to {out}"
    assert not out.exists() and _hidden(out) == []
    assert [signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)] == handlers  # put back


# --- owners of temporary folders ---------------------------------------------------------------------------


def _temp_of(owner: Owner, final: Path, kind: str = "tmp") -> Path:
    folder = final.with_name(f".{final.name}.{kind}-{owner.tag}-abcd1234")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    return folder


def test_a_live_owner_is_refused_and_left_alone_a_dead_one_removed(tmp_path, warnings_):
    final = tmp_path / "out"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = Owner(sleeper.pid, paths._proc_start(sleeper.pid), Owner.me().host, Owner.me().boot)
        folder = _temp_of(live, final)
        with pytest.raises(paths.PrunellmError, match=r"--output_dir '.*out' is being written by another running process \(pid \d+"):
            check_output(final, "--output_dir")
        assert folder.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert live.state() == "dead"  # reaped: the id is gone
    check_output(final, "--output_dir")
    assert not folder.exists()
    _one_removal_line(warnings_, folder.name)


def test_owner_checks_survive_pid_reuse_other_hosts_and_reboots(tmp_path):
    me = Owner.me()
    assert me.state() == "self"
    assert Owner(me.pid, me.start + 1, me.host, me.boot).state() == "dead"  # same id, another start time: reused
    assert Owner(me.pid, me.start, "0123abcd", me.boot).state() == "unknown"  # another host: never removed
    assert Owner(me.pid, me.start, me.host, "0123abcd").state() == "dead"  # another boot of this machine


def test_a_dead_swap_puts_the_old_output_back(tmp_path, warnings_):
    # killed between setting the old output aside and renaming the new one into place
    final = tmp_path / "out"
    dead = Owner(2**22 + 1, 1, Owner.me().host, Owner.me().boot)  # above pid_max: no such process
    old = _temp_of(dead, final, "old")
    new = _temp_of(dead, final, "tmp")
    clear_leftovers(final)
    assert final.is_dir() and not old.exists() and not new.exists()
    assert any("restored out" in line for line in warnings_)


def test_folders_without_an_owner_record_are_left_alone(tmp_path, warnings_):
    legacy = tmp_path / ".out.tmp-k2j9x8ab"  # made by an older prunellm
    legacy.mkdir()
    check_output(tmp_path / "out", "--output")
    assert legacy.is_dir() and any(legacy.name in line and "left alone" in line for line in warnings_)


def test_final_path_names_a_temporary_folder_by_its_destination(tmp_path):
    with paths.atomic_dir(tmp_path / "run") as tmp:
        assert final_path(tmp / "finetuned" / "model") == tmp_path / "run" / "finetuned" / "model"
        with paths.atomic_dir(tmp / "model") as inner:
            assert final_path(inner / "config.json") == tmp_path / "run" / "model" / "config.json"
            (inner / "config.json").write_text("{}")
    assert (tmp_path / "run" / "model" / "config.json").is_file() and _hidden(tmp_path / "run") == []


# --- one overwrite rule, inputs, writability ---------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or evaluating fails the test: refusals must come before any work."""
    import prunellm.evaluation
    import prunellm.models
    import prunellm.pruner

    def never(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    for module, name in ((prunellm.models, "load_model"), (prunellm.pruner, "load_model"), (prunellm.evaluation, "evaluate")):
        monkeypatch.setattr(module, name, never)


def _command(ws: Path, kind: str, out: Path) -> tuple[list[str], str]:
    """The command line writing ``out``, and its output flag."""
    run = str(ws / "results" / "run")
    return {
        "prune": (_prune_args(ws, out.parent, out.name), "--output_name"),
        "layers": (["layers", "--base_model", str(ws / "tiny"), "--output_dir", str(out.parent), "--output_name", out.name,
                    "--n_remove_layers", "1"], "--output_name"),
        "finetune": (_finetune_args(ws, out, "--max_steps", "1"), "--output_dir"),
        "export-vllm": (["export", "--model", run, "--format", "vllm", "--output", str(out)], "--output"),
        "export-gguf": (["export", "--model", run, "--output", str(out.parent), "--outtype", "f32"], "--output"),
        "eval": (["eval", "--model_path", run, "--output", str(out)], "--output"),
        "report": (["report", run, "--output", str(out)], "--output"),
    }[kind]  # fmt: skip


COMMANDS = ["prune", "layers", "finetune", "export-vllm", "export-gguf", "eval", "report"]


@pytest.mark.parametrize("kind", COMMANDS)
def test_every_command_refuses_an_existing_output_without_overwrite(ws, tmp_path, kind, no_work, capsys):
    out = tmp_path / "o" / ("run-f32.gguf" if kind == "export-gguf" else "x.json" if kind == "eval" else "x")
    if out.suffix:
        out.parent.mkdir()
        out.write_text("earlier results")
    else:
        _old_output(out)
    before = _snapshot(out)
    args, flag = _command(ws, kind, out)
    assert main(args) == 2
    line = _last_error(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} '") and line.endswith(f"already exists; pass --overwrite to replace it or choose another {flag}"), line
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "kind, output",
    [("finetune", "run"), ("finetune", "run/finetuned"), ("finetune", "."), ("export-vllm", "run"),
     ("export-vllm", "run/model"), ("export-gguf", "run/model/x.gguf"), ("report", "run")],
)  # fmt: skip
def test_an_output_that_is_inside_or_holds_the_input_is_refused_even_with_overwrite(ws, kind, output, no_work, capsys):
    out = ws / "results" / output
    before = _snapshot(ws / "results" / "run")
    args, flag = _command(ws, kind, out)
    assert main([*args, "--overwrite"]) == 2
    line = _last_error(capsys.readouterr().err)
    input_flag = {"finetune": "--pruned_model", "report": "RESULTS_DIR"}.get(kind, "--model")
    assert line.startswith(f"error: {flag} '") and input_flag in line and "even with --overwrite" in line, line
    assert _snapshot(ws / "results" / "run") == before


@pytest.mark.parametrize("kind", COMMANDS)
def test_an_output_under_a_file_is_refused_before_any_work(ws, tmp_path, kind, no_work, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # refuses writes below it even to root
    args, flag = _command(ws, kind, blocker / "sub" / ("run-f32.gguf" if kind == "export-gguf" else "x"))
    assert main(args) == 2
    line = _last_error(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} '") and f"'{blocker}' is a file, not a folder" in line, line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("kind", ["prune", "eval", "report", "export-gguf"])
def test_an_unwritable_folder_is_refused_before_any_work(ws, tmp_path, kind, no_work, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        args, flag = _command(ws, kind, locked / ("run-f32.gguf" if kind == "export-gguf" else "x"))
        assert main(args) == 2
        line = _last_error(capsys.readouterr().err)
        assert line.startswith(f"error: {flag} '") and "no write permission" in line, line
    finally:
        locked.chmod(0o700)


# --- one place for a run's results -------------------------------------------------------------------------


def test_eval_of_a_results_folder_writes_beside_its_plan_where_report_finds_it(ws, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_prune_args(ws, tmp_path, "run")) == 0  # no evaluation: the run has no results yet
    evaluate = ["eval", "--model_path", str(run), "--metrics", "ppl", "--ppl_datasets", str(ws / "text.txt"),
                "--ppl_seq_len", "16", "--ppl_max_windows", "2"]  # fmt: skip
    assert main(evaluate) == 0
    assert (run / "evaluation_results.json").is_file() and not (run / "model" / "evaluation_results.json").exists()
    assert main(["report", str(run), "--output", str(tmp_path / "report")]) == 0
    assert "| run |" in capsys.readouterr().out
    assert main(evaluate) == 2  # the run's results are not silently replaced
    line = _last_error(capsys.readouterr().err)
    assert str(run / "evaluation_results.json") in line and "--overwrite" in line
    assert main([*evaluate, "--overwrite"]) == 0


def test_report_finds_results_an_older_eval_wrote_into_model(ws, tmp_path, capsys):
    run = tmp_path / "old_run"
    (run / "model").mkdir(parents=True)
    (run / "plan.json").write_bytes((ws / "results" / "run" / "plan.json").read_bytes())
    assert main(["eval", "--model_path", str(ws / "results" / "run"), "--metrics", "ppl", "--ppl_datasets", str(ws / "text.txt"),
                 "--ppl_seq_len", "16", "--ppl_max_windows", "2", "--output", str(run / "model" / "evaluation_results.json")]) == 0
    assert main(["report", str(run), "--output", str(tmp_path / "report")]) == 0
    assert "| old_run |" in capsys.readouterr().out


def test_resume_skips_a_checkpoint_its_run_did_not_finish_saving(tmp_path):
    from prunellm.errors import PrunellmError
    from prunellm.finetune.engine import resolve_checkpoint

    for step, state in ((1, '{"global_step": 1}'), (2, '{"global_st')):  # killed while writing checkpoint-2's state
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert resolve_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-1")
    with pytest.raises(PrunellmError, match="incomplete"):
        resolve_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path)
    with pytest.raises(PrunellmError, match="holds the checkpoints of an earlier run"):
        resolve_checkpoint(None, tmp_path)
