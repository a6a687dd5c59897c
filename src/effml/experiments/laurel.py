"""`laurel` and `laurel-vision`: LAuReL against its baseline and against simply adding a layer.

Paper: G. Menghani, R. Kumar, S. Kumar, "LAuReL: Learned Augmented Residual Layer", ICML 2025, arXiv 2411.07501
(component: ``effml.nn.laurel``). The paper's headline (ResNet-50 on ImageNet): RW recovers 60 % of the gain of an
extra layer with +0.003 % parameters, and RW+LR matches the extra layer with 2.6× fewer extra parameters; on LMs every
variant beats a deeper baseline.

Both recipes train the same arms for several seeds, with the same data order per seed:

* ``baseline-<L>L`` — the base model with L layers (plain residuals);
* ``baseline-<L+1>L`` — naive scaling: one more layer (transformer block / residual block);
* one arm per LAuReL variant (default RW, LR, RW+LR, RW+LR+PA), LAuReL around every residual branch of the L-layer
  model, starting from the L-layer baseline's weights of the same seed (``LaurelRecipe.seeded_model``): the arms of a
  seed differ only by LAuReL's own parameters.

Reported per run: the quality metric (held-out loss for `laurel`, test accuracy for `laurel-vision`), ``extra_params``
(absolute and % over the L-layer baseline) and the median ``step_time_s``. The derived entry ``best-laurel`` takes the
LAuReL arm with the best mean *validation* quality (chosen on validation, judged on test: choosing on the test values
that claim 2a then judges would favour the luckiest variant) and, per seed, the fraction of the extra layer's test
gain it recovers and its extra parameters as a fraction of the extra layer's.

Claims (issue #3): (1) RW improves on the L-layer baseline (1a) with under 0.01 % extra parameters (1b); (2) the best
variant recovers at least 60 % of the extra layer's gain (2a, stated linearly per seed as
gain(best) − 0.6·gain(extra layer) ≥ 0, which is not destabilised by a small denominator) with at most 1/2.6 of its
extra parameters (2b); (3) the step-time overhead of RW+LR is at most 5 %, measured as ``step_time_ratio`` (RW+LR
and the baseline stepped interleaved in one process, ``LaurelRecipe.step_overhead``) rather than from the arms' own
step times, which were taken at different times under different load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from effml.config import ConfigError, check_choice, check_distinct, check_positive
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, register
from effml.experiments.lm_training import load_byte_corpus, train_lm
from effml.train import TrainConfig, World

__all__ = ["LaurelLMConfig", "LaurelLM", "LaurelVisionConfig", "LaurelVision", "BEST", "RECOVERED_SHARE",
           "PARAM_RATIO"]

BEST = "best-laurel"  # derived entry: the best LAuReL arm against the extra layer
RECOVERED_SHARE = 0.6  # claim 2: share of the extra layer's gain to recover ...
PARAM_RATIO = 1 / 2.6  # ... with at most this fraction of its extra parameters
RW_PARAM_PCT = 0.01  # claim 1: RW's extra parameters, in percent
STEP_OVERHEAD = 0.05  # claim 3: RW+LR's step-time overhead


def _residual_options(config: Any) -> dict[str, Any]:
    """The recipe config's ``LaurelResidual`` options other than the variant (the same for every LAuReL arm)."""
    return {"rank": config.rank, "k": config.k, "bound": config.bound, "scale": config.scale,
            "per_channel": config.per_channel, "lr_init": config.lr_init, "pa_map": config.pa_map}


def _check_laurel_options(owner: str, config: Any) -> None:
    """ConfigError unless the recipe config's variants and residual options are valid LAuReL options."""
    from effml.nn.laurel import LaurelConfig

    _check_variants(owner, config.variants)
    try:
        LaurelConfig(**_residual_options(config))
    except ValueError as error:
        raise ConfigError(f"{owner}: {error}") from None


def _check_variants(owner: str, variants: tuple[str, ...]) -> None:
    from effml.nn.laurel import parse_variant

    canonical = []
    for variant in variants:
        try:
            canonical.append("+".join(parse_variant(variant)))
        except ValueError as error:
            raise ConfigError(f"{owner}.variants: {error}") from None
    check_distinct(owner, "variants", variants, key=lambda variant: "+".join(parse_variant(variant)),
                   why="each variant is one arm; list each once")
    missing = [v for v in ("rw", "rw+lr") if v not in canonical]
    if missing:
        raise ConfigError(f"{owner}.variants {variants!r} lacks {missing}: the claims are about RW and RW+LR, so keep "
                          "them (add others freely, e.g. 'lr', 'rw+lr+pa').")


