"""`padir`: parallel decoding by iterative refinement against autoregressive decoding, on a synthetic translation
task with two valid outputs per source, or on real verse-aligned text.

Reproduces the CPU demonstration PAPERS.md §9(d) derives from Li, Kirchmeyer, Mehta, Qin, Dadachev, Papineni, Kumar and
Risteski, "Promises and pitfalls of generative masked language modeling: theoretical framework and practical guidelines"
(ICML 2024, arXiv 2407.21046; PaDIR). The task (``effml.data.tasks.SyntheticTranslation``) reverses a symbol string and
spells it through a fixed map in which some symbols have a short and a long spelling, one dialect per example: two valid
targets, the multimodality that parallel decoding mixes. The cpu preset's second spellings are single tokens, so both
targets have the source's length and differ only in the ambiguous symbols' tokens. With two-token second spellings
(``second_spelling_tokens=2``, PAPERS.md's suggestion) the target's length reveals its dialect, so PaDIR's length
predictor picks the dialect before the decoder runs and the decoder never meets the multimodality (a pilot found 0.86
exact match from one pass). With ``data=verses`` (the ``full`` preset) the arms translate real text instead:
verse-aligned Bibles (``effml.data.tasks.VerseTranslation``; KJV→WEB, archaic to modern English, by default, or
``target_module=RV1909``, Spanish), in one BPE vocabulary of ``bpe_vocab`` ids, with verses of up to ``max_tokens``
tokens, scored on a held-out set of books by BLEU over words. Arms, each an ``effml.nn.EncoderDecoder`` of the same size
(with learned absolute positions, which the non-causal decoder needs: fed identical [MASK] tokens, rotary attention
alone cannot tell it where each position is) trained on fresh batches for the same steps (with ``data=verses``, drawn
with replacement from the training pairs):

* ``ar`` — the autoregressive baseline: a causal decoder trained by teacher forcing (BOS … EOS), decoded greedily
  with its KV cache (``effml.decode.decode_autoregressive``);
* ``nar`` — PaDIR: a non-causal decoder with the [LENGTH]-token length predictor, trained to restore targets
  corrupted at a U(0, 1) noise density with 80/10/10 [MASK]/random/kept noise (``effml.train.masking``), and decoded
  by ``iterations`` parallel passes from all-[MASK] with the linear re-masking schedule
  (``effml.decode.refine_decode``, the best of ``length_candidates`` predicted lengths);
* ``nar-distilled`` — the same, trained on the ``ar`` model's greedy translations of the training sources
  (sequence-level distillation, the standard remedy for multimodality in non-autoregressive translation).

With ``train_stages`` = K > 1 both NAR arms use PaDIR's multi-stage training (``effml.train.masking``): K unrolled
decoder passes per batch, each after the first fed the previous one's predictions (the cpu preset: K = 1).

Measured: BLEU, exact match (either dialect), length accuracy and the repeated-adjacent-token ("stutter") rate on
held-out sources, for every number of passes in ``iterations`` and, at ``claim_iterations``, with stutter re-masking
added (``linear+stutter``); and in the ``nar-distilled`` run, the wall time of decoding the same
``timing_examples`` sources in batches of each size in ``timing_batch_sizes`` with both models, interleaved
(``effml.metrics.timing``), as the paired ratio
``speedup@N_bB`` = AR time / N-pass time. Derived entries ``ARM@N`` (and ``ARM@N+stutter``) hold each decoding's
metrics, so that claims can compare decodings of one model.

Claims (fixed before the cpu preset was first run, except (1); the README's `padir` row): (1) BLEU rises with the
passes, 1 → 2 → … → ``claim_iterations`` (nar; first stated on nar-distilled, which its first cpu run found at its
ceiling from one pass, as distillation removes the dependence the passes are for; restated then, and tested on fresh
seeds); (2) with ``claim_iterations`` passes nar-distilled's BLEU is at
most 5 % below AR's; (3) decoding one source at a time, ``claim_iterations`` passes are at least 2× faster than AR (the
paper's "2–3× speedup"); (4) the same at the largest timing batch; (5) distillation raises BLEU at
``claim_iterations`` passes; (6) the stutter rate falls with the passes (nar, the undistilled model whose data is
multimodal); (7) stutter re-masking lowers the stutter rate at ``claim_iterations`` passes (nar).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from effml.config import ConfigError, check_choice, check_positive
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, complete_run, evaluate_sharded, register
from effml.train import TrainConfig, Trainer

__all__ = ["PadirConfig", "PadirRecipe", "AR", "NAR", "DISTILLED", "Seq2SeqBatch", "seq2seq_loss"]

AR, NAR, DISTILLED = "ar", "nar", "nar-distilled"
DATA = ("synthetic", "verses")
STUTTER = "+stutter"


@dataclass(frozen=True)
class PadirConfig:
    """Settings of the padir recipe (override any with --set key=value)."""

    data: str = "synthetic"  # "synthetic" (effml.data.tasks.SyntheticTranslation) or "verses" (VerseTranslation)
    n_symbols: int = 12  # the synthetic task

    n_ambiguous: int = 4
    min_length: int = 6
    max_length: int = 12
    map_seed: int = 0
    # 1: the two dialects differ only in their tokens; 2: the long one is longer (PAPERS.md §9(d)), but then the
    # predicted length alone tells the decoder which dialect to write (the module docstring)
    second_spelling_tokens: int = 1
    source_module: str = "KJV"  # the verses task: SWORD modules (WEB: modern English; RV1909: Spanish) ...
    target_module: str = "WEB"
    bpe_vocab: int = 4000  # ... the size of its BPE vocabulary ...
    max_tokens: int = 48  # ... and the longest source and target kept, in BPE tokens
    d_model: int = 64  # every arm's EncoderDecoder
    n_heads: int = 4
    layers: int = 2  # encoder layers, and as many decoder layers
    absolute_positions: bool = True
    dropout: float = 0.0
    batch_size: int = 64
    length_loss_weight: float = 0.1  # PaDIR's length classifier's cross-entropy, added to the token loss
    loss_weighting: str = "all"  # which positions the NAR token loss counts: all, noised, masked
    # PaDIR's multi-stage training: stages 2, 3, ... restore the target from the previous stage's predictions
    train_stages: int = 1
    keep_prob: float = 0.1  # noised positions kept unchanged ...
    random_prob: float = 0.1  # ... or replaced by a random target token (the rest become [MASK])
    iterations: tuple[int, ...] = (1, 2, 4, 8)  # decoding passes evaluated
    claim_iterations: int = 4  # the passes the claims on quality, speed and stutter are about
    remasking: str = "linear"
    init: str = "mask"
    update: str = "all"  # "all": every pass re-predicts every position (PaDIR); "masked": Mask-Predict's rule
    length_candidates: int = 1
    # drop the later token of every adjacent repeat after the last pass (then the repeat rates, and the stutter
    # claims, measure nothing)
    drop_repeats: bool = False
    eval_examples: int = 1024
    eval_batch_size: int = 128
    timing_batch_sizes: tuple[int, ...] = (1, 64)
    timing_examples: int = 32  # sources decoded per timed call, in batches of each timing size
    timing_repeats: int = 10  # rounds: a multiple of 2 × the contenders (AR + each pass count) balances them
    seeds: int = 3
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, lr=2e-3, warmup_steps=100, weight_decay=0.01, beta2=0.98, log_every=20))

    def __post_init__(self) -> None:
        owner = "padir"
        check_choice(owner, "data", self.data, DATA)
        for name in ("n_symbols", "min_length", "max_length", "max_tokens", "d_model", "n_heads", "layers",
                     "batch_size", "train_stages", "claim_iterations", "length_candidates", "eval_examples",
                     "eval_batch_size", "timing_examples", "timing_repeats", "seeds"):
            check_positive(owner, name, getattr(self, name))
        for name in ("n_ambiguous", "length_loss_weight"):
            check_positive(owner, name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{owner}.dropout = {self.dropout!r} must lie in [0, 1) (the share of activations "
                              "dropped in training; 0 turns dropout off).")
        from effml.decode import build_rejecter
        from effml.decode.refinement import INITS, UPDATES
        from effml.train.masking import LOSS_WEIGHTINGS

        check_choice(owner, "loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_choice(owner, "init", self.init, INITS)
        check_choice(owner, "update", self.update, UPDATES)
        try:
            build_rejecter(self.remasking)
            task = self.task()
        except ValueError as error:
            raise ConfigError(f"{owner}: {error}") from None
        if self.length_candidates > task.max_target_length:
            raise ConfigError(f"{owner}.length_candidates = {self.length_candidates} exceeds the "
                              f"{task.max_target_length} target lengths the predictor can propose.")
        if (not self.iterations or list(self.iterations) != sorted(set(self.iterations)) or self.iterations[0] < 1
                or self.claim_iterations not in self.iterations or self.iterations[0] >= self.claim_iterations):
            raise ConfigError(f"{owner}.iterations = {self.iterations!r} must be increasing positive pass counts that "
                              f"include claim_iterations = {self.claim_iterations} and a smaller count (claim 1 "
                              "compares them), for example 1,2,4,8.")
        if not self.timing_batch_sizes or any(size < 1 for size in self.timing_batch_sizes) \
                or list(self.timing_batch_sizes) != sorted(set(self.timing_batch_sizes)):
            raise ConfigError(f"{owner}.timing_batch_sizes = {self.timing_batch_sizes!r} must be increasing positive "
                              "batch sizes, for example 1,64.")
        if self.keep_prob + self.random_prob > 1 or min(self.keep_prob, self.random_prob) < 0:
            raise ConfigError(f"{owner}: keep_prob and random_prob must be ≥ 0 with a sum ≤ 1, got {self.keep_prob} "
                              f"and {self.random_prob}.")

    def task(self) -> Any:
        """The translation task ``data`` names (building it is cheap; the verses load when first used)."""
        from effml.data.tasks import SyntheticTranslation, VerseTranslation

        if self.data == "verses":
            return VerseTranslation(source_module=self.source_module, target_module=self.target_module,
                                    bpe_vocab=self.bpe_vocab, max_length=self.max_tokens)
        return SyntheticTranslation(n_symbols=self.n_symbols, n_ambiguous=self.n_ambiguous,
                                    min_length=self.min_length, max_length=self.max_length, map_seed=self.map_seed,
                                    second_spelling_tokens=self.second_spelling_tokens)

    def data_description(self) -> str:
        """What the arms learn from, in words: "the two-dialect data" or "the KJV→WEB verses"."""
        if self.data == "verses":
            return f"the {self.source_module}→{self.target_module} verses"
        return "the two-dialect data"

    def model_config(self, causal: bool) -> Any:
        """The arms' ``EncoderDecoderConfig``: a causal decoder (AR) or a non-causal one with a length predictor."""
        from effml.nn import EncoderDecoderConfig

        task = self.task()
        return EncoderDecoderConfig(
            vocab_size=task.vocab_size, d_model=self.d_model, n_heads=self.n_heads, n_encoder_layers=self.layers,
            n_decoder_layers=self.layers, max_source_len=task.max_length,
            max_target_len=task.max_target_length + 1,  # AR: BOS + the target; NAR: one spare position
            causal_decoder=causal,
            length_classes=0 if causal else task.max_target_length + 1,  # a class per target length 0 … max
            absolute_positions=self.absolute_positions, dropout=self.dropout)


