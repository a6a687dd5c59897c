"""Measurement helpers shared by every ``effml bench`` benchmark: timing, peak memory, matmul peak, machine, ratios.

Timing (``time_interleaved``, ``paired_rate_ratios``) lives in ``effml.metrics.timing`` (recipes time their speed claims
the same way) and is re-exported here.

Peak memory (``peak_memory``), what the number means:
- CUDA: ``torch.cuda.max_memory_allocated`` during ``steps`` calls minus the memory allocated just before them —
  the bytes of tensors a step needs beyond what existed before it (model weights and the batch are excluded;
  gradients, optimizer state created at the first step, activations and temporaries are included). Allocator
  caching and fragmentation are not counted.
- CPU: tracemalloc cannot see torch's allocations, so each contender is built in a *fresh Python subprocess* and
  the operating system's count is used: the resident-set high-water mark (Linux ``VmHWM``, reset just before the
  steps through ``/proc/self/clear_refs``) reached while running the steps, less the file-backed pages resident
  after them (``RssFile``, ``RssShmem``: torch's kernel code, which the first step reads in — 8–15 MiB that differ
  between contenders running different code and once flipped a comparison), minus the anonymous memory
  (``RssAnon``) just before them. This is the heap the process had to hold for the step: tensors plus allocator
  (glibc) overhead, fragmentation and per-thread buffers — an upper bound on tensor bytes, only comparable between
  contenders measured the same way (method ``linux-vmhwm-anonymous``). Where ``clear_refs`` is unavailable,
  ``getrusage`` max RSS is used, whose high-water mark cannot be reset (then a step that stays below an earlier
  peak of the process reads as a smaller delta, down to 0; the result says which method was used). A reading of
  0 bytes therefore means "not measured": memory ratios built from one (``ratio_entry(..., zero_is_unmeasured=
  True)``) are NaN and print as "not measured" instead of aborting the finished benchmark.

Matmul peak (``matmul_workload``, ``measure_matmul_peak``): the FLOP/s of one large square float32 matmul
(2·n³ FLOPs), median of repeats, with the torch threads of this process — the denominator of model FLOPs
utilisation (MFU). On a shared machine the peak drifts with the neighbours' load, so benchmarks time the matmul
interleaved with the model step it is compared with.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from effml.metrics.timing import (
    TimingResult,
    paired_rate_ratios,
    paired_time_ratios,
    require_count,
    synchronize,
    time_interleaved,
)

__all__ = [
    "TimingResult",
    "format_bytes",
    "format_rate",
    "format_ratio",
    "get_path",
    "machine_info",
    "markdown_table",
    "matmul_peak_summary",
    "matmul_workload",
    "measure_matmul_peak",
    "missing_peer_note",
    "package_version",
    "paired_rate_ratios",
    "paired_time_ratios",
    "peak_memory",
    "ratio_entry",
    "synchronize",
    "time_interleaved",
    "verdict",
]


# ---------------------------------------------------------------------------------------------------- timing


def matmul_workload(device: str | torch.device = "cpu", *, size: int = 2048,
                    dtype: torch.dtype = torch.float32) -> tuple[Callable[[], Any], float]:
    """A zero-argument callable multiplying two random ``size`` × ``size`` matrices on ``device``, and its FLOPs
    (2·size³). Time it interleaved with a model's step to get the peak under the same machine conditions."""
    require_count("size", size, 1)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator, dtype=dtype).to(device)
    b = torch.randn(size, size, generator=generator, dtype=dtype).to(device)
    return (lambda: torch.mm(a, b)), 2.0 * size ** 3


