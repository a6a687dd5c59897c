"""`looped-gd`: a looped linear-attention layer learns multi-step preconditioned gradient descent.

Reproduces the claims of Gatmiry, Saunshi, Reddi, Jegelka and Kumar, "Can Looped Transformers Learn to Implement
Multi-step Gradient Descent for In-context Learning?" (ICML 2024, arXiv 2410.08292). One restricted LSA layer
(``effml.nn.RestrictedLinearSelfAttention``: trainable preconditioner ``A`` and row ``u`` only) is looped ``loops``
times on in-context regression with one fixed covariance Σ* (eigenvalues evenly spaced in
[``spectrum_low``, ``spectrum_high``], random basis) and ``w ~ N(0, Σ*⁻¹/d)``. With ``u = 0`` the model is exactly
``loops`` steps of ``w ← w − A Xᵀ(Xw − y)/n`` from 0, and the paper shows that the global optimum has ``u = 0`` and
``A ≈ Σ*⁻¹`` up to a factor ``1 ± c`` with ``c → 0`` as the number of in-context examples n grows.

Arms: ``n{n}`` per n in ``n_contexts``; with ``"unrestricted"`` in ``attentions`` also ``full-n{n}``, the same looped
layer with full trainable P and Q (started at the GD form plus noise), whose GD reading ``A = −(P[d+1,d+1]·Q₁₁)ᵀ``,
``u = P[d+1,:d]/P[d+1,d+1]`` (``effml.nn.linear_attention.gd_parameters``) is measured the same way: it tests
whether training without the structure still finds preconditioned GD. Measured per arm: ``nmse`` on held-out prompts;
``u_ratio = ‖u‖/‖u_init‖``;
``precond_error = ‖A Σ* − I‖_F / √d``; ``gd_mismatch = Σ(ŷ_model − ŷ_GD)² / Σ y²`` against explicit ``loops``-step
preconditioned GD with the learned ``A`` (``effml.nn.linear_attention.preconditioned_gd``); the error when the
trained model is run with ``test_loops`` loops in distribution (``nmse_loops@k``), on Σ* rotated by ``ood_rotation``
(``rotated_nmse_loops@k``, W2 shift size ``rotated_w2``) and on Σ* rescaled by ``ood_scale`` (``rescaled_…``); and
``loops_rise`` / ``rotated_loops_rise`` / ``rescaled_loops_rise`` = the largest ln(nmse at the next loop count / nmse)
over test loop counts ≥ ``loops`` (≤ 0 iff more loops never hurt).

Claims: (1a) u goes to 0 (u_ratio ≤ 0.1 at the largest n); (1b) precond_error falls as n grows; (2) the model's
predictions match explicit preconditioned GD with its learned A (gd_mismatch ≤ 0.01 at the largest n); (3a) run with
the most test loops, the model errs less than with the loops it was trained with (``more_loops_log_gain`` =
ln(nmse at ``loops`` / nmse at the most loops) > 0, in log space like every ratio of errors here: across seeds they
differ by factors, not by amounts), in distribution and on the rotated and on the rescaled Σ*; (3b) in
distribution the error never rises by more than 1 % from one loop count to the next (``loops_rise`` ≤ ln 1.01: it
flattens at a floor set by the small u left after training, where a strict test would be decided by float noise);
(2') the unrestricted layer also matches preconditioned GD with its GD reading (gd_mismatch ≤ 0.01 at the largest n).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from effml.config import ConfigError, check_distinct, check_positive
from effml.experiments.base import Arm, ArmRun, RunContext, TaskExperiment, evaluate_sharded, register
from effml.train import TrainConfig, Trainer, World

__all__ = ["LoopedGDConfig", "LoopedGD"]


@dataclass(frozen=True)
class LoopedGDConfig:
    """Settings of the looped-gd recipe (override any with --set key=value)."""

    d: int = 5
    spectrum_low: float = 0.2
    spectrum_high: float = 2.0
    basis_seed: int = 0
    n_contexts: tuple[int, ...] = (20, 80, 320)
    loops: int = 2  # loops during training
    test_loops: tuple[int, ...] = (1, 2, 4, 8, 16)  # loops the trained model is run with at test time
    ood_rotation: float = 0.5  # out-of-distribution tests: Σ* rotated by this angle (radians) ...
    ood_scale: float = 1.5  # ... and Σ* rescaled by this factor
    attentions: tuple[str, ...] = ("restricted", "unrestricted")  # LSA parameterisations trained (claims: restricted)
    init_scale: float = 0.1  # the layer starts as GD with A = init_scale · I ...
    init_std: float = 0.1  # ... plus N(0, init_std²) noise on u (restricted) or on every entry of P, Q (unrestricted)
    batch_size: int = 64
    eval_prompts: int = 4096
    threads: int = 1
    seeds: int = 3
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, lr=3e-2, warmup_steps=50, weight_decay=0.0, eval_every=0, checkpoint_every=0, log_every=20))

    def __post_init__(self) -> None:
        owner = "looped-gd"
        if not 0 < self.spectrum_low <= self.spectrum_high:
            raise ConfigError(f"{owner}: the eigenvalues of Σ* must satisfy 0 < spectrum_low ≤ spectrum_high; got "
                              f"{self.spectrum_low} and {self.spectrum_high}.")
        if len(self.n_contexts) < 2 or list(self.n_contexts) != sorted(set(self.n_contexts)) or self.n_contexts[0] < 1:
            raise ConfigError(f"{owner}.n_contexts = {self.n_contexts!r}: give at least two distinct increasing "
                              "positive context sizes (for example 20,80,320); claim (1b) compares them.")
        if any(loops < 1 for loops in self.test_loops):
            raise ConfigError(f"{owner}.test_loops = {self.test_loops!r}: every test loop count must be positive "
                              "(the trained layer is run that many times); drop the entries below 1.")
        if (list(self.test_loops) != sorted(set(self.test_loops)) or self.loops not in self.test_loops
                or self.test_loops[-1] <= self.loops):
            raise ConfigError(f"{owner}.test_loops = {self.test_loops!r} must be increasing, contain the training "
                              f"loops={self.loops} and go beyond it (claim (3) runs the model with more loops).")
        for name in ("d", "loops", "batch_size", "eval_prompts", "seeds", "threads", "ood_scale"):
            check_positive(owner, name, getattr(self, name))
        for name in ("init_scale", "init_std"):
            check_positive(owner, name, getattr(self, name), allow_zero=True)
        if "restricted" not in self.attentions or not set(self.attentions) <= {"restricted", "unrestricted"}:
            raise ConfigError(f"{owner}.attentions = {self.attentions!r}: the claims are about the restricted layer, "
                              "so include 'restricted'; 'unrestricted' may be added.")
        check_distinct(owner, "attentions", self.attentions,
                       why="each attention trains one arm per context size; list each once")
        if self.init_scale == 0:
            raise ConfigError(f"{owner}.init_scale = 0 makes the layer's GD reading A = −(P[d+1,d+1]·Q₁₁)ᵀ undefined "
                              "at the start; use a positive init_scale.")
        if self.init_std == 0:
            raise ConfigError(f"{owner}.init_std = 0 starts u at its optimum 0, so claim (1a) would test nothing; "
                              "use a positive init_std.")

    @property
    def spectrum(self) -> tuple[float, ...]:
        """Eigenvalues of Σ*, evenly spaced from spectrum_low to spectrum_high."""
        if self.d == 1:
            return (self.spectrum_high,)
        step = (self.spectrum_high - self.spectrum_low) / (self.d - 1)
        return tuple(self.spectrum_low + i * step for i in range(self.d))


def _smoke() -> LoopedGDConfig:
    return LoopedGDConfig(d=3, n_contexts=(8, 32), test_loops=(1, 2, 4), batch_size=16, eval_prompts=64, seeds=2,
                          train=TrainConfig(steps=10, lr=1e-2, warmup_steps=2, weight_decay=0.0, log_every=2))


def _cpu() -> LoopedGDConfig:
    return LoopedGDConfig()


def _full() -> LoopedGDConfig:
    return LoopedGDConfig(d=10, n_contexts=(20, 80, 320, 1280), test_loops=(1, 2, 4, 8, 16, 32), batch_size=256,
                          eval_prompts=16384, seeds=5,
                          train=TrainConfig(steps=10_000, lr=3e-3, warmup_steps=200, weight_decay=0.0, log_every=100))


LOOPS_RISE_TOLERANCE = math.log(1.01)  # claim (3b): a rise of at most 1 % between loop counts counts as flat


def _rise(values: list[float]) -> float:
    """max_k ln(values[k+1] / values[k]): ≤ 0 iff the sequence never rises."""
    return max(math.log(b / a) for a, b in itertools.pairwise(values))


@register
class LoopedGD(TaskExperiment):
    name = "looped-gd"
    description = ("a looped restricted linear-attention layer learns multi-step preconditioned GD with A → Σ*⁻¹ "
                   "(arXiv 2410.08292)")
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}

    def arms(self, config: LoopedGDConfig) -> list[Arm]:
        return [Arm(name=f"{'' if attention == 'restricted' else 'full-'}n{n}",
                    label=f"{attention} LSA, n={n} in-context examples, {config.loops} loops",
                    info={"n_context": n, "loops": config.loops, "attention": attention})
                for attention in config.attentions for n in config.n_contexts]

    def task(self, config: LoopedGDConfig, n_context: int):
        from effml.data.tasks.regression import InContextRegression

        return InContextRegression(d=config.d, n_context=n_context, covariance="fixed", spectrum=config.spectrum,
                                   basis_seed=config.basis_seed, weight_prior="inverse-covariance")

    def run_arm(self, config: LoopedGDConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.train.icl import intra_op_threads

        with intra_op_threads(config.threads):
            return self._run_arm(config, arm, context)

    def _run_arm(self, config: LoopedGDConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.data.tasks.base import derive_seed
        from effml.nn.linear_attention import (LinearTransformer, LinearTransformerConfig, gd_parameters,
                                               preconditioned_gd, prompt_matrix)
        from effml.train.icl import predict_readouts, query_mse_loss

        task = self.task(config, arm.info["n_context"])
        torch.manual_seed(context.seed)
        model = LinearTransformer(LinearTransformerConfig(
            d=config.d, n_layers=1, n_loops=config.loops, attention=arm.info["attention"],
            init_scale=config.init_scale, init_std=config.init_std))
        layer = model.layers[0]

        def gd_reading() -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(t.detach().double().cpu() for t in gd_parameters(*layer.matrices()))

        u_init = float(gd_reading()[1].norm())
        eval_seed = derive_seed(context.seed, 1_000_003)

        def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
            predict = predict_readouts(model, context.device)
            return {"valid_nmse": evaluate_sharded(task, predict, 512, eval_seed, context.world)["nmse"]}

        trainer = Trainer(model, query_mse_loss, self.training_batches(config, task, context), config.train,
                          evaluate=evaluate, run_dir=context.run_dir, device=context.device, resume=context.resume,
                          quiet=context.quiet, description=f"{self.name} {arm.name} seed {context.seed}")
        result = trainer.fit()
        # Evaluate in float64: run with many loops the error falls to float32 rounding level, where rounding noise
        # would hide whether more loops still help.
        model.eval().double()
        test_seed = derive_seed(context.seed, 2_000_003)
        preconditioner, u = gd_reading()
        sigma = task.covariances(1, 0)[0]
        metrics: dict[str, float] = dict(result.final_metrics)
        metrics.update(
            u_ratio=float(u.norm()) / u_init,
            precond_error=float(torch.linalg.matrix_norm(preconditioner @ sigma - torch.eye(config.d))) / math.sqrt(
                config.d),
            step_time_s=result.median_step_time)

        @torch.no_grad()
        def mismatch(batch) -> torch.Tensor:
            batch = batch.to(context.device)
            model_prediction = model(prompt_matrix(batch.xs, batch.ys, batch.query).double()).cpu()
            gd_prediction = preconditioned_gd(batch.xs.double().cpu(), batch.ys.double().cpu(),
                                              batch.query.double().cpu(), preconditioner, config.loops)[-1]
            return torch.stack([model_prediction, gd_prediction])

        metrics["gd_mismatch"] = self._prediction_gap(task, mismatch, config.eval_prompts, test_seed, context.world)
        rotated, rescaled = task.shifted(rotation=config.ood_rotation), task.shifted(scale=config.ood_scale)
        metrics["rotated_w2"] = task.shift_size(rotated, n=1, seed=0)
        metrics["rescaled_w2"] = task.shift_size(rescaled, n=1, seed=0)
        curves = dict(result.curves)
        for prefix, distribution in (("", task), ("rotated_", rotated), ("rescaled_", rescaled)):
            predict = predict_readouts(model, context.device, torch.float64, n_loops=config.test_loops[-1])
            measured = evaluate_sharded(distribution, predict, config.eval_prompts, test_seed, context.world)
            per_loop = [measured[f"nmse@{k}"] for k in config.test_loops]
            metrics.update({f"{prefix}nmse_loops@{k}": v for k, v in zip(config.test_loops, per_loop, strict=True)})
            metrics[f"{prefix}nmse"] = measured[f"nmse@{config.loops}"]  # as trained: `loops` loops
            tail = per_loop[config.test_loops.index(config.loops):]
            metrics[f"{prefix}loops_rise"] = _rise(tail)
            metrics[f"{prefix}more_loops_log_gain"] = math.log(tail[0] / tail[-1])
            curves[f"{prefix}nmse_vs_loops"] = [[float(k), v] for k, v in zip(config.test_loops, per_loop, strict=True)]
        return ArmRun(params=sum(p.numel() for p in model.parameters()), metrics=metrics, curves=curves)

    @staticmethod
    def _prediction_gap(task, predict_pair, n: int, seed: int, world: World) -> float:
        """Σ (first − second)² / Σ y² over ``n`` evaluation prompts, split among ``world``'s ranks; predict_pair
        returns ``(2, B)``."""
        from effml.data.tasks.base import evaluation_batches
        from effml.train.distributed import all_gather_objects

        gap = energy = 0.0
        for size, batch_seed in evaluation_batches(n, seed, 256, world.rank, world.world_size):
            batch = task.sample(size, batch_seed)
            first, second = predict_pair(batch)
            gap += float(((first - second) ** 2).sum())
            energy += float((batch.target.double() ** 2).sum())
        sums = all_gather_objects((gap, energy))
        return sum(rank_gap for rank_gap, _ in sums) / sum(rank_energy for _, rank_energy in sums)

    def claims(self, config: LoopedGDConfig) -> list[Any]:
        from effml.report import Monotone, Threshold

        largest = f"n{config.n_contexts[-1]}"
        arms = [f"n{n}" for n in config.n_contexts]
        beyond = config.test_loops[-1]
        return [
            Threshold(name="u goes to 0",
                      statement=f"Training drives the row u of P to 0: ‖u‖/‖u_init‖ ≤ 0.1 ({largest}).",
                      metric="u_ratio", arm=largest, better="lower", threshold=0.1),
            Monotone(name="A approaches inverse covariance as n grows",
                     statement="The learned preconditioner's relative error ‖AΣ* − I‖_F/√d falls as the number of "
                               "in-context examples n grows.",
                     metric="precond_error", arms=arms, better="lower"),
            Threshold(name="model matches preconditioned GD",
                      statement=f"The trained model's predictions equal {config.loops}-step preconditioned GD with its "
                                f"learned A: Σ(ŷ_model − ŷ_GD)²/Σy² ≤ 0.01 ({largest}).",
                      metric="gd_mismatch", arm=largest, better="lower", threshold=0.01),
            Threshold(name="more loops lower the loss",
                      statement=f"Trained with {config.loops} loops and run with {beyond}, the model's in-distribution "
                                f"error is lower than with {config.loops} ({largest}).",
                      metric="more_loops_log_gain", arm=largest, better="higher", threshold=0.0),
            Threshold(name="more loops never raise the loss",
                      statement=f"Run with {config.loops}…{beyond} loops, the in-distribution error never rises by "
                                f"more than 1 % from one loop count to the next ({largest}; the error flattens at "
                                "a floor set by the small u ≠ 0 left after training, where float noise alone would "
                                "decide a strict test).",
                      metric="loops_rise", arm=largest, better="lower", threshold=LOOPS_RISE_TOLERANCE),
            Threshold(name="more loops lower the loss on a rotated covariance",
                      statement=f"The same gain on Σ* rotated by {config.ood_rotation:g} rad ({largest}).",
                      metric="rotated_more_loops_log_gain", arm=largest, better="higher", threshold=0.0),
            Threshold(name="more loops lower the loss on a rescaled covariance",
                      statement=f"The same gain on Σ* rescaled by {config.ood_scale:g} ({largest}).",
                      metric="rescaled_more_loops_log_gain", arm=largest, better="higher", threshold=0.0),
        ] + ([
            Threshold(name="unrestricted layer also learns preconditioned GD",
                      statement=f"With full trainable P and Q, the trained layer's predictions equal "
                                f"{config.loops}-step preconditioned GD with its GD reading A = −(P[d+1,d+1]·Q₁₁)ᵀ: "
                                f"Σ(ŷ_model − ŷ_GD)²/Σy² ≤ 0.01 (full-{largest}).",
                      metric="gd_mismatch", arm=f"full-{largest}", better="lower", threshold=0.01),
        ] if "unrestricted" in config.attentions else [])

    def plots(self, config: LoopedGDConfig) -> list[Any]:
        from effml.report import CurvePlot, MetricPlot

        return [
            MetricPlot(name="precond_error_vs_n", x="n_context", y="precond_error", logx=True, logy=True,
                       arms=[f"n{n}" for n in config.n_contexts],
                       title="‖AΣ* − I‖_F/√d of the learned preconditioner vs n (restricted)"),
            CurvePlot(name="nmse_vs_loops", curve="nmse_vs_loops", ylabel="test nmse", logy=True,
                      xlabel="loops at test time", title=f"In distribution, trained with {config.loops} loops"),
            CurvePlot(name="rotated_nmse_vs_loops", curve="rotated_nmse_vs_loops", ylabel="test nmse", logy=True,
                      xlabel="loops at test time",
                      title=f"Σ* rotated by {config.ood_rotation:g} rad, trained with {config.loops} loops"),
            CurvePlot(name="rescaled_nmse_vs_loops", curve="rescaled_nmse_vs_loops", ylabel="test nmse", logy=True,
                      xlabel="loops at test time",
                      title=f"Σ* rescaled by {config.ood_scale:g}, trained with {config.loops} loops"),
            CurvePlot(name="train_loss", curve="train_nmse", ylabel="train nmse", logy=True, title="Training nmse"),
        ]
