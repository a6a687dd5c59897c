"""`effml bench lora-rite`: the optimizer step of LoRA-RITE against Adam and LoRA+ on the same PEFT adapters.

Workload: ``layers`` square linear layers of width ``d`` wrapped by PEFT LoRA of rank ``r`` (PEFT is needed: it is the
peers' home). Every parameter's gradient is filled once with fixed random values; a contender's unit of work is one
``optimizer.step()`` over all adapters (forward and backward are identical for the three and excluded). Contenders:
``lora-rite`` (``effml.optim.LoRARite.from_model``), ``adam`` (``torch.optim.AdamW`` over the adapters) and
``loraplus`` (PEFT's ``create_loraplus_optimizer`` around AdamW). Steps are timed interleaved in balanced rounds
(``effml.benchmarks.common.time_interleaved``). Memory: the bytes of optimizer state each one keeps after its steps
(sum over its state tensors: exact and deterministic, unlike resident-set readings).

A second workload has the adapter shapes of SmolLM2-135M (what the lora-rite recipe fine-tunes): 30 layers × the
projections q, k, v, o (576→576, 576→192, 576→192, 576→576) and gate, up, down (576→1536, 576→1536, 1536→576), i.e.
210 pairs in 4 distinct shapes, PEFT-named (``….lora_A.default.weight``) but without the frozen base weights, which no
optimizer touches. Many same-shaped pairs are where LoRA-RITE's batching pays; a few layers of one shape mostly time
its fixed per-step overhead.

Ratios: LoRA-RITE ÷ peer step time and state bytes (lower is better), per workload.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effml.benchmarks.common import (machine_info, markdown_table, missing_peer_note, paired_time_ratios, ratio_entry,
                                     time_interleaved)

__all__ = ["run", "render"]

CONTENDERS = ("lora-rite", "adam", "loraplus")


def _adapters(width: int, rank: int, layers: int, seed: int) -> nn.Module:
    import peft

    torch.manual_seed(seed)
    base = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                      target_modules=[str(i) for i in range(layers)]))
    _fill(model, scale=width ** -0.5)
    return model


SMOLLM2_LAYERS = 30
SMOLLM2_PROJECTIONS = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
                       "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}  # (in, out)


class _LoRAFactors(nn.Module):
    """The trainable part of a PEFT LoRA linear layer, named as PEFT names it: lora_A.default (r×in), lora_B.default
    (out×r)."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, d_out, bias=False)})


def _smollm2_adapters(rank: int, seed: int, layers: int = SMOLLM2_LAYERS) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.ModuleList(nn.ModuleDict({name: _LoRAFactors(d_in, d_out, rank)
                                         for name, (d_in, d_out) in SMOLLM2_PROJECTIONS.items()})
                          for _ in range(layers))
    _fill(model, scale=576 ** -0.5)
    return model


def _fill(model: nn.Module, scale: float) -> None:
    """Nonzero factors and gradients, as mid-training."""
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(0.0, scale)
            param.grad = torch.randn_like(param) * 1e-3


def _optimizer(contender: str, model: nn.Module) -> torch.optim.Optimizer:
    if contender == "lora-rite":
        from effml.optim import LoRARite

        return LoRARite.from_model(model, lr=1e-4)
    if contender == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=4.0, weight_decay=0.0)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Measure every workload ((width, rank) and SmolLM2-shaped); returns config, machine, per-workload numbers and
    ``ratios``."""
    widths, ranks, layers, repeats = ((64,), (4, 8), 2, 3) if quick else ((576, 2048), (8, 16, 64), 8, 15)
    smollm2_ranks, smollm2_layers = ((4,), 1) if quick else ((8, 16), SMOLLM2_LAYERS)
    config = {"widths": list(widths), "ranks": list(ranks), "layers": layers, "repeats": repeats,
              "smollm2_ranks": list(smollm2_ranks), "smollm2_layers": smollm2_layers,
              "work": "one optimizer.step() over all adapters (gradients pre-filled)"}
    result: dict[str, Any] = {"benchmark": "lora-rite", "quick": quick, "config": config,
                              "machine": machine_info(device, peers=("peft",)), "shapes": {}, "ratios": {}}
    try:
        import peft  # noqa: F401
    except ModuleNotFoundError as error:
        result["skipped"] = {"all": missing_peer_note("peft", error)}
        return result
    workloads = [(f"d{width}-r{rank}", lambda width=width, rank=rank: _adapters(width, rank, layers, seed=0))
                 for width in widths for rank in ranks]
    workloads += [(f"smollm2-r{rank}", lambda rank=rank: _smollm2_adapters(rank, seed=0, layers=smollm2_layers))
                  for rank in smollm2_ranks]
    for key, build in workloads:
        models = {name: build().to(device) for name in CONTENDERS}
        optimizers = {name: _optimizer(name, models[name]) for name in CONTENDERS}
        timings = time_interleaved({name: optimizers[name].step for name in CONTENDERS}, repeats=repeats,
                                   warmup=1, device=device)
        result["shapes"][key] = {name: {"median_s": timings[name].median, "samples_s": list(timings[name].samples),
                                        "state_bytes": _state_bytes(optimizers[name]),
                                        "adapter_params": sum(p.numel() for p in models[name].parameters()
                                                              if p.requires_grad)}
                                 for name in CONTENDERS}
        for peer in ("adam", "loraplus"):
            result["ratios"][f"step_time_{key}_vs_{peer}"] = ratio_entry(
                result, ("shapes", key, "lora-rite", "median_s"), ("shapes", key, peer, "median_s"),
                better="lower", per_round=paired_time_ratios(timings["lora-rite"].samples, timings[peer].samples))
            result["ratios"][f"state_bytes_{key}_vs_{peer}"] = ratio_entry(
                result, ("shapes", key, "lora-rite", "state_bytes"), ("shapes", key, peer, "state_bytes"),
                better="lower")
    return result


def render(result: dict[str, Any]) -> str:
    """Per-shape step times and state sizes, then the ratios."""
    if "skipped" in result:
        return "Not measured: " + result["skipped"]["all"] + "\n"
    rows = []
    for key, numbers in result["shapes"].items():
        for name in CONTENDERS:
            rows.append([key, name, f"{numbers[name]['median_s'] * 1e3:.3f} ms",
                         f"{numbers[name]['state_bytes'] / 2 ** 20:.2f} MiB", numbers[name]["adapter_params"]])
    ratio_rows = [[f"`{name}`", f"{entry['value']:.3g}×",
                   (f"{entry['per_round']['median']:.3g}× [{entry['per_round']['min']:.3g}–"
                    f"{entry['per_round']['max']:.3g}]") if "per_round" in entry else "–"]
                  for name, entry in result["ratios"].items()]
    return ("## Optimizer step\n\n" + markdown_table(["shape", "optimizer", "median step", "state", "adapter params"],
                                                    rows)
            + "\n\n## Ratios (LoRA-RITE ÷ peer; lower is better)\n\n"
            + markdown_table(["ratio", "value", "per round: median [min–max]"], ratio_rows) + "\n")
