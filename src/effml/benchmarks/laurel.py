"""``effml bench laurel``: the cost of LAuReL residuals (arXiv 2411.07501) relative to the plain residual.

For each width d in the config, effml's ``TransformerLM`` is built once per residual — ``plain`` and each LAuReL
variant (around both sub-layers of every block) — with the same shape, and measured in one process:

1. Time of a forward + cross-entropy + backward pass on the same random batch, all residuals of a width timed
   interleaved in balanced rounds (``effml.benchmarks.common.time_interleaved``).
2. Peak memory of that pass (one fresh subprocess per contender, ``effml.benchmarks.common.peak_memory``).

3. Peer: the low-rank augmentation alone against the LAuReL block of Hugging Face's Gemma 3n
   (``Gemma3nTextLaurelBlock``: x + RMSNorm(W_up·W_down·x)), forward + backward on a (B, T, d) stream at the same
   rank: effml's ``LaurelResidual(variant="lr")(x, f)`` against ``block(x) + f``. Gemma's block also normalises the
   low-rank term (one RMSNorm more), so this compares two readings of LR, not identical computations.

Every ratio is variant ÷ plain (or effml ÷ Gemma 3n) at the same width (lower is leaner), computed from the absolute
numbers stored beside it, with the round-by-round ratios for the timings. The paper reports 1–2 % latency overhead
for RW+LR on a 4B LLM; the target here is RW+LR time ≤ 1.05 × plain at every width, evaluated from the measurement
(``verdict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from effml.benchmarks.common import (format_bytes, format_ratio, machine_info, markdown_table, missing_peer_note,
                                     package_version, paired_time_ratios, peak_memory, ratio_entry, time_interleaved,
                                     verdict)
from effml.train.loop import bf16_autocast

__all__ = ["LaurelBenchConfig", "DEFAULT", "GPU", "QUICK", "PassStep", "pass_step_factory", "LowRankPass", "run",
           "render", "TARGET"]

PLAIN = "plain"
TARGET = 1.05  # RW+LR forward+backward time at most 5 % above the plain residual's


@dataclass(frozen=True)
class LaurelBenchConfig:
    """Shapes and repeat counts of the ``laurel`` benchmark.

    Attributes:
        widths: d_model values measured (head size 64, or d/2 below 128).
        n_layers, vocab_size, context, batch_size: model and batch shape.
        variants: LAuReL variants compared with the plain residual; rank, k: their options.
        warmup, repeats: untimed and timed interleaved passes per contender; memory_steps: passes while measuring
            memory. seed: weights and batch.
        compiled: variants also timed with the whole model under ``torch.compile`` (``compile_backend``), against
            the compiled plain model: how a GPU user would train, with LAuReL's elementwise ops fused into their
            neighbours' kernels (empty: eager only).
    """

    widths: tuple[int, ...] = (64, 128, 256)
    n_layers: int = 4
    vocab_size: int = 256
    context: int = 128
    batch_size: int = 8
    variants: tuple[str, ...] = ("rw", "lr", "rw+lr", "rw+lr+pa")
    rank: int = 16
    k: int = 3
    warmup: int = 2
    repeats: int = 10
    memory_steps: int = 2
    seed: int = 0
    compiled: tuple[str, ...] = ()
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        from effml.nn.laurel import parse_variant

        if not self.widths or any(w <= 0 or w % 2 for w in self.widths):
            raise ValueError(f"LaurelBenchConfig.widths must be positive even ints, got {self.widths!r}.")
        for variant in (*self.variants, *self.compiled):
            parse_variant(variant)
        for name in ("n_layers", "vocab_size", "context", "batch_size", "rank", "k", "repeats", "memory_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LaurelBenchConfig.{name} must be positive, got {getattr(self, name)!r}.")


DEFAULT = LaurelBenchConfig()
# On CUDA (bf16 autocast, as the trainer runs): widths of 1–3B-parameter LMs, where the paper's 1–2 % latency applies.
GPU = LaurelBenchConfig(widths=(1024, 2048, 3072), n_layers=4, vocab_size=256, context=1024, batch_size=8, rank=64,
                        warmup=3, repeats=20, compiled=("rw", "rw+lr"))
QUICK = LaurelBenchConfig(widths=(32,), n_layers=2, vocab_size=64, context=16, batch_size=2, rank=4, k=2, warmup=1,
                          repeats=2, memory_steps=1,
                          compiled=("rw+lr",), compile_backend="eager")  # eager: Dynamo's capture only, in seconds


class PassStep:
    """One forward + cross-entropy + backward pass of a ``TransformerLM`` with residual ``variant`` ("plain" or a
    LAuReL variant), the forward under bf16 autocast on CUDA and, with ``compile_backend``, through
    ``torch.compile(model, backend=compile_backend)``; callable. Attributes: ``model``, ``inputs``/``targets`` (B, T),
    ``params``."""

    def __init__(self, variant: str, width: int, n_layers: int, vocab_size: int, context: int, batch_size: int,
                 rank: int, k: int, device: str, seed: int, compile_backend: str | None = None) -> None:
        from effml.nn import TransformerConfig, TransformerLM

        residual = ({"residual": "plain"} if variant == PLAIN else
                    {"residual": "laurel", "residual_options": {"variant": variant, "rank": rank, "k": k}})
        torch.manual_seed(seed)
        self.model = TransformerLM(TransformerConfig(vocab_size=vocab_size, d_model=width, n_layers=n_layers,
                                                     n_heads=max(1, width // 64) if width >= 128 else 2,
                                                     max_seq_len=context, **residual)).to(device).train()
        self.params = self.model.num_parameters()
        generator = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(0, vocab_size, (batch_size, context + 1), generator=generator).to(device)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.device = device
        self.forward = self.model if compile_backend is None else torch.compile(self.model, backend=compile_backend)

    def __call__(self) -> Tensor:
        self.model.zero_grad(set_to_none=True)
        with bf16_autocast(self.device):
            logits = self.forward(self.inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), self.targets.flatten())
        loss.backward()
        return loss.detach()


def pass_step_factory(**kwargs: Any) -> PassStep:
    """A ready ``PassStep`` from JSON-serialisable keyword arguments (memory subprocesses build it this way)."""
    return PassStep(**kwargs)


class LowRankPass:
    """Forward + backward of one low-rank residual augmentation on a random (B, T, d) stream x and branch output f:
    ``"effml"`` = ``LaurelResidual(d, variant="lr", rank)(x, f)``; ``"gemma3n"`` = ``Gemma3nTextLaurelBlock(x) + f``
    (its up-projection randomised too, so neither side multiplies by zeros)."""

    def __init__(self, contender: str, width: int, rank: int, batch_size: int, context: int, device: str,
                 seed: int) -> None:
        torch.manual_seed(seed)
        if contender == "effml":
            from effml.nn.laurel import LaurelResidual

            residual = LaurelResidual(width, variant="lr", rank=rank)
            self.module, self._apply = residual, lambda x, f: residual(x, f)
        else:
            from transformers.models.gemma3n.configuration_gemma3n import Gemma3nTextConfig
            from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextLaurelBlock

            block = Gemma3nTextLaurelBlock(Gemma3nTextConfig(hidden_size=width, laurel_rank=rank))
            self.module, self._apply = block, lambda x, f: block(x) + f
        with torch.no_grad():
            for parameter in self.module.parameters():
                if parameter.ndim == 2:
                    parameter.normal_(0.0, 0.02)
        self.module.to(device)
        self.x = torch.randn(batch_size, context, width, device=device, requires_grad=True)
        self.f = torch.randn(batch_size, context, width, device=device, requires_grad=True)

    def __call__(self) -> Tensor:
        self.module.zero_grad(set_to_none=True)
        self.x.grad = self.f.grad = None
        out = self._apply(self.x, self.f)
        out.square().mean().backward()
        return out.detach()


def _measure_peer(config: LaurelBenchConfig, device: str, result: dict[str, Any]) -> None:
    """Time effml's LR residual against Gemma 3n's LAuReL block at every width (skipped with a note if missing)."""
    try:
        import transformers.models.gemma3n.modeling_gemma3n  # noqa: F401
    except ImportError as error:
        result["peer"] = {"skipped": missing_peer_note("transformers", error)}
        return
    peer: dict[str, Any] = {"transformers": package_version("transformers"), "widths": {}}
    result["peer"] = peer
    for width in config.widths:
        passes = {name: LowRankPass(name, width, config.rank, config.batch_size, config.context, device, config.seed)
                  for name in ("effml", "gemma3n")}
        timings = time_interleaved(passes, repeats=config.repeats, warmup=config.warmup, device=device)
        peer["widths"][str(width)] = {name: timings[name].as_dict() for name in passes}


def _kwargs(config: LaurelBenchConfig, variant: str, width: int, device: str) -> dict[str, Any]:
    return {"variant": variant, "width": width, "n_layers": config.n_layers, "vocab_size": config.vocab_size,
            "context": config.context, "batch_size": config.batch_size, "rank": config.rank, "k": config.k,
            "device": device, "seed": config.seed}


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Run the benchmark (``QUICK`` shapes when ``quick``, else ``GPU`` on CUDA and ``DEFAULT`` elsewhere) and return
    the JSON-ready result: config, machine, per width the time and memory of every contender, ``ratios`` (variant ÷
    plain) and the RW+LR ``targets``."""
    config = QUICK if quick else (GPU if torch.device(device).type == "cuda" else DEFAULT)
    contenders = (PLAIN, *config.variants)
    result: dict[str, Any] = {
        "benchmark": "laurel", "quick": quick, "machine": machine_info(device),
        "config": {**dataclasses.asdict(config), "widths": list(config.widths), "variants": list(config.variants),
                   "compiled": list(config.compiled),
                   "step": "forward + F.cross_entropy + backward (no optimizer step)"},
        "widths": {},
    }
    factories = {}
    for width in config.widths:
        steps = {name: PassStep(**_kwargs(config, name, width, device)) for name in contenders}
        timings = time_interleaved(steps, repeats=config.repeats, warmup=config.warmup, device=device)
        result["widths"][str(width)] = {
            "time": {name: {**timings[name].as_dict(), "params": steps[name].params} for name in contenders}}
        for name in contenders:
            factories[f"{width}/{name}"] = ("effml.benchmarks.laurel:pass_step_factory",
                                            _kwargs(config, name, width, device))
        if config.compiled:
            torch._dynamo.reset()  # each width's models get their own compiled code, within Dynamo's recompile limit
            compiled = {name: PassStep(**_kwargs(config, name, width, device), compile_backend=config.compile_backend)
                        for name in (PLAIN, *config.compiled)}
            timings = time_interleaved(compiled, repeats=config.repeats, warmup=config.warmup, device=device)
            result["widths"][str(width)]["compiled_time"] = {
                name: {**timings[name].as_dict(), "params": compiled[name].params} for name in compiled}
    _measure_peer(config, device, result)
    memory = peak_memory(factories, device=device, steps=config.memory_steps)
    for key, numbers in memory.items():
        width, name = key.split("/", 1)
        result["widths"][width].setdefault("memory", {})[name] = numbers
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for width, section in result["widths"].items():
        for name in config.variants:
            per_round = paired_time_ratios(section["time"][name]["samples_s"], section["time"][PLAIN]["samples_s"])
            ratios[f"time_{name}_d{width}"] = ratio_entry(
                result, ("widths", width, "time", name, "median_s"), ("widths", width, "time", PLAIN, "median_s"),
                better="lower", per_round=per_round)
            ratios[f"memory_{name}_d{width}"] = ratio_entry(
                result, ("widths", width, "memory", name, "peak_bytes"),
                ("widths", width, "memory", PLAIN, "peak_bytes"), better="lower", zero_is_unmeasured=True)
        for name in config.compiled:
            per_round = paired_time_ratios(section["compiled_time"][name]["samples_s"],
                                           section["compiled_time"][PLAIN]["samples_s"])
            ratios[f"compiled_time_{name}_d{width}"] = ratio_entry(
                result, ("widths", width, "compiled_time", name, "median_s"),
                ("widths", width, "compiled_time", PLAIN, "median_s"), better="lower", per_round=per_round)
        for key in (f"time_rw+lr_d{width}", f"compiled_time_rw+lr_d{width}"):
            if key in ratios:
                targets[key] = {"target": f"≤ {TARGET}", "verdict": verdict(ratios[key], TARGET)}
    for width, numbers in result["peer"].get("widths", {}).items():
        ratios[f"lr_time_effml_vs_gemma3n_d{width}"] = ratio_entry(
            result, ("peer", "widths", width, "effml", "median_s"), ("peer", "widths", width, "gemma3n", "median_s"),
            better="lower",
            per_round=paired_time_ratios(numbers["effml"]["samples_s"], numbers["gemma3n"]["samples_s"]))
    result["ratios"], result["targets"] = ratios, targets
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown: per width, each contender's params, median pass time, memory and its ratios to the plain residual
    (eager), then the same times with the models under ``torch.compile`` where measured."""
    sections = []
    for width, section in result["widths"].items():
        rows = []
        for name, numbers in section["time"].items():
            memory = section.get("memory", {}).get(name, {})
            if name == PLAIN:
                time_ratio = memory_ratio = "1.00× (ref)"
            else:
                time_ratio = format_ratio(result["ratios"][f"time_{name}_d{width}"], digits=3)
                memory_ratio = format_ratio(result["ratios"][f"memory_{name}_d{width}"], digits=3)
            extra = numbers["params"] - section["time"][PLAIN]["params"]
            rows.append([name, f"{numbers['params']:,}", f"+{extra:,}", f"{numbers['median_s'] * 1e3:.2f}",
                         format_bytes(memory.get("peak_bytes")), time_ratio, memory_ratio])
        sections.append(f"## d_model = {width}\n\n" + markdown_table(
            ["residual", "params", "extra params", "median fwd+bwd (ms)", "peak memory", "time ÷ plain",
             "memory ÷ plain"], rows))
        if "compiled_time" in section:
            rows = [[name, f"{numbers['median_s'] * 1e3:.2f}",
                     "1.00× (ref)" if name == PLAIN else
                     format_ratio(result["ratios"][f"compiled_time_{name}_d{width}"], digits=3)]
                    for name, numbers in section["compiled_time"].items()]
            backend = result["config"].get("compile_backend")
            sections.append(f"### d_model = {width}, whole model under `torch.compile` (backend {backend})\n\n"
                            + markdown_table(["residual", "median fwd+bwd (ms)", "time ÷ plain"], rows))
    peer = result.get("peer", {})
    if "skipped" in peer:
        sections.append(f"## Peer: Gemma 3n LAuReL block\n\n{peer['skipped']}")
    elif peer.get("widths"):
        rows = []
        for width, numbers in peer["widths"].items():
            entry = result["ratios"][f"lr_time_effml_vs_gemma3n_d{width}"]
            rows.append([width, f"{numbers['effml']['median_s'] * 1e3:.3f}",
                         f"{numbers['gemma3n']['median_s'] * 1e3:.3f}",
                         f"{entry['value']:.3f}× (rounds: {entry['per_round']['median']:.3f}×)"])
        sections.append("## Peer: low-rank term, effml `LaurelResidual(variant='lr')` vs Gemma 3n "
                        f"`Gemma3nTextLaurelBlock` (transformers {peer.get('transformers')})\n\n" + markdown_table(
                            ["d_model", "effml fwd+bwd (ms)", "gemma3n fwd+bwd (ms)", "effml ÷ gemma3n"], rows)
                        + "\n\nGemma 3n's block also RMS-normalises the low-rank term (more work per call).")
    target_rows = [[name, spec["target"], spec["verdict"]] for name, spec in result.get("targets", {}).items()]
    if target_rows:
        sections.append("## Targets\n\n" + markdown_table(["ratio", "target", "verdict"], target_rows))
    sections.append("Time ratios: quotient of the medians, then the median and range of the round-by-round ratios "
                    "(each round ran every contender once under the same machine load). Memory: see "
                    "`effml.benchmarks.common.peak_memory` (on CPU, resident-set growth of a fresh process).")
    return "\n\n".join(sections) + "\n"
