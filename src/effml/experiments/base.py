"""What a recipe is: presets, arms, one (arm, seed) run, derived quantities, claims and plots — all as data.

A recipe subclasses `Experiment` and registers itself with `@register`. The runner (`effml.experiments.runner`) does
the rest the same way for every recipe: resolve the preset and overrides, run each arm for each seed through
`run_arm`, collect the measurements into the results document, compute derived per-seed quantities, and let the
report decide each claim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from effml.train.distributed import World

__all__ = ["Arm", "ArmRun", "RunContext", "Experiment", "TaskExperiment", "EXPERIMENTS", "register", "get_experiment",
           "PRESETS", "run_subdir", "complete_run"]

PRESETS = ("smoke", "cpu", "full")


def run_subdir(run_dir: Path, arm: str, seed: int) -> Path:
    """The directory of arm ``arm``'s run with seed ``seed`` in the recipe run ``run_dir`` (``<arm>/seed-<n>``)."""
    return run_dir / arm / f"seed-{seed}"


def complete_run(results: dict[str, Any], arm: str, seed: str) -> dict[str, Any] | None:
    """Arm ``arm``'s run with seed ``seed`` (a string key) in the results document, if it completed; else None."""
    run = results["arms"].get(arm, {}).get("runs", {}).get(seed)
    return run if run is not None and run.get("status") == "complete" else None


@dataclass(frozen=True)
class Arm:
    """One configuration compared in a recipe (the method, a baseline, one model size, ...).

    ``needs`` names arms whose run with the same seed must be complete before this arm's run starts, e.g. a teacher
    trained in its own arm, whose weights this arm's run loads from ``context.arm_run_dir("teacher")``. Each must be
    listed before this arm in ``Experiment.arms`` and have every seed this arm has, unless it is shared (the runner
    checks both).

    A ``shared`` arm runs once, with the recipe's first seed (``seeds(config)[0]``, the default ``arm_seeds``), and
    that one run serves every seed: each seed's run of an arm that needs it waits for, and reads, that run
    (``context.arm_run_dir(name)`` gives its directory), e.g. a frozen pretrained model every seed's arms start from.
    A recipe whose ``arm_seeds`` is its own must give a shared arm exactly one seed (the runner checks). The results
    document records the shared arm with that one seed, so a claim pairing it with a per-seed arm has one seed."""

    name: str
    label: str
    info: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    shared: bool = False


@dataclass
class RunContext:
    """Where and how one (arm, seed) run happens. ``resume``: the recipe run is being resumed, so trainers continue
    from the checkpoints they find (a trainer with none starts afresh). ``shared_seeds`` maps each shared arm of the
    recipe (``Arm.shared``) to the seed of its one run (the runner fills it in), so that ``arm_run_dir`` finds that
    run from every seed."""

    run_dir: Path
    seed: int
    device: str
    world: World
    resume: bool = False
    quiet: bool = False
    shared_seeds: dict[str, int] = field(default_factory=dict)

    def arm_run_dir(self, arm: str, seed: int | None = None) -> Path:
        """The run directory of arm ``arm``'s run with seed ``seed`` in the same recipe run; by default the seed of
        the arm's one run if it is shared (``shared_seeds``), else this run's seed. For ``run_dir``
        ``runs/salt/20260101-000000/student/seed-2``, ``arm_run_dir("teacher")`` is
        ``runs/salt/20260101-000000/teacher/seed-2``, or ``.../teacher/seed-0`` if the teacher is a shared arm run
        with seed 0. A run reads a needed arm's results there (``Arm.needs``)."""
        if seed is None:
            seed = self.shared_seeds.get(arm, self.seed)
        return run_subdir(self.run_dir.parents[1], arm, seed)


@dataclass
class ArmRun:
    """What one (arm, seed) run measured."""

    params: int
    metrics: dict[str, float]
    curves: dict[str, list[list[float]]] = field(default_factory=dict)