class LaurelRecipe(Experiment):
    """What both LAuReL recipes share: arms, extra-parameter accounting, the derived best variant and the claims.

    Subclasses set ``metric``, ``selection_metric`` and ``better`` (the test and validation quality metrics and their
    direction) and implement ``build_model`` (the baseline with a given depth, or the L-layer model with a LAuReL
    variant) and ``run_arm``.
    """

    metric: ClassVar[str]  # the test metric every claim on quality is judged on
    selection_metric: ClassVar[str]  # its validation counterpart, which chooses the best variant
    better: ClassVar[str]
    claims_on_time = True  # claim 3: RW+LR's step-time overhead

    unit: ClassVar[str] = "L"  # arm-name suffix of the depth: L layers (LM) or B residual blocks (ResNet)
    unit_name: ClassVar[str] = "layer"

    def depth(self, config: Any) -> int:
        """L: the number of layers (residual units) of the base model."""
        return config.n_layers

    def units(self, count: int) -> str:
        """``count`` residual units in words: "1 layer", "4 blocks"."""
        return f"{count} {self.unit_name}{'' if count == 1 else 's'}"

    def arms(self, config: Any) -> list[Arm]:
        depth = self.depth(config)
        base_name, deeper_name = self._baselines(config)
        base = Arm(name=base_name, label=f"baseline, {self.units(depth)}",
                   info={"extra_layer": False, "variant": None})
        deeper = Arm(name=deeper_name, label=f"baseline, {self.units(depth + 1)} (one more)",
                     info={"extra_layer": True, "variant": None})
        variants = [Arm(name=v, label=f"LAuReL-{v.upper()}, {self.units(depth)}",
                        info={"extra_layer": False, "variant": v})
                    for v in config.variants]
        # RW and RW+LR run right after the baseline, so that an interrupted run has decided claims 1 and 3 first.
        first = [arm for arm in variants if arm.name in ("rw", "rw+lr")]
        return [base, *first, deeper, *[arm for arm in variants if arm not in first]]

    def _baselines(self, config: Any) -> tuple[str, str]:
        """Names of the L-layer and the (L+1)-layer baseline arms."""
        depth = self.depth(config)
        return f"baseline-{depth}{self.unit}", f"baseline-{depth + 1}{self.unit}"

    def build_model(self, config: Any, extra_layer: bool, variant: str | None) -> torch.nn.Module:
        """The base model (one more layer with ``extra_layer``) with plain residuals, or with LAuReL ``variant``."""
        raise NotImplementedError

    def seeded_model(self, config: Any, seed: int, extra_layer: bool, variant: str | None) -> torch.nn.Module:
        """``build_model`` under ``seed``, where a LAuReL model also takes the plain model's weights (built under the
        same seed) for every parameter the two share: all arms of a seed then start from the same network and differ
        only by LAuReL's own parameters. Built alone, an initialiser that draws from the global generator (LR's
        Xavier) would shift the draws of every layer built after it."""
        torch.manual_seed(seed)
        model = self.build_model(config, extra_layer, variant)
        if variant is not None:
            torch.manual_seed(seed)
            plain = self.build_model(config, extra_layer, None).state_dict()
            unexpected = model.load_state_dict(plain, strict=False).unexpected_keys
            if unexpected:
                raise RuntimeError(f"{self.name}: the {variant} model lacks the plain model's {unexpected}.")
        return model

    def laurel_options(self, config: Any, variant: str) -> dict[str, Any]:
        """The ``LaurelResidual`` options of ``variant`` under ``config``."""
        return {"variant": variant, **_residual_options(config)}

    def extra_parameters(self, config: Any, model: torch.nn.Module) -> dict[str, float]:
        """``extra_params`` and ``extra_params_pct`` of ``model`` over the L-layer baseline (built to be counted, with
        the random state saved and restored so that counting changes nothing else)."""
        with torch.random.fork_rng(devices=[]):
            baseline = sum(p.numel() for p in self.build_model(config, False, None).parameters())
        extra = sum(p.numel() for p in model.parameters()) - baseline
        return {"extra_params": float(extra), "extra_params_pct": 100.0 * extra / baseline}

    def step_overhead(self, config: Any, context: RunContext, loss_fn: Any, batch: Any) -> dict[str, float]:
        """RW+LR's training-step time over the L-layer baseline's (``effml.train.step_timing.step_time_ratio``):
        fresh models, one batch, ``config.timing_rounds`` interleaved rounds. Arms are trained one after another, so
        their own median step times mix in the machine's load drift; this pairs every RW+LR step with a baseline step
        taken right next to it."""
        from effml.train.step_timing import step_time_ratio

        with torch.random.fork_rng(devices=[]):
            laurel = self.seeded_model(config, context.seed, False, "rw+lr")
            baseline = self.seeded_model(config, context.seed, False, None)
        return step_time_ratio(laurel, baseline, loss_fn, batch, rounds=config.timing_rounds, device=context.device,
                               train=config.train)

    def selection_note(self, config: Any) -> str:
        """Appended to the derived label when the validation values that choose the best variant do not come from a
        split of their own (empty by default)."""
        return ""

    def derive(self, config: Any, results: dict[str, Any]) -> dict[str, Any]:
        """The best LAuReL arm against the extra layer, per seed. The best is chosen by mean *validation* quality
        (``selection_metric``) over the seeds every variant completed, and judged (claim 2a) on test quality
        (``metric``): choosing and judging on the same values would favour whichever variant was luckiest on them."""
        from effml.report import best_by_mean

        arms = results["arms"]
        base, deeper = self._baselines(config)

        def complete(name: str) -> dict[str, dict[str, Any]]:
            runs = arms.get(name, {}).get("runs", {})
            return {seed: run for seed, run in runs.items() if run.get("status") == "complete"}

        def validation(run: dict[str, Any]) -> float | None:
            """The run's final validation value: its metric, else the last point of its curve (older runs)."""
            value = run.get("metrics", {}).get(self.selection_metric)
            if value is None and run.get("curves", {}).get(self.selection_metric):
                value = run["curves"][self.selection_metric][-1][1]
            return value

        sign = -1.0 if self.better == "lower" else 1.0  # gain = sign · (arm − baseline) > 0 when the arm is better
        chosen_on = {v: {seed: value for seed, run in complete(v).items() if (value := validation(run)) is not None}
                     for v in config.variants}
        chosen_on = {v: values for v, values in chosen_on.items() if values}
        if not chosen_on:
            return {}
        best = best_by_mean(chosen_on, self.better)
        base_runs, deeper_runs, best_runs = (
            {seed: run["metrics"] for seed, run in complete(name).items()} for name in (base, deeper, best))
        per_seed = {}
        for seed in sorted(set(base_runs) & set(deeper_runs) & set(best_runs), key=int):
            layer_gain = sign * (deeper_runs[seed][self.metric] - base_runs[seed][self.metric])
            best_gain = sign * (best_runs[seed][self.metric] - base_runs[seed][self.metric])
            metrics = {
                "gain_of_extra_layer": layer_gain,
                "gain_of_best": best_gain,
                "gain_margin": best_gain - RECOVERED_SHARE * layer_gain,
                "param_ratio": best_runs[seed]["extra_params"] / deeper_runs[seed]["extra_params"],
            }
            if layer_gain != 0.0:
                metrics["recovered_fraction"] = best_gain / layer_gain
            per_seed[seed] = {"status": "complete", "metrics": metrics}
        label = (f"best LAuReL variant by mean {self.selection_metric} (judged on {self.metric}): {best}, against "
                 f"{deeper}{self.selection_note(config)}")
        return {BEST: {"label": label, "variant": best, "runs": per_seed}}

    def claims(self, config: Any) -> list[Any]:
        from effml.report import Compare, Threshold

        base, deeper = self._baselines(config)
        quality = "held-out loss" if self.metric.endswith("loss") else "test accuracy"
        extra_helps = f"2a premise: one more {self.unit_name} helps"
        return [
            Compare(name="1a RW beats the baseline",
                    statement=f"LAuReL-RW improves {quality} over the baseline "
                              f"({self.units(self.depth(config))}).",
                    metric=self.metric, arm="rw", baseline=base, better=self.better),
            Threshold(name="1b RW adds under 0.01% parameters",
                      statement="LAuReL-RW adds under 0.01 % parameters to the baseline.",
                      metric="extra_params_pct", arm="rw", better="lower", threshold=RW_PARAM_PCT),
            Compare(name=extra_helps,
                    statement=f"Adding one {self.unit_name} improves {quality} over the baseline (without a "
                              "gain there is nothing for 2a to recover).",
                    metric=self.metric, arm=deeper, baseline=base, better=self.better),
            Threshold(name="2a best variant recovers 60% of the extra layer's gain",
                      statement=f"The best LAuReL variant recovers at least {RECOVERED_SHARE:.0%} of the {quality} "
                                "gain of adding a layer (per seed: gain(best) − 0.6·gain(extra layer) ≥ 0).",
                      metric="gain_margin", arm=BEST, better="higher", threshold=0.0, requires=extra_helps),
            Threshold(name="2b with at most 1/2.6 of its extra parameters",
                      statement="... while adding at most 1/2.6 of the extra layer's extra parameters.",
                      metric="param_ratio", arm=BEST, better="lower", threshold=PARAM_RATIO),
            Threshold(name="3 RW+LR step-time overhead at most 5%",
                      statement="A training step of LAuReL-RW+LR takes at most 5 % longer than the baseline's "
                                "(the two timed interleaved in one process, median per-round ratio).",
                      metric="step_time_ratio", arm="rw+lr", better="lower", threshold=1 + STEP_OVERHEAD),
        ]


