"""`salt`: a small LM helps train a larger one — distillation early, then plain training (SALT, arXiv 2410.18779).

Per seed, a small teacher is trained first (arm ``teacher``); then a larger student is trained on the same code corpus
in five ways, every student arm from the same initial weights and batches:

* ``baseline`` — next-token cross-entropy throughout;
* ``kd-throughout`` — distillation from the teacher for the whole run (the paper's "reverse KD" strawman);
* ``salt`` — distillation for the first ``kd_fraction`` of the steps, then cross-entropy (`effml.train.distill`);
* ``salt-ds`` — SALT whose distillation stage trains on the windows the teacher scores "challenging yet learnable";
* ``salt-reduced`` — SALT trained for ``reduced_fraction`` of the baseline's steps (its own learning-rate schedule over
  them, the distillation stage as long as ``salt``'s), which is how the paper's "reaches the baseline with fewer
  steps" is tested here: by final loss, as midas's reduced run is.

Claims, fixed before the cpu preset was first run (its scale was then chosen on run time and on the premise that the
teacher ends below the student's early loss, on other seeds; the README's `salt` row):
(1) SALT leads early: at the end of the distillation stage its held-out loss is below the baseline's at that step;
(2) SALT with ``reduced_fraction`` of the steps ends at or below the baseline's final loss (so it saves at least
1 − reduced_fraction of the student's steps; its FLOPs, the teacher's forward passes included, are reported);
(3) at the full budget SALT ends below the baseline; (4) distilling throughout ends above the baseline;
(5) SALT_DS is at least as good as SALT, within ``ds_tolerance`` nats.

The student's training FLOPs are `TransformerLM.flops_per_token` per token (forward and backward), plus a third of the
teacher's per token (its forward pass) for every distillation step and, for SALT_DS, for every candidate window scored
before training; the teacher's own training is reported apart, since a teacher is trained once and may serve many
students.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from effml.config import ConfigError, check_choice, check_positive
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, complete_run, register
from effml.experiments.lm_training import byte_lm_config, load_byte_corpus, load_trained_lm, parse_size, train_lm
from effml.io import atomic_save_numpy
from effml.train import TrainConfig
from effml.train.distill import TRANSITIONS, DistillationLoss, KDSchedule, SelectedWindows, candidate_count

__all__ = ["SaltConfig", "SaltRecipe", "TEACHER", "BASELINE", "REDUCED"]

TEACHER, BASELINE, KD_THROUGHOUT, SALT, SALT_DS, REDUCED = (
    "teacher", "baseline", "kd-throughout", "salt", "salt-ds", "salt-reduced")
STUDENTS = (BASELINE, KD_THROUGHOUT, SALT, SALT_DS, REDUCED)
SELECTION_FILE = "selected_starts.npy"

@dataclass(frozen=True)
class SaltConfig:
    """Settings of the salt recipe (override any with --set key=value)."""

    teacher_size: str = "48x2"  # WIDTHxDEPTH of the small model
    student_size: str = "96x3"  # WIDTHxDEPTH of the large model
    head_dim: int = 16
    corpus: str = "stdlib-code"
    max_bytes: int | None = None
    seq_len: int = 128
    batch_size: int = 32
    eval_windows: int = 256
    kd_weight: float = 0.5  # ω during the distillation stage
    temperature: float = 1.0  # τ
    kd_fraction: float = 0.2  # distillation stage: this share of the full student run's steps
    transition: str = "step"  # "step" | "linear" (ω decays to 0 over the stage)
    top_k: int = 10  # SALT_DS: a token is learnable when its true next token is in the teacher's top k
    keep_fraction: float = 0.5  # SALT_DS: share of the scored candidate windows the distillation stage trains on
    reduced_fraction: float = 0.75  # salt-reduced trains for this share of the baseline's steps
    ds_tolerance: float = 0.01  # claim 5: SALT_DS may end at most this many nats above SALT
    seeds: int = 3
    seed: int = 0
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=400, lr=3e-3, warmup_steps=30, eval_every=100, checkpoint_every=100, log_every=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=400, lr=3e-3, warmup_steps=30, eval_every=40, checkpoint_every=100, log_every=10))

    def __post_init__(self) -> None:
        owner = "salt"
        for name in ("head_dim", "seq_len", "batch_size", "eval_windows", "seeds", "top_k", "temperature"):
            check_positive(owner, name, getattr(self, name))
        for name in ("teacher_size", "student_size"):
            width, depth = parse_size(getattr(self, name), f"{owner}.{name} =")
            check_positive(owner, f"{name} width", width)
            check_positive(owner, f"{name} depth", depth)
            if width % self.head_dim:
                raise ConfigError(f"{owner}.{name} = {getattr(self, name)!r}: width {width} is not a multiple of "
                                  f"head_dim {self.head_dim}; pick a width divisible by it or change head_dim.")
        check_choice(owner, "transition", self.transition, TRANSITIONS)
        for name in ("kd_weight", "kd_fraction", "keep_fraction", "reduced_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{owner}.{name} = {value!r} is out of range: it must lie in (0, 1].")
        check_positive(owner, "ds_tolerance", self.ds_tolerance, allow_zero=True)
        if self.max_bytes is not None:
            check_positive(owner, "max_bytes", self.max_bytes)
        every = self.train.eval_every
        if not every or self.kd_steps % every:
            raise ConfigError(f"salt's claim 'SALT leads early' reads the held-out loss at the end of the distillation "
                              f"stage (step {self.kd_steps} = kd_fraction {self.kd_fraction:g} × train.steps "
                              f"{self.train.steps}), but train.eval_every = {every} does not evaluate there; set "
                              f"train.eval_every to a divisor of {self.kd_steps}.")
        if self.kd_steps >= self.reduced_steps:
            raise ConfigError(f"salt-reduced's {self.reduced_steps} steps (reduced_fraction {self.reduced_fraction:g} "
                              f"× {self.train.steps}) leave no plain training after the {self.kd_steps}-step "
                              "distillation stage; raise reduced_fraction or lower kd_fraction.")

    @property
    def kd_steps(self) -> int:
        """Length of the distillation stage in optimizer steps (the same in ``salt``, ``salt-ds``, ``salt-reduced``)."""
        return max(1, round(self.kd_fraction * self.train.steps))

    @property
    def reduced_steps(self) -> int:
        return max(1, round(self.reduced_fraction * self.train.steps))

    @functools.cached_property
    def flops_per_token(self) -> dict[str, float]:
        """Training FLOPs per token (forward + backward, `TransformerLM.flops_per_token`) of the teacher and the
        student at ``seq_len`` (models built under a forked RNG, so the global random state is untouched)."""
        from effml.nn import TransformerLM

        with torch.random.fork_rng(devices=[]):
            return {role: TransformerLM(model_config(self, getattr(self, f"{role}_size"))).flops_per_token(self.seq_len)
                    for role in ("teacher", "student")}

    @property
    def scored_windows(self) -> int:
        """Candidate windows SALT_DS's teacher scores before training (`SelectedWindows`)."""
        return candidate_count(self.kd_steps * self.train.grad_accum * self.batch_size, self.keep_fraction)

    def student_flops(self, steps: int, kd_steps: int, scored_windows: int = 0) -> float:
        """Training FLOPs of a student run: ``steps`` forward-backward passes, plus the teacher's forward pass (a third
        of its training FLOPs per token) on each of the first ``kd_steps`` steps and on ``scored_windows`` windows
        scored before training (SALT_DS)."""
        per_token = self.flops_per_token
        tokens_per_step = self.batch_size * self.seq_len * self.train.grad_accum
        teacher_forward = per_token["teacher"] / 3.0
        return ((steps * per_token["student"] + kd_steps * teacher_forward) * tokens_per_step
                + scored_windows * self.seq_len * teacher_forward)


