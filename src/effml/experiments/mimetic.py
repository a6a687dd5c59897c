"""`mimetic`: mimetic initialisation lets a selective SSM learn to copy and to recall (Trockman, Harutyunyan, Kolter,
Kumar, Bhojanapalli, "Mimetic Initialization Helps State Space Models Learn to Recall", arXiv 2410.11135).

A small LM whose token mixer is Mamba-2 (or Mamba-1, ``--set mixer=mamba1``; ``effml.nn.ssm``) is trained from scratch
on two synthetic tasks over a sweep of lengths: copying (a random string, a separator, the string again; scored on
the copy) and multi-query associative recall (MQAR, Zoology format; scored on the values of the queried keys).
The copying model has ``copy_layers`` mixer layers, the MQAR model ``mqar_layers`` (recall needs the second layer at CPU
scale). Every (task, length) is trained under four initialisations with the same steps, data and seeds:

* ``default`` — Mamba's own initialisation;
* ``mimetic`` — ``effml.init.apply_mimetic_init`` with the state part (A ≈ 0, Δ ≈ 1) and the B/C part (W_C ≈ W_B);
* ``state-only`` and ``bc-only`` — the two ablations (by default trained at the claim length only:
  ``ablation_lengths="longest"``; ``"all"`` sweeps them like the main inits).

Vocabulary sizes. Each task has a main vocabulary — ``copy_symbols`` symbols for copying, ``mqar_keys`` keys and
``mqar_values`` values for MQAR — at which everything above runs and the claims are decided. ``copy_vocab_sizes`` and
``mqar_vocab_sizes`` add more vocabularies (copying: that many symbols; MQAR: that many keys and as many values),
trained with the main inits (default and mimetic) at the claim length (``vocab_lengths="longest"``), at the shortest
length of the sweep (``"shortest"``, the cheapest) or over the whole sweep (``"all"``). They are reported — accuracy
per arm, the largest length solved, a plot of accuracy against vocabulary — not claimed.

Measured per run: held-out per-token accuracy on the answer positions (``token_accuracy``) after training. Derived per
seed, for every (task, vocabulary, init): the largest length solved (accuracy ≥ ``solve_accuracy``; 0 when none)
among the lengths that init trained at — the whole sweep for the main inits at the main vocabulary, only the claim
length for an ablation trained there alone (so its value is the claim length or 0), and the label says which.

Claims, per task, at the main vocabulary and the ``claim length`` (the longest length of the sweep): (1) mimetic
reaches ≥ 95 % accuracy there, (2) default stays below 50 % with the same steps, (3) mimetic solves longer
strings/more pairs than default, and the ablations: mimetic beats each single part by ≥ 5 points of accuracy at the
claim length. The arms of (1) and (2) run ``claim_seeds`` seeds (at least ``seeds``), the others ``seeds``; the paired
claims use the seeds both sides have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from effml.config import ConfigError, check_choice, check_distinct, check_positive, check_range
from effml.experiments.base import Arm, ArmRun, RunContext, TaskExperiment, evaluate_sharded, register
from effml.train import TrainConfig, Trainer
from effml.train.lm import token_share

__all__ = ["MimeticConfig", "Mimetic", "INITS", "masked_token_loss"]

#: name → the parts of ``apply_mimetic_init`` switched on (None: Mamba's default initialisation).
INITS: dict[str, dict[str, bool] | None] = {
    "default": None,
    "mimetic": {"state": True, "bc": True},
    "state-only": {"state": True, "bc": False},
    "bc-only": {"state": False, "bc": True},
}
MAIN_INITS = ("default", "mimetic")
ABLATION_LENGTHS = ("longest", "all")
VOCAB_LENGTHS = ("longest", "shortest", "all")
TASK_NAMES = ("copying", "mqar")
VOCAB_WORDS = {"copying": "symbols", "mqar": "keys"}  # what a task's vocabulary size counts
_EVAL_SEED = 2_410_111_35


def masked_token_loss(model: torch.nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Cross-entropy on the answer positions of a ``TaskBatch`` (inputs, targets, loss_mask all (B, T)), and the
    teacher-forced accuracy there; both over every rank's answers under torchrun (`token_share`)."""
    logits = model(batch.inputs)[batch.loss_mask].float()
    targets = batch.targets[batch.loss_mask]
    share = token_share(batch.loss_mask)
    loss = F.cross_entropy(logits, targets) * share
    return loss, {"train_accuracy": (logits.argmax(-1) == targets).float().mean() * share}


