"""The `effml` command: list | run | report | bench.

Exit codes: 0 success; 2 a user error (bad recipe, preset, override, resume target, ...), printed as one paragraph;
130 interrupted (a checkpoint was written; the message says how to resume); 3 the loss became non-finite.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effml", description="Efficient deep-learning methods, each with a recipe "
                                     "that tests its paper's claim against the baseline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,run,report,bench}")

    commands.add_parser("list", help="every recipe and benchmark, with its presets")

    run = commands.add_parser("run", help="run a recipe (arms × seeds) and write its report")
    run.add_argument("name", help="recipe name (see `effml list`)")
    run.add_argument("--preset", default=None, help="smoke (seconds), cpu (default: minutes on 2 cores) or full (GPU)")
    run.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset's)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    run.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    run.add_argument("--out", default=None, help="parent directory of run directories (default: runs)")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue an interrupted run, or re-derive a finished one with the current code (no "
                          "retraining); takes the run's own preset and settings")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run N (arm, seed) runs at once in separate processes, splitting the threads among them "
                          "(default 1): for the CPU presets of small models, which one run cannot spread over every "
                          "core; refused for recipes whose claims compare times")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    report = commands.add_parser("report", help="re-render the report of a finished or interrupted run")
    report.add_argument("run_dir", help="a run directory (runs/RECIPE/TIMESTAMP) or its results.json")

    bench = commands.add_parser("bench", help="run a benchmark against peer implementations")
    bench.add_argument("name", help="benchmark name (see `effml list`)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (checks that it runs)")
    bench.add_argument("--out", default="runs", help="where the benchmark's JSON and markdown go (default: runs)")
    bench.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    return parser


def _list() -> int:
    from effml.benchmarks import BENCHMARKS
    from effml.experiments import EXPERIMENTS

    print("Recipes (effml run NAME [--preset P]):")
    for name, experiment in sorted(EXPERIMENTS.items()):
        print(f"  {name:<16} {experiment.description}")
        print(f"  {'':<16} presets: {', '.join(experiment.presets)} (default cpu)")
    print("\nBenchmarks (effml bench NAME):")
    for name, bench in sorted(BENCHMARKS.items()):
        print(f"  {name:<16} {bench.description}")
    return 0


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}). "
                         f"Run with --device cpu, or install a CUDA build of PyTorch on a machine with a GPU.")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device {device!r} is not supported: use cpu, cuda or cuda:N.")


def _run(args: argparse.Namespace) -> int:
    from effml.experiments.runner import run_experiment
    from effml.report import load_results
    from effml.train import NonFiniteLoss, TrainingInterrupted
    from effml.train.distributed import current_world

    _check_device(args.device)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: the number of seeds must be at least 1.")
    try:
        run_dir = run_experiment(args.name, preset=args.preset, overrides=args.overrides, seeds=args.seeds,
                                 device=args.device, out=args.out, resume=args.resume, quiet=args.quiet,
                                 jobs=args.jobs)
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        run_dir = getattr(stop, "run_dir", None)  # set by the runner once the run directory exists
        if run_dir is None:
            raise  # stopped before: nothing to resume
        print(f"effml: {str(stop) or 'interrupted'}. Resume with: effml run {args.name} --resume {run_dir}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLoss as error:
        print(f"effml: {error}", file=sys.stderr)
        return EXIT_NON_FINITE
    if current_world().is_main:  # under torchrun, one copy of the verdicts
        _print_verdicts(load_results(run_dir))
        print(f"report: {run_dir / 'report.md'}")
    return 0


def _print_verdicts(results: dict) -> None:
    from effml.report import evaluate_claims, partial_run_warning

    if warning := partial_run_warning(results):
        print(warning)
    for outcome in evaluate_claims(results):
        print(f"[{outcome.verdict:^12}] {outcome.name}: {outcome.evidence}")


def _report(args: argparse.Namespace) -> int:
    from effml.report import load_results, write_report

    run_dir = Path(args.run_dir)
    if run_dir.is_file():  # the results.json itself: the report goes next to it
        if run_dir.name != "results.json":
            raise ValueError(f"effml report {run_dir}: pass a run directory or its results.json; the report is "
                             "written beside the file, together with a fresh results.json, so another JSON file "
                             "would replace the run's own. To render an edited copy, put it as results.json in a "
                             "copy of the run directory.")
        run_dir = run_dir.parent
    results = load_results(run_dir)
    write_report(run_dir, results)
    _print_verdicts(results)
    print(f"report: {run_dir / 'report.md'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from effml.benchmarks import run_benchmark

    _check_device(args.device)
    path = run_benchmark(args.name, quick=args.quick, out=Path(args.out), device=args.device)
    print(f"benchmark report: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `effml` console script and `python -m effml`."""
    from effml.data.corpora import CorpusUnavailableError
    from effml.experiments.runner import RunError
    from effml.train import CheckpointError

    args = build_parser().parse_args(argv)
    handlers = {"list": lambda a: _list(), "run": _run, "report": _report, "bench": _bench}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, CorpusUnavailableError, RunError, CheckpointError) as error:  # user errors
        # (a missing corpus can surface in an arm, e.g. on --resume on another machine); bugs propagate
        print(f"effml: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("effml: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
