"""The `effml` command end to end: list, run (smoke preset), report, resume, and every user error."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effml.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, main

SMOKE = ["run", "lm-scaling", "--preset", "smoke", "--quiet"]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with its SHA-256 (to prove a failed command changed nothing)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def smoke_run(run_smoke) -> Path:
    return run_smoke("lm-scaling")


def test_list_names_every_recipe_with_its_presets(capsys) -> None:
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    assert "lm-scaling" in printed and "smoke, cpu, full" in printed and "lm " in printed


def test_smoke_run_writes_a_complete_report_with_computed_verdicts(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["status"] == "complete"
    assert set(results["arms"]) == {"d32-l1", "d64-l2"}
    for arm in results["arms"].values():
        assert set(arm["runs"]) == {"0", "1"} and arm["params"] > 0
        for run in arm["runs"].values():
            assert run["metrics"]["test_bpb"] > 0 and run["curves"]["train_loss"]
    assert set(results["derived"]["power-law"]["runs"]) == {"0", "1"}
    report = (smoke_run / "report.md").read_text()
    for claim in ("loss falls with size", "power-law exponent"):
        assert claim in report
    assert any(v in report for v in ("holds", "fails", "inconclusive"))
    assert list(smoke_run.glob("*.png"))
    assert json.loads((smoke_run / "config.json").read_text())["preset"] == "smoke"


def test_report_re_renders_the_same_report(smoke_run: Path, capsys) -> None:
    before = (smoke_run / "report.md").read_text()
    assert main(["report", str(smoke_run)]) == 0
    assert (smoke_run / "report.md").read_text() == before
    printed = capsys.readouterr().out
    assert "loss falls with size" in printed and "WARNING" not in printed


def test_resume_of_a_finished_run_changes_no_result(smoke_run: Path, tmp_path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    assert main(["run", "lm-scaling", "--quiet", "--resume", str(smoke_run)]) == 0
    assert json.loads((smoke_run / "results.json").read_text())["arms"] == results["arms"]


def test_resume_evaluates_the_recipes_current_claims(smoke_run: Path, tmp_path) -> None:
    """A resumed run re-derives its numbers with the current code, so it must also take the current claims: a run
    dir whose stored claims are out of date gets them replaced, and its verdicts come from the current ones."""
    import shutil

    from effml.experiments import get_experiment
    from effml.experiments.runner import config_from_dict

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    current = results["claims"]
    results["claims"] = [{**current[0], "statement": "an outdated statement"}]
    (run_dir / "results.json").write_text(json.dumps(results))
    assert main(["run", "lm-scaling", "--quiet", "--resume", str(run_dir)]) == 0
    resumed = json.loads((run_dir / "results.json").read_text())
    experiment = get_experiment("lm-scaling")
    config = config_from_dict(experiment.config_class, resumed["config"])
    assert resumed["claims"] == [claim.to_dict() for claim in experiment.claims(config)] == current
    assert "an outdated statement" not in (run_dir / "report.md").read_text()


def test_resume_takes_the_recipes_current_arms_and_seeds(smoke_run: Path, tmp_path) -> None:
    """A run dir written by older code may lack an arm the recipe has now, or list other seeds or labels for one: the
    resumed run adds the arm (and runs it), refreshes the label and seeds, and keeps every run already done."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    current = {name: {key: arm[key] for key in ("label", "info", "seeds")} for name, arm in results["arms"].items()}
    done = results["arms"]["d32-l1"]["runs"]
    del results["arms"]["d64-l2"]
    results["arms"]["d32-l1"].update(label="an outdated label", seeds=[0])
    (run_dir / "results.json").write_text(json.dumps(results))
    assert main(["run", "lm-scaling", "--quiet", "--resume", str(run_dir)]) == 0
    resumed = json.loads((run_dir / "results.json").read_text())
    assert {name: {key: arm[key] for key in ("label", "info", "seeds")}
            for name, arm in resumed["arms"].items()} == current
    assert resumed["arms"]["d32-l1"]["runs"] == done
    assert set(resumed["arms"]["d64-l2"]["runs"]) == {"0", "1"}
    assert "an outdated label" not in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["run", "no-such-recipe"], "Unknown recipe 'no-such-recipe'.*lm-scaling"),
        ([*SMOKE, "--set", "train.lrr=1"], r"unknown key.*train\.lr"),
        ([*SMOKE, "--set", "train.steps=many"], r"train\.steps.*int"),
        ([*SMOKE, "--set", "train.steps=0"], r"steps = 0 .*> 0"),
        ([*SMOKE, "--set", "sizes=64,32x2"], "WIDTHxDEPTH"),
        ([*SMOKE, "--seeds", "0"], "at least 1"),
        ([*SMOKE, "--set", "seed=-1"], r"seed = -1 .*int ≥ 0"),
        ([*SMOKE, "--set", "sizes=64x2,32x1"], "smallest model to the largest"),
        ([*SMOKE, "--set", "head_dim=0"], r"head_dim = 0 .*> 0"),
        ([*SMOKE, "--set", "corpus=no-such-corpus"], "no-such-corpus"),  # found only when an arm loads its data
        ([*SMOKE, "--set", "train.lr=nan"], r"train\.lr = nan is not a finite number"),
        (["run", "lm-scaling", "--preset", "huge"], "preset 'huge'.*smoke"),
        (["run", "lm-scaling", "--device", "cuda"], "CUDA is not available"),
        (["bench", "no-such-bench"], "no-such-bench"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_write_nothing(arguments, expected, tmp_path, capsys) -> None:
    import re

    out = tmp_path / "runs"
    assert main([*arguments, "--out", str(out)]) == EXIT_USER_ERROR
    message = capsys.readouterr().err
    assert re.search(expected, message, re.S), message
    assert not out.exists() or not any(out.glob("*/*"))  # no run directory (an empty runs/RECIPE/ may remain)


def test_resume_rejects_missing_foreign_and_corrupted_targets_without_changing_anything(smoke_run, tmp_path,
                                                                                       capsys) -> None:
    assert main(["run", "lm-scaling", "--resume", str(tmp_path / "absent")]) == EXIT_USER_ERROR
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", "lm-scaling", "--resume", str(tmp_path / "empty")]) == EXIT_USER_ERROR
    assert "not an effml run directory" in capsys.readouterr().err

    # An unfinished run whose checkpoint was damaged: the resume refuses, and no file changes.
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(smoke_run), str(damaged)], check=True)
    results = json.loads((damaged / "results.json").read_text())
    del results["arms"]["d64-l2"]["runs"]["1"]
    (damaged / "results.json").write_text(json.dumps(results))
    weights = next((damaged / "d64-l2" / "seed-1" / "checkpoints").glob("step-*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    before = snapshot(damaged)
    assert main(["run", "lm-scaling", "--resume", str(damaged)]) == EXIT_USER_ERROR
    assert "corrupted" in capsys.readouterr().err
    assert snapshot(damaged) == before

    # Settings cannot change on resume; hand-edited files get a message, not a KeyError.
    finished = snapshot(smoke_run)
    for extra in (["--set", "train.steps=500"], ["--seeds", "7"], ["--preset", "full"], ["--out", str(tmp_path)]):
        assert main(["run", "lm-scaling", "--resume", str(smoke_run), *extra]) == EXIT_USER_ERROR
        assert "cannot be combined with it" in capsys.readouterr().err
    assert snapshot(smoke_run) == finished
    edited = tmp_path / "edited"
    subprocess.run(["cp", "-r", str(smoke_run), str(edited)], check=True)
    saved = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "preset"}))
    assert main(["run", "lm-scaling", "--resume", str(edited)]) == EXIT_USER_ERROR
    assert "config.json lacks preset" in capsys.readouterr().err