# ------------------------------------------------------------------------------------------------ language


@dataclass(frozen=True)
class LaurelLMConfig:
    """Settings of the `laurel` recipe (override any with --set key=value).

    The base model is effml's decoder LM (pre-norm, rotary, GELU MLP) of width ``d_model`` and ``n_layers`` layers on
    byte-level code; LAuReL wraps both residual connections (attention, MLP) of every block.
    """

    d_model: int = 64
    n_layers: int = 3
    head_dim: int = 32
    mlp: str = "gelu"
    variants: tuple[str, ...] = ("rw", "lr", "rw+lr", "rw+lr+pa")
    rank: int = 8
    k: int = 3
    bound: str = "softmax"
    scale: float = 2.0  # RW: α, β = scale·bound(logits); 2 starts them at 1
    per_channel: bool = False
    lr_init: str = "orthogonal"
    pa_map: str = "identity"
    corpus: str = "stdlib-code"
    max_bytes: int | None = None
    seq_len: int = 128
    batch_size: int = 32
    eval_windows: int = 256
    timing_rounds: int = 40  # interleaved RW+LR/baseline step pairs behind claim 3
    seeds: int = 3
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=3e-3, warmup_steps=30,
                                                                   eval_every=150, checkpoint_every=150,
                                                                   log_every=20))

    def __post_init__(self) -> None:
        owner = "laurel"
        for name in ("d_model", "n_layers", "head_dim", "rank", "k", "seq_len", "batch_size", "eval_windows", "seeds",
                     "timing_rounds"):
            check_positive(owner, name, getattr(self, name))
        if self.d_model % self.head_dim:
            raise ConfigError(f"laurel: d_model {self.d_model} is not a multiple of head_dim {self.head_dim}; "
                              "pick a width divisible by it or change head_dim.")
        if self.rank > self.d_model:
            raise ConfigError(f"laurel: rank {self.rank} exceeds d_model {self.d_model}; choose rank ≤ d_model.")
        check_choice(owner, "mlp", self.mlp, ("gelu", "swiglu"))
        _check_laurel_options(owner, self)
        if self.max_bytes is not None:
            check_positive(owner, "max_bytes", self.max_bytes)