@dataclass(frozen=True)
class MimeticConfig:
    """Settings of the mimetic recipe (override any with --set key=value)."""

    mixer: str = "mamba2"
    d_model: int = 64
    copy_layers: int = 1                              # mixer layers of the copying model
    mqar_layers: int = 2                              # mixer layers of the MQAR model
    d_state: int = 32
    headdim: int = 16           # Mamba-2 only
    chunk_size: int = 32
    tasks: tuple[str, ...] = TASK_NAMES
    copy_lengths: tuple[int, ...] = (8, 16, 32)       # string length L (sequence 2L)
    copy_symbols: int = 16                            # copying vocabulary (plus the separator)
    mqar_pairs: tuple[int, ...] = (4, 8, 16)          # key-value pairs, all queried (sequence 4P − 1)
    mqar_keys: int = 64
    mqar_values: int = 64
    copy_vocab_sizes: tuple[int, ...] = ()            # more copying vocabularies (symbols), reported, not claimed
    mqar_vocab_sizes: tuple[int, ...] = ()            # more MQAR vocabularies (this many keys and as many values)
    vocab_lengths: str = "longest"                    # lengths of the extra vocabularies: longest, shortest, all
    inits: tuple[str, ...] = tuple(INITS)
    ablation_lengths: str = "longest"                 # lengths the ablations train at: "longest" (claim) or "all"
    conv_identity: bool = False                       # also make the conv the identity in the mimetic inits
    batch_size: int = 32
    eval_examples: int = 256
    solve_accuracy: float = 0.95
    seeds: int = 3
    claim_seeds: int = 0                              # seeds of the threshold claims' arms (0 or fewer: `seeds`)
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, lr=3e-3, warmup_steps=15,
                                                                   weight_decay=0.0, eval_every=50,
                                                                   checkpoint_every=50, log_every=10))

    def __post_init__(self) -> None:
        owner = "mimetic"
        check_choice(owner, "mixer", self.mixer, ("mamba1", "mamba2"))
        for name in ("d_model", "copy_layers", "mqar_layers", "d_state", "headdim", "chunk_size", "copy_symbols",
                     "mqar_keys", "mqar_values", "batch_size", "eval_examples", "seeds"):
            check_positive(owner, name, getattr(self, name))
        if self.mixer == "mamba2" and (2 * self.d_model) % self.headdim:
            raise ConfigError(f"mimetic: the Mamba-2 inner width 2·d_model = {2 * self.d_model} is not a multiple of "
                              f"headdim = {self.headdim}; pick a headdim dividing it.")
        if not self.tasks or any(task not in TASK_NAMES for task in self.tasks):
            raise ConfigError(f"mimetic.tasks = {self.tasks!r}: choose a non-empty subset of {TASK_NAMES}.")
        if not self.inits or any(init not in INITS for init in self.inits) or "default" not in self.inits \
                or "mimetic" not in self.inits:
            raise ConfigError(f"mimetic.inits = {self.inits!r}: choose from {tuple(INITS)}, including 'default' and "
                              "'mimetic' (the claims compare them).")
        for name in ("tasks", "inits"):
            check_distinct(owner, name, getattr(self, name))
        for name in ("copy_lengths", "mqar_pairs", "copy_vocab_sizes", "mqar_vocab_sizes"):
            values = getattr(self, name)
            if (not values and name in ("copy_lengths", "mqar_pairs")) \
                    or any(not isinstance(v, int) or v < 1 for v in values) or list(values) != sorted(set(values)):
                raise ConfigError(f"mimetic.{name} = {values!r} must be distinct positive ints in increasing order.")
        for task in TASK_NAMES:
            check_distinct(owner, f"{task} vocabularies (main, then extra)", self.vocabularies(task),
                           why="the extra vocabularies must differ from the main one; list only other sizes")
        if min(self.copy_vocab_sizes, default=2) < 2:
            raise ConfigError(f"mimetic.copy_vocab_sizes = {self.copy_vocab_sizes!r}: copying needs at least 2 "
                              "symbols per vocabulary.")
        if max(self.mqar_pairs) > min(self.vocabularies("mqar")):
            raise ConfigError(f"mimetic: mqar_pairs up to {max(self.mqar_pairs)} need as many distinct keys, but "
                              f"the MQAR vocabularies (mqar_keys, mqar_vocab_sizes) go down to "
                              f"{min(self.vocabularies('mqar'))}; raise them or lower the pairs.")
        check_range(owner, "solve_accuracy", self.solve_accuracy, 0.0, 1.0)
        check_choice(owner, "ablation_lengths", self.ablation_lengths, ABLATION_LENGTHS)
        check_choice(owner, "vocab_lengths", self.vocab_lengths, VOCAB_LENGTHS)

    def vocabularies(self, task: str) -> tuple[int, ...]:
        """The vocabulary sizes of ``task``, the main one first: symbols (copying) or keys (MQAR)."""
        if task == "copying":
            return (self.copy_symbols, *self.copy_vocab_sizes)
        return (self.mqar_keys, *self.mqar_vocab_sizes)

    def inits_at(self, task: str, vocab: int) -> tuple[str, ...]:
        """The inits trained at vocabulary ``vocab`` of ``task``: all at the main one, the main inits elsewhere."""
        if vocab == self.vocabularies(task)[0]:
            return self.inits
        return tuple(init for init in self.inits if init in MAIN_INITS)

    def lengths(self, task: str, init: str = "default", vocab: int | None = None) -> tuple[int, ...]:
        """The sweep of ``task`` for ``init`` at vocabulary ``vocab`` (None: the main one): string lengths (copying)
        or key-value pairs (MQAR). An ablation gets only the longest (the claim length) when
        ``ablation_lengths == "longest"``; an extra vocabulary gets the longest, the shortest (the cheapest) or all,
        following ``vocab_lengths``."""
        lengths = self.copy_lengths if task == "copying" else self.mqar_pairs
        if vocab is not None and vocab != self.vocabularies(task)[0]:
            return {"all": lengths, "longest": lengths[-1:], "shortest": lengths[:1]}[self.vocab_lengths]
        if init in MAIN_INITS or self.ablation_lengths == "all":
            return lengths
        return lengths[-1:]

    def claim_length(self, task: str) -> int:
        """The length the claims of ``task`` are decided at: the longest of the sweep."""
        return max(self.lengths(task))

    def layers(self, task: str) -> int:
        """Mixer layers of the model trained on ``task``."""
        return self.copy_layers if task == "copying" else self.mqar_layers

    def build_task(self, task: str, length: int, vocab: int | None = None):
        """The task instance at ``length`` and vocabulary ``vocab`` (None: the main one)."""
        from effml.data.tasks import MQAR, Copying

        main = self.vocabularies(task)[0]
        vocab = main if vocab is None else vocab
        if task == "copying":
            return Copying(length=length, n_symbols=vocab)
        values = self.mqar_values if vocab == main else vocab
        return MQAR(n_pairs=length, n_queries=length, n_keys=vocab, n_values=values)


