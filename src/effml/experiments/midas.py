"""`midas`: gradual stacking and MIDAS against full-depth training of the same byte-level LM.

Saunshi, Karp, Krishnan, Miryoosefi, Reddi, Kumar, "On the Inductive Bias of Stacking Towards Improving Reasoning"
(MIDAS; NeurIPS 2024, arXiv 2409.19044). The target model has ``k · b`` layers. Arms, all on the standard library's
code (byte tokens), with the same warmup + cosine learning-rate shape over each arm's own budget and ≥ 3 seeds:

* ``baseline`` — all ``k · b`` layers from the first step, ``T`` steps;
* ``stacking`` — gradual stacking (copy the last block on top), ``k`` Prop-α stages over ``T`` steps;
* ``midas`` — MIDAS (duplicate the middle block in place), the same stages over ``T`` steps;
* ``midas-reduced`` — MIDAS with ``reduced_budget`` of the baseline's training FLOPs: the most steps whose Prop-α
  stages stay within that budget (`budget_steps`; 289 of 300 steps for the cpu preset's 0.73, where MIDAS over
  ``T`` steps costs 0.756 of the baseline's FLOPs);
* ``step-times`` — no training: an interleaved timing pass of one training step at every depth the arms use.

Measured per run: held-out loss against cumulative training FLOPs (``TransformerLM.flops_per_token`` of the model
as it is at each step, so a growing model's cost grows with it) and cumulative wall-clock seconds of training steps;
the test loss; the layer-by-layer cosine similarity of weight matrices, the model's ``loop_similarity`` (mean
similarity of distinct blocks: 1 for a looped model) and ``core_similarity`` (the same over the interior blocks);
and, for the baseline and MIDAS, the exact-match accuracy on the reasoning primitives (induction copying, variable
assignment at depths 0/1/2, arithmetic; `effml.data.tasks.primitives`) few-shot and after a short multi-task
fine-tune that supervises every example's answer in each sequence. The instances are small (`primitive_tasks`:
induction over 8 letters with a one-letter key, one distractor statement or variable), because at CPU scale the
models do not learn to retrieve from the prompt at all: a byte LM of 8 layers, d = 96, pretrained 300 steps on code,
stays at the chance level of guessing among the prompt's candidates after up to 500 fine-tuning steps on one
primitive alone; the ``baseline learns the primitives`` claim reports whether that changed.

Wall-clock. The arms train one after another, so the load of a shared machine drifts between them and their
measured seconds are not comparable. The ``step-times`` arm therefore times one optimizer step (forward, backward,
clipping, AdamW) of the model at each depth ``b, 2b, …, k·b`` in balanced rounds (`time_interleaved`: all depths see the
same load) and keeps the median seconds per depth; an arm's *modeled* wall-clock at step ``s`` is
``Σ_{t<s} seconds(depth at step t)`` (same seed's timing pass); the measured seconds are kept as a curve and as the
``measured_time_saving`` derived metric.

The savings estimator (claim 1). The paper measures MIDAS's speedup as the compute of a MIDAS run against the
baseline's and compares the two runs' final losses (abstract: up to 40 % faster, with similar or slightly worse
perplexity). Likewise, "MIDAS reaches the baseline's final loss with at least ``s`` (``speedup_threshold``) less
compute" is tested here by training MIDAS with ``reduced_budget ≤ 1 − s`` of the baseline's FLOPs and comparing
final losses, paired by seed: ``test_loss_gap = test_loss(midas-reduced) − test_loss(baseline)`` of the same seed
(same data order), on ``test_windows`` windows of the test split, which no choice in the recipe looks at. The FLOPs
claim holds when the t-interval of the mean gap lies wholly ≤ 0 (a saving of at least ``1 − reduced_budget``), fails
when it lies wholly > 0. The wall-clock claim uses the same run once its modeled wall-clock is shown to be at most
``1 − s`` of the baseline's (its premise). The shallow stages cost 5–9 % more per layer than the full depth (fixed
per-step work), so at exactly ``1 − s`` of the FLOPs the run's wall-clock fraction would sit on the threshold
(0.740–0.754 over the four session-11 timing passes): the cpu preset gives the run 0.73 of the FLOPs, which makes the
FLOPs test 2 points stricter than the claim's 25 %, and leaves the wall-clock premise decidable. Measured (session
12, 1 thread): the premise holds (0.729 ± 0.007), and the 0.73-FLOPs run ends where the baseline does: test-loss gap
−0.017 ± 0.040 over the preset's 5 seeds, +0.001 ± 0.029 over 13 (seeds 5–12 run for this pair alone; std 0.048
per seed), so at this scale MIDAS's saving sits on the claim's threshold and the claim stays inconclusive.

Why not the first estimator (the compute at which a held-out curve first crosses the baseline's final loss, as
``saving = 1 − C_arm / C_baseline``; still reported, per seed, as ``flops_saving``, ``time_saving`` and
``measured_time_saving`` with the target lowered to the arm's own final loss when it ends above the baseline's):
it reads the crossing on the flat, still-annealing end of a curve, where a loss difference of 0.01 nats moves the
crossing by ~10 steps, and it compares a point in the middle of MIDAS's schedule with the end of the baseline's.
Run at 1 thread with 4 seeds (session 11), it gave 0.37 ± 0.26 (per seed 0.37/0.47/0.51/0.14). That spread is not
noise of the held-out estimate: re-evaluating the final checkpoints on all 4,393 validation windows instead of 48
left the per-seed gaps of MIDAS (full budget) to the baseline at −0.040/−0.043/−0.072/+0.029 nats/byte (48 windows:
−0.047/−0.081/−0.084/+0.023), and the test split agrees (−0.036/−0.048/−0.070/+0.019): on seed 3 MIDAS really ends
above the baseline, and it trails it from step ~60 on. It is seed-to-seed variation of training, which only more
seeds average out; the paired final-loss gap measures it in the claim's own units without the crossing's
amplification.

Claims: (1) MIDAS reaches the baseline's final held-out loss with ≥ ``1 − reduced_budget`` less compute, in FLOPs
and in wall-clock (above);
(2) the baseline learns the primitives in the fine-tune (mean accuracy above ``chance_accuracy`` by at least
``above_chance``: without it, claim 3 compares chance with chance); (3) MIDAS is at least as good as the baseline
on every primitive after fine-tuning (non-inferiority margin of ``primitive_margin`` accuracy); (4) MIDAS's blocks
are more alike than stacking's, over all blocks and (5) over the interior blocks.

Why two similarity claims: starting from one block, stacking duplicates the newest block and MIDAS the newest or
its twin (a block with the same split history), so the two models have the same family tree of copies up to
relabelling, hence the same multiset of "growth at which two blocks' lines split" over all pairs and over adjacent
pairs; only the positions of the recent copies differ. The all-blocks mean is blind to positions,
so it can differ only through training dynamics. The paper's picture (stacking: similar blocks piled at the top,
"lopsided"; MIDAS: the similar blocks in the middle between distinct first and last blocks, like a looped core) is
about positions, which the interior-block similarity measures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effml.config import ConfigError, check_choice, check_positive, check_range
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, complete_run, evaluate_sharded, register
from effml.experiments.lm_training import heldout_evaluator, load_byte_corpus
from effml.metrics.timing import time_interleaved
from effml.train import Callback, TrainConfig, Trainer
from effml.train.growth import (OPTIMIZER_STATE_MODES, GrowthCallback, core_similarity, layer_similarity,
                                loop_similarity, prop_alpha_stages, stage_starts)
from effml.train.lm import causal_lm_loss, heldout_nats_per_token, token_share

__all__ = ["MidasConfig", "MidasRecipe", "ComputeMeter", "primitive_tasks", "finetune_batches", "answer_loss",
           "compute_to_reach", "depth_schedule", "modeled_seconds"]

BASELINE = "baseline"
REDUCED = "midas-reduced"
STEP_TIMES = "step-times"


def versus(arm: str) -> str:
    """The name of arm ``arm``'s per-seed comparison with the baseline in ``derive`` (distinct from the arm's)."""
    return f"{arm} vs {BASELINE}"


def primitive_tasks(config: MidasConfig) -> dict[str, Any]:
    """The reasoning primitives by short name, each with ``config.shots`` solved examples before the query.

    Induction copying over ``induction_length`` letters with a key of ``induction_key_length`` letters; variable
    assignment at depths 0, 1, 2, whose prompts hold the chain plus ``distractors`` other digit statements;
    arithmetic over the two operands plus ``distractors`` other variables.
    """
    from effml.data.tasks import Arithmetic, InductionCopying, VariableAssignment

    shots, distractors = config.shots, config.distractors
    return {"induction": InductionCopying(length=config.induction_length, key_length=config.induction_key_length,
                                          shots=shots),
            **{f"assign-d{d}": VariableAssignment(depth=d, n_statements=d + 1 + distractors, shots=shots)
               for d in (0, 1, 2)},
            "arithmetic": Arithmetic(n_vars=2 + distractors, shots=shots)}


@dataclass(frozen=True)
class MidasConfig:
    """Settings of the midas recipe (override any with --set key=value)."""

    d_model: int = 96
    head_dim: int = 32
    block_size: int = 2  # b: layers per block
    n_stages: int = 4  # k: the target depth is k · b
    alpha: float = 1.0  # Prop-α stage schedule
    optimizer_state: str = "copy"  # AdamW state of new layers: "copy" from their source or "reset"
    speedup_threshold: float = 0.25  # claim 1: the compute saving that counts
    reduced_budget: float = 0.73  # training FLOPs of midas-reduced ÷ the baseline's (≤ 1 − speedup_threshold)
    mlp: str = "gelu"
    corpus: str = "stdlib-code"
    max_bytes: int | None = None
    seq_len: int = 128
    batch_size: int = 16
    eval_windows: int = 48  # held-out windows per evaluation during training
    test_windows: int | None = 256  # test-split windows for the final test loss (None: the whole split)
    shots: int = 3  # solved examples before each primitive's query
    induction_length: int = 8  # letters in an induction context
    induction_key_length: int = 1  # letters in the induction key (1: the classic …AB…A → B)
    distractors: int = 1  # extra digit statements (variable assignment) and extra variables (arithmetic)
    task_examples: int = 200  # evaluation examples per primitive
    finetune_steps: int = 150  # multi-task fine-tune on the primitives (0: few-shot only)
    finetune_batch: int = 16
    finetune_lr: float = 2e-3
    primitive_margin: float = 0.02  # MIDAS ≥ baseline holds when MIDAS is at most this much accuracy below it
    above_chance: float = 0.05  # the baseline "learns the primitives" when its mean accuracy is this far above chance
    timing_repeats: int = 6  # rounds of the interleaved step-time pass (one step per depth per round)
    seeds: int = 3
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=3e-3, warmup_steps=15, eval_every=10,
                                                                   checkpoint_every=100, log_every=10))

    def __post_init__(self) -> None:
        owner = "midas"
        for name in ("d_model", "head_dim", "block_size", "n_stages", "seq_len", "batch_size", "eval_windows",
                     "shots", "induction_length", "induction_key_length", "task_examples", "finetune_batch",
                     "timing_repeats", "seeds"):
            check_positive(owner, name, getattr(self, name))
        check_positive(owner, "finetune_steps", self.finetune_steps, allow_zero=True)
        check_positive(owner, "finetune_lr", self.finetune_lr)
        if self.d_model % self.head_dim:
            raise ConfigError(f"midas.d_model = {self.d_model} is not a multiple of head_dim = {self.head_dim}; "
                              "pick a width divisible by it or change head_dim.")
        if self.n_stages < 2:
            raise ConfigError(f"midas.n_stages = {self.n_stages}: growth needs at least 2 stages (the model grows "
                              "between stages); use n_stages ≥ 2.")
        check_range(owner, "alpha", self.alpha, 0.0, 10.0)
        check_choice(owner, "optimizer_state", self.optimizer_state, OPTIMIZER_STATE_MODES)
        check_choice(owner, "mlp", self.mlp, ("gelu", "swiglu"))
        if not 0.0 < self.reduced_budget < 1.0:
            raise ConfigError(f"midas.reduced_budget = {self.reduced_budget} must lie strictly between 0 and 1 (a "
                              "fraction of the baseline's training FLOPs, e.g. 0.73).")
        check_range(owner, "speedup_threshold", self.speedup_threshold, 0.0, 1.0)
        if self.reduced_budget > 1.0 - self.speedup_threshold:
            raise ConfigError(f"midas.reduced_budget = {self.reduced_budget} is more than 1 − speedup_threshold = "
                              f"{1.0 - self.speedup_threshold:g}: the midas-reduced run could not show that saving; "
                              "lower reduced_budget or speedup_threshold.")
        if self.reduced_steps >= self.train.steps:
            same_steps = training_flops(self, "midas", [self.train.steps])[0] / training_flops(
                self, None, [self.train.steps])[0]
            raise ConfigError(f"midas: MIDAS over the baseline's {self.train.steps} steps already costs "
                              f"{same_steps:.3f} of its FLOPs (n_stages={self.n_stages}, alpha={self.alpha:g}), so "
                              f"reduced_budget={self.reduced_budget} would train midas-reduced for "
                              f"{self.reduced_steps} steps: no fewer tokens than the baseline, not a reduced budget. "
                              f"Lower reduced_budget below {same_steps:.3f}, or use fewer stages (n_stages) so that "
                              "stacking saves less.")
        if self.reduced_steps < max(self.n_stages, self.train.warmup_steps):
            raise ConfigError(f"midas: the reduced budget ({self.reduced_budget} of the baseline's FLOPs = "
                              f"{self.reduced_steps} MIDAS steps) is shorter than n_stages={self.n_stages} or "
                              f"train.warmup_steps={self.train.warmup_steps}; raise train.steps or reduced_budget.")
        check_range(owner, "primitive_margin", self.primitive_margin, 0.0, 1.0)
        check_range(owner, "above_chance", self.above_chance, 0.0, 1.0)
        for name in ("max_bytes", "test_windows"):
            if getattr(self, name) is not None:
                check_positive(owner, name, getattr(self, name))
        check_positive(owner, "distractors", self.distractors, allow_zero=True)
        try:
            tasks = primitive_tasks(self)
        except ValueError as error:
            raise ConfigError(f"midas: the primitives' settings are invalid ({error}); change induction_length, "
                              "induction_key_length or distractors.") from error
        longest = max(task.seq_len for task in tasks.values())
        if longest > self.seq_len:
            raise ConfigError(f"midas: with shots={self.shots} a primitive's prompt has {longest} tokens, more than "
                              f"seq_len={self.seq_len}; lower shots or raise seq_len.")

    @property
    def n_layers(self) -> int:
        """Target depth k · b."""
        return self.n_stages * self.block_size

    @functools.cached_property
    def flops_per_token_by_depth(self) -> dict[int, float]:
        """`TransformerLM.flops_per_token` at ``seq_len`` for every depth ``b, 2b, …, k·b`` the arms train at. It grows
        by the same amount per identical layer, so it is read off models of 1 and 2 layers (built once per config,
        under a forked RNG, so the global random state is untouched)."""
        from effml.nn import TransformerLM

        with torch.random.fork_rng(devices=[]):
            one, two = (TransformerLM(model_config(self, depth)).flops_per_token(self.seq_len) for depth in (1, 2))
        return {depth: one + (depth - 1) * (two - one)
                for depth in [self.block_size * i for i in range(1, self.n_stages + 1)]}

    @functools.cached_property
    def reduced_steps(self) -> int:
        """Steps of the ``midas-reduced`` arm: the most whose training FLOPs stay within ``reduced_budget`` of the
        baseline's (`budget_steps`; computed once per config: the search costs ~1 s for the `full` preset)."""
        return budget_steps(self, "midas", self.reduced_budget * training_flops(self, None, [self.train.steps])[0])