def _smoke() -> PadirConfig:
    return PadirConfig(n_symbols=8, n_ambiguous=2, min_length=3, max_length=6, second_spelling_tokens=2, d_model=32,
                       layers=1, batch_size=16, train_stages=2, iterations=(1, 2), claim_iterations=2,
                       length_candidates=2, eval_examples=32, eval_batch_size=16, timing_batch_sizes=(1, 4),
                       timing_examples=4, timing_repeats=2, seeds=2,
                       train=TrainConfig(steps=12, lr=3e-3, warmup_steps=2, weight_decay=0.01, log_every=4))


def _cpu() -> PadirConfig:
    return PadirConfig()


def _full() -> PadirConfig:
    """Real translation at GPU scale: KJV→RV1909 (English→Spanish) verses of up to 64 BPE tokens, 8,000 BPE ids,
    encoder-decoders d=512 with 6+6 layers and dropout 0.3 (26,323 training pairs: a small corpus for this size;
    ``eval_examples`` exceeds the 1,734 held-out pairs, so all of them are scored). Not yet run. The CPU-scale run on
    real text is the README's (``--set data=verses ...``)."""
    return PadirConfig(data="verses", target_module="RV1909", max_tokens=64, bpe_vocab=8000, d_model=512, n_heads=8,
                       layers=6, dropout=0.3, batch_size=128, eval_examples=4096, eval_batch_size=256,
                       timing_batch_sizes=(1, 128), timing_repeats=20,
                       train=TrainConfig(steps=20_000, lr=5e-4, warmup_steps=1000, weight_decay=0.01, beta2=0.98,
                                         log_every=100))


