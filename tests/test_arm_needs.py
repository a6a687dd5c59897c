"""`Arm.needs`: an arm's run waits for the same seed's runs of the arms it needs (a teacher trained in its own arm), or
for a shared arm's one run (`Arm.shared`), in sequential runs and with ``--jobs``, and the runner refuses needs that
cannot be met before it writes anything.

The worker processes are spawned, so the stand-in recipe below is importable by name (this module) in them."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from effml.experiments import EXPERIMENTS
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, run_subdir
from effml.experiments.parallel import Unit, _first_ready, _Worker, run_in_workers
from effml.experiments.runner import _check_needs, run_experiment
from effml.train.distributed import World


@dataclass(frozen=True)
class NeedsConfig:
    seed: int = 0
    seeds: int = 2
    arms: tuple[str, ...] = ("teacher", "student")  # in the order the recipe lists them
    needs: tuple[str, ...] = ("teacher",)  # the student's
    extra_student_seeds: int = 0
    overlap: bool = False  # the seed-0 teacher waits (20 s at most) for the seed-1 student to finish
    shared: bool = False  # the teacher is a shared arm (one run, seed 0, for every seed)
    teacher_every_seed: bool = False  # arm_seeds gives the teacher every seed even when it is shared


class TeacherStudent(Experiment):
    """The teacher writes its "weights" (10 + seed) into its run directory, and a line into its file "runs" each time
    it runs; the student reads its seed's teacher's (or the shared teacher's) weights from
    ``context.arm_run_dir("teacher")`` when it starts (-1 if they are not there yet)."""

    name, description, presets = "teacher-student", "test recipe", {"smoke": NeedsConfig}

    def arms(self, config: NeedsConfig) -> list[Arm]:
        arms = {"teacher": Arm("teacher", "teacher", shared=config.shared),
                "student": Arm("student", "student", needs=config.needs)}
        return [arms[name] for name in config.arms]

    def arm_seeds(self, config: NeedsConfig, arm: Arm) -> list[int]:
        if arm.name == "teacher":
            return self.seeds(config) if config.teacher_every_seed else super().arm_seeds(config, arm)
        return self.seeds(config) + list(range(config.seeds, config.seeds + config.extra_student_seeds))

    def claims(self, config: NeedsConfig) -> list:
        return []

    def run_arm(self, config: NeedsConfig, arm: Arm, context: RunContext) -> ArmRun:
        if arm.name == "teacher":
            if config.overlap and context.seed == 0:
                other_student = run_subdir(context.run_dir.parents[1], "student", 1) / "done"
                deadline = time.monotonic() + 20
                while not other_student.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
                if other_student.exists():
                    (context.run_dir / "overlapped").touch()
            with open(context.run_dir / "runs", "a") as log:
                log.write(f"seed {context.seed}\n")
            (context.run_dir / "pid").write_text(str(os.getpid()))
            (context.run_dir / "weights").write_text(str(10 + context.seed))
            return ArmRun(params=1, metrics={"weights": 10.0 + context.seed})
        weights = context.arm_run_dir("teacher") / "weights"
        teacher_weights = float(weights.read_text()) if weights.exists() else -1.0
        (context.run_dir / "done").touch()
        return ArmRun(params=1, metrics={"teacher_weights": teacher_weights})


@pytest.fixture
def recipe(monkeypatch) -> str:
    monkeypatch.setitem(EXPERIMENTS, TeacherStudent.name, TeacherStudent())
    return TeacherStudent.name


def _metrics(run_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete"
    return {arm: {seed: run["metrics"] for seed, run in entry["runs"].items()}
            for arm, entry in results["arms"].items()}


EXPECTED = {"teacher": {"0": {"weights": 10.0}, "1": {"weights": 11.0}},
            "student": {"0": {"teacher_weights": 10.0}, "1": {"teacher_weights": 11.0}}}


def test_with_jobs_a_student_waits_for_its_seeds_teacher_only(tmp_path, recipe) -> None:
    """The seed-0 teacher finishes only once the seed-1 student has: handing out runs strictly in order would start
    the seed-0 student before its teacher finished, and holding every student back until all teachers finished would
    keep the seed-0 teacher waiting in vain."""
    run_dir = run_experiment(recipe, preset="smoke", overrides=["overlap=true"], out=tmp_path, quiet=True, jobs=2)
    assert _metrics(run_dir) == EXPECTED
    assert (run_subdir(run_dir, "teacher", 0) / "overlapped").exists()


def test_sequential_runs_give_the_same_results(tmp_path, recipe) -> None:
    run_dir = run_experiment(recipe, preset="smoke", out=tmp_path, quiet=True)
    assert _metrics(run_dir) == EXPECTED


def test_arm_run_dir_is_where_the_runner_runs_that_arm(tmp_path, recipe) -> None:
    top = Path("runs/salt/20260101-000000")
    context = RunContext(run_dir=run_subdir(top, "student", 2), seed=2, device="cpu", world=World())
    assert context.arm_run_dir("teacher") == top / "teacher" / "seed-2"

    run_dir = run_experiment(recipe, preset="smoke", out=tmp_path, quiet=True)
    for seed in (0, 1):
        context = RunContext(run_dir=run_subdir(run_dir, "student", seed), seed=seed, device="cpu", world=World())
        assert (context.run_dir / "done").exists()  # the student's own run directory
        assert (context.arm_run_dir("teacher") / "weights").read_text() == str(10 + seed)


def test_a_need_absent_from_the_units_counts_as_complete(tmp_path) -> None:
    """On --resume the finished teacher runs are not among the units, and their students start at once."""
    for seed in (0, 1):
        teacher = run_subdir(tmp_path, "teacher", seed)
        teacher.mkdir(parents=True)
        (teacher / "weights").write_text(str(10 + seed))
    units = [Unit(Arm("student", "student", needs=("teacher",)), RunContext(
        run_dir=run_subdir(tmp_path, "student", seed), seed=seed, device="cpu", world=World())) for seed in (0, 1)]
    runs = list(run_in_workers(TeacherStudent(), NeedsConfig(), units, jobs=2, threads=1))
    assert sorted((unit.context.seed, run.metrics["teacher_weights"]) for unit, run in runs) == [(0, 10.0), (1, 11.0)]


@pytest.mark.parametrize("override, message", [
    ("needs=tutor", "arm 'student' needs arm 'tutor', which is not one of the recipe's arms \\(teacher, student\\)"),
    ("arms=student,teacher", "arm 'student' needs arm 'teacher', which TeacherStudent.arms\\(config\\) lists after it"),
    ("needs=student", "arm 'student' needs arm 'student', which .* lists as that arm itself"),
    ("extra_student_seeds=2", "arm 'student' needs arm 'teacher''s run of each of its seeds, but 'teacher' has no "
                              "run with seed\\(s\\) 2, 3"),
])
def test_needs_that_cannot_be_met_are_refused_before_anything_is_written(tmp_path, recipe, override,
                                                                         message) -> None:
    with pytest.raises(ValueError, match=f"^teacher-student: {message}"):
        run_experiment(recipe, preset="smoke", overrides=[override], out=tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())


# --- shared arms ---------------------------------------------------------------------------------------------------


SHARED_EXPECTED = {"teacher": {"0": {"weights": 10.0}},
                   "student": {str(seed): {"teacher_weights": 10.0} for seed in (0, 1, 2)}}


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_shared_teacher_runs_once_and_every_seeds_student_reads_it(tmp_path, recipe, monkeypatch, jobs) -> None:
    """With ``--jobs 2`` the students of seeds 1 and 2 need no teacher of their own seed, but must still wait for the
    shared one, which runs first, in the runner's own process (with every thread), before any student is handed to
    a worker. (Whether a student started early would read the weights depends on how fast each worker process
    starts, so the parent's log of the hand-outs and reports is checked.)"""
    events: list[tuple[str, str, int]] = []
    assign, receive = _Worker.assign, _Worker.receive

    def logged_assign(worker: _Worker, experiment: Experiment, config: NeedsConfig, unit: Unit) -> None:
        events.append(("start", unit.arm.name, unit.context.seed))
        assign(worker, experiment, config, unit)

    def logged_receive(worker: _Worker) -> tuple:
        assert worker.unit is not None
        events.append(("done", worker.unit.arm.name, worker.unit.context.seed))
        return receive(worker)

    monkeypatch.setattr(_Worker, "assign", logged_assign)
    monkeypatch.setattr(_Worker, "receive", logged_receive)
    run_dir = run_experiment(recipe, preset="smoke", overrides=["shared=true", "seeds=3"], out=tmp_path, quiet=True,
                             jobs=jobs)
    assert _metrics(run_dir) == SHARED_EXPECTED
    if jobs > 1:
        assert sorted(events) == [(event, "student", seed) for event in ("done", "start") for seed in (0, 1, 2)]
    assert (run_subdir(run_dir, "teacher", 0) / "pid").read_text() == str(os.getpid())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["arms"]["teacher"]["seeds"] == [0] and results["arms"]["student"]["seeds"] == [0, 1, 2]
    assert sorted(path.name for path in (run_dir / "teacher").iterdir()) == ["seed-0"]
    assert (run_subdir(run_dir, "teacher", 0) / "runs").read_text() == "seed 0\n"
    assert "WARNING" not in (run_dir / "report.md").read_text()  # the teacher's one seed is all it should have


def test_a_resumed_run_does_not_rerun_a_shared_arm_that_completed(tmp_path, recipe) -> None:
    """The shared teacher and the seed-0 student completed; on --resume (with --jobs) the seed-1 student starts at
    once and reads that teacher's weights, and the teacher is not run again."""
    run_dir = run_experiment(recipe, preset="smoke", overrides=["shared=true"], out=tmp_path, quiet=True)
    results = json.loads((run_dir / "results.json").read_text())
    results["status"] = "partial"
    del results["arms"]["student"]["runs"]["1"]
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_subdir(run_dir, "student", 1) / "done").unlink()
    assert run_experiment(recipe, resume=run_dir, quiet=True, jobs=2) == run_dir
    assert _metrics(run_dir) == {"teacher": {"0": {"weights": 10.0}},
                                 "student": {"0": {"teacher_weights": 10.0}, "1": {"teacher_weights": 10.0}}}
    assert (run_subdir(run_dir, "student", 1) / "done").exists()
    assert (run_subdir(run_dir, "teacher", 0) / "runs").read_text() == "seed 0\n"


def test_a_unit_needing_a_shared_arm_waits_for_its_one_unit_whatever_the_seeds() -> None:
    teacher, student = Arm("teacher", "teacher", shared=True), Arm("student", "student", needs=("teacher",))
    top = Path("runs/x/1")

    def unit(arm: Arm, seed: int) -> Unit:
        return Unit(arm, RunContext(run_dir=run_subdir(top, arm.name, seed), seed=seed, device="cpu", world=World()))

    students = [unit(student, seed) for seed in (1, 2)]
    assert _first_ready([unit(teacher, 0), *students], []) == 0
    assert _first_ready(students, [_Worker(process=None, connection=None, unit=unit(teacher, 0))]) == -1
    assert _first_ready(students, [_Worker(process=None, connection=None)]) == 0  # (a resumed run: teacher done)
    not_shared = Arm("teacher", "teacher")
    assert _first_ready([unit(student, 2), unit(student, 1)], [_Worker(None, None, unit(not_shared, 1))]) == 0


def test_arm_run_dir_finds_a_shared_arms_run_or_the_seed_asked_for() -> None:
    top = Path("runs/softsrv/20260101-000000")
    context = RunContext(run_dir=run_subdir(top, "prompt", 2), seed=2, device="cpu", world=World(),
                         shared_seeds={"generator": 0})
    assert context.arm_run_dir("generator") == top / "generator" / "seed-0"
    assert context.arm_run_dir("teacher") == top / "teacher" / "seed-2"
    assert context.arm_run_dir("teacher", seed=5) == top / "teacher" / "seed-5"
    assert context.arm_run_dir("generator", seed=1) == top / "generator" / "seed-1"


def test_the_default_arm_seeds_give_a_shared_arm_the_first_seed_alone() -> None:
    class Plain(TeacherStudent):
        arm_seeds = Experiment.arm_seeds

    config = NeedsConfig(seed=3, seeds=3, shared=True)
    teacher, student = Plain().arms(config)
    assert Plain().arm_seeds(config, teacher) == [3] and Plain().arm_seeds(config, student) == [3, 4, 5]


def test_check_needs_accepts_a_shared_arm_for_every_seed() -> None:
    arms = [Arm("teacher", "teacher", shared=True), Arm("student", "student", needs=("teacher",))]
    _check_needs(TeacherStudent(), arms, {"teacher": [0], "student": [0, 1, 2, 7]})
    with pytest.raises(ValueError, match="'teacher''s run of each of its seeds, but 'teacher' has no run with seed"):
        _check_needs(TeacherStudent(), [Arm("teacher", "teacher"), arms[1]], {"teacher": [0], "student": [0, 1]})


def test_a_shared_arm_may_need_only_shared_arms() -> None:
    """Shared runs come before every per-seed run, so one cannot wait for a per-seed arm's runs."""
    data, model = Arm("data", "data"), Arm("model", "model", needs=("data",), shared=True)
    with pytest.raises(ValueError, match="'model' is shared .* cannot wait for 'data''s runs"):
        _check_needs(TeacherStudent(), [data, model], {"data": [0, 1], "model": [0]})
    _check_needs(TeacherStudent(), [Arm("data", "data", shared=True), model], {"data": [0], "model": [0]})


@pytest.mark.parametrize("overrides, message", [
    (["shared=true", "teacher_every_seed=true"],
     "arm 'teacher' is shared \\(Arm.shared\\), so it runs once for every seed, but TeacherStudent.arm_seeds\\(config, "
     "arm\\) gives it 2 seeds \\(0, 1\\). Make arm_seeds give a shared arm exactly one seed"),
    (["shared=true", "arms=student,teacher"],
     "arm 'student' needs arm 'teacher', which TeacherStudent.arms\\(config\\) lists after it"),
])
def test_shared_arms_that_cannot_serve_every_seed_are_refused(tmp_path, recipe, overrides, message) -> None:
    with pytest.raises(ValueError, match=f"^teacher-student: {message}"):
        run_experiment(recipe, preset="smoke", overrides=overrides, out=tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())