def model_config(config: MidasConfig, n_layers: int) -> Any:
    """The recipe's byte-level `TransformerConfig` at depth ``n_layers``."""
    from effml.nn import TransformerConfig

    return TransformerConfig(vocab_size=256, d_model=config.d_model, n_heads=config.d_model // config.head_dim,
                             n_layers=n_layers, max_seq_len=config.seq_len, mlp=config.mlp)


def _run_flops(config: MidasConfig, operator: str | None, steps: int) -> float:
    """Training FLOPs of one run of ``steps`` steps (see `training_flops`)."""
    per_token = config.flops_per_token_by_depth
    tokens_per_step = config.batch_size * config.seq_len * config.train.grad_accum
    if operator is None:
        return steps * per_token[config.n_layers] * tokens_per_step
    return math.fsum(length * per_token[config.block_size * (i + 1)] for i, length
                     in enumerate(prop_alpha_stages(steps, config.n_stages, config.alpha))) * tokens_per_step


def training_flops(config: MidasConfig, operator: str | None, steps_list: list[int]) -> list[float]:
    """Total training FLOPs of an arm run for each step count in ``steps_list``: ``Σ_stages T_i ·
    flops_per_token(depth_i) · tokens per step`` over its Prop-α stages (the full depth throughout for the baseline,
    ``operator=None``), as `ComputeMeter` counts them during training."""
    return [_run_flops(config, operator, steps) for steps in steps_list]