def model_config(config: SaltConfig, size: str) -> Any:
    """The byte-level `TransformerConfig` of ``size`` (``WIDTHxDEPTH``)."""
    return byte_lm_config(size, head_dim=config.head_dim, seq_len=config.seq_len, what="salt size")


def _smoke() -> SaltConfig:
    return SaltConfig(teacher_size="32x1", student_size="48x2", max_bytes=300_000, seq_len=64, batch_size=8,
                      eval_windows=16, seeds=2,
                      teacher_train=TrainConfig(steps=12, lr=3e-3, warmup_steps=2, eval_every=6, checkpoint_every=6,
                                                log_every=2),
                      train=TrainConfig(steps=20, lr=3e-3, warmup_steps=2, eval_every=4, checkpoint_every=8,
                                        log_every=2))


def _cpu() -> SaltConfig:
    return SaltConfig()


def _full() -> SaltConfig:
    return SaltConfig(teacher_size="256x4", student_size="512x8", head_dim=64, seq_len=512, batch_size=64,
                      eval_windows=1024,
                      teacher_train=TrainConfig(steps=10_000, lr=1e-3, warmup_steps=500, eval_every=1000,
                                                checkpoint_every=1000, log_every=50),
                      train=TrainConfig(steps=10_000, lr=1e-3, warmup_steps=500, eval_every=500,
                                        checkpoint_every=1000, log_every=50))


