"""Benchmarks of effml's components against peer implementations, run by ``effml bench NAME``.

Each benchmark measures effml and its peers side by side in one process, on the same config, and reports absolute
numbers plus ratios against the peers measured in the same run. ``run_benchmark`` writes
``<out>/bench-<name>/<UTC timestamp>/result.json`` and ``result.md`` (atomically) and never reuses a directory.
Peers are dev/bench extras (``pip install effml[bench]``); a missing one is skipped with a note.
"""

from __future__ import annotations

import datetime as _dt
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effml.benchmarks.common import markdown_table
from effml.io import atomic_write_json, atomic_write_text, check_directory_path

__all__ = ["Benchmark", "BENCHMARKS", "run_benchmark", "render_markdown"]


def _default_render(result: dict[str, Any]) -> str:
    ratios = result.get("ratios", {})
    rows = [[f"`{name}`", "not measured" if entry["value"] is None else f"{entry['value']:.3g}",
             "/".join(entry["numerator"]), "/".join(entry["denominator"])] for name, entry in ratios.items()]
    return "## Ratios\n\n" + markdown_table(["ratio", "value", "numerator", "denominator"], rows) + "\n"


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark.

    Attributes:
        name: the ``effml bench NAME`` name.
        description: one line, shown by ``effml list``.
        run: ``run(quick: bool, device: str) -> dict``, a JSON-serialisable result with at least ``machine`` and
            ``config`` (rendered first in the markdown) and, by convention, ``ratios``.
        render: result -> the markdown body after the machine/config header (tables of numbers and ratios).
        write_files: optional ``(result, directory)`` hook writing extra files (plots) into the run directory.
    """

    name: str
    description: str
    run: Callable[..., dict]
    render: Callable[[dict[str, Any]], str] = _default_render
    write_files: Callable[[dict[str, Any], Path], None] | None = None


def _lazy_benchmark(name: str, module: str, description: str) -> Benchmark:
    """A benchmark whose ``run``, ``render`` and optional ``write_files`` live in ``effml.benchmarks.<module>``,
    imported only when used (so ``effml list`` does not import the peers)."""

    def run(quick: bool = False, device: str = "cpu") -> dict:
        return importlib.import_module(f"effml.benchmarks.{module}").run(quick=quick, device=device)

    def render(result: dict[str, Any]) -> str:
        return importlib.import_module(f"effml.benchmarks.{module}").render(result)

    def write_files(result: dict[str, Any], directory: Path) -> None:
        extra = getattr(importlib.import_module(f"effml.benchmarks.{module}"), "write_files", None)
        if extra is not None:
            extra(result, directory)

    return Benchmark(name, description, run, render, write_files)


BENCHMARKS: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in (
    _lazy_benchmark("lm", "lm", "effml's TransformerLM vs x-transformers and HF GPT-2: training tokens/s, step "
                    "memory, KV-cache generation tokens/s, MFU"),
    _lazy_benchmark("lora-rite", "lora_rite", "LoRA-RITE's optimizer step vs Adam and LoRA+ (PEFT): step time and "
                    "state memory at several ranks and widths"),
    _lazy_benchmark("laurel", "laurel", "LAuReL variants vs the plain residual: forward+backward time and peak "
                    "memory at several widths"),
    _lazy_benchmark("padir", "padir", "PaDIR's parallel decoding vs autoregressive decoding as targets grow, and vs "
                    "x-transformers' NonAutoregressiveWrapper: decoding and training-step time"),
    _lazy_benchmark("salt", "salt", "SALT's distillation step vs a plain step of the same student, and SALT_DS's "
                    "scoring of a batch: time, and the ratio the FLOPs model predicts"),
    _lazy_benchmark("ssm", "ssm", "effml's Mamba vs mambapy: training tokens/s; LM step time vs context, SSM vs "
                    "attention"),
)}


def render_markdown(name: str, result: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> str:
    """The full report: title, the machine, the config, then ``render(result)``."""
    machine = result.get("machine", {})
    machine_rows = [[key.replace("_", " "), value if not isinstance(value, dict) else
                     ", ".join(f"{k} {v or 'not installed'}" for k, v in value.items())]
                    for key, value in machine.items()]
    config_rows = [[key, value] for key, value in result.get("config", {}).items()]
    quick = " (--quick: tiny shapes, checks that it runs; not a measurement to quote)" if result.get("quick") else ""
    if "started_utc" in result:
        machine_rows.append(["run started (UTC)", result["started_utc"]])
    return (f"# Benchmark `{name}`{quick}\n\n## Machine\n\n{markdown_table(['property', 'value'], machine_rows)}\n\n"
            f"## Config\n\n{markdown_table(['setting', 'value'], config_rows)}\n\n{render(result)}")


def _new_run_directory(parent: Path, started: _dt.datetime) -> Path:
    """Create and return a fresh ``parent/<UTC timestamp>[-k]`` directory; an existing one is never reused."""
    parent.mkdir(parents=True, exist_ok=True)
    stem = started.strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1, 10_000):
        candidate = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"could not create a new run directory under {parent} for {stem}.")


def run_benchmark(name: str, *, quick: bool = False, out: Path = Path("runs"), device: str = "cpu") -> Path:
    """Run benchmark ``name`` and write ``out/bench-<name>/<UTC timestamp>/result.json`` and ``result.md``.

    The directory is created only once the measurement finished (a failed run writes nothing) and is never an
    existing one (a second run in the same second gets a ``-2`` suffix). Both files are written atomically.
    Returns the path of ``result.md``. An unknown ``name``, or an ``out`` where a file stands in the way of the
    directory, raises ValueError before anything is measured.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; available benchmarks: {', '.join(sorted(BENCHMARKS))}.")
    benchmark = BENCHMARKS[name]
    parent = Path(out) / f"bench-{name}"
    check_directory_path(parent, f"--out {out}", "pass a directory as --out (nothing was measured).")
    started = _dt.datetime.now(_dt.timezone.utc)
    result = benchmark.run(quick=quick, device=device)
    result = {**result, "started_utc": started.isoformat(timespec="seconds")}
    directory = _new_run_directory(parent, started)
    atomic_write_json(directory / "result.json", result)
    markdown_path = directory / "result.md"
    atomic_write_text(markdown_path, render_markdown(name, result, benchmark.render))
    if benchmark.write_files is not None:
        benchmark.write_files(result, directory)
    return markdown_path
