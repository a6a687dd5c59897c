"""``effml bench ssm``: effml's selective SSMs against ``mambapy`` (pure-PyTorch Mamba), and against effml's own
transformer as the sequence grows.

Measured in one process, contenders interleaved in balanced rounds (``effml.benchmarks.common.time_interleaved``):

1. Training throughput (tokens/s of forward + MSE loss + backward + ``torch.optim.AdamW`` step) of a residual stack of
   Mamba-1 layers, ``x ← x + mixer(RMSNorm(x))`` × n_layers on (B, T, d_model) inputs: effml's ``Mamba1Mixer``
   (``selective_scan``: checkpointed chunks, hand-written backward) against ``mambapy.mamba.Mamba`` with the same
   d_model, n_layers, d_state, expand, d_conv and dt_rank (``mambapy``'s parallel scan, ``pscan=True``). effml's
   ``Mamba2Mixer`` stack is timed alongside for reference (a different layer: scalar decay per head; no ratio target).
2. Time per training step of the LM (``TransformerLM``, cross-entropy) with attention, with the Mamba-1 mixer and
   with the Mamba-2 mixer, at batch 1 and growing context T. The local slope d log(time) / d log(T) between
   consecutive contexts tends to 1 for a linear-time layer and towards 2 for attention once the T² term dominates;
   ``scaling.png`` plots all three.

Ratios are effml ÷ peer from the absolute numbers stored beside them. Target: effml Mamba-1 ≥ 3× mambapy training
tokens/s on the CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.benchmarks.common import (format_ratio, machine_info, markdown_table, missing_peer_note,
                                     paired_rate_ratios, ratio_entry, time_interleaved, verdict)

__all__ = ["SSMBenchConfig", "DEFAULT", "QUICK", "MixerStack", "run", "render", "write_files"]

EFFML1, EFFML2, MAMBAPY = "effml-mamba1", "effml-mamba2", "mambapy"
TRANSFORMER = "effml-transformer"
TARGET = 3.0


@dataclass(frozen=True)
class SSMBenchConfig:
    """Shapes and repeat counts of the ``ssm`` benchmark (all positive; the seed ≥ 0).

    Attributes:
        d_model, n_layers, d_state, expand, d_conv, batch_size, context: the Mamba stacks and their batch (B, T).
        headdim: Mamba-2 head size. lr: AdamW learning rate for every contender.
        train_warmup, train_repeats: untimed and timed interleaved steps per contender.
        scaling_contexts: the contexts T of part 2 (increasing). scaling_d_model, scaling_layers, scaling_heads: the
            LMs of part 2. scaling_repeats: timed steps per model and context. seed: weights and data.
    """

    d_model: int = 128
    n_layers: int = 2
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    headdim: int = 32
    batch_size: int = 8
    context: int = 256
    lr: float = 1e-3
    train_warmup: int = 1
    train_repeats: int = 6
    scaling_contexts: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    scaling_d_model: int = 64
    scaling_layers: int = 2
    scaling_heads: int = 2
    scaling_repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            for item in (value if isinstance(value, tuple) else (value,)):
                if isinstance(item, bool) or not isinstance(item, (int, float)) or item < 0 \
                        or (item == 0 and field.name != "seed"):
                    raise ValueError(f"SSMBenchConfig.{field.name} must be positive, got {value!r}.")
        if list(self.scaling_contexts) != sorted(set(self.scaling_contexts)) or len(self.scaling_contexts) < 2:
            raise ValueError(f"SSMBenchConfig.scaling_contexts must be ≥ 2 increasing contexts, got "
                             f"{self.scaling_contexts!r}.")


DEFAULT = SSMBenchConfig()
QUICK = SSMBenchConfig(d_model=16, d_state=4, headdim=8, batch_size=2, context=16, train_repeats=2,
                       scaling_contexts=(8, 16), scaling_d_model=16, scaling_layers=1, scaling_repeats=1)


class MixerStack(nn.Module):
    """``x ← x + mixer(RMSNorm(x))`` for n_layers effml SSM mixers — the layout of ``mambapy.mamba.Mamba``.
    forward: (B, T, d_model) → (B, T, d_model)."""

    def __init__(self, mixer: str, d_model: int, n_layers: int, **options: Any) -> None:
        super().__init__()
        from effml.nn import RMSNorm, build_mixer

        self.norms = nn.ModuleList(RMSNorm(d_model, 1e-5) for _ in range(n_layers))
        self.mixers = nn.ModuleList(build_mixer(mixer, d_model, **options) for _ in range(n_layers))

    def forward(self, x: Tensor) -> Tensor:
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            x = x + mixer(norm(x))
        return x


def _build_stack(contender: str, config: SSMBenchConfig) -> nn.Module:
    common = {"d_state": config.d_state, "expand": config.expand, "d_conv": config.d_conv}
    if contender == EFFML1:
        return MixerStack("mamba1", config.d_model, config.n_layers, **common)
    if contender == EFFML2:
        return MixerStack("mamba2", config.d_model, config.n_layers, headdim=config.headdim, **common)
    if contender == MAMBAPY:
        from mambapy.mamba import Mamba, MambaConfig

        return Mamba(MambaConfig(d_model=config.d_model, n_layers=config.n_layers, d_state=config.d_state,
                                 expand_factor=config.expand, d_conv=config.d_conv))
    raise ValueError(f"unknown contender {contender!r}")


class _Step:
    """One training step: forward, loss, backward, AdamW step, on a fixed batch."""

    def __init__(self, model: nn.Module, inputs: Tensor, loss_fn, lr: float, device: str) -> None:
        self.model = model.to(device).train()
        self.params = sum(p.numel() for p in model.parameters())
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.inputs, self.loss_fn = inputs.to(device), loss_fn

    def __call__(self) -> Tensor:
        loss = self.loss_fn(self.model, self.inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _regression_loss(model: nn.Module, inputs: Tensor) -> Tensor:
    return F.mse_loss(model(inputs), inputs.roll(1, dims=1))


def _lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _measure_throughput(config: SSMBenchConfig, device: str, result: dict[str, Any], skipped: dict[str, str]) -> None:
    generator = torch.Generator().manual_seed(config.seed)
    inputs = torch.randn(config.batch_size, config.context, config.d_model, generator=generator)
    steps = {}
    for contender in (EFFML1, MAMBAPY, EFFML2):
        torch.manual_seed(config.seed)
        try:
            steps[contender] = _Step(_build_stack(contender, config), inputs, _regression_loss, config.lr, device)
        except ImportError as error:
            skipped[contender] = missing_peer_note("mambapy", error)
    timings = time_interleaved(steps, repeats=config.train_repeats, warmup=config.train_warmup, device=device)
    tokens = config.batch_size * config.context
    result["train"] = {name: {"params": steps[name].params, "work_tokens": tokens,
                              "tokens_per_s": tokens / timing.median, **timing.as_dict()}
                       for name, timing in timings.items()}


def _measure_scaling(config: SSMBenchConfig, device: str, result: dict[str, Any]) -> None:
    from effml.nn import TransformerConfig, TransformerLM

    vocab = 256
    models = ((TRANSFORMER, "attention", {}), (EFFML1, "mamba1", {"d_state": config.d_state}),
              (EFFML2, "mamba2", {"d_state": config.d_state, "headdim": config.headdim}))
    scaling: dict[str, dict[str, Any]] = {name: {} for name, _, _ in models}
    for context in config.scaling_contexts:
        tokens = torch.randint(0, vocab, (1, context + 1), generator=torch.Generator().manual_seed(config.seed))
        steps = {}
        for name, mixer, options in models:
            torch.manual_seed(config.seed)
            model = TransformerLM(TransformerConfig(
                vocab_size=vocab, d_model=config.scaling_d_model, n_layers=config.scaling_layers,
                n_heads=config.scaling_heads, max_seq_len=context, mixer=mixer, mixer_options=options))
            steps[name] = _Step(model, tokens, _lm_loss, config.lr, device)
        timings = time_interleaved(steps, repeats=config.scaling_repeats, warmup=1, device=device)
        for name, timing in timings.items():
            scaling[name][str(context)] = {"context": context, "median_s": timing.median,
                                           "samples_s": list(timing.samples)}
    for name, points in scaling.items():
        values = list(points.values())
        slopes = [math.log(b["median_s"] / a["median_s"]) / math.log(b["context"] / a["context"])
                  for a, b in itertools.pairwise(values)]
        scaling[name] = {"points": points, "local_slopes": slopes}
    result["scaling"] = scaling


def _add_ratios(result: dict[str, Any], device: str) -> None:
    train = result["train"]
    ratios: dict[str, Any] = {}
    for name, label in ((EFFML1, "mamba1"), (EFFML2, "mamba2")):
        if name in train and MAMBAPY in train:
            ratios[f"train_ratio_{label}_vs_mambapy"] = ratio_entry(
                result, ("train", name, "tokens_per_s"), ("train", MAMBAPY, "tokens_per_s"), better="higher",
                per_round=paired_rate_ratios(train[name]["samples_s"], train[MAMBAPY]["samples_s"]))
    longest = str(max(int(k) for k in result["scaling"][TRANSFORMER]["points"]))
    for name, label in ((EFFML1, "mamba1"), (EFFML2, "mamba2")):
        ratios[f"step_time_transformer_over_{label}_longest_context"] = ratio_entry(
            result, ("scaling", TRANSFORMER, "points", longest, "median_s"),
            ("scaling", name, "points", longest, "median_s"), better="higher")
    result["ratios"] = ratios
    entry = ratios.get("train_ratio_mamba1_vs_mambapy")
    on_cpu = torch.device(device).type == "cpu"
    status = "n/a (stated for CPU)" if not on_cpu else ("not measured" if entry is None else verdict(entry, TARGET))
    result["targets"] = [{"target": "effml Mamba-1 ≥ 3× mambapy training tokens/s (on CPU)",
                          "ratio": "train_ratio_mamba1_vs_mambapy", "threshold": TARGET,
                          "value": None if entry is None else entry["value"], "status": status}]


def run(quick: bool = False, device: str = "cpu", config: SSMBenchConfig | None = None) -> dict[str, Any]:
    """Run the ``ssm`` benchmark (``QUICK`` shapes when ``quick``, else ``config`` or ``DEFAULT``); returns the
    JSON-ready result."""
    config = QUICK if quick else (config or DEFAULT)
    skipped: dict[str, str] = {}
    result: dict[str, Any] = {
        "benchmark": "ssm", "quick": quick, "machine": machine_info(device, peers=("mambapy",)),
        "config": {**dataclasses.asdict(config), "scaling_contexts": list(config.scaling_contexts),
                   "optimizer": "torch.optim.AdamW, same settings for all",
                   "loss": "part 1: MSE against the inputs shifted by one step; part 2: next-token cross-entropy"},
    }
    _measure_throughput(config, device, result, skipped)
    _measure_scaling(config, device, result)
    _add_ratios(result, device)
    result["skipped"] = skipped
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown body: throughput table with ratios, the scaling table with local slopes, the target."""
    ratios = result["ratios"]
    rows = []
    for name, numbers in result["train"].items():
        ratio = {EFFML1: "train_ratio_mamba1_vs_mambapy", EFFML2: "train_ratio_mamba2_vs_mambapy"}.get(name)
        rows.append([name, f"{numbers['params']:,}", f"{numbers['median_s'] * 1e3:.1f}",
                     f"{numbers['tokens_per_s']:,.0f}",
                     "1.00× (ref)" if ratio is None else format_ratio(ratios.get(ratio))])
    sections = ["## Training step of a Mamba stack (forward + MSE + backward + AdamW)",
                markdown_table(["model", "params", "median step (ms)", "tokens/s", "tokens/s ÷ mambapy's"], rows),
                "effml-mamba2 is a different layer (scalar decay per head, SSD scan), shown for reference."]
    scaling = result["scaling"]
    contexts = list(scaling[TRANSFORMER]["points"])
    srows = []
    for name, data in scaling.items():
        srows.append([name] + [f"{data['points'][c]['median_s'] * 1e3:.1f}" for c in contexts]
                     + [", ".join(f"{s:.2f}" for s in data["local_slopes"])])
    sections += ["## LM training step time vs context (batch 1)",
                 markdown_table(["model"] + [f"T={c} (ms)" for c in contexts] + ["local slopes d log t / d log T"],
                                srows),
                 "A slope near 1 is linear in T; attention's slope rises towards 2 as its T² term takes over. "
                 f"Transformer ÷ Mamba-1 step time at the longest context: "
                 f"{format_ratio(ratios.get('step_time_transformer_over_mamba1_longest_context'))}; Transformer ÷ "
                 f"Mamba-2: {format_ratio(ratios['step_time_transformer_over_mamba2_longest_context'])} (see "
                 "scaling.png)."]
    sections += ["## Target (evaluated from this run's measurements)",
                 markdown_table(["target", "measured", "status"],
                                [[t["target"], format_ratio(ratios.get(t["ratio"])), f"**{t['status']}**"]
                                 for t in result["targets"]])]
    if result["skipped"]:
        sections += ["## Skipped", "\n".join(f"- {name}: {note}" for name, note in result["skipped"].items())]
    return "\n\n".join(sections) + "\n"


def write_files(result: dict[str, Any], directory: Path) -> None:
    """``scaling.png``: step time against context, log-log, with the slope-1 and slope-2 guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, data in result["scaling"].items():
        points = list(data["points"].values())
        axes.plot([p["context"] for p in points], [p["median_s"] for p in points], marker="o", label=name)
    first = list(result["scaling"][EFFML2]["points"].values())
    t0, c0 = first[0]["median_s"], first[0]["context"]
    contexts = [p["context"] for p in first]
    axes.plot(contexts, [t0 * c / c0 for c in contexts], "k:", label="∝ T (linear)")
    axes.plot(contexts, [t0 * (c / c0) ** 2 for c in contexts], "k--", label="∝ T² (quadratic)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("context T (tokens)")
    axes.set_ylabel("training step time (s)")
    axes.set_title("LM training step time vs context (batch 1)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(directory / "scaling.png", dpi=120)
    plt.close(figure)
