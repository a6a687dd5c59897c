"""Several (arm, seed) runs of a recipe at once, each in its own process: ``effml run NAME --jobs N``.

The small models of the CPU presets use two cores hardly better than one (mimetic's copying model: 53 ms per step
with two threads, 55 ms with one; two single-thread processes side by side, 64 ms each), so N single-thread
processes finish N runs in little more than the time one run takes with N threads. ``run_in_workers`` starts
``jobs`` spawned worker processes with ``threads`` torch threads each and hands them the runs one at a time, in
order except that a run waits until the runs it needs (``Arm.needs``: those of its seed, or a shared arm's one run)
have finished; each worker calls ``Experiment.run_arm`` exactly as a sequential run does (same directories,
checkpoints and resume) and sends back its ``ArmRun``. The parent alone writes results.

Stopping. Workers sit in their own process group, so a Ctrl-C at the terminal reaches the parent only; the parent then
hands out no more runs and forwards one SIGINT to every busy worker, whose trainer checkpoints at its next step
boundary and stops, as a sequential run does on Ctrl-C (SIGTERM to the parent does the same). A run that fails stops
the others the same way before its error is raised. A run a worker was still setting up (outside its trainer's loop)
stops without a checkpoint and starts afresh on ``--resume``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from effml.experiments.base import Arm, ArmRun, Experiment, RunContext
from effml.train.loop import StopSignals, TrainingInterrupted

__all__ = ["Unit", "WorkerError", "run_in_workers"]


@dataclass(frozen=True)
class Unit:
    """One (arm, seed) run: the arm and where/how it runs."""

    arm: Arm
    context: RunContext


class WorkerError(RuntimeError):
    """The traceback of an exception raised in a worker process (set as that exception's cause)."""


def _worker_main(connection: Connection, threads: int) -> None:
    """A worker's loop: receive ``(experiment, config, unit)``, run it, send ``("done", ArmRun)``; stop on ``None``.

    A stop request (SIGINT from the parent, or SIGTERM) makes the trainer checkpoint and raise TrainingInterrupted, or
    raises KeyboardInterrupt outside the trainer's loop; either is reported and ends the worker, as does a failure."""
    os.setpgid(0, 0)  # out of the terminal's foreground group: a Ctrl-C reaches the parent, which forwards it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    torch.set_num_threads(threads)
    while True:
        try:
            task = connection.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            return
        experiment, config, unit = task
        try:
            unit.context.run_dir.mkdir(parents=True, exist_ok=True)
            connection.send(("done", experiment.run_arm(config, unit.arm, unit.context)))
        except TrainingInterrupted as stop:
            connection.send(("interrupted", stop.step, stop.checkpoint))
            return
        except KeyboardInterrupt:
            connection.send(("stopped",))
            return
        except BaseException as error:  # sent back whole when it pickles, else as its text; the parent raises it
            connection.send(("failed", _portable(error), traceback.format_exc()))
            return


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (its type and message intact), else a RuntimeError with its text."""
    import pickle

    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:  # an exception whose constructor does not take its own args back
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


@dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    connection: Connection
    unit: Unit | None = None
    alive: bool = True
    stopping: bool = False  # sent its one SIGINT (a second could cut short the report of the first)

    def assign(self, experiment: Experiment, config: Any, unit: Unit) -> None:
        self.unit = unit
        self.connection.send((experiment, config, unit))

    def receive(self) -> tuple[Any, ...]:
        """The worker's report on its unit; a worker that died without one (killed, out of memory) is a failure."""
        try:
            if self.connection.poll():
                return self.connection.recv()
        except (EOFError, OSError):
            pass
        self.process.join(timeout=5)
        self.alive = False
        assert self.unit is not None
        error = RuntimeError(f"the worker process running arm {self.unit.arm.name!r}, seed {self.unit.context.seed} "
                             f"died (exit code {self.process.exitcode}) without reporting, e.g. killed for memory; "
                             "resume the run, with fewer --jobs if memory is short.")
        return ("failed", error, "")


@dataclass
class _Outcome:
    """How the runs that did not finish ended."""

    failure: BaseException | None = None
    interruptions: list[tuple[int, Any]] = field(default_factory=list)  # (step, checkpoint) of interrupted runs
    abandoned: int = 0  # runs stopped before their trainer's loop (no checkpoint)


class _ForwardStopSignals(StopSignals):
    """While active, SIGINT/SIGTERM to the parent request a stop (``requested``) and forward SIGINT to every busy
    worker, once each (a second Ctrl-C of an impatient user reaches the parent alone)."""

    def __init__(self, workers: list[_Worker]) -> None:
        super().__init__()
        self.workers = workers

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Hand out no more runs, and have the busy ones checkpoint and stop."""
        self.requested = True
        for worker in self.workers:
            if worker.unit is not None and worker.alive and not worker.stopping:
                worker.stopping = True
                try:
                    os.kill(worker.process.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass


def run_in_workers(experiment: Experiment, config: Any, units: Sequence[Unit], *, jobs: int,
                   threads: int) -> Iterator[tuple[Unit, ArmRun]]:
    """Yield ``(unit, ArmRun)`` as each unit finishes, running up to ``jobs`` of them at once in spawned processes
    with ``threads`` torch threads each. An idle worker gets the first unit, in the order given, that is ready: none of
    the units its arm needs (``Arm.needs``: the same seed's, or a shared arm's one unit whatever its seed) is waiting or
    running; one absent from ``units`` counts as complete (a resumed run's finished runs). While no unit is ready, the
    pool waits for a busy one to finish.

    After a stop (see the module docstring) the units that finished are yielded, then TrainingInterrupted is raised
    (with the first interrupted run's step and checkpoint), or KeyboardInterrupt if no run had a checkpoint to stop
    at. A unit that raised has its exception re-raised here once the others have stopped, with the worker's
    traceback as its cause."""
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-flight
    workers: list[_Worker] = []
    outcome = _Outcome()
    pending = list(units)
    # The handler stays in place until the workers are shut down: a second Ctrl-C during the shutdown is absorbed
    # (it raised KeyboardInterrupt in the joins below, losing the interruption's checkpoint).
    with _ForwardStopSignals(workers) as signals:
        try:
            for _ in range(min(jobs, len(units))):
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_worker_main, args=(child_end, threads), daemon=True)
                process.start()
                child_end.close()
                workers.append(_Worker(process, parent_end))
            while True:
                if not signals.requested:
                    for worker in workers:
                        if worker.unit is None and worker.alive and (index := _first_ready(pending, workers)) >= 0:
                            worker.assign(experiment, config, pending.pop(index))
                busy = [worker for worker in workers if worker.unit is not None]
                if not busy:
                    if pending and not signals.requested:  # (the runner's check of Arm.needs rules this out)
                        raise RuntimeError("the runs left need each other: " + ", ".join(
                            f"arm {unit.arm.name!r} (needs {', '.join(unit.arm.needs)}), seed {unit.context.seed}"
                            for unit in pending))
                    break
                ready = set(wait([w.connection for w in busy] + [w.process.sentinel for w in busy]))
                for worker in busy:
                    if worker.connection not in ready and worker.process.sentinel not in ready:
                        continue
                    message, unit = worker.receive(), worker.unit
                    worker.unit = None
                    if message[0] == "done":
                        yield unit, message[1]
                        continue
                    # A worker that did not finish its unit has ended, and the run stops: the others checkpoint.
                    worker.alive = False
                    if message[0] == "interrupted":
                        outcome.interruptions.append(message[1:])
                    elif message[0] == "stopped":
                        outcome.abandoned += 1
                    elif outcome.failure is None:
                        outcome.failure = _with_remote_traceback(*message[1:], unit)
                    signals.stop()
        finally:
            _shut_down(workers)
    if outcome.failure is not None:
        raise outcome.failure
    if outcome.interruptions:
        step, checkpoint = outcome.interruptions[0]
        raise TrainingInterrupted(step, checkpoint)
    if pending or outcome.abandoned:
        raise KeyboardInterrupt


def _first_ready(pending: list[Unit], workers: list[_Worker]) -> int:
    """The index in ``pending`` of the first unit that needs no unit still pending or busy; -1 if there is none. A
    unit needs the units of its own seed of the arms in its ``Arm.needs``, and of a shared arm (``Arm.shared``) its one
    unit, whatever the seeds."""
    busy = [worker.unit for worker in workers if worker.unit is not None]
    unfinished = {(unit.arm.name, unit.context.seed) for unit in [*pending, *busy]}
    unfinished_shared = {unit.arm.name for unit in [*pending, *busy] if unit.arm.shared}
    return next((index for index, unit in enumerate(pending)
                 if not any(need in unfinished_shared or (need, unit.context.seed) in unfinished
                            for need in unit.arm.needs)), -1)


def _with_remote_traceback(error: BaseException, remote_traceback: str, unit: Unit) -> BaseException:
    if remote_traceback:
        error.__cause__ = WorkerError(f"in the worker running arm {unit.arm.name!r}, seed {unit.context.seed}:\n"
                                      f"{remote_traceback}")
    return error


def _shut_down(workers: list[_Worker]) -> None:
    """Ask idle workers to exit, then make sure none outlives the pool (a consumer's error may leave busy ones)."""
    for worker in workers:
        try:
            worker.connection.send(None)
        except (BrokenPipeError, OSError):
            pass
    for worker in workers:
        worker.process.join(timeout=30 if worker.unit is None else 0)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join()
        worker.connection.close()