class Experiment(ABC):
    """A paper's claim reproduced side by side with its baseline. Subclasses set the class attributes below."""

    name: ClassVar[str]
    description: ClassVar[str]
    presets: ClassVar[dict[str, Callable[[], Any]]]  # preset name → config factory (a validated dataclass)
    #: Whether a claim compares measured times (step time, wall clock): then runs must not share the machine, and
    #: the runner refuses ``--jobs`` > 1.
    claims_on_time: ClassVar[bool] = False
    #: Whether its runs may shard the model with FSDP (``--set train.data_parallel=fsdp``): its code after training
    #: calls the model the same number of times on every rank and reads no parameter values from it.
    supports_fsdp: ClassVar[bool] = False

    def preset(self, name: str) -> Any:
        """The config of preset ``name`` (clear error listing the presets otherwise)."""
        if name not in self.presets:
            raise ValueError(f"Recipe {self.name!r} has no preset {name!r}; choose one of {', '.join(self.presets)}.")
        return self.presets[name]()

    @property
    def config_class(self) -> type:
        return type(self.preset(next(iter(self.presets))))

    def seeds(self, config: Any) -> list[int]:
        """Seeds to run: ``config.seed, config.seed + 1, ...`` (``config.seeds`` of them). Raises ConfigError unless
        ``seed`` is an int ≥ 0 and ``seeds`` an int ≥ 1 (the runner asks before it writes anything)."""
        from effml.config import ConfigError

        for name, low in (("seed", 0), ("seeds", 1)):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{self.name}.{name} = {value!r} is out of range: it must be an int ≥ {low}.")
        return [config.seed + i for i in range(config.seeds)]

    def arm_seeds(self, config: Any, arm: Arm) -> list[int]:
        """Seeds to run for ``arm``: ``seeds(config)``, or its first seed alone for a shared arm (``Arm.shared``),
        unless a recipe gives some arms more (say, the arms a threshold claim is decided on); the results document
        records each arm's list (``"seeds"``). A recipe overriding it must give a shared arm exactly one seed."""
        seeds = self.seeds(config)
        return seeds[:1] if arm.shared else seeds

    @abstractmethod
    def arms(self, config: Any) -> list[Arm]:
        """The arms compared, in the order they are run and reported."""

    def check(self, config: Any) -> None:
        """Raise a ValueError (e.g. ``DataUnavailableError``) if ``config`` cannot run here — data or a package
        missing — so that the runner fails before it writes a run directory. Nothing to check by default."""

    @abstractmethod
    def run_arm(self, config: Any, arm: Arm, context: RunContext) -> ArmRun:
        """Train/evaluate one arm for one seed (resuming from ``context.run_dir`` when ``context.resume``)."""

    def derive(self, config: Any, results: dict[str, Any]) -> dict[str, Any]:
        """Per-seed quantities computed from several arms (results["derived"]); none by default."""
        return {}

    @abstractmethod
    def claims(self, config: Any) -> list[Any]:
        """The paper's claims as `effml.report` claim objects."""

    def plots(self, config: Any) -> list[Any]:
        """Plot specs (`effml.report` plot objects)."""
        return []


class TaskExperiment(Experiment):
    """A recipe trained on a generated task (``effml.data.tasks``), its config giving the global ``batch_size``."""

    def training_batches(self, config: Any, task: Any, context: RunContext) -> Any:
        """``index -> batch``: this rank's share (``config.batch_size / world_size`` examples) of the global batch of
        ``config.batch_size`` examples drawn from ``derive_seed(context.seed, index)``, the batch a single process
        trains on at micro-batch ``index`` (``effml.data.batches.sampled_batches``)."""
        from effml.data.batches import sampled_batches

        return sampled_batches(task, config.batch_size, context.seed, context.world)


def evaluate_sharded(task: Any, predict: Callable[[Any], Any], n: int, seed: int, world: World,
                     **options: Any) -> dict[str, float]:
    """``task.evaluate(predict, n, seed, **options)`` with the ``n`` examples split among ``world``'s ranks: each
    scores its batches (``task.evaluation_sums``) and every rank combines all ranks' sums (one all-gather), so
    evaluation takes 1/N of the time on N ranks and gives one process's numbers. In a world of one it is
    ``task.evaluate`` itself. Every rank must call it. Ranks may call ``predict`` a different number of times, so it
    suits replicated (DDP) models, not FSDP-sharded ones (whose forward needs every rank)."""
    if not world.distributed:
        return task.evaluate(predict, n, seed, **options)
    from effml.train.distributed import all_gather_objects

    sums = task.evaluation_sums(predict, n, seed, rank=world.rank, world_size=world.world_size, **options)
    return task.metrics_from_sums(all_gather_objects(sums), n)


EXPERIMENTS: dict[str, Experiment] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: make a recipe available to `effml list` / `effml run`."""
    EXPERIMENTS[cls.name] = cls()
    return cls


def get_experiment(name: str) -> Experiment:
    """The registered recipe ``name``; an unknown name lists every recipe."""
    import effml.experiments  # noqa: F401  (registers the built-in recipes)

    if name not in EXPERIMENTS:
        listing = "\n".join(f"  {n:<16} {e.description}" for n, e in sorted(EXPERIMENTS.items()))
        raise ValueError(f"Unknown recipe {name!r}. The recipes are:\n{listing}\n(`effml list` shows their presets.)")
    return EXPERIMENTS[name]