def _arm_steps(config: SaltConfig, arm: str) -> int:
    return config.reduced_steps if arm == REDUCED else config.train.steps


def _valid_loss_at(curves: dict[str, Any], step: int) -> float:
    """The held-out loss the trainer recorded at ``step`` (NaN if it did not evaluate there)."""
    return next((value for at, value in curves.get("valid_loss", []) if int(at) == step), float("nan"))


@register
class SaltRecipe(Experiment):
    name = "salt"
    description = "SALT: distil a small LM into a larger one early in training, then train plainly (stdlib code)"
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}
    supports_fsdp = True

    def arms(self, config: SaltConfig) -> list[Arm]:
        kd = f"ω={config.kd_weight:g}, τ={config.temperature:g}"
        stage = f"{config.kd_steps} distillation steps ({config.transition}), then cross-entropy"
        labels = {
            BASELINE: f"student {config.student_size}, cross-entropy, {config.train.steps} steps",
            KD_THROUGHOUT: f"student, distillation for all {config.train.steps} steps ({kd})",
            SALT: f"SALT: {stage}, {config.train.steps} steps ({kd})",
            SALT_DS: f"SALT_DS: SALT on the top {config.keep_fraction:g} of windows by the teacher's score",
            REDUCED: f"SALT with {config.reduced_steps} steps ({config.reduced_fraction:g} of the baseline's)",
        }
        teacher = Arm(name=TEACHER, label=f"teacher {config.teacher_size}, cross-entropy, "
                                          f"{config.teacher_train.steps} steps",
                      info={"size": config.teacher_size, "steps": config.teacher_train.steps})
        return [teacher, *(Arm(name=name, label=labels[name], needs=() if name == BASELINE else (TEACHER,),
                               info={"size": config.student_size, "steps": _arm_steps(config, name)})
                           for name in STUDENTS)]

    def run_arm(self, config: SaltConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.data import WindowBatches
        from effml.nn import TransformerLM

        corpus = load_byte_corpus(config.corpus, config.max_bytes, context.world)
        torch.manual_seed(context.seed)
        model = TransformerLM(model_config(config, arm.info["size"]))
        description = f"{self.name} {arm.name} seed {context.seed}"
        common = dict(seq_len=config.seq_len, batch_size=config.batch_size, eval_windows=config.eval_windows,
                      context=context, description=description)
        if arm.name == TEACHER:  # its final checkpoint (the full model, under DDP or FSDP) is what the students load
            metrics, curves = train_lm(model, corpus, train=config.teacher_train, **common)
            metrics["train_flops"] = (config.flops_per_token["teacher"] * config.teacher_train.steps
                                      * config.batch_size * config.seq_len * config.teacher_train.grad_accum)
            return ArmRun(params=model.num_parameters(), metrics=metrics, curves=curves)

        steps = arm.info["steps"]
        train = dataclasses.replace(config.train, steps=steps)
        kd_steps = 0 if arm.name == BASELINE else (steps if arm.name == KD_THROUGHOUT else config.kd_steps)
        options: dict[str, Any] = {}
        if kd_steps:
            teacher = self._teacher(config, context)
            schedule = KDSchedule(config.kd_weight, None if arm.name == KD_THROUGHOUT else kd_steps,
                                  config.transition)
            options["loss"] = DistillationLoss(teacher, schedule, config.temperature)
            if arm.name == SALT_DS:
                base = WindowBatches(corpus.train, config.batch_size, config.seq_len, seed=context.seed)
                options["batches"] = self._selected_windows(config, base, teacher, context)
        metrics, curves = train_lm(model, corpus, train=train, **common, **options)
        scored = config.scored_windows if arm.name == SALT_DS else 0
        metrics.update(valid_loss_at_kd_end=_valid_loss_at(curves, config.kd_steps),
                       flops=config.student_flops(steps, kd_steps, scored))
        return ArmRun(params=model.num_parameters(), metrics=metrics, curves=curves)

    def _teacher(self, config: SaltConfig, context: RunContext) -> torch.nn.Module:
        """The same seed's trained teacher (from its run's final checkpoint), on the run's device."""
        return load_trained_lm(context, TEACHER, config.teacher_train.steps, model_config(config, config.teacher_size),
                               recipe=self.name, what="the same seed's trained teacher")

    def _selected_windows(self, config: SaltConfig, base: Any, teacher: torch.nn.Module,
                          context: RunContext) -> SelectedWindows:
        """SALT_DS's batch source; the kept windows are saved in the run directory and reused on resume."""
        path = context.run_dir / SELECTION_FILE
        selected_batches = config.kd_steps * config.train.grad_accum
        saved = np.load(path) if path.exists() else None
        windows = SelectedWindows(base, teacher, selected_batches, context.world, keep_fraction=config.keep_fraction,
                                  top_k=config.top_k, seed=context.seed, device=context.device, starts=saved)
        if saved is None and context.world.is_main:
            atomic_save_numpy(path, windows.starts)
        return windows

    def derive(self, config: SaltConfig, results: dict[str, Any]) -> dict[str, Any]:
        """Per seed, ``salt-reduced`` against the same seed's baseline (entry ``"salt-reduced vs baseline"``):
        ``test_loss_gap`` (reduced − baseline, nats/byte; ≤ 0: SALT reached the baseline's final loss),
        ``steps_fraction`` and ``flops_fraction`` (the teacher's forward passes included) of the baseline's."""
        runs = {}
        for seed in map(str, self.seeds(config)):
            reduced, base = complete_run(results, REDUCED, seed), complete_run(results, BASELINE, seed)
            if reduced is None or base is None:
                continue
            runs[seed] = {"status": "complete", "metrics": {
                "test_loss_gap": reduced["metrics"]["test_loss"] - base["metrics"]["test_loss"],
                "steps_fraction": config.reduced_steps / config.train.steps,
                "flops_fraction": reduced["metrics"]["flops"] / base["metrics"]["flops"]}}
        return {f"{REDUCED} vs {BASELINE}": {"label": "SALT with fewer steps against the same seed's baseline: final "
                                                      "test-loss gap, fractions of the baseline's steps and FLOPs",
                                             "runs": runs}}

    def claims(self, config: SaltConfig) -> list[Any]:
        from effml.report import Compare, Threshold

        saving = f"{(1.0 - config.reduced_fraction) * 100:g}%"
        flops = config.student_flops(config.reduced_steps, config.kd_steps) / config.student_flops(
            config.train.steps, 0)
        return [
            Compare(name="SALT leads early",
                    statement=f"At the end of the distillation stage (step {config.kd_steps}), SALT's held-out loss "
                              "is below the baseline's at the same step.",
                    metric="valid_loss_at_kd_end", arm=SALT, baseline=BASELINE, better="lower"),
            Threshold(name="SALT saves training steps",
                      statement=f"SALT trained for {config.reduced_steps} steps ({config.reduced_fraction:g} of the "
                                f"baseline's {config.train.steps}; {flops:.3f} of its FLOPs, the teacher's forward "
                                "passes included) ends below the baseline's final test loss (the 95 % interval of "
                                "the mean per-seed gap lies below 0): SALT reaches the baseline with at least "
                                f"{saving} fewer steps.",
                      metric="test_loss_gap", arm=f"{REDUCED} vs {BASELINE}", better="lower", threshold=0.0),
            Compare(name="SALT ends below the baseline",
                    statement=f"At the full budget of {config.train.steps} steps, SALT's test loss is below the "
                              "baseline's.",
                    metric="test_loss", arm=SALT, baseline=BASELINE, better="lower"),
            Compare(name="distilling throughout ends above the baseline",
                    statement="Distilling from the smaller teacher for the whole run ends with a higher test loss "
                              "than plain training (the teacher's bias outweighs its variance reduction late).",
                    metric="test_loss", arm=BASELINE, baseline=KD_THROUGHOUT, better="lower"),
            Compare(name="SALT_DS is as good as SALT",
                    statement="Training the distillation stage on the windows the teacher scores challenging yet "
                              f"learnable ends at most {config.ds_tolerance:g} nats/byte above SALT's test loss.",
                    metric="test_loss", arm=SALT_DS, baseline=SALT, better="lower", margin=-config.ds_tolerance),
        ]

    def plots(self, config: SaltConfig) -> list[Any]:
        from effml.report import CurvePlot

        return [
            CurvePlot(name="valid_loss", curve="valid_loss", title="Held-out loss during training",
                      ylabel="nats per byte"),
            CurvePlot(name="train_loss", curve="train_loss", title="Training loss (the student's objective)",
                      ylabel="nats per byte", arms=list(STUDENTS)),
        ]

