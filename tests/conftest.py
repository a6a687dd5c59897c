"""Test-session set-up: token caches go to a fresh temporary directory (shared with subprocesses via the env)."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from effml.train import Callback


class InterruptAt(Callback):
    """Sends this process SIGINT after a given step, as a user's Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def interrupt_at() -> type[InterruptAt]:
    """The `InterruptAt` Trainer callback class: ``interrupt_at(step)`` stops a run like Ctrl-C after ``step``."""
    return InterruptAt


@pytest.fixture(scope="session")
def run_smoke(tmp_path_factory) -> Callable[..., Path]:
    """``run_smoke(recipe, *options)``: runs the recipe's smoke preset through the CLI (quietly, with ``options``)
    into a fresh directory and returns its run directory."""
    from effml.cli import main

    def run(recipe: str, *options: str) -> Path:
        out = tmp_path_factory.mktemp("runs")
        assert main(["run", recipe, "--preset", "smoke", "--quiet", *options, "--out", str(out)]) == 0
        (run_dir,) = (out / recipe).iterdir()
        return run_dir

    return run


@pytest.fixture(scope="session", autouse=True)
def isolated_token_cache():
    previous = os.environ.get("EFFML_CACHE")
    with tempfile.TemporaryDirectory(prefix="effml-cache-") as cache:
        os.environ["EFFML_CACHE"] = cache
        yield cache
    if previous is None:
        os.environ.pop("EFFML_CACHE", None)
    else:
        os.environ["EFFML_CACHE"] = previous


@pytest.fixture
def check_recipe_sharding(tmp_path):
    """``check(training_batches, task, batch_size, seed, fields)``: a recipe's ``training_batches(task, context)``
    gives rank r of 2 the r-th half of the one-process batch, and one process exactly the batch it drew before
    sharding existed (``task.sample(batch_size, derive_seed(seed, index))``), on every field named in ``fields``."""
    import torch

    from effml.data.tasks import derive_seed
    from effml.experiments.base import RunContext
    from effml.train.distributed import World

    def check(training_batches, task, batch_size: int, seed: int, fields: tuple[str, ...]) -> None:
        def batches(rank: int, world_size: int):
            world = World(rank=rank, world_size=world_size)
            return training_batches(task, RunContext(run_dir=tmp_path, seed=seed, device="cpu", world=world))

        single, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
        half = batch_size // 2
        for index in (0, 5):
            whole, before = single(index), task.sample(batch_size, derive_seed(seed, index))  # the old batch
            for name in fields:
                assert torch.equal(getattr(whole, name), getattr(before, name))
                assert torch.equal(getattr(first(index), name), getattr(whole, name)[:half])
                assert torch.equal(getattr(second(index), name), getattr(whole, name)[half:])

    return check


@pytest.fixture
def torchrun(tmp_path):
    """``torchrun(*args, script=None, ranks=2) -> stdout``: ``torchrun --standalone --nproc_per_node=ranks *args``
    with effml importable and one thread per process (``script``: Python source written to a file under tmp_path
    and run before ``args``); fails the test with the end of stderr unless every rank exits with 0."""
    import itertools
    import subprocess
    import sys
    from pathlib import Path

    names = itertools.count()

    def run(*args: str, script: str | None = None, ranks: int = 2) -> str:
        if script is not None:
            path = tmp_path / f"script{next(names)}.py"
            path.write_text(script)
            args = (str(path), *args)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
        completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={ranks}", *args], capture_output=True, text=True, timeout=300,
                                   env=env)
        assert completed.returncode == 0, completed.stderr[-3000:]
        return completed.stdout

    return run


TIMING_WORDS = ("time", "seconds", "per_s", "speedup", "decode_s")  # metric names holding measured times


@pytest.fixture
def torchrun_smoke(torchrun, tmp_path):
    """``torchrun_smoke(recipe, one_process_results, arms=None, rel=1e-4) -> results``: runs the recipe's smoke
    preset under torchrun on 2 CPU processes, checks that it completed with one run directory and one printed report
    (rank 1 writes nothing), and that each arm in ``arms`` (default: all) trained and measured as the one-process run
    did: the same training-loss curve and every metric that is not a time, up to ``rel`` (summation order)."""
    import json

    def run(recipe: str, one: dict, arms: tuple[str, ...] | None = None, rel: float = 1e-4) -> dict:
        out = tmp_path / "torchrun"
        stdout = torchrun("-m", "effml", "run", recipe, "--preset", "smoke", "--quiet", "--out", str(out))
        (run_dir,) = (out / recipe).iterdir()
        assert stdout.count("report: ") == 1
        two = json.loads((run_dir / "results.json").read_text())
        assert two["status"] == "complete" and two["environment"]["world_size"] == 2
        for arm in arms if arms is not None else list(one["arms"]):
            assert list(two["arms"][arm]["runs"]) == list(one["arms"][arm]["runs"])
            for seed, run_one in one["arms"][arm]["runs"].items():
                run_two = two["arms"][arm]["runs"][seed]
                curve_one, curve_two = (entry["curves"].get("train_loss", []) for entry in (run_one, run_two))
                assert [step for step, _ in curve_two] == [step for step, _ in curve_one]
                assert [loss for _, loss in curve_two] == pytest.approx([loss for _, loss in curve_one], rel=rel)
                untimed = [name for name in run_one["metrics"] if not any(word in name for word in TIMING_WORDS)]
                assert {name: run_two["metrics"][name] for name in untimed} == pytest.approx(
                    {name: run_one["metrics"][name] for name in untimed}, rel=rel, abs=1e-9)
        return two

    return run
