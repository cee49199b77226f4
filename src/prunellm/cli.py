"""``prunellm prune | eval``: the command line, generated from the typed options.

Bad input exits with status 2 and one line: ``error: <what, where, what is valid>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import Field

from .errors import PrunellmError
from .options import EvalOptions, PruneRecipe, RunOptions, _Options, add_options, build_options

log = logging.getLogger("prunellm")


class EvalTarget(_Options):
    """Which model to evaluate and where the results go."""

    model_path: str = Field("smollm2-135m", description="smollm2-135m, a model directory, a prunellm results folder, or a hub id")
    output: str | None = Field(None, description="results JSON path (default: <model dir>/evaluation_results.json or ./evaluation_results.json)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    trust_pickle: bool = Field(False, description="allow loading a legacy pickled .bin model (runs code from it)")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    """The ``prunellm`` parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="prunellm", description="Structured pruning, recovery and evaluation of causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="global structured pruning (GQA groups + MLP channels)")
    add_prune_arguments(prune)
    evaluate = commands.add_parser("eval", help="evaluate a model (perplexity)")
    add_options(evaluate, EvalTarget, "model")
    add_options(evaluate, EvalOptions, "evaluation")
    return parser


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``prunellm prune`` (also used by run_global_pruning.py)."""
    add_options(parser, PruneRecipe, "recipe")
    add_options(parser, RunOptions, "run")
    add_options(parser, EvalOptions, "evaluation")


def run_prune(args: argparse.Namespace, argv: list[str]) -> int:
    from .pruner import prune

    recipe = build_options(PruneRecipe, args)
    run = build_options(RunOptions, args)
    eval_options = build_options(EvalOptions, args)
    prune(recipe, run, eval_options, argv=argv)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from .checkpoint import import_legacy_pickle
    from .evaluation import evaluate, save_results
    from .models import load_model, load_tokenizer, resolve_model_path

    target: EvalTarget = build_options(EvalTarget, args)
    options: EvalOptions = build_options(EvalOptions, args)
    if target.model_path.endswith((".bin", ".pt", ".pth")):
        model, tokenizer = import_legacy_pickle(target.model_path, target.trust_pickle)
        model.eval()
        default_out = Path(target.model_path).with_name("evaluation_results.json")
    else:
        path = resolve_model_path(target.model_path, "--model_path")
        tokenizer = load_tokenizer(target.model_path, "--model_path")
        model = load_model(target.model_path, dtype=target.dtype, device=target.device, flag="--model_path")
        default_out = Path(path) / "evaluation_results.json" if Path(path).is_dir() and Path(path).exists() else Path("evaluation_results.json")
    if tokenizer is None:
        raise PrunellmError(f"--model_path '{target.model_path}' carries no tokenizer")
    results = evaluate(model, tokenizer, options, model_path=target.model_path)
    out = Path(target.output) if target.output else default_out
    save_results(results, out)
    table = Table(title=f"{target.model_path}: {results['model']['params']:,} parameters")
    for column in ("dataset", "protocol", "PPL", "scored tokens", "windows"):
        table.add_column(column)
    for row in results["metrics"].get("ppl", []):
        table.add_row(row["dataset"], row["protocol"], f"{row['ppl']:.3f}", str(row["scored_tokens"]), str(row["windows"]))
    Console().print(table)
    log.info("results written to %s", out)
    log.debug(json.dumps(results["metrics"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prunellm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "prune":
            return run_prune(args, argv)
        return run_eval(args)
    except PrunellmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
