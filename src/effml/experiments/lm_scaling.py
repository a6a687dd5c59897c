"""`lm-scaling`: held-out loss of effml's decoder LM against model size at a fixed token budget.

The trunk's end-to-end proof: the base LM (effml.nn.TransformerLM) is trained at several sizes on the Python standard
library's code, every size for the same number of tokens, over several seeds. Reported: held-out bits per byte
against non-embedding parameters, and a power law ``bpb ≈ a · N^(-alpha)`` fitted per seed (Kaplan et al., "Scaling
Laws for Neural Language Models", arXiv 2001.08361, fit the same form to loss against N).

Claims: (1) held-out loss falls monotonically with size; (2) the fitted exponent alpha is positive, reported with its
spread over seeds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from effml.config import ConfigError, check_choice, check_distinct, check_positive
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, register
from effml.experiments.lm_training import byte_lm_config, load_byte_corpus, train_lm
from effml.experiments.lm_training import parse_size as parse_width_depth
from effml.train import TrainConfig

__all__ = ["LMScalingConfig", "LMScaling", "parse_size"]

def parse_size(text: str) -> tuple[int, int]:
    """``"128x4"`` → (d_model=128, n_layers=4)."""
    return parse_width_depth(text, "lm-scaling size")


@dataclass(frozen=True)
class LMScalingConfig:
    """Settings of the lm-scaling recipe (override any with --set key=value)."""

    sizes: tuple[str, ...] = ("48x2", "96x3", "192x4")  # WIDTHxDEPTH, smallest first
    head_dim: int = 16
    mlp: str = "gelu"
    corpus: str = "stdlib-code"
    tokenizer: str = "byte"
    max_bytes: int | None = None  # cap on raw text read from the corpus (None: all of it)
    seq_len: int = 128
    batch_size: int = 32
    eval_windows: int = 256  # held-out windows of seq_len tokens per evaluation
    seeds: int = 3
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=3e-3, warmup_steps=30, eval_every=100,
                                                                   checkpoint_every=100, log_every=10))

    def __post_init__(self) -> None:
        for name in ("head_dim", "seq_len", "batch_size", "eval_windows", "seeds"):
            check_positive("lm-scaling", name, getattr(self, name))
        if len(self.sizes) < 2:
            raise ConfigError(f"lm-scaling needs at least two sizes to compare; got sizes={self.sizes!r}.")
        for size in self.sizes:
            width, depth = parse_size(size)
            if width % self.head_dim:
                raise ConfigError(f"lm-scaling size {size!r}: width {width} is not a multiple of head_dim "
                                  f"{self.head_dim}; pick widths divisible by it or change head_dim.")
            check_positive("lm-scaling", "depth", depth)
        check_distinct("lm-scaling", "sizes", self.sizes, key=parse_size, why="each size is one arm; list each once")
        check_choice("lm-scaling", "mlp", self.mlp, ("gelu", "swiglu"))
        check_choice("lm-scaling", "tokenizer", self.tokenizer, ("byte",))
        if self.max_bytes is not None:
            check_positive("lm-scaling", "max_bytes", self.max_bytes)
        counts = [non_embedding_params(self, size) for size in self.sizes]
        for (small, small_count), (large, large_count) in itertools.pairwise(zip(self.sizes, counts, strict=True)):
            if large_count <= small_count:
                raise ConfigError(f"lm-scaling sizes must run from the smallest model to the largest (the claim 'loss "
                                  f"falls with size' follows their order), but {large} has {large_count:,} "
                                  f"non-embedding parameters, no more than {small} before it ({small_count:,}); list "
                                  "them in increasing size.")

    @property
    def tokens_per_run(self) -> int:
        return self.train.steps * self.batch_size * self.seq_len * self.train.grad_accum


def model_config(config: LMScalingConfig, size: str) -> Any:
    """The byte-level `TransformerConfig` of one size (``WIDTHxDEPTH``) of the recipe."""
    return byte_lm_config(size, head_dim=config.head_dim, seq_len=config.seq_len, what="lm-scaling size",
                          mlp=config.mlp)


def non_embedding_params(config: LMScalingConfig, size: str) -> int:
    """Non-embedding parameters of one size, by formula (what ``TransformerLM.num_parameters(exclude_embeddings=True)``
    counts, without building the model): per layer the four d×d attention maps, the MLP (two d×h matrices, three
    for SwiGLU) and two norm scales; then the final norm."""
    model = model_config(config, size)
    d, matrices = model.d_model, 3 if model.mlp == "swiglu" else 2
    return model.n_layers * (4 * d * d + matrices * d * model.mlp_hidden + 2 * d) + d


def _smoke() -> LMScalingConfig:
    return LMScalingConfig(sizes=("32x1", "64x2"), max_bytes=300_000, seq_len=64, batch_size=8, eval_windows=16,
                           seeds=2, train=TrainConfig(steps=12, lr=3e-3, warmup_steps=2, eval_every=6,
                                                      checkpoint_every=6, log_every=2))


def _cpu() -> LMScalingConfig:
    return LMScalingConfig()


def _full() -> LMScalingConfig:
    return LMScalingConfig(sizes=("128x2", "256x4", "384x6", "512x8", "768x12"), head_dim=64, seq_len=512,
                           batch_size=64, eval_windows=1024, seeds=3,
                           train=TrainConfig(steps=10_000, lr=1e-3, warmup_steps=500, eval_every=1000,
                                             checkpoint_every=1000, log_every=50))


@register
class LMScaling(Experiment):
    name = "lm-scaling"
    description = "effml's decoder LM at several sizes on stdlib code: held-out bits/byte vs parameters, power-law fit"
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}
    supports_fsdp = True

    def arms(self, config: LMScalingConfig) -> list[Arm]:
        arms = []
        for size in config.sizes:
            width, depth = parse_size(size)
            arms.append(Arm(name=f"d{width}-l{depth}", label=f"d_model={width}, {depth} layers",
                            info={"size": size, "d_model": width, "n_layers": depth,
                                  "n_heads": width // config.head_dim}))
        return arms

    def run_arm(self, config: LMScalingConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.nn import TransformerLM

        corpus = load_byte_corpus(config.corpus, config.max_bytes, context.world)
        torch.manual_seed(context.seed)
        model = TransformerLM(model_config(config, arm.info["size"]))
        metrics, curves = train_lm(model, corpus, seq_len=config.seq_len, batch_size=config.batch_size,
                                   eval_windows=config.eval_windows, train=config.train, context=context,
                                   description=f"{self.name} {arm.name} seed {context.seed}")
        metrics["non_embedding_params"] = float(model.num_parameters(exclude_embeddings=True))
        return ArmRun(params=model.num_parameters(), metrics=metrics, curves=curves)

    def derive(self, config: LMScalingConfig, results: dict[str, Any]) -> dict[str, Any]:
        """Per seed, fit test_bpb ≈ a · N^(-alpha) over the sizes (N = non-embedding parameters)."""
        from effml.report import fit_power_law

        names = [arm.name for arm in self.arms(config)]
        fits: dict[str, Any] = {}
        for seed in self.seeds(config):
            runs = [results["arms"].get(n, {}).get("runs", {}).get(str(seed)) for n in names]
            if any(r is None or r.get("status") != "complete" for r in runs):
                continue
            n_params = [r["metrics"]["non_embedding_params"] for r in runs]
            bpb = [r["metrics"]["test_bpb"] for r in runs]
            coefficient, alpha = fit_power_law(n_params, bpb)
            fits[str(seed)] = {"status": "complete", "metrics": {"alpha": alpha, "coefficient": coefficient}}
        return {"power-law": {"label": "test_bpb ≈ a·N^(-alpha), N = non-embedding parameters", "runs": fits}}

    def claims(self, config: LMScalingConfig) -> list[Any]:
        from effml.report import Monotone, Threshold

        return [
            Monotone(name="loss falls with size",
                     statement="Held-out bits per byte fall monotonically as the model grows, at a fixed token budget.",
                     metric="test_bpb", arms=[a.name for a in self.arms(config)], better="lower"),
            Threshold(name="power-law exponent",
                      statement="The exponent alpha of test_bpb ≈ a·N^(-alpha) is positive (reported with its spread).",
                      metric="alpha", arm="power-law", better="higher", threshold=0.0),
        ]

    def plots(self, config: LMScalingConfig) -> list[Any]:
        from effml.report import CurvePlot, MetricPlot

        return [
            MetricPlot(name="bpb_vs_params", x="non_embedding_params", y="test_bpb",
                       title="Held-out bits/byte vs non-embedding parameters", logx=True, logy=True, fit="power_law"),
            CurvePlot(name="valid_bpb", curve="valid_bpb", title="Validation bits/byte during training",
                      ylabel="bits per byte"),
            CurvePlot(name="train_loss", curve="train_loss", title="Training loss", ylabel="nats per token"),
        ]
