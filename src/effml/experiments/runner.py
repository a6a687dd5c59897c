"""Runs a recipe: arms × seeds → the results document → report, in ``runs/NAME/<timestamp>/``.

Layout of a run directory::

    runs/lm-scaling/20261122-060000/
      config.json          recipe, preset, resolved config, seeds, device (written first; --resume reads it)
      results.json         the results document (effml.report), rewritten after every finished (arm, seed)
      report.md, *.png     the report, re-rendered at the same moments
      <arm>/seed-<n>/      metrics.jsonl and checkpoints/ of one run

An existing directory is never reused for a new run. ``--resume RUN_DIR`` first verifies everything it will read
(config, results, each unfinished run's checkpoint) and only then writes, so a bad resume changes nothing.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from effml.config import apply_overrides, config_from_dict, config_to_dict
from effml.experiments.base import (EXPERIMENTS, PRESETS, Arm, ArmRun, Experiment, RunContext, get_experiment,
                                    run_subdir)
from effml.experiments.parallel import Unit, run_in_workers
from effml.io import atomic_write_json, atomic_write_text, check_directory_path
from effml.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from effml.train.distributed import World, barrier, init_distributed
from effml.train.loop import TrainingInterrupted

__all__ = ["run_experiment", "RunError", "new_run_dir", "environment", "threads_per_run"]


class RunError(RuntimeError):
    """A run cannot start or resume; the message says why and what to do."""


def threads_per_run(jobs: int) -> int:
    """Torch threads each of ``jobs`` concurrent runs gets: this process's threads split among them (at least 1)."""
    return max(1, torch.get_num_threads() // jobs)


def environment(device: str, world: World, jobs: int = 1) -> dict[str, Any]:
    """The facts a reader needs to interpret timings and reproduce the run."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads_per_run(jobs),
        "jobs": jobs,
        "device": device,
        "world_size": world.world_size,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def new_run_dir(out: Path, name: str) -> Path:
    """A fresh ``out/name/<UTC timestamp>`` directory (suffixed -2, -3, ... rather than reuse an existing one)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    check_directory_path(out / name, f"--out {out}", "pass another --out.")
    base = out / name / stamp
    candidate, suffix = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = base.with_name(f"{stamp}-{suffix}")


def _broadcast_path(path: Path | None, world: World) -> Path:
    if not world.distributed:
        assert path is not None
        return path
    import torch.distributed as dist

    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _seed_key(seed: int) -> str:
    return str(seed)


def _load_for_resume(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read and check config.json and results.json of a run directory; raise RunError without writing anything."""
    if not run_dir.is_dir():
        raise RunError(f"--resume {run_dir}: no such directory. Pass a run directory such as runs/lm-scaling/<time>.")
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise RunError(f"--resume {run_dir}: {config_file.name} is missing, so this is not an effml run directory "
                       f"(or it was started by an incompatible version). Start a new run instead.")
    try:
        saved = json.loads(config_file.read_text())
        results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else None
    except json.JSONDecodeError as error:
        raise RunError(f"--resume {run_dir}: config.json or results.json is corrupted ({error}); "
                       f"nothing was changed. Start a new run instead.") from error
    missing = [key for key in ("recipe", "preset", "config") if not isinstance(saved, dict) or key not in saved]
    has_arms = results is None or (isinstance(results, dict) and isinstance(results.get("arms"), dict))
    if missing or not has_arms:
        what = f"config.json lacks {', '.join(missing)}" if missing else "results.json has no per-arm results"
        raise RunError(f"--resume {run_dir}: {what}, so it was not written by effml's runner (or was edited by "
                       "hand); nothing was changed. Restore the file or start a new run instead.")
    return saved, results


def _verify_checkpoints(experiment: Experiment, config: Any, run_dir: Path, results: dict[str, Any]) -> None:
    """Every unfinished run that has checkpoints must have a loadable latest one (raises before anything is written)."""
    for arm in experiment.arms(config):
        for seed in experiment.arm_seeds(config, arm):
            done = results["arms"].get(arm.name, {}).get("runs", {}).get(_seed_key(seed), {})
            if done.get("status") == "complete":
                continue
            checkpoints = run_subdir(run_dir, arm.name, seed) / "checkpoints"
            if not checkpoints.exists():
                continue
            try:
                if latest_checkpoint(checkpoints) is not None:
                    load_checkpoint(checkpoints)
                elif any(not entry.name.startswith(".tmp-") for entry in checkpoints.iterdir()):
                    # (only a staging folder: the first save was cut short, and the arm simply starts again)
                    raise CheckpointError(
                        f"{checkpoints} holds files but no LATEST pointer: its first checkpoint was never completed."
                    )
            except CheckpointError as error:
                raise RunError(f"--resume {run_dir}: arm {arm.name!r}, seed {seed}: {error}") from error


def _has_progress(run_dir: Path, results: dict[str, Any]) -> bool:
    """Whether a run directory holds anything worth keeping: a finished run or a checkpoint to resume from."""
    finished = any(run.get("status") == "complete" for arm in results["arms"].values() for run in arm["runs"].values())
    return finished or any(run_dir.glob("*/seed-*/checkpoints/LATEST"))


def _empty_results(experiment: Experiment, preset: str, config: Any, device: str, world: World,
                   jobs: int) -> dict[str, Any]:
    return {
        "recipe": experiment.name,
        "description": experiment.description,
        "preset": preset,
        "status": "partial",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device, world, jobs),
        "config": config_to_dict(config),
        "arms": _refreshed_arms(experiment, config, {}),
        "derived": {},
        **_evaluation(experiment, config),
    }


def _refreshed_arms(experiment: Experiment, config: Any, arms: dict[str, Any]) -> dict[str, Any]:
    """``arms`` (the results' per-arm entries) with every arm of the recipe's current code present and its label, info
    and seeds taken afresh, keeping the runs already done. A resumed run re-derives with the current code, so an arm it
    added or a seed count it changed must show in the document; entries of arms it dropped are kept as they were.
    Raises RunError if two arms share a name (one would silently take the other's results), ValueError if an arm's
    ``needs`` cannot be met or a shared arm has not exactly one seed (`_check_needs`)."""
    arm_list = experiment.arms(config)
    names = [arm.name for arm in arm_list]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise RunError(f"{experiment.name}: the config gives several arms the name(s) {', '.join(repeated)}, so their "
                       "results would overwrite each other; a list setting (--set) probably repeats an entry or two "
                       "entries that name the same thing. Make the entries distinct.")
    seeds = {arm.name: experiment.arm_seeds(config, arm) for arm in arm_list}
    _check_needs(experiment, arm_list, seeds)
    for arm in arm_list:
        entry = arms.setdefault(arm.name, {"params": None, "runs": {}})
        entry.update(label=arm.label, info=dict(arm.info), seeds=seeds[arm.name])
    return arms


def _check_needs(experiment: Experiment, arm_list: Sequence[Arm], seeds: dict[str, list[int]]) -> None:
    """Raise ValueError unless each shared arm has exactly one seed and each arm's ``needs`` names arms listed before
    it that are shared or have every seed it has (``seeds``: arm name → its seeds), so that the run each of its runs
    needs exists and comes first (`Arm.needs`, `Arm.shared`); a shared arm, run before every per-seed run, may need
    only shared arms."""
    names = [arm.name for arm in arm_list]
    shared = {arm.name for arm in arm_list if arm.shared}
    for position, arm in enumerate(arm_list):
        if arm.shared and len(seeds[arm.name]) != 1:
            raise ValueError(f"{experiment.name}: arm {arm.name!r} is shared (Arm.shared), so it runs once for every "
                             f"seed, but {type(experiment).__name__}.arm_seeds(config, arm) gives it "
                             f"{len(seeds[arm.name])} seeds ({', '.join(map(str, seeds[arm.name])) or 'none'}). Make "
                             "arm_seeds give a shared arm exactly one seed (the default gives it seeds(config)[0]), "
                             "or make the arm not shared.")
        for need in arm.needs:
            problem = f"{experiment.name}: arm {arm.name!r} needs arm {need!r}"
            if need not in names:
                raise ValueError(f"{problem}, which is not one of the recipe's arms ({', '.join(names)}). Name an "
                                 f"arm of {type(experiment).__name__}.arms(config) in {arm.name!r}'s Arm.needs.")
            if arm.shared and need not in shared:
                raise ValueError(f"{problem}, but {arm.name!r} is shared (Arm.shared) and runs once, before every "
                                 f"per-seed run, so it cannot wait for {need!r}'s runs. Make {need!r} shared too, or "
                                 f"{arm.name!r} per-seed.")
            if names.index(need) >= position:
                raise ValueError(f"{problem}, which {type(experiment).__name__}.arms(config) lists "
                                 f"{'as that arm itself' if need == arm.name else 'after it'}. List every needed arm "
                                 f"before the arms that need it, and no arm in its own Arm.needs.")
            if need not in shared and (missing := sorted(set(seeds[arm.name]) - set(seeds[need]))):
                raise ValueError(f"{problem}'s run of each of its seeds, but {need!r} has no run with seed(s) "
                                 f"{', '.join(map(str, missing))}. Make arm_seeds(config, arm) give {need!r} every "
                                 f"seed of {arm.name!r}, or make {need!r} a shared arm (Arm.shared).")


def _evaluation(experiment: Experiment, config: Any) -> dict[str, Any]:
    """The claims and plots of the recipe's current code. A resumed run takes them afresh, as it re-derives with the
    current code, so that its verdicts test today's claims on today's derived numbers."""
    from effml.report import check_claim_list

    claims = experiment.claims(config)
    check_claim_list(claims)
    return {"claims": [claim.to_dict() for claim in claims],
            "plots": [plot.to_dict() for plot in experiment.plots(config)]}


def _save(experiment: Experiment, config: Any, results: dict[str, Any], run_dir: Path, *, status: str,
          render: bool) -> None:
    """Write results.json; with ``render``, also report.md and the plots (kept for the end: matplotlib is slow)."""
    from effml.report import write_report

    results["status"] = status
    results["derived"] = experiment.derive(config, results)
    if render:
        write_report(run_dir, results)
    else:
        atomic_write_json(run_dir / "results.json", results)


def _run_here(experiment: Experiment, config: Any, units: Sequence[Unit]) -> Iterator[tuple[Unit, ArmRun]]:
    """Yield ``(unit, ArmRun)`` for each unit, run one after the other in this process (on every rank together). The
    units come arm by arm in the recipe's order, so the runs an arm needs (``Arm.needs``: arms listed before it, a
    shared arm's one run included) are complete before its own runs start."""
    for unit in units:
        if unit.context.world.is_main:
            unit.context.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        yield unit, experiment.run_arm(config, unit.arm, unit.context)


def _jobs_hint(experiment: Experiment, jobs: int, device: str, world: World, runs: int) -> str:
    """A note for the start line where ``--jobs`` > 1 is allowed (``_check_jobs``) and would help: one job now,
    several runs and more than one thread (small models do not spread over every core)."""
    at_once = min(torch.get_num_threads(), runs)
    if jobs > 1 or at_once < 2:
        return ""
    try:
        _check_jobs(experiment, at_once, device, world)
    except RunError:
        return ""
    return f" (--jobs {at_once} would run {at_once} at a time, often faster for small models)"


def _check_jobs(experiment: Experiment, jobs: int, device: str, world: World) -> None:
    """Raise RunError unless ``jobs`` runs may share this machine at once (see effml.experiments.parallel)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise RunError(f"--jobs {jobs!r}: the number of runs at once must be an int ≥ 1.")
    if jobs == 1:
        return
    if world.distributed:
        raise RunError(f"--jobs {jobs} cannot be combined with torchrun, whose ranks already share every run; "
                       "drop --jobs.")
    if device != "cpu":
        raise RunError(f"--jobs {jobs} runs several runs at once on the CPU's cores; with --device {device} they "
                       "would share one accelerator. Drop --jobs, or run with --device cpu.")
    if experiment.claims_on_time:
        raise RunError(f"{experiment.name}'s claims compare measured times, which runs sharing the cores would "
                       "distort; run it without --jobs (one run at a time).")


def _check_data_parallel(experiment: Experiment, config: Any) -> None:
    """Raise RunError if ``config`` asks for FSDP from a recipe that cannot run on a sharded model."""
    if getattr(getattr(config, "train", None), "data_parallel", "ddp") == "fsdp" and not experiment.supports_fsdp:
        able = ", ".join(sorted(name for name, recipe in EXPERIMENTS.items() if recipe.supports_fsdp))
        raise RunError(f"{experiment.name} cannot train a sharded model (train.data_parallel=fsdp): it grows the "
                       "model, reads its parameter values or runs code that FSDP does not support. Drop the setting "
                       f"(DDP replicates the model on every rank); recipes that support FSDP: {able}.")


def run_experiment(
    name: str,
    *,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    seeds: int | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
    jobs: int = 1,
) -> Path:
    """Run (or resume) recipe ``name`` and return its run directory. Rank 0 alone writes files.

    A new run takes ``preset`` (default "cpu"), ``overrides``, ``seeds`` and ``out`` (default "runs"); a resumed one
    (``resume``) takes its own, so giving any of them with ``resume`` is a RunError. ``jobs`` > 1 runs that many
    (arm, seed) runs at once in worker processes, the torch threads split among them (effml.experiments.parallel);
    the runs and their results are the same, up to the float rounding a different thread count may bring. Shared
    arms' runs (``Arm.shared``) come first, in this process with every thread, whatever ``jobs``."""
    experiment = get_experiment(name)
    world = init_distributed(device)
    _check_jobs(experiment, jobs, device, world)
    if world.distributed and device.startswith("cuda"):
        device = f"cuda:{world.local_rank}"

    if resume is not None:
        run_dir = Path(resume)
        given = [flag for flag, value in (("--preset", preset), ("--set", overrides or None), ("--seeds", seeds),
                                          ("--out", out)) if value is not None]
        if given:
            raise RunError(f"--resume {run_dir} continues the run in its own directory with the preset and config it "
                           f"was started with, so {', '.join(given)} cannot be combined with it; drop "
                           f"{'them' if len(given) > 1 else 'it'}, or start a new run with the changed settings.")
        saved, results = _load_for_resume(run_dir)
        if saved.get("recipe") != name:
            raise RunError(f"--resume {run_dir} is a run of {saved.get('recipe')!r}, not {name!r}: "
                           f"use `effml run {saved.get('recipe')} --resume {run_dir}`.")
        preset = saved["preset"]
        config = config_from_dict(experiment.config_class, saved["config"])
        if results is None:
            results = _empty_results(experiment, preset, config, device, world, jobs)
        else:
            results.update(arms=_refreshed_arms(experiment, config, results["arms"]), **_evaluation(experiment, config))
        _verify_checkpoints(experiment, config, run_dir, results)
    else:
        preset = preset or "cpu"
        if preset not in PRESETS or preset not in experiment.presets:
            raise RunError(f"Unknown preset {preset!r} for {name}; choose one of {', '.join(experiment.presets)}.")
        seeds_override = [] if seeds is None else [f"seeds={seeds}"]  # after --set: --seeds wins
        config = apply_overrides(experiment.preset(preset), [*overrides, *seeds_override])
        _check_data_parallel(experiment, config)
        experiment.check(config)
        results = _empty_results(experiment, preset, config, device, world, jobs)  # its arms and seeds are checked too
        run_dir = _broadcast_path(new_run_dir(Path(out or "runs"), name) if world.is_main else None, world)
        if world.is_main:
            atomic_write_text(run_dir / "config.json", json.dumps(
                {"recipe": name, "preset": preset, "overrides": list(overrides), "device": device,
                 "config": config_to_dict(config)}, indent=2))

    # the seed of each shared arm's one run (checked by _refreshed_arms), for RunContext.arm_run_dir
    shared_seeds = {arm.name: experiment.arm_seeds(config, arm)[0] for arm in experiment.arms(config) if arm.shared}
    units = [Unit(arm, RunContext(run_dir=subdir, seed=seed, device=device, world=world, quiet=quiet or jobs > 1,
                                  resume=resume is not None, shared_seeds=shared_seeds))
             for arm in experiment.arms(config) for seed in experiment.arm_seeds(config, arm)
             if results["arms"][arm.name]["runs"].get(_seed_key(seed), {}).get("status") != "complete"
             for subdir in [run_subdir(run_dir, arm.name, seed)]]
    threads = threads_per_run(jobs)
    if world.is_main and not quiet:
        at_once = (f", {jobs} at a time with {threads} thread{'s' * (threads > 1)} each" if jobs > 1
                   else _jobs_hint(experiment, jobs, device, world, len(units)))
        print(f"effml: {name} ({preset}) → {run_dir}: {len(units)} runs to do{at_once}", file=sys.stderr)
    # Shared arms' runs come first, here with every thread: the runs needing them wait anyway (with --jobs, a worker
    # would train a shared model on its share of the threads while the others idle).
    shared = [unit for unit in units if unit.arm.shared]
    per_seed = [unit for unit in units if not unit.arm.shared]
    finished = itertools.chain(_run_here(experiment, config, shared),
                               _run_here(experiment, config, per_seed) if jobs == 1
                               else run_in_workers(experiment, config, per_seed, jobs=jobs, threads=threads))
    try:
        for count, (unit, outcome) in enumerate(finished, start=1):
            arm_entry = results["arms"][unit.arm.name]
            arm_entry["params"] = outcome.params
            arm_entry["runs"][_seed_key(unit.context.seed)] = {"status": "complete", "metrics": outcome.metrics,
                                                               "curves": outcome.curves}
            arm_entry["runs"] = dict(sorted(arm_entry["runs"].items(), key=lambda run: int(run[0])))  # (--jobs)
            if world.is_main:
                _save(experiment, config, results, run_dir, status="partial", render=False)
                if jobs > 1 and not quiet:
                    print(f"effml: [{count}/{len(units)}] {unit.arm.name}, seed {unit.context.seed}: done",
                          file=sys.stderr)
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        if world.is_main:
            _save(experiment, config, results, run_dir, status="partial", render=True)
        stop.run_dir = run_dir  # (for the CLI's "resume with" line)
        raise
    except (ValueError, FileNotFoundError):  # a user error only the data could reveal (a corpus, a size)
        if world.is_main and resume is None and not _has_progress(run_dir, results):
            shutil.rmtree(run_dir, ignore_errors=True)  # made by this call, holding nothing to resume
        raise
    if world.is_main:
        _save(experiment, config, results, run_dir, status="complete", render=True)
    barrier()
    return run_dir