def budget_steps(config: MidasConfig, operator: str, budget_flops: float) -> int:
    """The largest step count ``s ≥ n_stages`` such that every ``n_stages ≤ s' ≤ s`` trains within ``budget_flops``
    (`training_flops`, each ``s'`` with its own Prop-α split); ``n_stages`` if none fits (the config rejects that)."""
    steps = config.n_stages
    for candidate in range(config.n_stages + 1, 4 * config.train.steps + config.n_stages + 1):
        if _run_flops(config, operator, candidate) > budget_flops:
            break
        steps = candidate
    return steps


def _smoke() -> MidasConfig:
    # 4 stages of 1 layer (Prop-1: 1, 2, 4, 5 steps): with 2 stages both operators copy block 0 at their one growth
    # and the stacking and MIDAS arms train the same models; from the second growth on they differ
    return MidasConfig(d_model=32, block_size=1, n_stages=4, max_bytes=300_000, seq_len=80, batch_size=8,
                       eval_windows=8, test_windows=16, shots=1, task_examples=16, finetune_steps=4, finetune_batch=8,
                       timing_repeats=2, seeds=2,
                       train=TrainConfig(steps=12, lr=3e-3, warmup_steps=2, eval_every=3, checkpoint_every=6,
                                         log_every=2))


def _cpu() -> MidasConfig:
    # 5 seeds: the paired test-loss gap of MIDAS to the baseline had a std of 0.038 nats/byte over 4 seeds (session
    # 11); evaluations every 20 steps (the curves are descriptive; the claim reads the final test loss)
    return MidasConfig(seeds=5, train=dataclasses.replace(MidasConfig().train, eval_every=20))


