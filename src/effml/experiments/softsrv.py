"""`softsrv`: soft prompts steer a frozen LM to write synthetic docstrings, judged by what a fresh LM learns from them.

SoftSRV (DeSalvo et al., arXiv 2410.16534; PAPERS.md §6), at CPU scale. A byte-level LM pretrained on the standard
library's code (arm ``generator``, one run shared by every seed: the paper's fixed pretrained LLM) is frozen. The
target is 1,500 of the standard library's one-line docstrings (`effml.data.docstrings`, from the corpus's train files;
the held-out docstrings come from its valid and test files, which the generator never saw). Each arm builds a
synthetic set of ``n_samples`` docstrings, then trains a fresh small LM (the "student") on it from scratch:

* ``real-data`` — the student trains on the real target examples themselves (the reference, not a generator);
* ``hard-prompt`` — the generator continues a fixed literal prefix (``hard_prompt``, by default a function header
  and an opening ``\"\"\"``);
* ``nsp``, ``mp<k>``, ``mc`` — SoftSRV's non-contextual, mixture-of-k and MLP-contextual soft prompts
  (`effml.synth`), trained to reconstruct the target examples from their lossy context vectors (hashed byte-trigram
  embeddings), then sampled with contexts drawn from the target examples.

Every sample is cut at its first closing ``\"\"\"``; one that has none within ``max_example_bytes`` gets one appended
(counted in ``unterminated_fraction``). Measured per arm: the student's loss on the real held-out docstrings
(``test_loss``, nats/byte: how useful the data is), the cross-validated AUC of a classifier telling the synthetic set
from the real held-out docstrings in the frozen generator's mean-pooled features (``auc``: 0.5 is indistinguishable),
and what the samples are like (distinct fraction, exact copies of a target example, mean length).

The generator and the target set are fixed across seeds (the paper's given LLM and sample), so the spread over seeds
is that of the prompts' initialisation and batches, the sampling, and the students' initialisation and batches.

Claims (PAPERS.md §6 d: expected MC ≳ MP2 > NSP > hard prompt), fixed before the cpu preset was first run: (1) the
best SoftSRV variant's data (MC) trains a better student than the hard prompt's; (2) even the non-contextual prompt's
data does; (3) the mixture beats the non-contextual prompt; (4) MC is at least as good as the mixture, within
``tolerance``; (5) MC's samples are harder to tell from real docstrings than NSP's (lower AUC) and (6) than the hard
prompt's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from effml.config import ConfigError, check_positive
from effml.experiments.base import Arm, ArmRun, Experiment, RunContext, register
from effml.experiments.lm_training import byte_lm_config, load_byte_corpus, load_trained_lm, parse_size, train_lm
from effml.io import atomic_write_text
from effml.train import TrainConfig

__all__ = ["SoftsrvConfig", "SoftsrvRecipe", "GENERATOR", "REAL", "HARD"]

GENERATOR, REAL, HARD, NSP, MC = "generator", "real-data", "hard-prompt", "nsp", "mc"
CLOSING = '"""'
SAMPLES_FILE = "synthetic.json"
SEPARATOR = "\x1c"  # between examples in a student's training stream (the corpora's document separator)
# derive_seed sub-streams of a seed beside the prompt's batch indices 0, 1, 2, ...
_PROMPT_INIT_STREAM, _STUDENT_INIT_STREAM = 2**40, 2**40 + 1


