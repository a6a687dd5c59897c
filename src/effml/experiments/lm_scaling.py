"""`lm-scaling`: held-out loss of effml's decoder LM against model size at a fixed token budget.

The trunk's end-to-end proof: the base LM (effml.nn.TransformerLM) is trained at several sizes on the Python standard
library's code, every size for the same number of tokens, over several seeds. Reported: held-out bits per byte
against non-embedding parameters, and a power law ``bpb ≈ a · N^(-alpha)`` fitted per seed (Kaplan et al., "Scaling
Laws for Neural Language Models", arXiv 2001.08361, fit the same form to loss against N).

Claims: (1) held-out loss falls monotonically with size; (2) the fitted exponent alpha is positive, reported with its
spread over seeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from effml.config import ConfigError, check_choice, check_positive
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, register
from effml.train import TrainConfig, Trainer
from effml.train.distributed import World, main_first
from effml.train.lm import causal_lm_loss, heldout_nats_per_token

__all__ = ["LMScalingConfig", "LMScaling", "parse_size", "load_byte_corpus", "heldout_evaluator"]

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(text: str) -> tuple[int, int]:
    """``"128x4"`` → (d_model=128, n_layers=4)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"lm-scaling size {text!r} is not of the form WIDTHxDEPTH (for example 128x4).")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class LMScalingConfig:
    """Settings of the lm-scaling recipe (override any with --set key=value)."""

    sizes: tuple[str, ...] = ("48x2", "96x3", "192x4")  # WIDTHxDEPTH, smallest first
    head_dim: int = 32
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
        if len(self.sizes) < 2:
            raise ConfigError(f"lm-scaling needs at least two sizes to compare; got sizes={self.sizes!r}.")
        for size in self.sizes:
            width, depth = parse_size(size)
            if width % self.head_dim:
                raise ConfigError(f"lm-scaling size {size!r}: width {width} is not a multiple of head_dim "
                                  f"{self.head_dim}; pick widths divisible by it or change head_dim.")
            check_positive("lm-scaling", "depth", depth)
        check_choice("lm-scaling", "mlp", self.mlp, ("gelu", "swiglu"))
        check_choice("lm-scaling", "tokenizer", self.tokenizer, ("byte",))
        for name in ("head_dim", "seq_len", "batch_size", "eval_windows", "seeds"):
            check_positive("lm-scaling", name, getattr(self, name))
        if self.max_bytes is not None:
            check_positive("lm-scaling", "max_bytes", self.max_bytes)

    @property
    def tokens_per_run(self) -> int:
        return self.train.steps * self.batch_size * self.seq_len * self.train.grad_accum


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


def load_byte_corpus(name: str, max_bytes: int | None, world: World):
    """The corpus ``name`` as byte tokens (`effml.data.CorpusSplits`); rank 0 builds the token cache first."""
    from effml.data import ByteTokenizer, load_corpus

    with main_first(world):  # rank 0 builds the token cache; the others then read it
        return load_corpus(name, ByteTokenizer(), max_bytes=max_bytes)


def heldout_evaluator(corpus: Any, seq_len: int, batch_size: int, eval_windows: int | None, world: World,
                      device: str) -> Callable[[torch.nn.Module, int], dict[str, float]]:
    """A Trainer ``evaluate`` function: held-out ``valid_loss`` (nats/token) and ``valid_bpb`` on ``eval_windows``
    windows of the corpus's validation split."""
    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        nats = heldout_nats_per_token(model, corpus.valid, seq_len, batch_size, eval_windows, world, device)
        return {"valid_loss": nats, "valid_bpb": corpus.bits_per_byte("valid", nats)}

    return evaluate


@register
class LMScaling(Experiment):
    name = "lm-scaling"
    description = "effml's decoder LM at several sizes on stdlib code: held-out bits/byte vs parameters, power-law fit"
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}

    def arms(self, config: LMScalingConfig) -> list[Arm]:
        arms = []
        for size in config.sizes:
            width, depth = parse_size(size)
            arms.append(Arm(name=f"d{width}-l{depth}", label=f"d_model={width}, {depth} layers",
                            info={"d_model": width, "n_layers": depth, "n_heads": width // config.head_dim}))
        return arms

    def run_arm(self, config: LMScalingConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.data import WindowBatches
        from effml.nn import TransformerConfig, TransformerLM

        corpus = load_byte_corpus(config.corpus, config.max_bytes, context.world)
        torch.manual_seed(context.seed)
        model = TransformerLM(TransformerConfig(
            vocab_size=256, d_model=arm.info["d_model"], n_layers=arm.info["n_layers"], n_heads=arm.info["n_heads"],
            max_seq_len=config.seq_len, mlp=config.mlp))
        source = WindowBatches(corpus.train, config.batch_size, config.seq_len, seed=context.seed)
        world = context.world

        evaluate = heldout_evaluator(corpus, config.seq_len, config.batch_size, config.eval_windows, world,
                                     context.device)
        trainer = Trainer(
            model, causal_lm_loss, lambda index: source.batch(index, world.rank, world.world_size), config.train,
            evaluate=evaluate, run_dir=context.run_dir, device=context.device, resume=context.resume,
            quiet=context.quiet, description=f"{self.name} {arm.name} seed {context.seed}")
        result = trainer.fit()
        model.eval()
        test_nats = heldout_nats_per_token(model, corpus.test, config.seq_len, config.batch_size, None, world,
                                           context.device)
        metrics = dict(result.final_metrics)
        metrics.update(
            test_loss=test_nats,
            test_bpb=corpus.bits_per_byte("test", test_nats),
            step_time_s=result.median_step_time,
            tokens_per_s=config.batch_size * config.seq_len * config.train.grad_accum / result.median_step_time,
            non_embedding_params=float(model.num_parameters(exclude_embeddings=True)),
        )
        return ArmRun(params=model.num_parameters(), metrics=metrics, curves=result.curves)

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