def _full() -> MidasConfig:
    # 24 layers in 4 stages of 6: MIDAS over the baseline's steps costs 0.750 of its FLOPs, so 0.73 trains
    # midas-reduced for 19,456 of 20,000 steps (6 stages of 4 cost 0.723: 0.73 would have bought 20,203 steps)
    return MidasConfig(d_model=512, head_dim=64, block_size=6, n_stages=4, seq_len=512, batch_size=64,
                       eval_windows=512, test_windows=None, task_examples=1000, finetune_steps=500, finetune_batch=64,
                       train=TrainConfig(steps=20_000, lr=1e-3, warmup_steps=500, eval_every=250,
                                         checkpoint_every=1000, log_every=50))


class ComputeMeter(Callback):
    """Cumulative training FLOPs and wall-clock seconds of the steps so far (saved in checkpoints).

    FLOPs per step = ``model.flops_per_token(seq_len) · tokens_per_step`` with the model as it is during that step;
    seconds run from the start of a step (before any growth callback placed after this one) to its end.
    """

    def __init__(self, seq_len: int, tokens_per_step: int) -> None:
        self.seq_len, self.tokens_per_step = seq_len, tokens_per_step
        self.flops = 0.0
        self.seconds = 0.0
        self._started = 0.0

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.flops += trainer.model.flops_per_token(self.seq_len) * self.tokens_per_step
        self.seconds += time.perf_counter() - self._started

    def state_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        self.flops, self.seconds = float(state["flops"]), float(state["seconds"])