def matmul_peak_summary(timing: TimingResult, size: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The JSON record of a timed ``matmul_workload``: ``flops_per_s`` (2·size³ ÷ median), size, dtype, median,
    repeats, the torch intra-op threads used and the samples."""
    return {"flops_per_s": 2.0 * size ** 3 / timing.median, "size": size, "dtype": str(dtype).replace("torch.", ""),
            "median_s": timing.median, "repeats": len(timing.samples), "threads": torch.get_num_threads(),
            "samples_s": list(timing.samples)}


def measure_matmul_peak(device: str | torch.device = "cpu", *, size: int = 2048, repeats: int = 5, warmup: int = 1,
                        dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Measured matmul throughput of this machine on its own: a ``size``³ matmul, median of ``repeats``
    (see ``matmul_peak_summary`` for the returned dict). This is the practical peak that MFU is measured against,
    not the vendor's number; on a shared machine prefer timing ``matmul_workload`` interleaved with the model."""
    workload, _ = matmul_workload(device, size=size, dtype=dtype)
    timing = time_interleaved({"matmul": workload}, repeats=repeats, warmup=warmup, device=device)["matmul"]
    return matmul_peak_summary(timing, size, dtype)


# ---------------------------------------------------------------------------------------------------- memory

# Runs in a fresh interpreter: builds one contender with a factory "module:function" (returning a zero-argument
# step callable), then measures the resident-set growth of running the step. Prints one JSON line.
_MEMORY_CHILD = r"""
import gc, importlib, json, resource, sys
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
module_name, function_name = spec["factory"].split(":")
step = getattr(importlib.import_module(module_name), function_name)(**spec["kwargs"])
gc.collect()

def status_kib(field):
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None

def maxrss_kib():
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value   # bytes on macOS, KiB on Linux

method = "getrusage-maxrss"
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")   # reset the peak resident set size (VmHWM) to the current one
    if status_kib("VmHWM") is not None:
        method = "linux-vmhwm-reset"
except OSError:
    pass
anonymous = method == "linux-vmhwm-reset" and status_kib("RssAnon") is not None
before = status_kib("RssAnon") if anonymous else (status_kib("VmRSS") or maxrss_kib())
for _ in range(spec["steps"]):
    step()
if anonymous:
    # VmHWM also counts file-backed pages (torch's kernel code, read in by the first step): take off those resident
    # now, which are at least those resident at the peak, leaving a lower bound on the peak of anonymous memory.
    peak = status_kib("VmHWM") - status_kib("RssFile") - (status_kib("RssShmem") or 0)
    method = "linux-vmhwm-anonymous"
else:
    peak = status_kib("VmHWM") if method == "linux-vmhwm-reset" else maxrss_kib()
print("EFFML-MEMORY " + json.dumps({"before_kib": before, "peak_kib": peak, "method": method}))
"""


def _effml_import_root() -> str:
    import effml

    return str(Path(effml.__file__).resolve().parent.parent)


def peak_memory(factories: Mapping[str, tuple[str, dict[str, Any]]], *, device: str | torch.device = "cpu",
                steps: int = 2, timeout_s: float = 600.0) -> dict[str, dict[str, Any]]:
    """Peak memory a step needs, per contender (see the module docstring for exactly what is measured).

    Args:
        factories: name -> (``"module:function"``, keyword arguments). The function must be importable in a fresh
            interpreter, take the keyword arguments (JSON-serialisable) and return a zero-argument step callable
            with everything (model, optimizer, batch) already built on ``device``.
        device: ``"cpu"`` measures each contender in its own subprocess (all started at once: memory does not
            depend on scheduling); CUDA devices measure in this process, one after the other.
        steps: step calls measured (the first step creates optimizer state, so >= 2 shows the steady state too).

    Returns:
        name -> {"peak_bytes": int, "method": str, "steps": int}.
    """
    require_count("steps", steps, 1)
    if torch.device(device).type == "cuda":
        return {name: _peak_memory_cuda(factory, kwargs, device, steps) for name, (factory, kwargs) in
                factories.items()}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_effml_import_root(), env.get("PYTHONPATH")]))
    processes = {}
    for name, (factory, kwargs) in factories.items():
        spec = {"factory": factory, "kwargs": kwargs, "steps": steps, "threads": torch.get_num_threads()}
        processes[name] = subprocess.Popen([sys.executable, "-c", _MEMORY_CHILD, json.dumps(spec)], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"memory measurement of {name!r} did not finish within {timeout_s:.0f} s.") from None
        lines = [line for line in stdout.splitlines() if line.startswith("EFFML-MEMORY ")]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"memory measurement of {name!r} failed (exit code {process.returncode}):\n"
                               f"{stderr.strip()[-2000:]}")
        reading = json.loads(lines[-1].removeprefix("EFFML-MEMORY "))
        results[name] = {"peak_bytes": max(0, reading["peak_kib"] - reading["before_kib"]) * 1024,
                         "method": reading["method"], "steps": steps}
    return results


def _peak_memory_cuda(factory: str, kwargs: dict[str, Any], device: str | torch.device,
                      steps: int) -> dict[str, Any]:
    import importlib

    module_name, function_name = factory.split(":")
    step = getattr(importlib.import_module(module_name), function_name)(**kwargs)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del step
    torch.cuda.empty_cache()
    return {"peak_bytes": int(peak), "method": "cuda-max-memory-allocated", "steps": steps}


