"""``prunellm prune | layers | run | finetune | eval | export | report``: the command line, generated from the typed options.

Bad input exits with status 2 and one line: ``error: <what, where, what is valid>``. SIGTERM, SIGINT (Ctrl-C) and
SIGHUP unwind the command, so its unfinished output is removed, and exit with status 128 + the signal's number
and one line: ``error: interrupted by SIGTERM; nothing was written to <output>``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, Field, ValidationError

from .errors import PrunellmError
from .options import (
    DistillOptions,
    EvalOptions,
    ExportOptions,
    FinetuneData,
    FinetuneOptions,
    FinetuneTarget,
    LayersRecipe,
    LoraOptions,
    PruneRecipe,
    RunOptions,
    TrackingOptions,
    TrainOptions,
    RENAMED_OPTIONS,
    _Options,
    option_flags,
    option_groups,
)

log = logging.getLogger("prunellm")


# ---------------------------------------------------------------------------------------------------------------
# argparse generated from the option models: one --flag per option (options.option_flags), errors mapped to flags


def parse_bool(text: str) -> bool:
    """Accept the seed's ``--flag True`` / ``--flag False`` as well as a bare ``--flag``."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel], title: str | None = None) -> None:
    """Add one ``--flag`` per option of ``model`` (help and default from the field); each nested group that keeps
    its field names gets its own ``--help`` section, ``<title>: <group>``."""
    title = title or model.__name__
    sections = {None: parser.add_argument_group(title, (model.__doc__ or "").strip().splitlines()[0])}
    for flag, entry in option_flags(model).items():
        if entry.section not in sections:
            doc = (option_groups(model)[entry.section].__doc__ or "").strip().splitlines()[0]
            sections[entry.section] = parser.add_argument_group(f"{title}: {entry.section}", doc)
        annotation = _unwrap_optional(entry.annotation)
        kwargs: dict[str, Any] = {"dest": flag, "default": argparse.SUPPRESS}
        if annotation is bool:
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif annotation in (int, float, str):
            kwargs.update(type=annotation)
        else:
            kwargs.update(type=str)
        old_names = [f"--{old}" for old, new in RENAMED_OPTIONS.items() if new == flag]
        sections[entry.section].add_argument(f"--{flag}", *old_names, help=f"{entry.help} (default: {entry.default})", **kwargs)


