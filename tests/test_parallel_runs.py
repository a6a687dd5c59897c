"""`effml run NAME --jobs N`: several (arm, seed) runs at once in worker processes (effml.experiments.parallel).

The worker processes are spawned, so the stand-in recipe below is importable by name (this module) in them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from effml.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, main
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext
from effml.experiments.parallel import Unit, WorkerError, _portable, run_in_workers
from effml.report import evaluate_claims
from effml.train import TrainConfig, Trainer, TrainingInterrupted
from effml.train.distributed import World

SMOKE = ["run", "lm-scaling", "--preset", "smoke", "--quiet"]


def _results(out: Path) -> dict:
    (results_file,) = out.glob("lm-scaling/*/results.json")
    return json.loads(results_file.read_text())


def test_two_jobs_measure_what_one_process_measures(tmp_path) -> None:
    assert main([*SMOKE, "--out", str(tmp_path / "one")]) == 0
    assert main([*SMOKE, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert two["status"] == "complete" and two["environment"]["jobs"] == 2
    assert two["environment"]["threads"] == max(1, torch.get_num_threads() // 2)
    for arm, entry in one["arms"].items():
        runs = two["arms"][arm]["runs"]
        assert list(runs) == list(entry["runs"]) == ["0", "1"]  # in seed order, whatever order they finished in
        for seed, run in entry["runs"].items():
            # The same runs; only the thread count differs, which may change float rounding.
            assert runs[seed]["metrics"]["test_loss"] == pytest.approx(run["metrics"]["test_loss"], rel=1e-5)
            (steps_one, losses_one), (steps_two, losses_two) = (zip(*r["curves"]["train_loss"], strict=True)
                                                                for r in (run, runs[seed]))
            assert steps_two == steps_one and losses_two == pytest.approx(losses_one, rel=1e-5)
    assert [claim.verdict for claim in evaluate_claims(two)] == [claim.verdict for claim in evaluate_claims(one)]


def test_ctrl_c_checkpoints_every_busy_run_and_resume_completes(tmp_path) -> None:
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "effml", *SMOKE, "--out", str(out), "--jobs", "2",
               "--set", "train.steps=300", "--set", "train.checkpoint_every=5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    deadline = time.monotonic() + 120
    while len(list(out.glob("lm-scaling/*/*/seed-*/checkpoints/LATEST"))) < 2:  # both workers are training
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the parent only: workers have their own group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    (run_dir,) = (out / "lm-scaling").iterdir()
    assert f"--resume {run_dir}" in stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "partial"
    stopped = list(run_dir.glob("*/seed-*/checkpoints/LATEST"))
    assert len(stopped) >= 2  # every busy run checkpointed where it stopped (not only where it had saved before)

    assert main(["run", "lm-scaling", "--quiet", "--jobs", "2", "--resume", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete"
    for entry in results["arms"].values():
        for run in entry["runs"].values():
            steps = [step for step, _ in run["curves"]["train_loss"]]
            assert steps == sorted(set(steps)) and steps[-1] == 299


def test_jobs_are_refused_where_runs_must_not_share_the_machine(tmp_path, capsys) -> None:
    assert main([*SMOKE, "--jobs", "0", "--out", str(tmp_path)]) == EXIT_USER_ERROR
    assert "--jobs 0" in capsys.readouterr().err
    for name in ("laurel", "laurel-vision", "midas", "lora-rite"):  # their claims compare step times or wall clock
        assert main(["run", name, "--preset", "smoke", "--jobs", "2", "--out", str(tmp_path)]) == EXIT_USER_ERROR
        assert "compare measured times" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    from effml.experiments.runner import RunError, run_experiment

    with pytest.raises(RunError, match="share one accelerator"):
        run_experiment("lm-scaling", preset="smoke", device="cuda", jobs=2, out=tmp_path)


def test_the_start_line_suggests_jobs_only_where_they_are_allowed_and_would_help(monkeypatch) -> None:
    from effml.experiments import get_experiment
    from effml.experiments.runner import _jobs_hint

    lm_scaling, laurel, one = get_experiment("lm-scaling"), get_experiment("laurel"), World()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    hint = _jobs_hint(lm_scaling, 1, "cpu", one, runs=6)
    assert hint == " (--jobs 2 would run 2 at a time, often faster for small models)"
    assert _jobs_hint(laurel, 1, "cpu", one, runs=6) == ""  # its claims compare times
    assert _jobs_hint(lm_scaling, 2, "cpu", one, runs=6) == ""  # already given
    assert _jobs_hint(lm_scaling, 1, "cuda", one, runs=6) == ""
    assert _jobs_hint(lm_scaling, 1, "cpu", one, runs=1) == ""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert _jobs_hint(lm_scaling, 1, "cpu", one, runs=3).startswith(" (--jobs 3 would run 3 at a time")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert _jobs_hint(lm_scaling, 1, "cpu", one, runs=6) == ""


# --- run_in_workers with a stand-in recipe -------------------------------------------------------------------------

@dataclass(frozen=True)
class StandInConfig:
    steps: int = 10_000
    failure: str = ""  # how the seed-1 run fails: "", "value-error" or "exit"


class UnpicklableError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")


class StandIn(Experiment):
    """Trains a 1-parameter model for ``steps`` steps (checkpointing every step); seed 1 fails as configured, once
    seed 0 has a checkpoint, so that the failure finds the other run training."""

    name, description, presets = "stand-in", "test recipe", {}

    def arms(self, config: StandInConfig) -> list[Arm]:
        return [Arm("only", "only")]

    def claims(self, config: StandInConfig) -> list:
        return []

    def run_arm(self, config: StandInConfig, arm: Arm, context: RunContext) -> ArmRun:
        if context.seed == 1 and config.failure:
            other = context.run_dir.parent / "seed-0" / "checkpoints" / "LATEST"
            deadline = time.monotonic() + 60
            while not other.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if config.failure == "exit":
                os._exit(3)
            raise ValueError("no such corpus")
        model = torch.nn.Linear(1, 1)
        trainer = Trainer(model, lambda m, batch, step: (m(batch).pow(2).mean(), {}), lambda index: torch.ones(4, 1),
                          TrainConfig(steps=config.steps, lr=1e-3, warmup_steps=0, checkpoint_every=1, eval_every=0),
                          run_dir=context.run_dir, resume=context.resume, quiet=True)
        return ArmRun(params=2, metrics=trainer.fit().final_metrics)


def _units(tmp_path: Path, seeds: int) -> list[Unit]:
    return [Unit(Arm("only", "only"), RunContext(run_dir=tmp_path / "only" / f"seed-{seed}", seed=seed, device="cpu",
                                                 world=World())) for seed in range(seeds)]


def test_an_exception_that_does_not_pickle_travels_as_its_text() -> None:
    assert _portable(ValueError("no such corpus")).args == ("no such corpus",)
    portable = _portable(UnpicklableError(7, "odd"))
    assert type(portable) is RuntimeError and str(portable) == "UnpicklableError: code 7: odd"


@pytest.mark.parametrize("failure, error, message", [
    ("value-error", ValueError, "no such corpus"),
    ("exit", RuntimeError, "died \\(exit code 3\\)"),
])
def test_a_failing_run_stops_the_other_at_a_checkpoint_and_raises(tmp_path, failure, error, message) -> None:
    units = _units(tmp_path, 2)
    with pytest.raises(error, match=message) as raised:
        list(run_in_workers(StandIn(), StandInConfig(failure=failure), units, jobs=2, threads=1))
    if failure != "exit":
        assert isinstance(raised.value.__cause__, WorkerError)
        assert "in the worker running arm 'only', seed 1" in str(raised.value.__cause__)
    latest = (tmp_path / "only" / "seed-0" / "checkpoints" / "LATEST").read_text()
    assert int(latest.split("-")[-1]) < 10_000  # seed 0 was stopped, not run to its end


def test_a_stop_signal_to_the_parent_interrupts_the_busy_runs(tmp_path) -> None:
    units = _units(tmp_path, 3)
    finished = run_in_workers(StandIn(), StandInConfig(), units, jobs=2, threads=1)

    def ctrl_c_twice_once_both_train() -> None:  # (an impatient user: the workers get one SIGINT each)
        while not all((u.context.run_dir / "checkpoints" / "LATEST").exists() for u in units[:2]):
            time.sleep(0.05)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)

    import threading

    # The runner's handler puts back the one it found when the stop is done. Under load the second press can come
    # after that, and must then land here, not as a KeyboardInterrupt in pytest itself (a CI run was cut short so).
    late_presses: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: late_presses.append(signum))
    try:
        presser = threading.Thread(target=ctrl_c_twice_once_both_train, daemon=True)
        presser.start()
        with pytest.raises(TrainingInterrupted) as raised:
            list(finished)
        presser.join(timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not presser.is_alive()
    assert raised.value.checkpoint is not None and raised.value.step < 10_000
    assert not (tmp_path / "only" / "seed-2").exists()  # the third run was never handed out


def test_a_ctrl_c_while_the_workers_shut_down_is_absorbed(tmp_path, monkeypatch) -> None:
    """A second Ctrl-C can come while the pool shuts its workers down. The stop handler used to be gone by then: the
    press raised KeyboardInterrupt in the joins, and a finished pool (here) or an interruption's checkpoint was lost
    (a CI run was cut short so). The press now lands in the stop handler."""
    from effml.experiments import parallel

    shut_down = parallel._shut_down

    def pressed_during_shutdown(workers) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode of this (main) thread
        time.sleep(0.1)
        shut_down(workers)

    monkeypatch.setattr(parallel, "_shut_down", pressed_during_shutdown)
    runs = list(run_in_workers(StandIn(), StandInConfig(steps=3), _units(tmp_path, 2), jobs=2, threads=1))
    assert sorted(unit.context.seed for unit, _ in runs) == [0, 1]