def test_resume_restarts_an_arm_whose_first_checkpoint_was_cut_short(smoke_run, tmp_path) -> None:
    """A kill during the first save leaves only the staging folder: resuming runs that arm from the start (as the
    trainer would) instead of refusing the whole run."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(smoke_run), str(run_dir)], check=True)
    results = json.loads((run_dir / "results.json").read_text())
    del results["arms"]["d64-l2"]["runs"]["1"]
    (run_dir / "results.json").write_text(json.dumps(results))
    checkpoints = run_dir / "d64-l2" / "seed-1" / "checkpoints"
    subprocess.run(["rm", "-r", str(checkpoints)], check=True)
    (checkpoints / ".tmp-step-00000006-999").mkdir(parents=True)
    (checkpoints / ".tmp-step-00000006-999" / "model.safetensors").write_bytes(b"partial")
    assert main(["run", "lm-scaling", "--quiet", "--resume", str(run_dir)]) == 0
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["arms"]["d64-l2"]["runs"]["1"]["status"] == "complete"


def test_report_accepts_the_results_file_and_out_must_be_a_directory(smoke_run, tmp_path, capsys) -> None:
    assert main(["report", str(smoke_run / "results.json")]) == 0
    assert "report:" in capsys.readouterr().out
    other = tmp_path / "edited.json"
    other.write_text((smoke_run / "results.json").read_text())
    before = snapshot(smoke_run)
    assert main(["report", str(other)]) == EXIT_USER_ERROR
    assert "pass a run directory or its results.json" in capsys.readouterr().err
    assert snapshot(smoke_run) == before
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    assert main([*SMOKE, "--out", str(a_file)]) == EXIT_USER_ERROR
    assert "is a file, not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "not a directory"


def test_sigterm_checkpoints_and_resume_completes_the_run(tmp_path, capsys) -> None:
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "effml", *SMOKE, "--out", str(out), "--set", "train.steps=200",
               "--set", "train.checkpoint_every=5", "--set", "seeds=1"]  # 200 steps: the signal comes long before
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    deadline = time.monotonic() + 120
    while not list(out.glob("lm-scaling/*/d32-l1/seed-0/checkpoints/LATEST")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    (run_dir,) = (out / "lm-scaling").iterdir()
    assert f"--resume {run_dir}" in stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == "partial"
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.startswith("WARNING: partial results")  # above the verdicts, as in report.md

    assert main(["run", "lm-scaling", "--quiet", "--resume", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete"
    steps = [s for s, _ in results["arms"]["d32-l1"]["runs"]["0"]["curves"]["train_loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 199