def _lm_smoke() -> LaurelLMConfig:
    return LaurelLMConfig(d_model=32, n_layers=1, head_dim=16, rank=2, max_bytes=40_000, seq_len=32, batch_size=8,
                          eval_windows=8, seeds=2, variants=("rw", "rw+lr"), timing_rounds=2,
                          train=TrainConfig(steps=4, lr=3e-3, warmup_steps=1, eval_every=4, checkpoint_every=4,
                                            log_every=2))


def _lm_cpu() -> LaurelLMConfig:
    return LaurelLMConfig()


def _lm_full() -> LaurelLMConfig:
    return LaurelLMConfig(d_model=768, n_layers=12, head_dim=64, rank=32, seq_len=1024, batch_size=64,
                          eval_windows=1024, train=TrainConfig(steps=20_000, lr=6e-4, warmup_steps=1000,
                                                               eval_every=1000, checkpoint_every=1000, log_every=50))


@register
class LaurelLM(LaurelRecipe):
    name = "laurel"
    description = ("LAuReL (arXiv 2411.07501) on effml's LM, stdlib code: RW/LR/PA vs the baseline and vs one more "
                   "layer (held-out loss, extra params, step time)")
    presets = {"smoke": _lm_smoke, "cpu": _lm_cpu, "full": _lm_full}
    supports_fsdp = True
    metric = "test_loss"
    selection_metric = "valid_loss"
    better = "lower"

    def build_model(self, config: LaurelLMConfig, extra_layer: bool, variant: str | None) -> torch.nn.Module:
        from effml.nn import TransformerConfig, TransformerLM

        residual = {"residual": "laurel", "residual_options": self.laurel_options(config, variant)} if variant else {}
        return TransformerLM(TransformerConfig(vocab_size=256, d_model=config.d_model,
                                               n_layers=config.n_layers + int(extra_layer),
                                               n_heads=config.d_model // config.head_dim, max_seq_len=config.seq_len,
                                               mlp=config.mlp, **residual))

    def run_arm(self, config: LaurelLMConfig, arm: Arm, context: RunContext) -> ArmRun:
        corpus = load_byte_corpus(config.corpus, config.max_bytes, context.world)
        model = self.seeded_model(config, context.seed, arm.info["extra_layer"], arm.info["variant"])
        metrics, curves = train_lm(model, corpus, seq_len=config.seq_len, batch_size=config.batch_size,
                                   eval_windows=config.eval_windows, train=config.train, context=context,
                                   description=f"{self.name} {arm.name} seed {context.seed}")
        metrics.update(self.extra_parameters(config, model))
        if arm.info["variant"] == "rw+lr":
            from effml.data import WindowBatches
            from effml.train.lm import causal_lm_loss

            batch = WindowBatches(corpus.train, config.batch_size, config.seq_len, seed=context.seed).batch(0)
            metrics.update(self.step_overhead(config, context, causal_lm_loss, batch))
        return ArmRun(params=model.num_parameters(), metrics=metrics, curves=curves)

    def plots(self, config: LaurelLMConfig) -> list[Any]:
        from effml.report import CurvePlot, MetricPlot

        return [
            MetricPlot(name="loss_vs_params", x="params", y="test_loss",
                       title="Held-out loss vs parameters (LAuReL arms sit at the baseline's size)"),
            CurvePlot(name="valid_loss", curve="valid_loss", title="Validation loss during training",
                      ylabel="nats per byte"),
            CurvePlot(name="train_loss", curve="train_loss", title="Training loss", ylabel="nats per byte"),
        ]