# ----------------------------------------------------------------------------------------------------------- batches

@dataclass
class Seq2SeqBatch:
    """One training batch of either decoder, ready for ``seq2seq_loss``.

    Attributes:
        sources: (B, S) ids; source_padding: (B, S) bool, True at padding.
        decoder_inputs: (B, T) the decoder's input: BOS + the target shifted right (AR) or the corrupted target (NAR).
        targets: (B, T) what each position predicts: the next token, EOS after the last (AR), or the clean target
            (NAR). loss_mask: (B, T) bool, the positions the token loss counts.
        target_padding: (B, T) bool, True beyond each target (the non-causal decoder hides it; a causal one needs no
            mask). lengths: (B,) target lengths (the length predictor's labels).
    """

    sources: torch.Tensor
    source_padding: torch.Tensor
    decoder_inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    target_padding: torch.Tensor
    lengths: torch.Tensor


def _teacher_forced(task: Any, sources: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> Seq2SeqBatch:
    """The AR batch: decoder inputs BOS t₁ … t_L (then PAD), targets t₁ … t_L EOS (then PAD)."""
    width = int(lengths.max()) + 1
    positions = torch.arange(width)[None, :]
    padded = torch.full((len(lengths), width), task.pad_id, dtype=torch.long)
    padded[:, :width - 1] = targets[:, :width - 1]
    padded = padded.masked_fill(positions >= lengths[:, None], task.pad_id)
    with_eos = padded.masked_fill(positions == lengths[:, None], task.eos_id)
    inputs = torch.cat([torch.full((len(lengths), 1), task.bos_id), with_eos[:, :-1]], dim=1)
    inputs = inputs.masked_fill(positions > lengths[:, None], task.pad_id)
    valid = positions <= lengths[:, None]
    return Seq2SeqBatch(sources, sources.eq(task.pad_id), inputs, with_eos, valid, ~valid, lengths)


def _corrupted(config: PadirConfig, task: Any, sources: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
               generator: torch.Generator) -> Seq2SeqBatch:
    """The NAR batch: PaDIR's corruption of the targets (``effml.train.masking.corrupt_targets``)."""
    from effml.decode.seq2seq import within_lengths
    from effml.train.masking import corrupt_targets, loss_positions

    width = max(int(lengths.max()), 1)
    clean = targets[:, :width]
    padding = ~within_lengths(lengths, width)
    corruption = corrupt_targets(clean, padding, mask_id=task.mask_id, replacement_ids=_target_ids(task),
                                 keep_prob=config.keep_prob, random_prob=config.random_prob, generator=generator)
    selected = loss_positions(padding, corruption, config.loss_weighting)
    # an empty target (a teacher that emits EOS first) keeps one visible position, which no loss counts: a
    # sequence of padding only leaves its attention nothing to attend to
    padding[:, 0] = False
    return Seq2SeqBatch(sources, sources.eq(task.pad_id), corruption.inputs, clean, selected, padding, lengths)


def _rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor of a ``TranslationBatch``."""
    return dataclasses.replace(batch, **{name: value[start:stop] for name, value in vars(batch).items()})


def _decodings(config: PadirConfig) -> list[tuple[str, int, str]]:
    """How the NAR arms are decoded: (metric suffix, passes, re-masking) for every pass count in ``iterations``, and
    for ``claim_iterations`` with stutter re-masking added."""
    decodings = [(f"@{n}", n, config.remasking) for n in config.iterations]
    decodings.append((f"@{config.claim_iterations}{STUTTER}", config.claim_iterations, config.remasking + STUTTER))
    return decodings


def _target_ids(task: Any) -> torch.Tensor:
    """The ids of the task's target tokens (random corruption and random initial tokens draw from them)."""
    return torch.arange(task.target_offset, task.vocab_size)


def _non_target_ids(task: Any) -> tuple[int, ...]:
    """The special ids (PAD, BOS, EOS, MASK, LENGTH, …), which no decoder pass predicts."""
    return tuple(range(task.target_offset))


def seq2seq_loss(length_loss_weight: float, train_stages: int = 1, suppress_ids: tuple[int, ...] = ()):
    """The loss of either arm: token cross-entropy on ``loss_mask`` (over every rank's tokens under torchrun), plus
    ``length_loss_weight`` × the length predictor's cross-entropy when the model has one. With ``train_stages`` > 1
    (PaDIR's multi-stage training, non-causal decoders only), each later stage feeds the decoder the previous stage's
    predictions (``effml.train.masking.next_stage_inputs``, never predicting ``suppress_ids``) and adds its
    cross-entropy over every target position; the metric ``token_loss`` stays stage 1's, ``token_loss_stageK``
    is stage K's."""
    from effml.decode.seq2seq import within_lengths
    from effml.train.lm import token_share
    from effml.train.masking import masked_cross_entropy, next_stage_inputs

    def loss(model: torch.nn.Module, batch: Seq2SeqBatch, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        logits, length_logits = model(batch.sources, batch.decoder_inputs, batch.source_padding,
                                      batch.target_padding, with_length_logits=True)
        token_loss = masked_cross_entropy(logits, batch.targets, batch.loss_mask) * token_share(batch.loss_mask)
        total, metrics = token_loss, {"token_loss": token_loss.detach()}
        if train_stages > 1:
            inputs = batch.decoder_inputs
            inside = within_lengths(batch.lengths, inputs.shape[1])
            inside_share = token_share(inside)  # (a collective: once, not per stage)
            for stage in range(2, train_stages + 1):
                # the whole model again, encoder included, as PaDIR's code applies it per stage (and through the
                # wrapper, so that DDP sees every call); with dropout, each stage draws its own masks
                inputs = next_stage_inputs(logits, inputs, inside, suppress_ids=suppress_ids)
                logits = model(batch.sources, inputs, batch.source_padding, batch.target_padding)
                stage_loss = masked_cross_entropy(logits, batch.targets, inside) * inside_share
                total = total + stage_loss
                metrics[f"token_loss_stage{stage}"] = stage_loss.detach()
        if length_logits is not None:
            length_loss = F.cross_entropy(length_logits.float(), batch.lengths)
            total = total + length_loss_weight * length_loss
            metrics["length_loss"] = length_loss.detach()
        return total, metrics

    return loss


# ------------------------------------------------------------------------------------------------------------ recipe

@register
class PadirRecipe(Experiment):
    name = "padir"
    description = ("parallel decoding by iterative refinement (PaDIR) vs autoregressive decoding, with distillation "
                   "and stutter re-masking (arXiv 2407.21046)")
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}
    claims_on_time = True  # the speed-ups are wall-clock ratios

    def arms(self, config: PadirConfig) -> list[Arm]:
        return [
            Arm(AR, "autoregressive encoder-decoder, greedy decoding with a KV cache"),
            Arm(NAR, f"PaDIR: non-causal decoder with a length predictor, {config.remasking} re-masking"),
            Arm(DISTILLED, "PaDIR trained on the AR model's greedy translations", needs=(AR,)),
        ]

    def check(self, config: PadirConfig) -> None:
        """The verses' SWORD modules must be installed before a run directory is written."""
        if config.data != "verses":
            return
        from effml.data.images import DataUnavailableError
        from effml.data.parallel_text import SwordModuleNotFoundError, find_modules

        try:
            find_modules([config.source_module, config.target_module])
        except SwordModuleNotFoundError as error:
            raise DataUnavailableError(f"padir with data=verses: {error} (Here: set $SWORD_PATH.) Or run the "
                                       "synthetic task: --set data=synthetic.") from None

    def run_arm(self, config: PadirConfig, arm: Arm, context: RunContext) -> ArmRun:
        from effml.data.tasks.base import derive_seed
        from effml.nn import EncoderDecoder

        task = config.task()
        torch.manual_seed(context.seed)
        model = EncoderDecoder(config.model_config(causal=arm.name == AR))
        teacher = self._teacher(config, context) if arm.name == DISTILLED else None
        stages = 1 if arm.name == AR else config.train_stages
        loss = seq2seq_loss(config.length_loss_weight, stages, suppress_ids=_non_target_ids(task))
        trainer = Trainer(model, loss,
                          self.training_batches(config, arm.name, context, teacher), config.train,
                          run_dir=context.run_dir, device=context.device, resume=context.resume, quiet=context.quiet,
                          description=f"{self.name} {arm.name} seed {context.seed}")
        result = trainer.fit()
        model.eval()
        eval_seed = derive_seed(context.seed, 2_000_003)
        metrics: dict[str, float] = {**result.final_metrics, "step_time_s": result.median_step_time}
        curves = dict(result.curves)
        if arm.name == AR:
            measured = evaluate_sharded(task, self._ar_predict(model, task, context.device), config.eval_examples,
                                        eval_seed, context.world, batch_size=config.eval_batch_size)
            metrics.update(measured)
        else:
            for suffix, iterations, remasking in _decodings(config):
                predict = self._nar_predict(config, model, task, context.device, iterations, remasking)
                measured = evaluate_sharded(task, predict, config.eval_examples, eval_seed, context.world,
                                            batch_size=config.eval_batch_size)
                metrics["reference_repeat_rate"] = measured.pop("reference_repeat_rate")  # the data's: one value
                metrics.update({f"{name}{suffix}": value for name, value in measured.items()})
            curves["bleu_vs_iterations"] = [[float(n), metrics[f"bleu@{n}"]] for n in config.iterations]
            curves["repeat_rate_vs_iterations"] = [[float(n), metrics[f"repeat_rate@{n}"]] for n in config.iterations]
        if teacher is not None:
            speed = self._time_decoding(config, teacher, model, task, context)
            metrics.update(speed)
            largest = config.timing_batch_sizes[-1]
            curves[f"speedup_vs_iterations_b{largest}"] = [[float(n), speed[f"speedup@{n}_b{largest}"]]
                                                           for n in config.iterations]
        return ArmRun(params=model.num_parameters(), metrics=metrics, curves=curves)

    def training_batches(self, config: PadirConfig, arm: str, context: RunContext,
                         teacher: torch.nn.Module | None = None) -> Any:
        """``index -> Seq2SeqBatch``, this rank's share of the global batch ``index``: task examples from
        ``derive_seed(seed, index)``, teacher-forced (``ar``) or corrupted (the NAR arms; with ``teacher``, its
        greedy translations replace the targets). Every rank builds the global batch and keeps its share, so the
        corruption's draws do not depend on the number of ranks. The teacher translates each batch as it comes
        (the synthetic task never repeats a source) or, for a task with a finite training set (the verses), every
        training source once, up front (inference only, on every rank)."""
        from effml.data.batches import shard_batches
        from effml.data.tasks.base import derive_seed

        task = config.task()
        finite = task.finite_training_set
        translations = self._translate_training_set(config, teacher, task, context) \
            if teacher is not None and finite else None

        def global_batch(index: int) -> Seq2SeqBatch:
            seed = derive_seed(context.seed, index)
            indices = task.sample_indices(config.batch_size, seed) if finite else None
            sample = task.training_batch(indices) if finite else task.sample(config.batch_size, seed)
            if arm == AR:
                return _teacher_forced(task, sample.sources, sample.targets, sample.target_lengths)
            targets, lengths = sample.targets, sample.target_lengths
            if translations is not None:
                all_targets, all_lengths = translations
                rows = torch.from_numpy(indices)
                lengths = all_lengths[rows]
                targets = all_targets[rows, :max(int(lengths.max()), 1)]
            elif teacher is not None:
                targets, lengths = self._translate(teacher, task, sample.sources, context.device)
            generator = torch.Generator().manual_seed(derive_seed(context.seed, 1_000_003 + index))
            return _corrupted(config, task, sample.sources, targets, lengths, generator)

        return shard_batches(global_batch, context.world)

    def _translate_training_set(self, config: PadirConfig, teacher: torch.nn.Module, task: Any,
                                context: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's greedy translation of every training source of a finite task, in batches of
        ``eval_batch_size``: PAD-padded (N, max_target_length) targets and (N,) lengths."""
        import sys

        count = task.training_size
        if not context.quiet and context.world.is_main:
            print(f"padir: the autoregressive teacher translates the {count} training sources once", file=sys.stderr)
        targets = torch.full((count, task.max_target_length), task.pad_id, dtype=torch.long)
        lengths = torch.zeros(count, dtype=torch.long)
        for start in range(0, count, config.eval_batch_size):
            rows = torch.arange(start, min(start + config.eval_batch_size, count))
            translated, translated_lengths = self._translate(teacher, task, task.training_batch(rows).sources,
                                                             context.device)
            targets[rows, :translated.shape[1]] = translated
            lengths[rows] = translated_lengths
        return targets, lengths

    # -- models and decoding -------------------------------------------------------------------------------------

    def _teacher(self, config: PadirConfig, context: RunContext) -> torch.nn.Module:
        from effml.experiments.lm_training import load_trained_model
        from effml.nn import EncoderDecoder

        teacher = load_trained_model(context, AR, config.train.steps,
                                     lambda: EncoderDecoder(config.model_config(causal=True)), recipe=self.name,
                                     what="the autoregressive teacher")
        return teacher.eval().requires_grad_(False)

    @staticmethod
    def _translate(teacher: torch.nn.Module, task: Any, sources: torch.Tensor,
                   device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's greedy translations of ``sources``: (B, T) targets (PAD-padded) and (B,) lengths, on CPU."""
        from effml.decode import decode_autoregressive

        decoded = decode_autoregressive(teacher, sources.to(device), sources.eq(task.pad_id).to(device),
                                        bos_id=task.bos_id, eos_id=task.eos_id, pad_id=task.pad_id,
                                        max_len=task.max_target_length)
        return decoded.tokens.cpu(), decoded.lengths.cpu()

    @staticmethod
    def _ar_predict(model: torch.nn.Module, task: Any, device: str):
        from effml.decode import decode_autoregressive

        def predict(batch: Any) -> list[list[int]]:
            sources = batch.sources.to(device)
            return decode_autoregressive(model, sources, sources.eq(task.pad_id), bos_id=task.bos_id,
                                         eos_id=task.eos_id, pad_id=task.pad_id,
                                         max_len=task.max_target_length).to_lists()

        return predict

    @staticmethod
    def _nar_predict(config: PadirConfig, model: torch.nn.Module, task: Any, device: str, iterations: int,
                     remasking: str):
        from effml.decode import refine_decode

        replacements = _target_ids(task).to(device)
        not_targets = _non_target_ids(task)

        def predict(batch: Any) -> list[list[int]]:
            sources = batch.sources.to(device)
            # (random initial tokens, init="random", drawn from a seed that is a function of the batch alone)
            generator = torch.Generator(device=device).manual_seed(int(batch.sources.sum()))
            return refine_decode(model, sources, sources.eq(task.pad_id), iterations=iterations,
                                 mask_id=task.mask_id, pad_id=task.pad_id, remasking=remasking, init=config.init,
                                 replacement_ids=replacements, length_candidates=config.length_candidates,
                                 suppress_ids=not_targets, generator=generator, update=config.update,
                                 drop_repeats=config.drop_repeats).to_lists()

        return predict

    def _time_decoding(self, config: PadirConfig, teacher: torch.nn.Module, model: torch.nn.Module, task: Any,
                       context: RunContext) -> dict[str, float]:
        """Seconds per batch of each timing size, AR and every pass count interleaved in balanced rounds, and each
        count's speed-up: the median over rounds of AR time / its time (paired in the round). A round decodes the
        same ``timing_examples`` sources (or one batch, if a batch holds more) in batches of the size, so that the
        ratio at batch size 1 averages over target lengths instead of resting on one sampled source's."""
        from effml.data.tasks.base import derive_seed
        from effml.metrics.timing import paired_time_ratios, time_interleaved

        def decode_all(predict: Any, batches: list[Any]) -> None:
            for batch in batches:
                predict(batch)

        metrics: dict[str, float] = {}
        examples = task.sample(config.timing_examples, derive_seed(context.seed, 3_000_003))
        for size in config.timing_batch_sizes:
            if size > config.timing_examples:
                batches = [task.sample(size, derive_seed(context.seed, 3_000_003 + size))]
            else:
                batches = [_rows(examples, start, start + size)
                           for start in range(0, config.timing_examples - size + 1, size)]
            contenders = {AR: functools.partial(decode_all, self._ar_predict(teacher, task, context.device), batches)}
            for iterations in config.iterations:
                predict = self._nar_predict(config, model, task, context.device, iterations, config.remasking)
                contenders[f"n{iterations}"] = functools.partial(decode_all, predict, batches)
            timings = time_interleaved(contenders, repeats=config.timing_repeats, warmup=1, device=context.device)
            metrics[f"decode_s_ar_b{size}"] = timings[AR].median / len(batches)
            for iterations in config.iterations:
                timing = timings[f"n{iterations}"]
                metrics[f"decode_s@{iterations}_b{size}"] = timing.median / len(batches)
                metrics[f"speedup@{iterations}_b{size}"] = statistics.median(
                    paired_time_ratios(timings[AR].samples, timing.samples))
        return metrics

    # -- report ------------------------------------------------------------------------------------------------------

    def derive(self, config: PadirConfig, results: dict[str, Any]) -> dict[str, Any]:
        """Per NAR arm and pass count N, the entry ``ARM@N`` holding that decoding's metrics (bleu, exact_match,
        length_accuracy, repeat_rate), and ``ARM@N+stutter`` at ``claim_iterations``, so that claims compare
        decodings of one model as they compare arms."""
        derived = {}
        for arm in (NAR, DISTILLED):
            for suffix, iterations, remasking in _decodings(config):
                runs = {}
                for seed in map(str, self.seeds(config)):
                    run = complete_run(results, arm, seed)
                    if run is None:
                        continue
                    runs[seed] = {"status": "complete", "metrics": {
                        name: run["metrics"][f"{name}{suffix}"]
                        for name in ("bleu", "exact_match", "length_accuracy", "repeat_rate")}}
                derived[f"{arm}{suffix}"] = {"label": f"{arm} decoded in {iterations} passes, {remasking} re-masking",
                                             "runs": runs}
        return derived

    def claims(self, config: PadirConfig) -> list[Any]:
        from effml.report import Compare, Monotone, Threshold

        n = config.claim_iterations
        climbing = [count for count in config.iterations if count <= n]
        largest = config.timing_batch_sizes[-1]
        return [
            Monotone(name="quality rises with the passes",
                     statement=f"BLEU rises with each increase in decoding passes, {' → '.join(map(str, climbing))} "
                               f"(nar: trained on {config.data_description()}, whose dependence between positions "
                               "the passes resolve).",
                     metric="bleu", arms=[f"{NAR}@{count}" for count in climbing], better="higher"),
            Compare(name="few passes come close to AR",
                    statement=f"With {n} passes, the distilled PaDIR model's BLEU is at most 5 % below the "
                              "autoregressive model's.",
                    metric="bleu", arm=f"{DISTILLED}@{n}", baseline=AR, better="higher", relative=True,
                    margin=-0.05),
            Threshold(name="parallel decoding is faster one source at a time",
                      statement=f"Decoding one source, {n} parallel passes take at most half the autoregressive "
                                "model's time (the paper's 2–3× speed-up).",
                      metric=f"speedup@{n}_b{config.timing_batch_sizes[0]}", arm=DISTILLED, better="higher",
                      threshold=2.0),
            Threshold(name="parallel decoding is faster in batches",
                      statement=f"Decoding a batch of {largest} sources, {n} parallel passes take at most half the "
                                "autoregressive model's time.",
                      metric=f"speedup@{n}_b{largest}", arm=DISTILLED, better="higher", threshold=2.0),
            Compare(name="distillation helps",
                    statement=f"Trained on the AR model's translations, PaDIR's BLEU at {n} passes is higher than "
                              f"trained on {config.data_description()}.",
                    metric=f"bleu@{n}", arm=DISTILLED, baseline=NAR, better="higher"),
            Monotone(name="stutter falls with the passes",
                     statement=f"The rate of repeated adjacent tokens falls with each increase in decoding passes, "
                               f"{' → '.join(map(str, climbing))} (nar).",
                     metric="repeat_rate", arms=[f"{NAR}@{count}" for count in climbing], better="lower"),
            Compare(name="stutter re-masking lowers stutter",
                    statement=f"At {n} passes, adding stutter re-masking lowers the rate of repeated adjacent tokens "
                              "(nar).",
                    metric="repeat_rate", arm=f"{NAR}@{n}{STUTTER}", baseline=f"{NAR}@{n}", better="lower"),
        ]

    def plots(self, config: PadirConfig) -> list[Any]:
        from effml.report import CurvePlot

        largest = config.timing_batch_sizes[-1]
        return [
            CurvePlot(name="bleu_vs_iterations", curve="bleu_vs_iterations", ylabel="BLEU", xlabel="decoding passes",
                      logx=True, title="Held-out BLEU of parallel decoding against its passes"),
            CurvePlot(name="repeat_rate_vs_iterations", curve="repeat_rate_vs_iterations", xlabel="decoding passes",
                      ylabel="repeated adjacent tokens", logx=True, title="Stutter against decoding passes"),
            CurvePlot(name="speedup_vs_iterations", curve=f"speedup_vs_iterations_b{largest}", logx=True,
                      xlabel="decoding passes", ylabel="AR time / PaDIR time",
                      title=f"Decoding speed-up over AR, batches of {largest}"),
            CurvePlot(name="train_loss", curve="train_loss", ylabel="training loss", logy=True,
                      title="Training loss"),
        ]
