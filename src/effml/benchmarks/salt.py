"""`effml bench salt`: what a step of SALT's distillation stage costs against a plain step of the same student.

Per (teacher, student) pair of effml LMs (byte vocabulary), three contenders on one fixed batch, timed interleaved
in balanced rounds (``time_interleaved``):

* ``plain`` — a training step of the student with next-token cross-entropy (`effml.train.step_timing.TrainingStep`);
* ``distill`` — the same step with `effml.train.distill.DistillationLoss` (ω = 0.5): the teacher's forward pass, the
  two softmaxes over the vocabulary and the KL term come on top (a copy of the student, same initial weights);
* ``score`` — SALT_DS's scoring of the batch's windows by the teacher (its forward pass, top-k and median,
  `learnability_scores`), done once per candidate window before training.

The FLOPs model the `salt` recipe counts predicts ``distill / plain = 1 + F_teacher / (3 · F_student)`` (a forward
pass is a third of a training step's FLOPs, `TransformerLM.flops_per_token`); the measured ratio is reported beside
it. The model leaves out the softmaxes and the KL term, which weigh most where the models are small.

Ratios (lower is better): ``distill_vs_plain_<pair>`` and ``score_vs_plain_<pair>``, with their per-round spread.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from effml.benchmarks.common import (format_ratio, machine_info, markdown_table, paired_time_ratios, ratio_entry,
                                     time_interleaved)

__all__ = ["run", "render", "SaltBenchConfig"]

CONTENDERS = ("plain", "distill", "score")


@dataclass(frozen=True)
class SaltBenchConfig:
    """Shapes and timing of one run: ``pairs`` of (teacher, student) sizes as ``WIDTHxDEPTH``."""

    pairs: tuple[tuple[str, str], ...]
    head_dim: int
    context: int
    batch_size: int
    repeats: int
    warmup: int
    kd_weight: float = 0.5
    top_k: int = 10


DEFAULT = SaltBenchConfig(pairs=(("48x2", "96x3"), ("96x3", "192x4"), ("64x2", "256x4")), head_dim=16, context=128,
                          batch_size=32, repeats=20, warmup=2)  # the first pair: the salt recipe's cpu preset
GPU = SaltBenchConfig(pairs=(("256x4", "512x8"), ("512x8", "1024x12")), head_dim=64, context=512, batch_size=32,
                      repeats=20, warmup=3)  # the first pair: the recipe's full preset
QUICK = SaltBenchConfig(pairs=(("32x1", "64x2"),), head_dim=16, context=32, batch_size=4, repeats=3, warmup=1)


def _model(config: SaltBenchConfig, size: str, seed: int) -> Any:
    from effml.experiments.lm_training import byte_lm_config
    from effml.nn import TransformerLM

    torch.manual_seed(seed)
    return TransformerLM(byte_lm_config(size, head_dim=config.head_dim, seq_len=config.context,
                                        what="salt benchmark size"))


class _Scoring:
    """SALT_DS's scoring of one batch of windows by the teacher (no gradient); callable."""

    def __init__(self, teacher: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], top_k: int) -> None:
        self.teacher, self.batch, self.top_k = teacher.eval(), batch, top_k

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        from effml.train.distill import learnability_scores

        inputs, targets = self.batch
        return learnability_scores(self.teacher(inputs), targets, self.top_k)


def _measure_pair(config: SaltBenchConfig, teacher_size: str, student_size: str, device: str) -> dict[str, Any]:
    from effml.train.distill import DistillationLoss, KDSchedule
    from effml.train.lm import causal_lm_loss
    from effml.train.step_timing import TrainingStep

    teacher = _model(config, teacher_size, seed=1).to(device)
    student = _model(config, student_size, seed=0)
    tokens = torch.randint(0, 256, (config.batch_size, config.context + 1), generator=torch.Generator().manual_seed(2))
    batch = (tokens[:, :-1].to(device), tokens[:, 1:].to(device))
    contenders = {
        "plain": TrainingStep(student, causal_lm_loss, batch, device),
        "distill": TrainingStep(copy.deepcopy(student), DistillationLoss(teacher, KDSchedule(config.kd_weight)),
                                batch, device),
        "score": _Scoring(teacher, batch, config.top_k),
    }
    timings = time_interleaved(contenders, repeats=config.repeats, warmup=config.warmup, device=device)
    flops = {role: model.flops_per_token(config.context) for role, model in (("teacher", teacher),
                                                                             ("student", student))}
    return {"teacher": teacher_size, "student": student_size, "flops_per_token": flops,
            "predicted_distill_ratio": 1.0 + flops["teacher"] / (3.0 * flops["student"]),
            "time": {name: timings[name].as_dict() for name in CONTENDERS}}


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Run the benchmark (``QUICK`` shapes when ``quick``, else ``GPU`` on CUDA and ``DEFAULT`` elsewhere) and return
    the JSON-ready result: config, machine, per pair the contenders' times and the predicted ratio, and ``ratios``."""
    config = QUICK if quick else (GPU if torch.device(device).type == "cuda" else DEFAULT)
    result: dict[str, Any] = {
        "benchmark": "salt", "quick": quick, "machine": machine_info(device),
        "config": {**dataclasses.asdict(config), "pairs": [list(pair) for pair in config.pairs],
                   "step": "zero_grad, forward, loss, backward, AdamW step (plain and distill); teacher forward, "
                           "top-k, median (score)"},
        "pairs": {},
    }
    ratios: dict[str, Any] = {}
    for teacher_size, student_size in config.pairs:
        key = f"{teacher_size}-{student_size}"
        section = result["pairs"][key] = _measure_pair(config, teacher_size, student_size, device)
        for name in ("distill", "score"):
            ratios[f"{name}_vs_plain_{key}"] = ratio_entry(
                result, ("pairs", key, "time", name, "median_s"), ("pairs", key, "time", "plain", "median_s"),
                better="lower", per_round=paired_time_ratios(section["time"][name]["samples_s"],
                                                             section["time"]["plain"]["samples_s"]))
    result["ratios"] = ratios
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown: per pair the median step times, the distillation step's measured and predicted ratios, and the
    scoring of a batch against a plain step."""
    rows = []
    for key, section in result["pairs"].items():
        times = section["time"]
        rows.append([section["teacher"], section["student"], f"{times['plain']['median_s'] * 1e3:.1f}",
                     f"{times['distill']['median_s'] * 1e3:.1f}",
                     format_ratio(result["ratios"][f"distill_vs_plain_{key}"], digits=3),
                     f"{section['predicted_distill_ratio']:.3f}×", f"{times['score']['median_s'] * 1e3:.1f}",
                     format_ratio(result["ratios"][f"score_vs_plain_{key}"], digits=3)])
    return "## A distillation step against a plain step\n\n" + markdown_table(
        ["teacher", "student", "plain step (ms)", "distill step (ms)", "distill ÷ plain",
         "predicted by FLOPs", "score a batch (ms)", "score ÷ plain"], rows) + "\n"