# ------------------------------------------------------------------------------------------------ vision


@dataclass(frozen=True)
class LaurelVisionConfig:
    """Settings of the `laurel-vision` recipe (override any with --set key=value).

    The base model is a ResNet (``effml.nn.resnet``) with ``blocks`` residual blocks per stage (on Fashion-MNIST a
    3×3 stem of stride ``stem_stride``, so 28×28 images become 14×14 feature maps at the default 2); the "one more
    layer" arm adds one block to stage ``extra_block_stage`` (default the second-to-last: the paper's +4.37 %
    ResNet-50 arm matches one more bottleneck in its third of four stages). LAuReL replaces every block's residual
    connection.

    ``dataset``: "fashion-mnist" (IDX files, see ``effml.data.images``; ``data_dir`` or ``$EFFML_FASHION_MNIST``
    overrides the Debian location) or "imagenet" (``data_dir`` with train/ and val/ class folders, default
    ``$EFFML_IMAGENET`` in the `full` preset; needs Pillow).
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    valid_size: int = 5000  # training images held out for validation (Fashion-MNIST); 0: evaluate on the test split
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: tuple[int, ...] = (2, 2, 2)
    block: str = "basic"
    stem_stride: int = 2
    extra_block_stage: int = -2
    variants: tuple[str, ...] = ("rw", "lr", "rw+lr", "rw+lr+pa")
    rank: int = 4
    k: int = 2
    bound: str = "softmax"
    scale: float = 2.0  # RW: α, β = scale·bound(logits); 2 starts them at 1
    per_channel: bool = False
    lr_init: str = "xavier"
    pa_map: str = "identity"
    batch_size: int = 64
    eval_batch_size: int = 1000
    flip: bool = False
    timing_rounds: int = 40  # interleaved RW+LR/baseline step pairs behind claim 3
    seeds: int = 3
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=3e-3, warmup_steps=20,
                                                                   weight_decay=0.05, eval_every=0,
                                                                   checkpoint_every=150, log_every=20))

    def __post_init__(self) -> None:
        owner = "laurel-vision"
        check_choice(owner, "dataset", self.dataset, ("fashion-mnist", "imagenet"))
        check_choice(owner, "block", self.block, ("basic", "bottleneck"))
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ConfigError(f"laurel-vision: widths {self.widths} and blocks {self.blocks} need one entry per stage.")
        for value in (*self.widths, *self.blocks):
            check_positive(owner, "widths/blocks entries", value)
        if not -len(self.blocks) <= self.extra_block_stage < len(self.blocks):
            raise ConfigError(f"laurel-vision: extra_block_stage {self.extra_block_stage} is not a stage index for "
                              f"{len(self.blocks)} stages (use 0..{len(self.blocks) - 1} or a negative index).")
        for name in ("rank", "k", "batch_size", "eval_batch_size", "seeds", "stem_stride", "timing_rounds"):
            check_positive(owner, name, getattr(self, name))
        check_positive(owner, "valid_size", self.valid_size, allow_zero=True)
        if self.rank > min(self.widths):
            raise ConfigError(f"laurel-vision: rank {self.rank} exceeds the narrowest stage width {min(self.widths)}; "
                              "choose a smaller rank.")
        _check_laurel_options(owner, self)


def _vision_smoke() -> LaurelVisionConfig:
    return LaurelVisionConfig(widths=(4, 8), blocks=(1, 1), rank=2, batch_size=16, eval_batch_size=64, seeds=2,
                              valid_size=100, timing_rounds=2,
                              variants=("rw", "rw+lr"),
                              train=TrainConfig(steps=3, lr=3e-3, warmup_steps=1, eval_every=3, checkpoint_every=3,
                                                log_every=1))


def _vision_cpu() -> LaurelVisionConfig:
    return LaurelVisionConfig()


def _vision_full() -> LaurelVisionConfig:
    return LaurelVisionConfig(dataset="imagenet", data_dir=os.environ.get("EFFML_IMAGENET"),
                              widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), block="bottleneck", rank=16, k=3,
                              batch_size=256, eval_batch_size=250, flip=True, seeds=5,
                              train=TrainConfig(steps=450_000, lr=1e-3, warmup_steps=5000, weight_decay=0.05,
                                                eval_every=10_000, checkpoint_every=5000, log_every=100))


@register
class LaurelVision(LaurelRecipe):
    name = "laurel-vision"
    description = ("LAuReL (arXiv 2411.07501) on a ResNet, Fashion-MNIST (ImageNet ResNet-50 in `full`): "
                   "RW/LR/PA vs the baseline and vs one more block (test accuracy, extra params, step time)")
    presets = {"smoke": _vision_smoke, "cpu": _vision_cpu, "full": _vision_full}
    metric = "test_accuracy"
    selection_metric = "valid_accuracy"
    better = "higher"
    unit = "B"
    unit_name = "block"

    def depth(self, config: LaurelVisionConfig) -> int:
        return sum(config.blocks)

    def selection_note(self, config: LaurelVisionConfig) -> str:
        if config.dataset == "imagenet":
            return (" — no validation split (ImageNet's val/ is the test split): valid_accuracy is measured on it, "
                    "so the best variant is chosen on the values claim 2a judges")
        if config.valid_size == 0:
            return (" — no validation split (valid_size=0): valid_accuracy is measured on the test split, so the best "
                    "variant is chosen on the values claim 2a judges")
        return ""

    def check(self, config: LaurelVisionConfig) -> None:
        # Here rather than in the config: the `full` preset is built before `--set data_dir=...` applies.
        from effml.data.images import DataUnavailableError, fashion_mnist_dir

        if config.dataset == "fashion-mnist":
            fashion_mnist_dir(config.data_dir)  # before a run directory is made
        if config.dataset == "imagenet" and not config.data_dir:
            raise DataUnavailableError("laurel-vision: dataset 'imagenet' needs data_dir (a directory with train/ and "
                                       "val/ class folders): --set data_dir=/path/to/imagenet, or set $EFFML_IMAGENET "
                                       "for the `full` preset.")

    def build_model(self, config: LaurelVisionConfig, extra_layer: bool, variant: str | None) -> torch.nn.Module:
        from effml.nn.resnet import ResNet, ResNetConfig

        blocks = list(config.blocks)
        if extra_layer:
            blocks[config.extra_block_stage] += 1
        residual = ({"residual": "laurel", "residual_options": {**self.laurel_options(config, variant),
                                                                 "channel_dim": 1}} if variant else {})
        imagenet = config.dataset == "imagenet"
        return ResNet(ResNetConfig(in_channels=3 if imagenet else 1, num_classes=1000 if imagenet else 10,
                                   widths=tuple(config.widths), blocks=tuple(blocks), block=config.block,
                                   stem="imagenet" if imagenet else "small", stem_stride=config.stem_stride,
                                   **residual))

    def _data(self, config: LaurelVisionConfig, seed: int, world: World | None = None) -> tuple[Any, Any, Any]:
        """(training batch source, valid batches factory or None, test batches factory); the factories yield
        ``world``'s rank's share of the evaluation batches (all of them in a world of one, the default)."""
        from pathlib import Path

        from effml.data.batches import rank_batch_ranges
        from effml.data.images import (ImageBatches, ImageFolderBatches, ImageFolderSplit, eval_image_batches,
                                       load_fashion_mnist)

        world = world or World()

        if config.dataset == "imagenet":
            train = ImageFolderSplit(Path(config.data_dir) / "train")
            val = ImageFolderSplit(Path(config.data_dir) / "val", classes=train.classes)  # train's labels

            def val_batches():
                for indices in rank_batch_ranges(len(val), config.eval_batch_size, world.rank, world.world_size):
                    yield val.batch(indices)

            return ImageFolderBatches(train, config.batch_size, seed), None, val_batches
        splits = load_fashion_mnist(config.data_dir, valid_size=config.valid_size)
        source = ImageBatches(splits.train_images, splits.train_labels, config.batch_size, seed, flip=config.flip)
        share = {"batch_size": config.eval_batch_size, "rank": world.rank, "world_size": world.world_size}
        valid = None if config.valid_size == 0 else (  # no validation split: evaluations use the test split
            lambda: eval_image_batches(splits.valid_images, splits.valid_labels, **share))
        return source, valid, lambda: eval_image_batches(splits.test_images, splits.test_labels, **share)

    def run_arm(self, config: LaurelVisionConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.train import Trainer
        from effml.train.classify import classification_loss, classification_metrics

        world = context.world
        source, valid, test = self._data(config, context.seed, world)
        model = self.seeded_model(config, context.seed, arm.info["extra_layer"], arm.info["variant"])

        def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
            measured = classification_metrics(model, (valid or test)(), context.device, world)
            return {"valid_loss": measured["loss"], "valid_accuracy": measured["accuracy"]}

        trainer = Trainer(model, classification_loss, lambda index: source.batch(index, world.rank, world.world_size),
                          config.train, evaluate=evaluate, run_dir=context.run_dir, device=context.device,
                          resume=context.resume, quiet=context.quiet,
                          description=f"{self.name} {arm.name} seed {context.seed}")
        result = trainer.fit()
        measured = classification_metrics(model, test(), context.device, world)
        metrics = dict(result.final_metrics)
        metrics.update(test_loss=measured["loss"], test_accuracy=measured["accuracy"],
                       step_time_s=result.median_step_time,
                       images_per_s=config.batch_size * config.train.grad_accum / result.median_step_time)
        metrics.update(self.extra_parameters(config, model))
        if arm.info["variant"] == "rw+lr":
            metrics.update(self.step_overhead(config, context, classification_loss, source.batch(0)))
        return ArmRun(params=sum(p.numel() for p in model.parameters()), metrics=metrics, curves=result.curves)

    def plots(self, config: LaurelVisionConfig) -> list[Any]:
        from effml.report import CurvePlot, MetricPlot

        return [
            MetricPlot(name="accuracy_vs_params", x="params", y="test_accuracy",
                       title="Test accuracy vs parameters (LAuReL arms sit at the baseline's size)"),
            CurvePlot(name="valid_accuracy", curve="valid_accuracy", title="Validation accuracy during training",
                      ylabel="% correct"),
            CurvePlot(name="train_loss", curve="train_loss", title="Training loss", ylabel="nats"),
        ]