def _smoke() -> MimeticConfig:
    return MimeticConfig(d_model=32, d_state=8, copy_lengths=(2, 4), mqar_pairs=(2,), mqar_keys=8, mqar_values=8,
                         copy_symbols=6, copy_vocab_sizes=(3,), mqar_vocab_sizes=(4,), vocab_lengths="all",
                         inits=("default", "mimetic"), batch_size=8, eval_examples=16, seeds=2, claim_seeds=3,
                         train=TrainConfig(steps=4, lr=3e-3, warmup_steps=1, weight_decay=0.0, eval_every=2,
                                           log_every=2))


def _cpu() -> MimeticConfig:
    """76 runs: 13 min 6 s on 2 quiet cores with ``--jobs 2`` (session 15). With 5 claim seeds (56 runs) it took
    8 min 28 s with ``--jobs 2`` and 13 min 30 s one run at a time on 2 threads (session 13, with the causal conv's
    own backward; 17 min 51 s before it). Scale chosen so that some init learns each task within the budget (short
    single-thread runs, lr 1e-2 and 500 steps unless noted):

    * session 10's preset (1 Mamba-2 layer, d_state 32, 300 steps) left copying at length 32 undecided (mimetic
      0.89 ± 0.12) and MQAR unlearned by every init (4 pairs: ≤ 0.65);
    * MQAR, 4 pairs over 16 keys, 2 layers, 1000 steps, d_state 32: mimetic plateaued at 0.89 (lr 1e-2; 0.57 at
      3e-3; 0.88 at 2e-2); with d_state 64 it reached 1.00 by step 300. At d_state 64 and 500 steps: mimetic
      0.999 / 0.998, default 0.11 / 0.32 (seeds 0, 1); 1 layer: mimetic 0.87. 8 pairs (2 layers): mimetic 0.88,
      default 0.10, and 6 pairs: mimetic 0.73 / 0.26, default 0.07 / 0.18 — not solved by any init in budget, so
      the sweep stops at 4 pairs;
    * copying, length 32, d_state 64: 2 layers gave mimetic 0.954 / 0.911 (default 0.06) at twice the cost of 1
      layer, which gave 0.964 / 0.959 — copying uses 1 layer, MQAR 2;
    * MQAR "default < 50 %" at 4 pairs was inconclusive on 3 seeds (0.11, 0.32, 0.38). Seeds 0–8 of the default
      arm give 0.11, 0.32, 0.38, 0.42, 0.36, 0.23, 0.36, 0.52, 0.31 (mean 0.33, std 0.12; curves still rising
      slowly at step 500, one seed of nine above 0.5): a seed-variance problem of the mean, so the arms of the
      threshold claims run 5 seeds (``claim_seeds``) and the other arms 3. The same rule applies to copying,
      where seed 3 of the default init learns to copy at length 32 (0.81 at step 500, still rising): seeds 0–8
      give 0.07, 0.07, 0.11, 0.81, 0.07, 0.11, 0.16, 0.09, 0.29 (mean 0.20, std 0.24), so copying's
      "default < 50 %" is inconclusive on 5 seeds where 3 had it holding. ``--jobs 2`` (session 15) made room for
      10 claim seeds in the budget: both default claims hold on seeds 0–9, and both mimetic claims turn
      inconclusive, because seed 5 of mimetic init learns more slowly (copying 0.901, MQAR 0.51 at step 500);
    * a longer copying claim length, where default would fail on every seed, is not solved by mimetic in 500 steps:
      length 64, mimetic 0.90 / 0.92 (seeds 0, 1; still rising), default 0.064 / 0.062 (chance 1/16); length 48,
      mimetic 0.86 / 0.95 (0.946). At length 48, seed 0, changes that keep the cost do not restore it: lr 2e-2
      0.10 (does not learn), headdim 32 0.83; d_state 128 gives 0.946 at a higher cost per step. The copying
      claim length stays 32;
    * vocabulary 64 instead of 16 (seeds 0, 1): copying length 8, mimetic 0.99 / 0.995, default 0.26 / 0.05;
      copying length 32, mimetic 0.96, default 0.02 (seed 0); MQAR 2 pairs, mimetic 0.88 / 0.955, default
      0.74 / 0.69; 4 pairs, mimetic 0.90 / 0.85, default 0.18 / 0.07. The preset trains the extra vocabulary at
      the shortest length of each sweep (``vocab_lengths="shortest"``), where it costs a third of copying's claim
      length.

    Ablations train at the claim lengths only (``ablation_lengths="longest"``) to fit the budget."""
    return MimeticConfig(copy_layers=1, mqar_layers=2, d_state=64, copy_lengths=(8, 32), mqar_pairs=(2, 4),
                         mqar_keys=16, mqar_values=16, copy_vocab_sizes=(64,), mqar_vocab_sizes=(64,),
                         vocab_lengths="shortest", claim_seeds=10,
                         train=TrainConfig(steps=500, lr=1e-2, warmup_steps=30, weight_decay=0.0, eval_every=100,
                                           checkpoint_every=100, log_every=20))