def build_options(model: type[BaseModel], namespace: argparse.Namespace) -> BaseModel:
    """Instantiate ``model`` from the parsed flags that belong to it (flat flags into their groups); errors name
    the flag."""
    flags = option_flags(model)
    values = {flag: getattr(namespace, flag) for flag in flags if hasattr(namespace, flag)}
    try:
        return model(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(error.get("loc") or ())
        by_path = {entry.path: flag for flag, entry in flags.items()}
        flag = by_path.get(loc[:2]) or by_path.get(loc[:1])
        where = f"--{flag} {values.get(flag, '')}" if flag else model.__name__ + " "
        raise PrunellmError(f"{where}: {error['msg'].removeprefix('Value error, ')}") from None



class EvalTarget(_Options):
    """Which model to evaluate and where the results go."""

    model_path: str = Field("smollm2-135m", description="smollm2-135m, a model directory, a prunellm results folder, or a hub id")
    output: str | None = Field(
        None, description="results JSON path (default: evaluation_results.json in the results folder or model directory, else ./)"
    )
    overwrite: bool = Field(False, description="replace an existing results file")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    trust_pickle: bool = Field(False, description="allow loading a legacy pickled .bin model (runs code from it)")


class ReportTarget(_Options):
    """Where the comparison report goes."""

    output: str = Field("report", description="folder for report.md, report.csv, report.html and the charts")
    overwrite: bool = Field(False, description="replace an existing output folder")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


class OneLineParser(argparse.ArgumentParser):
    """A parser whose bad-flag errors are one line (argparse names the flag and, for choices, the valid ones)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``prunellm`` parser with one sub-command per stage."""
    parser = OneLineParser(prog="prunellm", description="Structured pruning, recovery and evaluation of causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="global structured pruning (GQA groups + MLP channels)")
    add_prune_arguments(prune)
    layers = commands.add_parser("layers", help="depth pruning: remove whole decoder layers")
    for model, title in LAYERS_GROUPS:
        add_options(layers, model, title)
    evaluate = commands.add_parser("eval", help="evaluate a model (perplexity, zero-shot, speed, memory)")
    add_options(evaluate, EvalTarget, "model")
    add_options(evaluate, EvalOptions, "evaluation")
    run = commands.add_parser("run", help="run a recipe file: prune or layers with its option groups in YAML")
    run.add_argument("recipe_file", metavar="RECIPE.yaml", help="YAML: 'command: prune|layers' and one mapping per option group")
    finetune = commands.add_parser("finetune", help="recovery fine-tuning (LoRA or full) of a pruned model")
    add_finetune_arguments(finetune)
    export = commands.add_parser("export", help="write a model for a serving engine: llama.cpp (GGUF) or vLLM")
    add_options(export, ExportOptions, "export")
    report = commands.add_parser("report", help="one comparison table and charts over many run folders")
    report.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR", help="run folders holding evaluation_results.json")
    add_options(report, ReportTarget, "report")
    return parser


PRUNE_GROUPS = (
    (PruneRecipe, "recipe"), (RunOptions, "run"), (EvalOptions, "evaluation"), (FinetuneOptions, "recovery"),
    (LoraOptions, "lora"), (TrackingOptions, "tracking"),  # the same LoRA and tracking groups as `prunellm finetune`
)  # fmt: skip
LAYERS_GROUPS = ((LayersRecipe, "recipe"), (RunOptions, "run"), (EvalOptions, "evaluation"))
RECIPE_COMMANDS = {"prune": PRUNE_GROUPS, "layers": LAYERS_GROUPS}  # `prunellm run` file: command -> option groups


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``prunellm prune`` (also used by run_global_pruning.py)."""
    for model, title in PRUNE_GROUPS:
        add_options(parser, model, title)


FINETUNE_GROUPS = (
    (FinetuneTarget, "model"), (FinetuneData, "data"), (LoraOptions, "lora"), (TrainOptions, "training"),
    (TrackingOptions, "tracking"), (DistillOptions, "distillation"), (EvalOptions, "evaluation"),
)  # fmt: skip


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``prunellm finetune`` (also used by finetune_lora.py)."""
    for model, title in FINETUNE_GROUPS:
        add_options(parser, model, title)


def run_prune(args: argparse.Namespace, argv: list[str]) -> int:
    from .pruner import prune

    recipe = build_options(PruneRecipe, args)
    run = build_options(RunOptions, args)
    eval_options = build_options(EvalOptions, args)
    prune(recipe, run, eval_options, argv=argv, finetune=build_options(FinetuneOptions, args),
          lora=build_options(LoraOptions, args), tracking=build_options(TrackingOptions, args))  # fmt: skip
    return 0


def run_finetune(args: argparse.Namespace, argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from .finetune import run_finetune as finetune

    metrics = finetune(*(build_options(model, args) for model, _ in FINETUNE_GROUPS), argv=argv)
    if metrics.get("model_dir") is None:
        return 0  # another process of a multi-process run; the main one reports
    table = Table(title=f"prunellm finetune ({metrics['method']}, {metrics['steps']} steps)")
    table.add_column("")
    table.add_column("value", justify="right")
    for label, key in (("train loss", "train_loss"), ("held-out loss before", "eval_loss_before"),
                       ("held-out loss after", "eval_loss"), ("tokens/s", "tokens_per_second")):  # fmt: skip
        if metrics.get(key) is not None:
            table.add_row(label, f"{metrics[key]:.4f}" if "loss" in key else f"{metrics[key]:.1f}")
    for row in (metrics.get("evaluation") or {}).get("metrics", {}).get("ppl", []):
        table.add_row(f"PPL {row['dataset']} ({row['protocol']}, {row['scored_tokens']} tok)", f"{row['ppl']:.3f}")
    Console(stderr=True).print(table)
    log.info("results: %s", metrics["output_dir"])
    return 0


def read_recipe_file(path: str | Path) -> tuple[str, dict[str, _Options]]:
    """Parse a ``prunellm run`` file: ``command`` and one mapping per option group of that command (the groups
    and keys of ``prunellm <command> --help``; a group left out takes its defaults; misspelt keys are refused)."""
    import yaml
    from pydantic import ValidationError

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PrunellmError(f"RECIPE.yaml '{path}' is not a readable YAML file: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("command") not in RECIPE_COMMANDS:
        raise PrunellmError(f"RECIPE.yaml '{path}' needs 'command: {'|'.join(RECIPE_COMMANDS)}' at the top level")
    groups = dict((title, model) for model, title in RECIPE_COMMANDS[data["command"]])
    unknown = [key for key in data if key != "command" and key not in groups]
    if unknown:
        raise PrunellmError(f"RECIPE.yaml '{path}': unknown group '{unknown[0]}'; {data['command']} takes {', '.join(groups)}")
    built: dict[str, _Options] = {}
    for title, model in groups.items():
        values = data.get(title) or {}
        if not isinstance(values, dict):
            raise PrunellmError(f"RECIPE.yaml '{path}': '{title}' must be a mapping of option: value")
        try:
            built[title] = model(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(map(str, (title, *error.get("loc", ()))))
            raise PrunellmError(f"RECIPE.yaml '{path}': {where}: {error['msg']}") from None
    return data["command"], built


def run_recipe(args: argparse.Namespace, argv: list[str]) -> int:
    from .pruner import prune, prune_layers

    from .model_files import check_device

    command, groups = read_recipe_file(args.recipe_file)
    check_device(groups["run"].device, f"RECIPE.yaml '{args.recipe_file}': run.device")
    if command == "prune":
        prune(groups["recipe"], groups["run"], groups["evaluation"], argv=argv, finetune=groups["recovery"],
              lora=groups["lora"], tracking=groups["tracking"])  # fmt: skip
    else:
        prune_layers(groups["recipe"], groups["run"], groups["evaluation"], argv=argv)
    return 0


def run_layers(args: argparse.Namespace, argv: list[str]) -> int:
    from .pruner import prune_layers

    prune_layers(build_options(LayersRecipe, args), build_options(RunOptions, args), build_options(EvalOptions, args), argv=argv)
    return 0


# the seed's layer_pruning.py flags and what they are called here
SEED_LAYER_FLAGS = {
    "--save_ckpt_log_name": "--output_name",
    "--layer_importance_samples": "--layer_importance_num_samples",
    "--channel_importance_samples": "--calibration_num_samples",
    "--eval_seq_len": "--ppl_seq_len",
}
SEED_EVAL_FLAGS = ("--test_original_ppl", "--test_after_prune")


def translate_seed_layer_flags(argv: list[str]) -> list[str]:
    """Map ``layer_pruning.py``'s flags onto ``prunellm prune --allocation layerwise``."""
    out = ["prune", "--allocation", "layerwise"]
    wants_eval = False
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if flag in SEED_EVAL_FLAGS or flag == "--save_model":
            value = inline or (argv[i + 1] if takes_value else "true")
            i += 1 if inline or not takes_value else 2
            if flag in SEED_EVAL_FLAGS and value.lower() in ("1", "true", "yes"):
                wants_eval = True
            elif flag == "--save_model" and value.lower() in ("0", "false", "no"):
                log.warning("--save_model False: the pruned model is always saved (it is the run's main output)")
            continue
        out.append(SEED_LAYER_FLAGS.get(flag, flag) + (f"={inline}" if inline else ""))
        i += 1
    if wants_eval and "--run_evaluation" not in out:
        out += ["--run_evaluation", "ppl"]
    return out


def run_eval(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from .checkpoint import import_legacy_pickle
    from .evaluation import evaluate, save_results
    from .models import load_model, load_tokenizer
    from .paths import check_output

    target: EvalTarget = build_options(EvalTarget, args)
    options: EvalOptions = build_options(EvalOptions, args)
    out = check_output(target.output or eval_output(target.model_path), "--output", target.overwrite, kind="file")  # before any work
    if target.model_path.endswith((".bin", ".pt", ".pth")):
        model, tokenizer = import_legacy_pickle(target.model_path, target.trust_pickle)
        model.eval()
    else:
        tokenizer = load_tokenizer(target.model_path, "--model_path")
        model = load_model(target.model_path, dtype=target.dtype, device=target.device, flag="--model_path")
    if tokenizer is None:
        raise PrunellmError(f"--model_path '{target.model_path}' carries no tokenizer")
    results = evaluate(model, tokenizer, options, model_path=target.model_path)
    save_results(results, out)
    table = Table(title=f"{target.model_path}: {results['model']['params']:,} parameters")
    for column in ("dataset", "protocol", "PPL", "scored tokens", "windows"):
        table.add_column(column)
    for row in results["metrics"].get("ppl", []):
        table.add_row(row["dataset"], row["protocol"], f"{row['ppl']:.3f}", str(row["scored_tokens"]), str(row["windows"]))
    if "ppl" in results["metrics"]:
        Console().print(table)
    _print_other_metrics(results, Console())
    log.info("results written to %s", out)
    log.debug(json.dumps(results["metrics"]))
    return 0


def eval_output(model_path: str) -> Path:
    """Where ``prunellm eval`` writes without ``--output``: a prunellm results folder's own
    ``evaluation_results.json`` (beside ``plan.json``, where ``prunellm report`` reads it), a model directory's, a
    legacy file's folder's, or ``./evaluation_results.json`` for a hub or embedded model (never into a cache)."""
    from .assets import EMBEDDED_MODELS
    from .models import resolve_model_path
    from .report import RESULTS_FILE

    if model_path.endswith((".bin", ".pt", ".pth")):
        return Path(model_path).with_name(RESULTS_FILE)
    if model_path in EMBEDDED_MODELS:
        return Path(RESULTS_FILE)
    path = Path(resolve_model_path(model_path, "--model_path"))
    given = Path(model_path).expanduser()
    if given.is_dir() and path == given / "model":  # a results folder: the run's results sit at its top
        return given / RESULTS_FILE
    return path / RESULTS_FILE if path.is_dir() else Path(RESULTS_FILE)


def _print_other_metrics(results: dict, console) -> None:
    """Zero-shot, speed and memory figures of one results document, as the report shows them."""
    from rich.table import Table

    from .report import summarize

    rows = [(header, value) for header, value in summarize(results) if not header.startswith("PPL ")]
    if any(key in results["metrics"] for key in ("zeroshot", "speed", "memory")):
        table = Table()
        table.add_column("metric")
        table.add_column("value", justify="right")
        for header, value in rows:
            table.add_row(header, value)
        console.print(table)


def run_report(args: argparse.Namespace) -> int:
    from .paths import atomic_dir, check_output
    from .report import build_report

    target: ReportTarget = build_options(ReportTarget, args)
    inputs = [("RESULTS_DIR", folder) for folder in args.results_dirs]
    out = check_output(target.output, "--output", target.overwrite, inputs=inputs)
    with atomic_dir(out) as tmp:  # a replaced report keeps no chart of the old one
        report = build_report(args.results_dirs, tmp)
    print(report["markdown"], end="")
    log.info("report written to %s", target.output)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .export import export_model

    written = export_model(build_options(ExportOptions, args))
    print(written)
    return 0


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) raised in the main thread: a ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` swallows it and every ``finally`` and temporary-output
    cleanup runs on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def stop_signals_unwind():
    """While the block runs, a stop signal raises :class:`Interrupted`; a second one ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        for number in previous:
            signal.signal(number, signal.SIG_DFL)
        raise Interrupted(signum)

    for number in STOP_SIGNALS:
        previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _close_progress_bars() -> None:
    """Finish the progress bars an interruption left open, so that the error starts a line of its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if getattr(args, "device", None) is not None:  # prune, layers, eval: refuse a device this machine lacks before any work
        from .model_files import check_device

        check_device(args.device)
    if args.command == "prune":
        return run_prune(args, argv)
    if args.command == "layers":
        return run_layers(args, argv)
    if args.command == "run":
        return run_recipe(args, argv)
    if args.command == "report":
        return run_report(args)
    if args.command == "finetune":
        return run_finetune(args, argv)
    if args.command == "export":
        return run_export(args)
    return run_eval(args)


def _negative_number(token: str) -> bool:
    try:
        return token.startswith("-") and float(token) < 0
    except ValueError:
        return False


def joined_negative_numbers(argv: list[str]) -> list[str]:
    """``--flag -inf`` as ``--flag=-inf``: argparse reads ``-inf`` or ``-1e30`` after a flag as an option (it takes
    only ``-digits[.digits]`` for a negative number), so ``--tau -inf`` as README writes it would be refused."""
    out: list[str] = []
    for token in argv:
        if _negative_number(token) and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prunellm`` console script."""
    from .paths import discarded_outputs, forget_discarded

    argv = joined_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    forget_discarded()
    try:
        with stop_signals_unwind():
            return _dispatch(args, argv)
    except PrunellmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        _close_progress_bars()
        outputs = ", ".join(str(path) for path in discarded_outputs())
        where = f"nothing was written to {outputs}" if outputs else "no output was written"
        print(f"error: interrupted by {exc}; {where}", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