@dataclass(frozen=True)
class SoftsrvConfig:
    """Settings of the softsrv recipe (override any with --set key=value)."""

    generator_size: str = "96x3"  # WIDTHxDEPTH of the frozen generator LM
    head_dim: int = 32
    corpus: str = "stdlib-code"
    max_bytes: int | None = None
    seq_len: int = 192  # the generator's context: soft tokens + an example must fit in it
    batch_size: int = 32  # the generator's pretraining batch
    eval_windows: int = 256
    target_examples: int = 1500  # target docstrings the prompts learn from (drawn once, with target_seed)
    target_seed: int = 0
    single_line: bool = True  # only docstrings on one line (the closing quotes on the line they start on)
    min_example_bytes: int = 16
    max_example_bytes: int = 96  # closing quotes included
    n_soft_tokens: int = 16  # t
    context_dim: int = 64  # d_e of the hashed n-gram embedder
    ngram: int = 3
    buckets: int = 4096
    mixture_k: int = 2
    mlp_hidden: int = 256
    prompt_batch_size: int = 16
    hard_prompt: str = 'def f():\n    """'
    n_samples: int = 1500
    sample_batch_size: int = 500  # samples generated at once
    temperature: float = 1.0
    top_p: float | None = None
    student_size: str = "64x2"
    student_seq_len: int = 128
    student_batch_size: int = 16
    auc_folds: int = 5
    auc_samples: int = 1000  # synthetic examples the two-sample classifier sees (all if fewer)
    tolerance: float = 0.01  # claim 4: MC may end this many nats/byte above the mixture
    seeds: int = 3
    seed: int = 0
    generator_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, lr=3e-3, warmup_steps=50, eval_every=250, checkpoint_every=250, log_every=10))
    prompt_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=200, lr=1e-2, warmup_steps=20, weight_decay=0.0, eval_every=100, checkpoint_every=100, log_every=10))
    student_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=400, lr=3e-3, warmup_steps=30, eval_every=100, checkpoint_every=200, log_every=10))

    def __post_init__(self) -> None:
        owner = "softsrv"
        for name in ("head_dim", "seq_len", "batch_size", "eval_windows", "target_examples", "min_example_bytes",
                     "max_example_bytes", "n_soft_tokens", "context_dim", "ngram", "buckets", "mlp_hidden",
                     "prompt_batch_size", "n_samples", "sample_batch_size", "student_seq_len", "student_batch_size",
                     "auc_folds", "auc_samples", "seeds"):
            check_positive(owner, name, getattr(self, name))
        check_positive(owner, "temperature", self.temperature)
        check_positive(owner, "tolerance", self.tolerance, allow_zero=True)
        if self.mixture_k < 2:
            raise ConfigError(f"{owner}.mixture_k = {self.mixture_k} must be at least 2 (one prompt is nsp).")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{owner}.top_p = {self.top_p!r} must be None or lie in (0, 1].")
        if self.min_example_bytes > self.max_example_bytes:
            raise ConfigError(f"{owner}.min_example_bytes = {self.min_example_bytes} exceeds max_example_bytes = "
                              f"{self.max_example_bytes}.")
        for name, size in (("generator_size", self.generator_size), ("student_size", self.student_size)):
            width, depth = parse_size(size, f"{owner}.{name} =")
            check_positive(owner, f"{name} width", width)
            check_positive(owner, f"{name} depth", depth)
            if width % self.head_dim:
                raise ConfigError(f"{owner}.{name} = {size!r}: width {width} is not a multiple of head_dim "
                                  f"{self.head_dim}; pick a width divisible by it or change head_dim.")
        longest_prompt = max(self.n_soft_tokens, len(self.hard_prompt.encode("utf-8")))
        if longest_prompt + self.max_example_bytes > self.seq_len:
            raise ConfigError(f"{owner}: a prompt of {longest_prompt} tokens (n_soft_tokens or the hard prompt's "
                              f"bytes) plus an example of up to max_example_bytes = {self.max_example_bytes} needs "
                              f"{longest_prompt + self.max_example_bytes} positions, more than the generator's seq_len "
                              f"= {self.seq_len} (positions it never trained on); lower max_example_bytes or raise "
                              "seq_len.")
        if not self.hard_prompt:
            raise ConfigError(f"{owner}.hard_prompt is empty; give the literal text the hard-prompt arm continues.")

    @property
    def mixture(self) -> str:
        return f"mp{self.mixture_k}"


def _generator_config(config: SoftsrvConfig) -> Any:
    return byte_lm_config(config.generator_size, head_dim=config.head_dim, seq_len=config.seq_len,
                          what="softsrv generator_size")