def _full() -> MimeticConfig:
    return MimeticConfig(d_model=128, copy_layers=2, mqar_layers=2, d_state=64, copy_lengths=(32, 64, 128, 256),
                         mqar_pairs=(16, 32, 64, 128), mqar_keys=256, mqar_values=256, copy_vocab_sizes=(64, 256),
                         mqar_vocab_sizes=(1024,), vocab_lengths="all", batch_size=64, seeds=5,
                         eval_examples=1024, train=TrainConfig(steps=5000, lr=1e-3, warmup_steps=200, weight_decay=0.0,
                                                               eval_every=250, checkpoint_every=1000, log_every=50))


@register
class Mimetic(TaskExperiment):
    name = "mimetic"
    description = ("mimetic init vs default init of a Mamba LM on copying and MQAR over lengths and vocabularies "
                   "(arXiv 2410.11135)")
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}

    @staticmethod
    def arm_name(task: str, vocab: int, length: int, init: str) -> str:
        return f"{task}-v{vocab}-{length}-{init}"

    @staticmethod
    def largest_solved_name(task: str, vocab: int, init: str) -> str:
        return f"{task}-v{vocab}-largest-solved-{init}"

    @staticmethod
    def is_claim_arm(config: MimeticConfig, arm: Arm) -> bool:
        """Whether ``arm`` decides a threshold claim: a main init at the main vocabulary and the claim length."""
        task = arm.info["task"]
        return (arm.info["init"] in MAIN_INITS and arm.info["vocab"] == config.vocabularies(task)[0]
                and arm.info["length"] == config.claim_length(task))

    def arm_seeds(self, config: MimeticConfig, arm: Arm) -> list[int]:
        """``claim_seeds`` seeds for the threshold claims' arms (when more than ``seeds``), ``seeds`` otherwise."""
        count = max(config.seeds, config.claim_seeds) if self.is_claim_arm(config, arm) else config.seeds
        return [config.seed + i for i in range(count)]

    def arms(self, config: MimeticConfig) -> list[Arm]:
        """The main vocabulary first, the extra vocabularies (reported, not claimed) last; within each, the longest
        lengths first and at each length the main inits before the ablations, the tasks alternating: the arms that
        decide the claims run first, so that an interrupted run has measured them."""
        cells = []
        for task_rank, task in enumerate(config.tasks):
            for vocab_rank, vocab in enumerate(config.vocabularies(task)):
                for init_rank, init in enumerate(config.inits_at(task, vocab)):
                    for length_rank, length in enumerate(config.lengths(task, init, vocab)[::-1]):
                        order = (vocab_rank > 0, length_rank, init not in MAIN_INITS, task_rank, vocab_rank, init_rank)
                        cells.append((order, task, vocab, length, init))
        arms = []
        for _, task, vocab, length, init in sorted(cells, key=lambda cell: cell[0]):
            unit = "string length" if task == "copying" else "key-value pairs"
            arms.append(Arm(name=self.arm_name(task, vocab, length, init),
                            label=f"{task}, {vocab} {VOCAB_WORDS[task]}, {unit} {length}, {init}",
                            info={"task": task, "vocab": vocab, "length": length, "init": init}))
        return arms

    def build_model(self, config: MimeticConfig, task: str, vocab_size: int, seq_len: int,
                    init: str) -> torch.nn.Module:
        """The LM for one arm of ``task``, initialised by ``init`` (the global RNG must already be seeded)."""
        from effml.init import apply_mimetic_init
        from effml.nn import TransformerConfig, TransformerLM

        options: dict[str, Any] = {"d_state": config.d_state, "chunk_size": config.chunk_size}
        if config.mixer == "mamba2":
            options["headdim"] = config.headdim
        model = TransformerLM(TransformerConfig(vocab_size=vocab_size, d_model=config.d_model,
                                                n_layers=config.layers(task), n_heads=1, max_seq_len=seq_len,
                                                mixer=config.mixer, mixer_options=options))
        parts = INITS[init]
        if parts is not None:
            apply_mimetic_init(model, conv_identity=config.conv_identity, **parts)
        return model

    def run_arm(self, config: MimeticConfig, arm: Arm, context: RunContext) -> ArmRun:
        task = config.build_task(arm.info["task"], arm.info["length"], arm.info["vocab"])
        torch.manual_seed(context.seed)
        model = self.build_model(config, arm.info["task"], task.vocab_size, task.seq_len, arm.info["init"])
        device = context.device

        def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
            return evaluate_sharded(task, lambda inputs: model(inputs.to(device)).argmax(-1), config.eval_examples,
                                    _EVAL_SEED, context.world, batch_size=config.batch_size)

        trainer = Trainer(model, masked_token_loss, self.training_batches(config, task, context), config.train,
                          evaluate=evaluate, run_dir=context.run_dir, device=device, resume=context.resume,
                          quiet=context.quiet, description=f"{self.name} {arm.name} seed {context.seed}")
        result = trainer.fit()
        metrics = dict(result.final_metrics, step_time_s=result.median_step_time)   # the length is in arm.info
        return ArmRun(params=model.num_parameters(), metrics=metrics, curves=result.curves)

    def derive(self, config: MimeticConfig, results: dict[str, Any]) -> dict[str, Any]:
        """Per task, vocabulary, init and seed: the largest of the lengths that init trained at (every length of the
        sweep, or fewer: the claim length of an ablation, the lengths of an extra vocabulary) whose accuracy reaches
        ``solve_accuracy`` (0 when none), over the seeds every one of those lengths has."""
        derived: dict[str, Any] = {}
        for task in config.tasks:
            for vocab in config.vocabularies(task):
                for init in config.inits_at(task, vocab):
                    trained = config.lengths(task, init, vocab)
                    runs: dict[str, Any] = {}
                    for seed in self.seeds(config):
                        measured = [results["arms"].get(self.arm_name(task, vocab, length, init), {})
                                    .get("runs", {}).get(str(seed)) for length in trained]
                        if any(run is None or run.get("status") != "complete" for run in measured):
                            continue
                        solved = [length for length, run in zip(trained, measured, strict=True)
                                  if run["metrics"]["token_accuracy"] >= config.solve_accuracy]
                        runs[str(seed)] = {"status": "complete",
                                           "metrics": {"largest_solved": float(max(solved, default=0))}}
                    derived[self.largest_solved_name(task, vocab, init)] = {
                        "label": f"{task}, {vocab} {VOCAB_WORDS[task]}: largest length with accuracy ≥ "
                                 f"{config.solve_accuracy:.0%}, {init} init, over the lengths it trained at "
                                 f"({', '.join(map(str, trained))})",
                        "runs": runs}
        return derived

    def claims(self, config: MimeticConfig) -> list[Any]:
        from effml.report import Compare, Threshold

        claims: list[Any] = []
        for task in config.tasks:
            length, vocab = config.claim_length(task), config.vocabularies(task)[0]
            mimetic = self.arm_name(task, vocab, length, "mimetic")
            default = self.arm_name(task, vocab, length, "default")
            claims += [
                Threshold(name=f"{task}: mimetic solves {length}",
                          statement=f"With mimetic init the model reaches ≥ 95% {task} accuracy at length {length}.",
                          metric="token_accuracy", arm=mimetic, better="higher", threshold=0.95),
                Threshold(name=f"{task}: default fails {length}",
                          statement=f"With default init the model stays below 50% {task} accuracy at length {length} "
                                    "within the same steps.",
                          metric="token_accuracy", arm=default, better="lower", threshold=0.5),
                Compare(name=f"{task}: mimetic solves longer",
                        statement=f"Mimetic init solves longer {task} instances than default init (largest length "
                                  f"with ≥ {config.solve_accuracy:.0%} accuracy).",
                        metric="largest_solved", arm=self.largest_solved_name(task, vocab, "mimetic"),
                        baseline=self.largest_solved_name(task, vocab, "default"), better="higher", margin=0.0),
            ]
            for ablation, part in (("state-only", "B/C"), ("bc-only", "state")):
                if ablation in config.inits:
                    claims.append(Compare(
                        name=f"{task}: {part} part matters",
                        statement=f"Dropping the {part} part of the init ({ablation}) costs ≥ 5 points of {task} "
                                  f"accuracy at length {length}.",
                        metric="token_accuracy", arm=mimetic, baseline=self.arm_name(task, vocab, length, ablation),
                        better="higher", margin=0.05))
        return claims

    def plots(self, config: MimeticConfig) -> list[Any]:
        from effml.report import CurvePlot, MetricPlot

        plots: list[Any] = []
        for task in config.tasks:
            length, vocabularies = config.claim_length(task), config.vocabularies(task)
            main = vocabularies[0]
            plots.append(CurvePlot(name=f"{task}_accuracy_curve", curve="token_accuracy",
                                   title=f"{task}, length {length}: held-out answer accuracy during training",
                                   ylabel="token accuracy",
                                   arms=[self.arm_name(task, main, length, init) for init in config.inits]))
            plots.append(MetricPlot(name=f"{task}_accuracy_vs_length", x="length", y="token_accuracy",
                                    title=f"{task}: final accuracy vs length, every init (vocabulary {main})",
                                    arms=[self.arm_name(task, main, n, init) for init in config.inits
                                          for n in config.lengths(task, init)]))
            for swept in (config.lengths(task, "default", vocabularies[1]) if len(vocabularies) > 1 else ()):
                plots.append(MetricPlot(name=f"{task}_{swept}_accuracy_vs_vocabulary", x="vocab", y="token_accuracy",
                                        title=f"{task}, length {swept}: final accuracy vs vocabulary size",
                                        arms=[self.arm_name(task, vocab, swept, init) for init in MAIN_INITS
                                              for vocab in vocabularies]))
        return plots