# ---------------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(distribution: str) -> str | None:
    """Installed version of a distribution (e.g. ``"x-transformers"``), or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def missing_peer_note(package: str, error: BaseException) -> str:
    """The note recorded when a peer cannot be imported."""
    return (f"skipped: {package} is not importable ({type(error).__name__}: {error}); "
            f"install the peers with `pip install effml[bench]` (or `pip install {package}`).")


def machine_info(device: str | torch.device, peers: Sequence[str] = ()) -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model, cores, torch threads, torch/Python versions, device (GPU name on
    CUDA), OS, and the versions of the ``peers`` distributions (None where not installed)."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "os": platform.platform(), "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["peers"] = {name: package_version(name) for name in peers}
    return info


# ---------------------------------------------------------------------------------------------------- ratios


def get_path(result: Mapping[str, Any], path: Sequence[str]) -> Any:
    """``result[path[0]][path[1]]...``; KeyError naming the whole path when a key is missing."""
    value: Any = result
    for depth, key in enumerate(path):
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(f"no value at {'/'.join(path[:depth + 1])} in the benchmark result")
        value = value[key]
    return value


def ratio_entry(result: Mapping[str, Any], numerator: Sequence[str], denominator: Sequence[str], *,
                better: str, per_round: Sequence[float] | None = None,
                zero_is_unmeasured: bool = False) -> dict[str, Any]:
    """A ratio computed from two absolute numbers already in ``result`` (so the JSON can be checked against itself).

    Returns {"value": numerator ÷ denominator, "numerator": path, "denominator": path, "better": "higher"|"lower"},
    plus, when ``per_round`` ratios are given (see ``paired_rate_ratios``), "per_round": {"median", "min", "max",
    "rounds", "rounds_at_least_1"}. A zero denominator raises ValueError, unless ``zero_is_unmeasured`` (readings
    where 0 means the method saw nothing, as CPU peak memory can): then a zero on either side makes "value" None
    (null in result.json, which stays strict JSON) and adds "not_measured" naming the zero reading(s).
    """
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}.")
    top, bottom = get_path(result, numerator), get_path(result, denominator)
    zeros = [path for path, value in ((numerator, top), (denominator, bottom)) if value == 0]
    if zero_is_unmeasured and zeros:
        return {"value": None, "numerator": list(numerator), "denominator": list(denominator), "better": better,
                "not_measured": " and ".join("/".join(path) for path in zeros) + " read 0"}
    if not bottom:
        raise ValueError(f"cannot form a ratio: the denominator {'/'.join(denominator)} is {bottom!r}.")
    entry = {"value": top / bottom, "numerator": list(numerator), "denominator": list(denominator), "better": better}
    if per_round is not None:
        entry["per_round"] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
                              "rounds": len(per_round), "rounds_at_least_1": sum(r >= 1.0 for r in per_round)}
    return entry


def verdict(entry: Mapping[str, Any], threshold: float) -> str:
    """``"met"``, ``"not met"`` or ``"inconclusive"`` for a ratio entry whose target is ``value >= threshold``
    (``better == "higher"``) or ``value <= threshold`` (``"lower"``).

    The quotient of medians decides, unless the entry has per-round ratios whose median falls on the other side of
    the threshold: the two estimates then disagree, the difference is within the machine's noise, and the answer
    is ``"inconclusive"`` rather than a verdict the next run might flip. A value of None (see ``ratio_entry``)
    gives ``"not measured"``.
    """
    def meets(value: float) -> bool:
        return value >= threshold if entry["better"] == "higher" else value <= threshold

    if entry["value"] is None:
        return "not measured"
    headline = meets(entry["value"])
    if "per_round" in entry and meets(entry["per_round"]["median"]) != headline:
        return "inconclusive"
    return "met" if headline else "not met"


# ---------------------------------------------------------------------------------------------------- markdown


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (cells converted with ``str``; ``|`` escaped)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_ratio(entry: Mapping[str, Any] | None, digits: int = 2) -> str:
    """A ratio entry as ``value×``, followed for timed ratios by the per-round median and range:
    ``1.05× (rounds: 1.07× [0.98–1.12])`` (``digits`` decimals); ``–`` when there is no entry, ``not measured``
    when its value is None (a reading of 0, see ``ratio_entry``)."""
    if entry is None:
        return "–"
    if entry["value"] is None:
        return "not measured"
    text = f"{entry['value']:.{digits}f}×"
    if "per_round" in entry:
        rounds = entry["per_round"]
        text += f" (rounds: {rounds['median']:.{digits}f}× [{rounds['min']:.{digits}f}–{rounds['max']:.{digits}f}])"
    return text


def format_bytes(n_bytes: float | None) -> str:
    """Bytes as MiB with one decimal (``"–"`` for None)."""
    return "–" if n_bytes is None else f"{n_bytes / 2 ** 20:.1f} MiB"


def format_rate(value: float | None) -> str:
    """A rate with three significant-ish digits and a k/M/G suffix (``"–"`` for None)."""
    if value is None:
        return "–"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"