def _smoke() -> SoftsrvConfig:
    return SoftsrvConfig(generator_size="32x1", head_dim=16, max_bytes=300_000, seq_len=96, batch_size=8,
                         eval_windows=8, target_examples=48, max_example_bytes=80, n_soft_tokens=4, context_dim=8,
                         buckets=256, mlp_hidden=16, prompt_batch_size=8, n_samples=24, student_size="32x1",
                         student_seq_len=48, student_batch_size=8, auc_folds=2, auc_samples=24, seeds=2,
                         generator_train=TrainConfig(steps=12, lr=3e-3, warmup_steps=2, eval_every=6,
                                                     checkpoint_every=6, log_every=2),
                         prompt_train=TrainConfig(steps=6, lr=1e-2, warmup_steps=1, weight_decay=0.0, eval_every=3,
                                                  checkpoint_every=3, log_every=1),
                         student_train=TrainConfig(steps=8, lr=3e-3, warmup_steps=1, eval_every=4,
                                                   checkpoint_every=4, log_every=2))


def _cpu() -> SoftsrvConfig:
    return SoftsrvConfig()


def _full() -> SoftsrvConfig:
    return SoftsrvConfig(generator_size="512x8", head_dim=64, seq_len=512, batch_size=64, eval_windows=1024,
                         target_examples=4000, max_example_bytes=384, n_soft_tokens=128, context_dim=256,
                         mlp_hidden=1024, n_samples=8000, student_size="256x4", student_seq_len=256,
                         student_batch_size=32, auc_samples=2000,
                         generator_train=TrainConfig(steps=20_000, lr=1e-3, warmup_steps=500, eval_every=1000,
                                                     checkpoint_every=1000, log_every=50),
                         prompt_train=TrainConfig(steps=4000, lr=1e-3, warmup_steps=100, weight_decay=0.0,
                                                  eval_every=500, checkpoint_every=500, log_every=50),
                         student_train=TrainConfig(steps=4000, lr=1e-3, warmup_steps=200, eval_every=500,
                                                   checkpoint_every=1000, log_every=50))


@dataclass(frozen=True)
class TargetData:
    """The target examples: ``train`` (the prompts learn from these; the real-data arm's student trains on them) and
    ``held_out`` (the docstrings of the corpus's valid and test files, none also in the train files: the students'
    evaluation, the two-sample test's reference and the prompts' held-out reconstruction)."""

    train: list[str]
    held_out: list[str]


def _target_data(config: SoftsrvConfig) -> TargetData:
    from effml.data import docstring_examples

    options = dict(min_bytes=config.min_example_bytes, max_bytes=config.max_example_bytes)

    def examples(split: str, exclude: set[str] = frozenset()) -> list[str]:
        found = docstring_examples(config.corpus, split, exclude=exclude, **options)
        return [text for text in found if "\n" not in text] if config.single_line else found

    pool = examples("train")
    if len(pool) < config.target_examples:
        kind = "one-line docstrings" if config.single_line else "docstrings"
        raise ConfigError(f"softsrv.target_examples = {config.target_examples}, but the corpus's train files hold "
                          f"only {len(pool)} {kind} of {config.min_example_bytes}–{config.max_example_bytes} bytes; "
                          "lower target_examples or widen the byte range.")
    chosen = np.random.default_rng(config.target_seed).choice(len(pool), config.target_examples, replace=False)
    return TargetData(train=[pool[i] for i in sorted(chosen)],
                      held_out=examples("valid", set(pool)) + examples("test", set(pool)))


def _bytes(text: str) -> bytes:
    """A text's bytes; a sample's invalid UTF-8 bytes come back exactly (they were decoded with surrogateescape)."""
    return text.encode("utf-8", errors="surrogateescape")


