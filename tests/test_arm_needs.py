"""`Arm.needs`: an arm's run waits for the same seed's runs of the arms it needs (a teacher trained in its own arm), in
sequential runs and with ``--jobs``, and the runner refuses needs that cannot be met before it writes anything.

The worker processes are spawned, so the stand-in recipe below is importable by name (this module) in them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from effml.experiments import EXPERIMENTS
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, run_subdir
from effml.experiments.parallel import Unit, run_in_workers
from effml.experiments.runner import run_experiment
from effml.train.distributed import World


@dataclass(frozen=True)
class NeedsConfig:
    seed: int = 0
    seeds: int = 2
    arms: tuple[str, ...] = ("teacher", "student")  # in the order the recipe lists them
    needs: tuple[str, ...] = ("teacher",)  # the student's
    extra_student_seeds: int = 0
    overlap: bool = False  # the seed-0 teacher waits (20 s at most) for the seed-1 student to finish


class TeacherStudent(Experiment):
    """The teacher writes its "weights" (10 + seed) into its run directory; the student reads its seed's teacher's
    weights from ``context.arm_run_dir("teacher")`` when it starts (-1 if they are not there yet)."""

    name, description, presets = "teacher-student", "test recipe", {"smoke": NeedsConfig}

    def arms(self, config: NeedsConfig) -> list[Arm]:
        arms = {"teacher": Arm("teacher", "teacher"), "student": Arm("student", "student", needs=config.needs)}
        return [arms[name] for name in config.arms]

    def arm_seeds(self, config: NeedsConfig, arm: Arm) -> list[int]:
        return self.seeds(config) + (list(range(config.seeds, config.seeds + config.extra_student_seeds))
                                     if arm.name == "student" else [])

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
