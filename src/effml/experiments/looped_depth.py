"""`looped-depth`: depth, looping and robustness for in-context regression with task diversity.

Reproduces the claims of Gatmiry, Saunshi, Reddi, Jegelka and Kumar, "On the Role of Depth and Looping for In-Context
Learning with Task Diversity" (arXiv 2410.21698) with linear-attention models (``effml.nn.LinearTransformer``) on
``effml.data.tasks.InContextRegression`` (a fresh Σ per prompt, condition number in [1, κ]).

Arms, for every κ in ``kappas`` and depth L in ``depths``: ``multi-L{L}-k{κ}`` (L distinct LSA layers) and
``looped-L{L}-k{κ}`` (one LSA layer applied L times); at L = 1 the two are the same model, so only ``multi-L1-k{κ}``
is trained and serves both families. With ``families`` including ``"softmax"`` (smoke and full presets; too slow for
the cpu preset), ``softmax-L{L}-k{κ}`` is effml's softmax transformer block looped L times with input injection
(``effml.nn.PromptTransformer``), reported beside the others but not part of the claims. Every arm is trained on
fresh prompts each step (squared error on the query). Training length: an L-layer (or L-loop) unrestricted LSA model
is a polynomial of degree 3^L in the prompt, and trained much past the cpu preset's 500 steps (2000–3000, at lr 1e-3
or 3e-3, float32 or float64) the 8-deep models met rare prompts on which the output overflowed to inf, at κ = 10 and
κ = 100 alike; the trainer then stops with a clear error. A 3000-step run on κ ∈ {1, 10} with 2 seeds (where no run
diverged) decided claims (1) and (2) as the 500-step preset does; its read-out claims were inconclusive.

Measured per arm (normalised MSE ``nmse = Σ(ŷ−y)²/Σy²`` on held-out prompts): ``nmse``; ``nmse@k`` read out after
every layer application k; ``shift_nmse@i`` on the test distribution with Σ rescaled by ``shift_scales[i]`` and its
2-Wasserstein size ``shift_w2@i``; ``readout_rise`` = max_k ln(nmse@{k+1} / nmse@k) (≤ 0 iff the read-out error
never rises with depth).

Derived: per family and seed, the depth needed to reach ``target_nmse`` at each κ (interpolated in log₂ L on the
running best error; extrapolated from the last two depths when no trained depth reaches it) and the least-squares
slope of that depth against ln κ, with the r² of that line and of a line in √κ (the theory's unrestricted and
restricted rates; telling them apart needs more than three κ values); the ratio of the multi-layer to the looped
shifted error at the largest depth.

Claims: (1) the depth needed grows with κ (slope > 0, for both families); (2) under the smallest shift the deepest
multi-layer model errs more than the 1-layer one, the deepest looped model does not, and the multi-layer/looped ratio
is > 1; (3) the looped model's read-out error falls with every loop (readout_rise ≤ 0), the multi-layer model's does
not (readout_rise > 0).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from effml.config import ConfigError, check_choice, check_distinct, check_positive
from effml.experiments.base import Arm, ArmRun, RunContext, TaskExperiment, evaluate_sharded, register
from effml.train import TrainConfig, Trainer

__all__ = ["LoopedDepthConfig", "LoopedDepth", "depth_needed", "FAMILIES"]

#: multi-layer LSA, looped LSA, and the looped softmax transformer with input injection (effml.nn.PromptTransformer)
FAMILIES = ("multi", "looped", "softmax")


@dataclass(frozen=True)
class LoopedDepthConfig:
    """Settings of the looped-depth recipe (override any with --set key=value)."""

    d: int = 5
    n_context: int = 40
    kappas: tuple[float, ...] = (1.0, 10.0, 100.0)
    depths: tuple[int, ...] = (1, 2, 4, 8)
    attention: str = "unrestricted"
    families: tuple[str, ...] = ("multi", "looped")  # add "softmax" for the looped softmax transformer (slow on CPU)
    softmax_width: int = 32
    softmax_heads: int = 2
    init_scale: float = 0.1
    init_std: float = 0.0
    batch_size: int = 64
    eval_prompts: int = 4096
    target_nmse: float = 0.1  # the fixed error whose required depth claim (1) fits against ln κ
    probe_kappa: float = 10.0  # the κ at which claims (2) and (3) are tested
    shift_scales: tuple[float, ...] = (1.1, 1.25, 1.5)  # test-time Σ → s·Σ; claim (2) uses the first
    threads: int = 1  # torch intra-op threads while training (tiny models: 1 is fastest on CPU)
    dtype: str = "float32"  # or "float64" (training and evaluation)
    seeds: int = 3
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=500, lr=3e-3, warmup_steps=50, weight_decay=0.0, eval_every=0, checkpoint_every=0, log_every=20))

    def __post_init__(self) -> None:
        owner = "looped-depth"
        if len(self.kappas) < 2 or any(k < 1 for k in self.kappas) or list(self.kappas) != sorted(set(self.kappas)):
            raise ConfigError(f"{owner}.kappas = {self.kappas!r}: give at least two distinct condition numbers ≥ 1 in "
                              "increasing order (for example 1,10,100); the depth fit needs two or more.")
        if (len(self.depths) < 2 or self.depths[0] != 1 or list(self.depths) != sorted(set(self.depths))
                or any(not isinstance(L, int) or L < 1 for L in self.depths)):
            raise ConfigError(f"{owner}.depths = {self.depths!r}: give increasing distinct depths starting at 1 "
                              "(for example 1,2,4,8); depth 1 is the baseline of every claim.")
        if self.probe_kappa not in self.kappas:
            raise ConfigError(f"{owner}.probe_kappa = {self.probe_kappa!r} is not one of kappas={self.kappas!r}; "
                              "pick one of them.")
        if not self.shift_scales or any(s <= 0 or s == 1 for s in self.shift_scales):
            raise ConfigError(f"{owner}.shift_scales = {self.shift_scales!r}: give one or more positive factors ≠ 1 "
                              "(Σ is multiplied by each at test time).")
        check_choice(owner, "attention", self.attention, ("unrestricted", "restricted"))
        check_choice(owner, "dtype", self.dtype, ("float32", "float64"))
        if not {"multi", "looped"} <= set(self.families):
            raise ConfigError(f"{owner}.families = {self.families!r}: the claims compare 'multi' and 'looped', so "
                              "both are needed; 'softmax' may be added.")
        for family in self.families:
            check_choice(owner, "families", family, FAMILIES)
        check_distinct(owner, "families", self.families,
                       why="each family trains one arm per depth and κ; list each once")
        check_distinct(owner, "shift_scales", self.shift_scales,
                       why="each scale is one shifted test (shift_nmse@i), so a repeat measures the same thing "
                           "twice; list each once")
        if self.softmax_width % self.softmax_heads or (self.softmax_width // self.softmax_heads) % 2:
            raise ConfigError(f"{owner}: softmax_width={self.softmax_width} must split into softmax_heads="
                              f"{self.softmax_heads} heads of even size (rotary attention).")
        for name in ("d", "n_context", "batch_size", "eval_prompts", "seeds", "target_nmse", "threads",
                     "softmax_width", "softmax_heads"):
            check_positive(owner, name, getattr(self, name))
        for name in ("init_scale", "init_std"):
            check_positive(owner, name, getattr(self, name), allow_zero=True)

    @property
    def deepest(self) -> int:
        return self.depths[-1]


def _smoke() -> LoopedDepthConfig:
    return LoopedDepthConfig(d=3, n_context=12, kappas=(1.0, 10.0), depths=(1, 2), probe_kappa=10.0, batch_size=16,
                             eval_prompts=64, shift_scales=(1.25,), seeds=2, families=FAMILIES, softmax_width=16,
                             train=TrainConfig(steps=8, lr=3e-3, warmup_steps=2, weight_decay=0.0, log_every=2))


def _cpu() -> LoopedDepthConfig:
    return LoopedDepthConfig()


def _full() -> LoopedDepthConfig:
    return LoopedDepthConfig(d=10, n_context=80, kappas=(1.0, 10.0, 100.0, 1000.0), depths=(1, 2, 4, 8, 16),
                             batch_size=256, eval_prompts=16384, seeds=5, families=FAMILIES, softmax_width=64,
                             softmax_heads=4,
                             train=TrainConfig(steps=20_000, lr=1e-3, warmup_steps=500, weight_decay=0.0,
                                               log_every=100))


def _kappa_tag(kappa: float) -> str:
    return f"{kappa:g}"


def arm_name(family: str, depth: int, kappa: float) -> str:
    """``multi-L4-k10`` / ``looped-L4-k10`` / ``softmax-L4-k10``; at depth 1 the multi-layer and looped LSA models
    coincide, so both are ``multi-L1-k…``."""
    return f"{'multi' if depth == 1 and family == 'looped' else family}-L{depth}-k{_kappa_tag(kappa)}"


_MAX_EXTRAPOLATED_DOUBLINGS = 10  # beyond 2^10 × the deepest trained model, call the depth needed infinite


def _unreached_slope(needed: list[float]) -> float:
    """The sign of growth when some κ's depth needed is infinite (never reached), κ ascending: +inf when the infinite
    ones are the largest κ and the finite ones do not fall (depth grows beyond the depths tried), −inf when they are
    the smallest κ and the finite ones do not rise (it falls), NaN otherwise. Non-finite, so a claim on it stays
    inconclusive, but never with the wrong sign."""
    reached = [math.isfinite(value) for value in needed]
    finite = [value for value in needed if math.isfinite(value)]
    if not finite:  # reached nowhere: no direction
        return math.nan
    if reached == sorted(reached, reverse=True) and finite == sorted(finite):
        return math.inf
    if reached == sorted(reached) and finite == sorted(finite, reverse=True):
        return -math.inf
    return math.nan


def depth_needed(depths: list[int], errors: list[float], target: float) -> tuple[float, bool]:
    """The depth at which the error reaches ``target``: ``(depth, extrapolated)``.

    Uses the running best error (a deeper model can do what a shallower one does), interpolates ln(error) linearly
    in log₂(depth) between the last depth above the target and the first at or below it, and extrapolates from the
    last two depths when none reaches it (a flat or rising tail, or more than 10 doublings beyond the deepest model,
    gives ``inf``).
    """
    best = []
    for error in errors:
        best.append(min(error, best[-1]) if best else error)
    logs = [math.log2(L) for L in depths]
    log_errors = [math.log(max(e, 1e-300)) for e in best]
    log_target = math.log(target)
    if best[0] <= target:
        return float(depths[0]), False
    for j in range(1, len(depths)):
        if best[j] <= target:
            fraction = (log_errors[j - 1] - log_target) / (log_errors[j - 1] - log_errors[j])
            return 2 ** (logs[j - 1] + fraction * (logs[j] - logs[j - 1])), False
    slope = (log_errors[-1] - log_errors[-2]) / (logs[-1] - logs[-2])
    log_depth = logs[-1] + (log_target - log_errors[-1]) / slope if slope < 0 else math.inf
    if log_depth > logs[-1] + _MAX_EXTRAPOLATED_DOUBLINGS:
        return math.inf, True
    return 2 ** log_depth, True


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y ≈ intercept + slope · x``: ``(slope, intercept, r²)`` (r² = 1 when ``ys`` are all equal)."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, intercept, 1.0 - residual / total if total > 0 else 1.0


@register
class LoopedDepth(TaskExperiment):
    name = "looped-depth"
    description = ("multi-layer vs looped linear attention on in-context regression with task diversity: depth needed "
                   "vs κ, robustness to shift, monotone read-outs (arXiv 2410.21698)")
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}

    def arms(self, config: LoopedDepthConfig) -> list[Arm]:
        arms = []
        labels = {"multi": "multi-layer LSA ", "looped": "looped LSA ×", "softmax": "looped softmax ×"}
        for kappa in config.kappas:
            for family in config.families:
                for depth in config.depths:
                    if family == "looped" and depth == 1:
                        continue
                    looped = family != "multi"
                    label = "1 LSA layer" if family != "softmax" and depth == 1 else labels[family] + str(depth)
                    arms.append(Arm(
                        name=arm_name(family, depth, kappa), label=f"{label}, κ={_kappa_tag(kappa)}",
                        info={"family": family, "depth": depth, "kappa": kappa,
                              "n_layers": 1 if looped else depth, "n_loops": depth if looped else 1}))
        return arms

    def task(self, config: LoopedDepthConfig, kappa: float):
        from effml.data.tasks.regression import InContextRegression

        return InContextRegression(d=config.d, n_context=config.n_context, covariance="diverse", kappa=kappa)

    def run_arm(self, config: LoopedDepthConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.train.icl import intra_op_threads

        with intra_op_threads(config.threads):
            return self._run_arm(config, arm, context)

    def _run_arm(self, config: LoopedDepthConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.data.tasks.base import derive_seed
        from effml.nn import LinearTransformer, LinearTransformerConfig, PromptTransformer, TransformerConfig
        from effml.train.icl import predict_readouts, query_mse_loss

        task = self.task(config, arm.info["kappa"])
        torch.manual_seed(context.seed)
        if arm.info["family"] == "softmax":
            model = PromptTransformer(config.d, TransformerConfig(
                d_model=config.softmax_width, n_heads=config.softmax_heads, n_layers=1, n_loops=arm.info["n_loops"],
                input_injection=True, max_seq_len=config.n_context + 1))
        else:
            model = LinearTransformer(LinearTransformerConfig(
                d=config.d, n_layers=arm.info["n_layers"], n_loops=arm.info["n_loops"], attention=config.attention,
                init_scale=config.init_scale, init_std=config.init_std))
        dtype = getattr(torch, config.dtype)
        model = model.to(dtype)
        eval_seed = derive_seed(context.seed, 1_000_003)  # held-out prompts: a stream training never draws from

        def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
            predict = predict_readouts(model, context.device, dtype)
            return {"valid_nmse": evaluate_sharded(task, predict, 512, eval_seed, context.world)["nmse"]}

        trainer = Trainer(model, query_mse_loss, self.training_batches(config, task, context), config.train,
                          evaluate=evaluate, run_dir=context.run_dir, device=context.device, resume=context.resume,
                          quiet=context.quiet, description=f"{self.name} {arm.name} seed {context.seed}")
        result = trainer.fit()
        model.eval()
        test_seed = derive_seed(context.seed, 2_000_003)
        predict = predict_readouts(model, context.device, dtype)
        metrics: dict[str, float] = dict(result.final_metrics)
        measured = evaluate_sharded(task, predict, config.eval_prompts, test_seed, context.world)
        depth = arm.info["depth"]
        readouts = [measured.get(f"nmse@{k}", measured["nmse"]) for k in range(1, depth + 1)]
        metrics["nmse"] = measured["nmse"]
        metrics.update({f"nmse@{k}": value for k, value in enumerate(readouts, start=1)})
        if depth > 1:
            metrics["readout_rise"] = max(math.log(b / a) for a, b in itertools.pairwise(readouts))
        shift_curve = [[0.0, measured["nmse"]]]
        for index, scale in enumerate(config.shift_scales):
            shifted = task.shifted(scale=scale)
            shift_nmse = evaluate_sharded(shifted, predict, config.eval_prompts, test_seed, context.world)["nmse"]
            w2 = task.shift_size(shifted, n=2048, seed=0)  # same prompts for every seed: one x per shift
            metrics[f"shift_nmse@{index + 1}"] = shift_nmse
            metrics[f"shift_w2@{index + 1}"] = w2
            shift_curve.append([w2, shift_nmse])
        metrics["shift_nmse"] = metrics["shift_nmse@1"]
        metrics["step_time_s"] = result.median_step_time
        curves = dict(result.curves)
        curves["readout_nmse"] = [[float(k), value] for k, value in enumerate(readouts, start=1)]
        curves["shift_nmse"] = shift_curve
        return ArmRun(params=sum(p.numel() for p in model.parameters()), metrics=metrics, curves=curves)

    def derive(self, config: LoopedDepthConfig, results: dict[str, Any]) -> dict[str, Any]:
        """Depth needed per κ and its slope against ln κ (per family and seed); multi/looped shifted-error ratio."""
        derived: dict[str, Any] = {}

        def final(arm: str, seed: int, metric: str) -> float | None:
            run = results["arms"].get(arm, {}).get("runs", {}).get(str(seed))
            if not run or run.get("status") != "complete":
                return None
            return run["metrics"].get(metric)

        for family in config.families:
            fits: dict[str, Any] = {}
            for seed in self.seeds(config):
                needed, extrapolated = [], 0
                for kappa in config.kappas:
                    errors = [final(arm_name(family, L, kappa), seed, "nmse") for L in config.depths]
                    if any(e is None for e in errors):
                        break
                    depth, was_extrapolated = depth_needed(list(config.depths), errors, config.target_nmse)
                    needed.append(depth)
                    extrapolated += was_extrapolated
                if len(needed) != len(config.kappas):
                    continue
                metrics = {f"depth_needed@k{_kappa_tag(k)}": value
                           for k, value in zip(config.kappas, needed, strict=True)}
                metrics["extrapolated"] = float(extrapolated)
                if all(math.isfinite(v) for v in needed):
                    slope, intercept, r2_log = _line_fit([math.log(k) for k in config.kappas], needed)
                    _, _, r2_sqrt = _line_fit([math.sqrt(k) for k in config.kappas], needed)
                    metrics.update(slope_per_ln_kappa=slope, intercept=intercept, r2_ln_kappa=r2_log,
                                   r2_sqrt_kappa=r2_sqrt)
                else:  # some κ never reached the target within the depths tried: no line to fit
                    metrics.update(slope_per_ln_kappa=_unreached_slope(needed), intercept=math.nan)
                fits[str(seed)] = {"status": "complete", "metrics": metrics}
            derived[f"depth-fit-{family}"] = {
                "label": f"{family}: depth needed for nmse ≤ {config.target_nmse:g} ≈ a + b·ln κ", "runs": fits}

        ratios: dict[str, Any] = {}
        multi = arm_name("multi", config.deepest, config.probe_kappa)
        looped = arm_name("looped", config.deepest, config.probe_kappa)
        for seed in self.seeds(config):
            m, lp = final(multi, seed, "shift_nmse"), final(looped, seed, "shift_nmse")
            if m is not None and lp is not None and lp > 0:
                ratios[str(seed)] = {"status": "complete", "metrics": {"multi_over_looped": m / lp}}
        derived["shift-robustness"] = {"label": f"shifted nmse of {multi} / {looped}", "runs": ratios}
        return derived

    def claims(self, config: LoopedDepthConfig) -> list[Any]:
        from effml.report import Compare, Threshold

        kappa, deepest = config.probe_kappa, config.deepest
        multi, looped, shallow = (arm_name("multi", deepest, kappa), arm_name("looped", deepest, kappa),
                                  arm_name("multi", 1, kappa))
        scale = config.shift_scales[0]
        claims: list[Any] = [
            Threshold(name=f"depth needed grows with kappa ({family})",
                      statement=f"The {family} model's depth needed to reach nmse ≤ {config.target_nmse:g} grows with "
                                f"the task diversity κ: its least-squares slope against ln κ is > 0.",
                      metric="slope_per_ln_kappa", arm=f"depth-fit-{family}", better="higher", threshold=0.0)
            for family in ("multi", "looped")
        ]
        claims += [
            Compare(name="multi-layer error under shift grows with depth",
                    statement=f"With Σ rescaled by {scale:g} at test time (κ={kappa:g}), the {deepest}-layer model "
                              f"errs more than the 1-layer model.",
                    metric="shift_nmse", arm=multi, baseline=shallow, better="higher"),
            Compare(name="looped error under shift stays bounded",
                    statement=f"Under the same shift the model looped {deepest} times errs less than the 1-layer "
                              "model (its error does not grow with depth).",
                    metric="shift_nmse", arm=looped, baseline=shallow, better="lower"),
            Threshold(name="looped is more robust than multi-layer",
                      statement=f"Under the same shift the ratio of the {deepest}-layer model's error to the looped "
                                "model's is > 1.",
                      metric="multi_over_looped", arm="shift-robustness", better="higher", threshold=1.0),
            Threshold(name="looped read-outs improve monotonically",
                      statement="Reading the looped model out after every loop, the error never rises: "
                                "max_k ln(nmse@k+1 / nmse@k) ≤ 0.",
                      metric="readout_rise", arm=looped, better="lower", threshold=0.0),
            Threshold(name="multi-layer read-outs are not monotone",
                      statement="Reading the multi-layer model out after every layer, the error rises somewhere: "
                                "max_k ln(nmse@k+1 / nmse@k) > 0.",
                      metric="readout_rise", arm=multi, better="higher", threshold=0.0),
        ]
        return claims

    def plots(self, config: LoopedDepthConfig) -> list[Any]:
        from effml.report import CurvePlot, MetricPlot

        kappa, deepest = config.probe_kappa, config.deepest
        plots: list[Any] = [
            MetricPlot(name=f"nmse_vs_depth_k{_kappa_tag(k)}", x="depth", y="nmse", logx=True, logy=True,
                       title=f"Test nmse vs depth, κ={_kappa_tag(k)} (multi-layer and looped)",
                       arms=[arm_name(f, L, k) for f in config.families for L in config.depths
                             if f != "looped" or L > 1])
            for k in config.kappas]
        probe_arms = [arm_name(f, L, kappa) for f in config.families for L in config.depths
                      if f != "looped" or L > 1]
        plots += [
            CurvePlot(name="nmse_vs_shift", curve="shift_nmse", arms=probe_arms, logy=True, ylabel="test nmse",
                      xlabel="W2 distance of the test distribution (Σ rescaled)",
                      title=f"Error under covariance rescaling, κ={kappa:g}"),
            CurvePlot(name="readouts", curve="readout_nmse", ylabel="nmse of the read-out", logy=True,
                      arms=[arm_name(f, deepest, kappa) for f in config.families],
                      xlabel="read-out after layer application k",
                      title=f"Per-layer / per-loop read-outs, κ={kappa:g}"),
            CurvePlot(name="train_loss", curve="train_nmse", ylabel="train nmse", logy=True, arms=probe_arms,
                      title=f"Training nmse, κ={kappa:g}"),
        ]
        return plots