def answer_loss(model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean cross-entropy over the answer positions of a `TaskBatch` (``loss_mask``), over every rank's answers under
    torchrun (`token_share`); model: (B, T) → (B, T, V)."""
    logits = model(batch.inputs)
    losses = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
    mask = batch.loss_mask.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp_min(1.0) * token_share(batch.loss_mask), {}


def finetune_batches(config: MidasConfig, tasks: dict[str, Any], context: RunContext) -> Callable[[int], Any]:
    """``index -> TaskBatch`` for the primitives' fine-tune: the primitives in turn (``tasks`` in order), each global
    batch of ``config.finetune_batch`` sequences from its own seed; this rank keeps its share
    (``finetune_batch / world_size`` sequences of ``(B, T)`` inputs, targets and every-answer loss mask)."""
    from effml.data.batches import shard_batches

    names = list(tasks)

    def global_batch(index: int) -> Any:
        task = tasks[names[index % len(names)]]
        return task.sample_every_answer(config.finetune_batch, context.seed * 1_000_000 + index)

    return shard_batches(global_batch, context.world)


def compute_to_reach(losses: list[list[float]], compute: list[list[float]], target: float) -> float:
    """The compute at which a loss curve first reaches ``target``: linear interpolation between the two
    evaluations around the crossing; the first evaluation's compute if it is already there; NaN if never.

    Args:
        losses: ``[[step, loss], ...]``; compute: ``[[step, cumulative compute], ...]`` at (at least) those steps.
    """
    spent = {step: value for step, value in compute}
    points = [(spent[step], loss) for step, loss in losses if step in spent]
    for index, (cost, loss) in enumerate(points):
        if loss <= target:
            if index == 0:
                return cost
            previous_cost, previous_loss = points[index - 1]
            return previous_cost + (cost - previous_cost) * (previous_loss - target) / (previous_loss - loss)
    return math.nan


def depth_schedule(config: MidasConfig, operator: str | None, steps: int) -> list[int]:
    """The model's depth (layers) during each of an arm's ``steps`` steps: ``k · b`` throughout for the baseline,
    ``b · (1 + stage)`` under the Prop-α stages for a growth operator (as `GrowthCallback` grows it)."""
    if operator is None:
        return [config.n_layers] * steps
    starts = stage_starts(prop_alpha_stages(steps, config.n_stages, config.alpha))
    return [config.block_size * sum(1 for start in starts if step >= start) for step in range(steps)]


def modeled_seconds(depths: list[int], seconds_per_step: dict[int, float], at_steps: list[int]) -> list[list[float]]:
    """Modeled cumulative training seconds ``Σ_{t<s} seconds_per_step[depths[t]]`` at each step count ``s`` in
    ``at_steps``, as a ``[[s, seconds], ...]`` curve."""
    missing = sorted(set(depths) - set(seconds_per_step))
    if missing:
        raise ValueError(f"modeled_seconds: no step time for depths {missing}; the timing pass measured "
                         f"{sorted(seconds_per_step)}.")
    cumulative = [0.0]
    for depth in depths:
        cumulative.append(cumulative[-1] + seconds_per_step[depth])
    return [[float(step), cumulative[int(step)]] for step in at_steps]


@register
class MidasRecipe(Experiment):
    name = "midas"
    description = "MIDAS / gradual stacking vs full-depth training: loss vs compute, reasoning primitives, loopiness"
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}
    claims_on_time = True  # claim 1 counts wall-clock compute

    def arms(self, config: MidasConfig) -> list[Arm]:
        stages = f"{config.n_stages} stages of {config.block_size}-layer blocks, Prop-{config.alpha:g}"
        target = {"target_layers": config.n_layers}

        def trained(operator: str | None, steps: int, primitives: bool) -> dict[str, Any]:
            return {**target, "operator": operator, "steps": steps, "primitives": primitives}

        depths = ", ".join(str(config.block_size * i) for i in range(1, config.n_stages + 1))
        return [
            Arm(BASELINE, f"baseline ({config.n_layers} layers throughout)",
                trained(None, config.train.steps, True)),
            Arm("stacking", f"gradual stacking ({stages})", trained("stacking", config.train.steps, False)),
            Arm("midas", f"MIDAS ({stages})", trained("midas", config.train.steps, True)),
            Arm(REDUCED, f"MIDAS, {config.reduced_budget:g} of the baseline's FLOPs ({config.reduced_steps} steps)",
                trained("midas", config.reduced_steps, False)),
            Arm(STEP_TIMES, f"interleaved step-time pass at depths {depths} (no training)",
                {**target, "steps": config.timing_repeats}),
        ]

    def _model(self, config: MidasConfig, n_layers: int) -> nn.Module:
        from effml.nn import TransformerLM

        return TransformerLM(model_config(config, n_layers))

    def _time_steps(self, config: MidasConfig, context: RunContext) -> ArmRun:
        """Median seconds of one training step at every depth ``b, 2b, …, k·b``, timed interleaved."""
        from effml.data import WindowBatches
        from effml.train.step_timing import TrainingStep

        world = context.world
        corpus = load_byte_corpus(config.corpus, config.max_bytes, world)
        source = WindowBatches(corpus.train, config.batch_size, config.seq_len, seed=context.seed)
        batch = source.batch(0, world.rank, world.world_size)

        def training_step(n_layers: int) -> TrainingStep:
            torch.manual_seed(context.seed)
            return TrainingStep(self._model(config, n_layers), causal_lm_loss, batch, context.device, config.train)

        depths = [config.block_size * i for i in range(1, config.n_stages + 1)]
        timings = time_interleaved({str(depth): training_step(depth) for depth in depths},
                                   repeats=config.timing_repeats, warmup=1, device=context.device)
        metrics = {f"step_seconds_{depth}": timings[str(depth)].median for depth in depths}
        return ArmRun(params=self._model(config, config.n_layers).num_parameters(), metrics=metrics)

    def run_arm(self, config: MidasConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.data import WindowBatches

        if arm.name == STEP_TIMES:
            return self._time_steps(config, context)
        world = context.world
        corpus = load_byte_corpus(config.corpus, config.max_bytes, world)
        operator = arm.info["operator"]
        train_config = dataclasses.replace(config.train, steps=arm.info["steps"])
        torch.manual_seed(context.seed)
        model = self._model(config, config.block_size if operator else config.n_layers)
        tokens_per_step = config.batch_size * config.seq_len * train_config.grad_accum
        meter = ComputeMeter(config.seq_len, tokens_per_step)
        callbacks: list[Callback] = [meter]  # first, so its step time includes the growth
        if operator:
            callbacks.append(GrowthCallback(operator, config.n_stages, config.block_size, config.alpha,
                                            train_config.steps, optimizer_state=config.optimizer_state))
        heldout = heldout_evaluator(corpus, config.seq_len, config.batch_size, config.eval_windows, world,
                                    context.device)

        def evaluate(model: nn.Module, step: int) -> dict[str, float]:
            return {**heldout(model, step), "flops": meter.flops, "train_seconds": meter.seconds}

        source = WindowBatches(corpus.train, config.batch_size, config.seq_len, seed=context.seed)
        trainer = Trainer(
            model, causal_lm_loss, lambda index: source.batch(index, world.rank, world.world_size), train_config,
            evaluate=evaluate, callbacks=callbacks, run_dir=context.run_dir, device=context.device,
            resume=context.resume, quiet=context.quiet, description=f"{self.name} {arm.name} seed {context.seed}")
        result = trainer.fit()
        model = trainer.model
        model.eval()
        test_nats = heldout_nats_per_token(model, corpus.test, config.seq_len, config.batch_size,
                                           config.test_windows, world, context.device)
        similarity = layer_similarity(model)
        metrics = dict(result.final_metrics)
        metrics.update(
            test_loss=test_nats, test_bpb=corpus.bits_per_byte("test", test_nats),
            loop_similarity=loop_similarity(model, config.block_size),
            final_layers=float(len(model.blocks)),
        )
        if config.n_stages >= 4:
            metrics["core_similarity"] = core_similarity(model, config.block_size)
        if arm.info["primitives"]:
            metrics.update(self._primitives(config, model, context))
        curves = dict(result.curves)
        curves["layer_similarity"] = similarity.tolist()
        return ArmRun(params=model.num_parameters(), metrics=metrics, curves=curves)

    def _primitives(self, config: MidasConfig, model: nn.Module, context: RunContext) -> dict[str, float]:
        """Exact-match accuracy on every primitive few-shot, then after a multi-task fine-tune (changes ``model``).

        The fine-tune's loss covers every example's answer in a sequence (``sample_every_answer``: ``shots + 1``
        answers per sequence, not only the query's); evaluation scores the query's answer alone. Also reported:
        ``finetuned_over_chance``, the mean over primitives of accuracy − ``chance_accuracy``.
        """
        tasks = primitive_tasks(config)
        eval_seed = 1_000_003 + context.seed  # hashed per batch by TokenTask.evaluate: disjoint from training seeds

        def accuracies(prefix: str) -> dict[str, float]:
            model.eval()
            with torch.no_grad():
                return {f"{prefix}_{name}": evaluate_sharded(task, lambda x: model(x.to(context.device)).argmax(-1),
                                                             config.task_examples, eval_seed,
                                                             context.world)["sequence_accuracy"]
                        for name, task in tasks.items()}

        metrics = accuracies("fewshot")
        if config.finetune_steps == 0:
            return metrics

        finetune = TrainConfig(steps=config.finetune_steps, lr=config.finetune_lr,
                               warmup_steps=min(10, config.finetune_steps), weight_decay=0.0, log_every=10)
        torch.manual_seed(context.seed)
        Trainer(model, answer_loss, finetune_batches(config, tasks, context), finetune, device=context.device,
                quiet=True, description=f"{self.name} fine-tune").fit()
        metrics.update(accuracies("finetuned"))
        metrics["finetuned_over_chance"] = sum(metrics[f"finetuned_{name}"] - task.chance_accuracy
                                               for name, task in tasks.items()) / len(tasks)
        return metrics

    def derive(self, config: MidasConfig, results: dict[str, Any]) -> dict[str, Any]:
        """Per seed, each growth arm against the same seed's baseline, as the derived entry ``"<arm> vs baseline"``:

        * ``test_loss_gap`` — the arm's final test loss minus the baseline's (nats/byte; < 0: the arm ends lower);
        * ``flops_fraction`` and ``time_fraction`` — the arm's total training FLOPs and modeled seconds over the
          baseline's (modeled seconds from the same seed's ``step-times`` pass; see the module docstring);
        * ``flops_saving``, ``time_saving``, ``measured_time_saving``, ``reached``, ``final_loss_gap`` — descriptive:
          the curve-crossing savings (`compute_to_reach` on the held-out curves, target = the lower final loss that
          both reach) and the gap of the last held-out evaluations.

        Also adds each trained run's ``modeled_seconds`` curve to its curves (a pure function of the run's depth
        schedule, its evaluation steps and the timing pass, recomputed identically at every save), for the plots.
        """
        by_name = {arm.name: arm for arm in self.arms(config)}
        trained = [name for name in by_name if name != STEP_TIMES]
        growth_arms = [name for name in trained if name != BASELINE]
        derived: dict[str, Any] = {
            versus(name): {"label": f"{name} against the same seed's baseline: final test-loss gap, compute fractions, "
                                    "curve-crossing savings", "runs": {}} for name in growth_arms}
        savings_kinds = (("flops", "flops_saving"), ("modeled_seconds", "time_saving"),
                         ("train_seconds", "measured_time_saving"))

        for seed in map(str, self.seeds(config)):
            runs = {name: complete_run(results, name, seed) for name in [*trained, STEP_TIMES]}
            if runs[BASELINE] is None:
                continue
            # The step-time arm runs last: without it (a partial run) only the time-based quantities are missing.
            timed = runs[STEP_TIMES] is not None
            total_seconds = {}
            if timed:
                seconds_per_step = {int(key.rsplit("_", 1)[1]): value for key, value
                                    in runs[STEP_TIMES]["metrics"].items() if key.startswith("step_seconds_")}
                for name in trained:
                    if runs[name] is not None:
                        info = by_name[name].info
                        depths = depth_schedule(config, info["operator"], info["steps"])
                        runs[name]["curves"]["modeled_seconds"] = modeled_seconds(
                            depths, seconds_per_step, [int(step) for step, _ in runs[name]["curves"]["valid_loss"]])
                        total_seconds[name] = modeled_seconds(depths, seconds_per_step, [info["steps"]])[0][1]
            kinds = [(kind, metric) for kind, metric in savings_kinds if timed or kind != "modeled_seconds"]
            base = runs[BASELINE]
            for name in growth_arms:
                run = runs[name]
                if run is None:
                    continue
                # the lower loss that both reach: the baseline's final loss if the arm gets there, else the arm's
                target = max(base["metrics"]["valid_loss"], run["metrics"]["valid_loss"])
                metrics = {metric: 1.0 - compute_to_reach(run["curves"]["valid_loss"], run["curves"][kind], target)
                           / compute_to_reach(base["curves"]["valid_loss"], base["curves"][kind], target)
                           for kind, metric in kinds}
                metrics.update(
                    test_loss_gap=run["metrics"]["test_loss"] - base["metrics"]["test_loss"],
                    flops_fraction=run["metrics"]["flops"] / base["metrics"]["flops"],
                    reached=float(run["metrics"]["valid_loss"] <= base["metrics"]["valid_loss"]),
                    final_loss_gap=run["metrics"]["valid_loss"] - base["metrics"]["valid_loss"])
                if timed:
                    metrics["time_fraction"] = total_seconds[name] / total_seconds[BASELINE]
                derived[versus(name)]["runs"][seed] = {"status": "complete", "metrics": metrics}
        return derived

    def claims(self, config: MidasConfig) -> list[Any]:
        from effml.report import Compare, Threshold

        saving = f"{config.speedup_threshold * 100:g}%"
        tested = f"{(1.0 - config.reduced_budget) * 100:g}%"
        reduced = versus(REDUCED)
        budget = (f"MIDAS trained with {config.reduced_budget:g} of the baseline's training FLOPs "
                  f"({config.reduced_steps} steps against the baseline's {config.train.steps})")
        reaches = ("ends at or below the baseline's final held-out loss (per-seed gap of the test losses, "
                   "MIDAS − baseline, ≤ 0)")
        time_budget = 1.0 - config.speedup_threshold
        within_time = f"the {REDUCED} run takes at most {time_budget:g} of the baseline's wall-clock"
        learns_primitives = "the baseline learns the primitives"  # the premise of the per-primitive comparisons
        claims: list[Any] = [
            Threshold(name="MIDAS saves FLOPs",
                      statement=f"{budget} {reaches}: MIDAS reaches the baseline's final loss with at least {tested} "
                                f"(so at least {saving}) fewer training FLOPs.",
                      metric="test_loss_gap", arm=reduced, better="lower", threshold=0.0),
            Threshold(name=within_time,
                      statement=f"The modeled wall-clock of {budget} (steps × the median step time of the "
                                f"model's depth, timed interleaved across depths) is at most {time_budget:g} of the "
                                "baseline's.",
                      metric="time_fraction", arm=reduced, better="lower", threshold=time_budget),
            Threshold(name="MIDAS saves wall-clock",
                      statement=f"Given that {within_time}: that run {reaches}, so MIDAS reaches the baseline's "
                                f"final loss with at least {saving} less training wall-clock time.",
                      metric="test_loss_gap", arm=reduced, better="lower", threshold=0.0, requires=within_time),
            Threshold(name=learns_primitives,
                      statement="After fine-tuning, the baseline's exact-match accuracy is above chance (guessing "
                                "among the prompt's answer candidates) by at least "
                                f"{config.above_chance:g}, averaged over the primitives; otherwise the comparisons "
                                "below compare chance with chance.",
                      metric="finetuned_over_chance", arm=BASELINE, better="higher", threshold=config.above_chance),
        ]
        for name in primitive_tasks(config):
            claims.append(Compare(
                name=f"MIDAS ≥ baseline on {name}",
                statement=f"After fine-tuning, MIDAS's exact-match accuracy on {name} is at least the baseline's "
                          f"(non-inferiority margin {config.primitive_margin:g}).",
                metric=f"finetuned_{name}", arm="midas", baseline=BASELINE, better="higher",
                margin=-config.primitive_margin, requires=learns_primitives))
        claims.append(Compare(
            name="MIDAS is more loop-like than stacking",
            statement="The blocks of the MIDAS-trained model are more alike than those of the stacking-trained one "
                      "(loop similarity: mean cosine similarity of distinct blocks' weights, 1 for a looped model).",
            metric="loop_similarity", arm="midas", baseline="stacking", better="higher"))
        if config.n_stages >= 4:
            claims.append(Compare(
                name="MIDAS's interior blocks are more loop-like than stacking's",
                statement="The interior blocks (all but the first and the last) of the MIDAS-trained model are more "
                          "alike than those of the stacking-trained one (core similarity).",
                metric="core_similarity", arm="midas", baseline="stacking", better="higher"))
        return claims

    def plots(self, config: MidasConfig) -> list[Any]:
        from effml.report import CurvePlot, HeatmapPlot, MetricPlot

        trained = [arm.name for arm in self.arms(config) if arm.name != STEP_TIMES]
        return [
            CurvePlot(name="loss_vs_flops", curve="valid_loss", x_curve="flops", xlabel="cumulative training FLOPs",
                      title="Held-out loss against training FLOPs", ylabel="nats per byte", arms=trained),
            CurvePlot(name="loss_vs_seconds", curve="valid_loss", x_curve="modeled_seconds",
                      xlabel="modeled cumulative training seconds", title="Held-out loss against wall-clock (modeled)",
                      ylabel="nats per byte", arms=trained),
            CurvePlot(name="train_loss", curve="train_loss", title="Training loss", ylabel="nats per byte",
                      arms=trained),
            HeatmapPlot(name="layer_similarity", matrix="layer_similarity", label="cosine similarity",
                        title="Cosine similarity of layers' weight matrices (mean over seeds)", arms=trained),
            MetricPlot(name="loop_similarity", x="flops", y="loop_similarity",
                       title="Loop similarity of the final model vs training FLOPs", arms=trained),
        ]