def _decode(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("utf-8", errors="surrogateescape")


def _encode(texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(_bytes(text), dtype=np.uint8) for text in texts]


def _stream(texts: list[str]) -> np.ndarray:
    """The examples as one byte stream, each followed by the separator (a student reads windows of it)."""
    return np.frombuffer(_bytes("".join(text + SEPARATOR for text in texts)), dtype=np.uint8)


@register
class SoftsrvRecipe(Experiment):
    name = "softsrv"
    description = "SoftSRV: soft prompts steer a frozen LM to write synthetic docstrings (stdlib code)"
    presets = {"smoke": _smoke, "cpu": _cpu, "full": _full}

    def arms(self, config: SoftsrvConfig) -> list[Arm]:
        prompt = f"{config.n_soft_tokens} soft tokens"
        labels = {
            REAL: f"the {config.target_examples} real target docstrings (reference)",
            HARD: f"generator continuing the literal prefix {config.hard_prompt!r}",
            NSP: f"SoftSRV non-contextual prompt ({prompt})",
            config.mixture: f"SoftSRV mixture of {config.mixture_k} prompts ({prompt})",
            MC: f"SoftSRV MLP-contextual prompt ({prompt}, hidden {config.mlp_hidden})",
        }
        generator = Arm(name=GENERATOR, label=f"generator {config.generator_size} pretrained on {config.corpus} "
                                              f"({config.generator_train.steps} steps), shared by every seed",
                        shared=True)
        return [generator, *(Arm(name=name, label=label, needs=(GENERATOR,)) for name, label in labels.items())]

    def run_arm(self, config: SoftsrvConfig, arm: Arm, context: RunContext) -> ArmRun:
        if arm.name == GENERATOR:
            return self._pretrain_generator(config, context)
        target = _target_data(config)
        generator = self._generator(config, context)
        metrics: dict[str, float] = {}
        curves: dict[str, Any] = {}
        params = 0
        if arm.name == REAL:
            examples = target.train
        elif arm.name == HARD:
            examples, metrics = self._synthetic(config, context, lambda: self._hard_prompt_samples(
                config, generator, context))
        else:
            prompt, metrics, curves = self._train_prompt(config, arm.name, generator, target, context)
            params = sum(parameter.numel() for parameter in prompt.parameters())
            examples, sample_metrics = self._synthetic(config, context, lambda: self._soft_prompt_samples(
                config, generator, prompt, target, context))
            metrics.update(sample_metrics)
        metrics.update(self._describe(examples, target))
        metrics["auc"] = self._two_sample_auc(config, generator, examples, target, context)
        student_metrics, student_curves = self._train_student(config, examples, target, context)
        metrics.update(student_metrics)
        curves.update(student_curves)
        return ArmRun(params=params, metrics=metrics, curves=curves)

    # -- the generator ---------------------------------------------------------------------------------------------
    def _pretrain_generator(self, config: SoftsrvConfig, context: RunContext) -> ArmRun:
        from effml.nn import TransformerLM

        corpus = load_byte_corpus(config.corpus, config.max_bytes, context.world)
        torch.manual_seed(context.seed)
        model = TransformerLM(_generator_config(config))
        metrics, curves = train_lm(model, corpus, seq_len=config.seq_len, batch_size=config.batch_size,
                                   eval_windows=config.eval_windows, train=config.generator_train, context=context,
                                   description=f"{self.name} generator")
        return ArmRun(params=model.num_parameters(), metrics=metrics, curves=curves)

    def _generator(self, config: SoftsrvConfig, context: RunContext) -> Any:
        """The shared generator's final weights, frozen, in eval mode, on the run's device."""
        generator = load_trained_lm(context, GENERATOR, config.generator_train.steps, _generator_config(config),
                                    recipe=self.name, what="the pretrained generator")
        return generator.eval().requires_grad_(False)

    # -- the soft prompts ------------------------------------------------------------------------------------------
    def _embedder(self, config: SoftsrvConfig) -> Any:
        from effml.synth import HashedNgramEmbedder

        return HashedNgramEmbedder(dim=config.context_dim, n=config.ngram, buckets=config.buckets,
                                   seed=config.target_seed)

    def _train_prompt(self, config: SoftsrvConfig, name: str, generator: Any, target: TargetData,
                      context: RunContext) -> tuple[Any, dict[str, float], dict[str, Any]]:
        """Train soft prompt ``name`` to reconstruct the target examples; returns it, its metrics and curves."""
        from effml.data.batches import shard_batches
        from effml.data.tasks.base import derive_seed
        from effml.synth import embedding_rows_init, make_soft_prompt, pad_examples
        from effml.train import Trainer

        embedder = self._embedder(config)
        tokens, mask = pad_examples(_encode(target.train), config.max_example_bytes)
        contexts = embedder(target.train)
        torch.manual_seed(derive_seed(context.seed, _PROMPT_INIT_STREAM))
        init = embedding_rows_init(generator.tok_emb.weight, config.n_soft_tokens,
                                   torch.Generator().manual_seed(context.seed))
        options = {"mp": {"k": config.mixture_k}, "mc": {"hidden": config.mlp_hidden}, "nsp": {}}
        kind = "mp" if name == config.mixture else name
        prompt = make_soft_prompt(kind, config.n_soft_tokens, generator.config.d_model, config.context_dim,
                                  init=init, **options[kind])
        loss_fn = _ReconstructionLoss(generator)

        def global_batch(index: int) -> tuple[torch.Tensor, ...]:
            rows = torch.from_numpy(np.random.default_rng(derive_seed(context.seed, index)).choice(
                len(target.train), config.prompt_batch_size, replace=False))
            return contexts[rows], tokens[rows], mask[rows]

        held_out = (embedder(target.held_out), *pad_examples(_encode(target.held_out), config.max_example_bytes))

        def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
            return {"valid_recon_loss": _mean_recon_loss(generator, model, held_out, context.device)}

        initial = _mean_recon_loss(generator, prompt.to(context.device), held_out, context.device)

        trainer = Trainer(prompt, loss_fn, shard_batches(global_batch, context.world), config.prompt_train,
                          evaluate=evaluate, run_dir=context.run_dir / "prompt", device=context.device,
                          resume=context.resume, quiet=context.quiet,
                          description=f"{self.name} {name} prompt seed {context.seed}")
        result = trainer.fit()
        metrics = {"prompt_" + key: value for key, value in result.final_metrics.items()}
        metrics["prompt_initial_recon_loss"] = initial
        curves = {"prompt_" + key: value for key, value in result.curves.items()}
        return prompt.eval(), metrics, curves

    # -- sampling ----------------------------------------------------------------------------------------------------
    def _synthetic(self, config: SoftsrvConfig, context: RunContext,
                   sample: Any) -> tuple[list[str], dict[str, float]]:
        """The arm's synthetic examples: read back from its run directory, or sampled now (``sample()`` → raw texts)
        and saved. Each is cut after its first closing ``\"\"\"``; one that has none within ``max_example_bytes`` gets
        one appended (and is counted as unterminated)."""
        from effml.train.distributed import barrier

        path = context.run_dir / SAMPLES_FILE
        if context.world.is_main and not path.exists():  # rank 0 samples; every rank then trains on its file
            atomic_write_text(path, json.dumps(sample()))  # ASCII: escapes keep undecodable bytes
        barrier()
        raw = json.loads(path.read_text(encoding="utf-8"))
        closed = [text[:text.index(CLOSING) + len(CLOSING)] if CLOSING in text else text + CLOSING for text in raw]
        return closed, {"unterminated_fraction": sum(CLOSING not in text for text in raw) / len(raw)}

    def _sample_generator(self, context: RunContext) -> torch.Generator:
        """The samples' random stream, the same for every arm of a seed (common random numbers), on the device the
        logits are drawn on. The samples depend on ``sample_batch_size`` too (batches draw from it in turn)."""
        return torch.Generator(device=context.device).manual_seed(10_000 + context.seed)

    def _hard_prompt_samples(self, config: SoftsrvConfig, generator: Any, context: RunContext) -> list[str]:
        from effml.decode import generate

        prefix = torch.tensor(list(config.hard_prompt.encode("utf-8")), device=context.device)
        rows = []
        sampler = self._sample_generator(context)
        for start in range(0, config.n_samples, config.sample_batch_size):
            count = min(config.sample_batch_size, config.n_samples - start)
            ids = generate(generator, prefix.expand(count, -1), config.max_example_bytes,
                           temperature=config.temperature, top_p=config.top_p, generator=sampler)
            rows.extend(ids[:, len(prefix):].cpu())
        return [_decode(row) for row in rows]

    def _soft_prompt_samples(self, config: SoftsrvConfig, generator: Any, prompt: Any, target: TargetData,
                             context: RunContext) -> list[str]:
        from effml.synth import generate_synthetic

        picks = np.random.default_rng(20_000 + context.seed).choice(len(target.train), config.n_samples)
        contexts = self._embedder(config)([target.train[i] for i in picks])
        ids = generate_synthetic(generator, prompt, contexts, config.max_example_bytes,
                                 temperature=config.temperature, top_p=config.top_p,
                                 generator=self._sample_generator(context), batch_size=config.sample_batch_size)
        return [_decode(row) for row in ids]

    # -- measurements ------------------------------------------------------------------------------------------------
    def _describe(self, examples: list[str], target: TargetData) -> dict[str, float]:
        training = set(target.train)
        return {"n_examples": float(len(examples)),
                "distinct_fraction": len(set(examples)) / len(examples),
                "copied_fraction": sum(example in training for example in examples) / len(examples),
                "mean_bytes": float(np.mean([len(_bytes(example)) for example in examples]))}

    def _two_sample_auc(self, config: SoftsrvConfig, generator: Any, examples: list[str], target: TargetData,
                        context: RunContext) -> float:
        """Cross-validated AUC of a classifier telling ``examples`` (up to ``auc_samples`` of them) from the real
        held-out docstrings, in the generator's mean-pooled final hidden states."""
        from effml.metrics import classifier_two_sample_auc

        if len(examples) > config.auc_samples:
            picks = np.random.default_rng(30_000 + context.seed).choice(len(examples), config.auc_samples,
                                                                         replace=False)
            examples = [examples[i] for i in sorted(picks)]
        real = _features(generator, target.held_out, context.device)
        return classifier_two_sample_auc(real, _features(generator, examples, context.device),
                                         folds=config.auc_folds, seed=context.seed)

    def _train_student(self, config: SoftsrvConfig, examples: list[str], target: TargetData,
                       context: RunContext) -> tuple[dict[str, float], dict[str, Any]]:
        """A fresh small LM trained on ``examples`` and evaluated on the real held-out docstrings (nats/byte)."""
        from effml.data import CorpusSplits
        from effml.nn import TransformerLM

        held_out = _stream(target.held_out)  # no choice is made on it, so the curves and the final loss share it
        splits = {"train": _stream(examples), "valid": held_out, "test": held_out}
        corpus = CorpusSplits(name="docstrings", **splits, n_bytes={k: len(v) for k, v in splits.items()},
                              files={k: [] for k in splits})
        torch.manual_seed(derive_student_seed(context.seed))
        student = TransformerLM(byte_lm_config(config.student_size, head_dim=config.head_dim,
                                               seq_len=config.student_seq_len, what="softsrv student_size"))
        student_context = dataclasses.replace(context, run_dir=context.run_dir / "student")
        return train_lm(student, corpus, seq_len=config.student_seq_len, batch_size=config.student_batch_size,
                        eval_windows=None, train=config.student_train, context=student_context,
                        description=f"{self.name} student seed {context.seed}")

    def claims(self, config: SoftsrvConfig) -> list[Any]:
        from effml.report import Compare

        student = "the student trained on its samples ends with a lower test loss (real held-out docstrings)"
        mixture = config.mixture
        return [
            Compare(name="SoftSRV beats the hard prompt", metric="test_loss", arm=MC, baseline=HARD, better="lower",
                    statement=f"With the MLP-contextual soft prompt, {student} than with the hard prompt's."),
            Compare(name="a plain soft prompt beats the hard prompt", metric="test_loss", arm=NSP, baseline=HARD,
                    better="lower", statement=f"With the non-contextual soft prompt, {student} than with the hard "
                                              "prompt's."),
            Compare(name="the mixture beats the plain soft prompt", metric="test_loss", arm=mixture, baseline=NSP,
                    better="lower", statement=f"With the mixture of {config.mixture_k} prompts, {student} than with "
                                              "the non-contextual prompt's."),
            Compare(name="MC is as good as the mixture", metric="test_loss", arm=MC, baseline=mixture,
                    better="lower", margin=-config.tolerance,
                    statement=f"The MLP-contextual prompt's student ends at most {config.tolerance:g} nats/byte "
                              "above the mixture's."),
            Compare(name="MC's samples match the target better than NSP's", metric="auc", arm=MC, baseline=NSP,
                    better="lower", statement="A classifier tells the MLP-contextual prompt's samples from real "
                                              "held-out docstrings less well (lower cross-validated AUC) than the "
                                              "non-contextual prompt's."),
            Compare(name="MC's samples match the target better than the hard prompt's", metric="auc", arm=MC,
                    baseline=HARD, better="lower",
                    statement="A classifier tells the MLP-contextual prompt's samples from real held-out docstrings "
                              "less well than the hard prompt's."),
        ]

    def plots(self, config: SoftsrvConfig) -> list[Any]:
        from effml.report import CurvePlot

        return [CurvePlot(name="valid_loss", curve="valid_loss", ylabel="nats per byte",
                          title="Students: loss on real held-out docstrings", arms=[REAL, HARD, NSP, config.mixture,
                                                                                     MC]),
                CurvePlot(name="prompt_valid_recon_loss", curve="prompt_valid_recon_loss", ylabel="nats per byte",
                          title="Soft prompts: reconstruction loss of held-out docstrings",
                          arms=[NSP, config.mixture, MC])]


def derive_student_seed(seed: int) -> int:
    """The students' initialisation seed: the same for every arm of a seed, so they differ only in their data."""
    from effml.data.tasks.base import derive_seed

    return derive_seed(seed, _STUDENT_INIT_STREAM)


class _ReconstructionLoss:
    """The Trainer's loss for a soft prompt: SoftSRV's reconstruction loss through the frozen generator, in nats per
    real token, weighted so that data parallelism averages over every rank's tokens (`token_share`)."""

    def __init__(self, generator: torch.nn.Module) -> None:
        self.generator = generator

    def __call__(self, model: torch.nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from effml.synth import reconstruction_loss
        from effml.train.lm import token_share

        contexts, tokens, mask = batch
        return reconstruction_loss(self.generator, model, contexts, tokens, mask) * token_share(mask), {}


@torch.no_grad()
def _mean_recon_loss(generator: Any, prompt: torch.nn.Module, held_out: tuple[torch.Tensor, ...], device: str,
                     batch_size: int = 64) -> float:
    """Mean reconstruction loss (nats per byte) of held-out examples ``(contexts, tokens, mask)``."""
    from effml.synth import reconstruction_loss

    total = count = 0.0
    for start in range(0, held_out[0].shape[0], batch_size):
        contexts, tokens, mask = (part[start:start + batch_size].to(device) for part in held_out)
        total += float(reconstruction_loss(generator, prompt, contexts, tokens, mask, reduction="sum"))
        count += float(mask.sum())
    return total / count


@torch.no_grad()
def _features(generator: Any, texts: list[str], device: str, batch_size: int = 64) -> torch.Tensor:
    """(N, d) the generator's final hidden states averaged over each text's bytes."""
    from effml.synth import pad_examples

    pieces = []
    for start in range(0, len(texts), batch_size):
        tokens, mask = pad_examples(_encode(texts[start:start + batch_size]))
        tokens, mask = tokens[:, :generator.config.max_seq_len].to(device), mask[:, :generator.config.max_seq_len]
        states = generator.hidden_states(tokens).float().cpu()
        pieces.append((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
    return torch.cat(pieces)
