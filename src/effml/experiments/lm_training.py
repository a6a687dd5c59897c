"""Training one decoder LM on a byte-level corpus and measuring it: the part every LM recipe shares.

``load_byte_corpus`` reads (and caches) the corpus once per process with rank 0 first; ``train_lm`` trains a given
model with the trunk's ``Trainer`` on random windows, evaluates held-out loss during training, and returns the final
metrics every LM recipe reports (valid/test nats per token and bits per byte, median step time, tokens/s).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from effml.config import ConfigError
from effml.experiments.base import RunContext
from effml.train import TrainConfig, Trainer
from effml.train.distributed import World, main_first
from effml.train.lm import causal_lm_loss, heldout_nats_per_token
from effml.train.loop import LossFn

__all__ = ["load_byte_corpus", "heldout_evaluator", "train_lm", "parse_size", "byte_lm_config", "load_trained_lm"]

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(text: str, what: str) -> tuple[int, int]:
    """A model size ``"128x4"`` → (d_model=128, n_layers=4); ``what`` names the setting in the error."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{what} {text!r} is not of the form WIDTHxDEPTH (for example 128x4).")
    return int(match.group(1)), int(match.group(2))


def byte_lm_config(size: str, *, head_dim: int, seq_len: int, what: str, mlp: str = "gelu") -> Any:
    """The byte-level (vocabulary 256) `TransformerConfig` of a size ``"WIDTHxDEPTH"``, with heads of ``head_dim``
    and positions up to ``seq_len``; ``what`` names the setting in a size error."""
    from effml.nn import TransformerConfig

    width, depth = parse_size(size, what)
    return TransformerConfig(vocab_size=256, d_model=width, n_layers=depth, n_heads=width // head_dim,
                             max_seq_len=seq_len, mlp=mlp)


def load_byte_corpus(name: str, max_bytes: int | None, world: World) -> Any:
    """The ``CorpusSplits`` of corpus ``name`` under the byte tokenizer (rank 0 builds the token cache first)."""
    from effml.data import ByteTokenizer, load_corpus

    with main_first(world):
        return load_corpus(name, ByteTokenizer(), max_bytes=max_bytes)


def heldout_evaluator(corpus: Any, seq_len: int, batch_size: int, eval_windows: int | None, world: World,
                      device: str) -> Callable[[torch.nn.Module, int], dict[str, float]]:
    """A Trainer ``evaluate`` function: held-out ``valid_loss`` (nats/token) and ``valid_bpb`` on ``eval_windows``
    windows of the corpus's validation split (all of it when None)."""

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        nats = heldout_nats_per_token(model, corpus.valid, seq_len, batch_size, eval_windows, world, device)
        return {"valid_loss": nats, "valid_bpb": corpus.bits_per_byte("valid", nats)}

    return evaluate


def train_lm(model: torch.nn.Module, corpus: Any, *, seq_len: int, batch_size: int, eval_windows: int,
             train: TrainConfig, context: RunContext, description: str, loss: LossFn = causal_lm_loss,
             batches: Callable[[int], Any] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Train ``model`` (token ids (B, T) → logits (B, T, V)) on ``corpus.train`` windows and measure it.

    ``loss`` is the trainer's loss function (next-token cross-entropy by default) and ``batches`` its batch source
    ``index -> this rank's (inputs, targets)`` (by default random windows of ``corpus.train`` drawn from the seed,
    `WindowBatches`).

    Returns ``(metrics, curves)``: the trainer's final metrics plus ``test_loss`` (nats/token over the whole test
    split), ``test_bpb``, ``step_time_s`` (median seconds per optimizer step) and ``tokens_per_s``; ``curves`` as
    recorded by the trainer (train loss, valid loss/bpb every ``train.eval_every`` steps).
    """
    from effml.data import WindowBatches

    world = context.world
    if batches is None:
        source = WindowBatches(corpus.train, batch_size, seq_len, seed=context.seed)

        def batches(index: int) -> Any:
            return source.batch(index, world.rank, world.world_size)

    evaluate = heldout_evaluator(corpus, seq_len, batch_size, eval_windows, world, context.device)
    trainer = Trainer(model, loss, batches, train,
                      evaluate=evaluate, run_dir=context.run_dir, device=context.device, resume=context.resume,
                      quiet=context.quiet, description=description)
    result = trainer.fit()
    model.eval()
    test_nats = heldout_nats_per_token(model, corpus.test, seq_len, batch_size, None, world, context.device)
    metrics = dict(result.final_metrics)
    metrics.update(test_loss=test_nats, test_bpb=corpus.bits_per_byte("test", test_nats),
                   step_time_s=result.median_step_time,
                   tokens_per_s=batch_size * seq_len * train.grad_accum / result.median_step_time)
    return metrics, result.curves


def load_trained_model(context: RunContext, arm: str, steps: int, build: Callable[[], torch.nn.Module], *, recipe: str,
                       what: str) -> torch.nn.Module:
    """The model that arm ``arm``'s run (the one ``context`` needs: `RunContext.arm_run_dir`) trained for ``steps``
    steps, from its final checkpoint, on the run's device. ``build()`` makes the untrained model; it is called under a
    forked RNG, so the caller's random state is untouched. Raises FileNotFoundError, saying how to go on, when that
    run did not reach its last step."""
    from effml.train.checkpoint import latest_checkpoint, load_checkpoint

    checkpoints = context.arm_run_dir(arm) / "checkpoints"
    path = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
    checkpoint = load_checkpoint(path) if path is not None else None
    if checkpoint is None or checkpoint.step != steps:
        found = "no checkpoint" if checkpoint is None else f"a checkpoint at step {checkpoint.step}"
        raise FileNotFoundError(f"{recipe}'s runs load {what} from {checkpoints}, which holds {found}, not one at its "
                                f"last step ({steps}): the {arm} run did not finish. Resume the run (`effml run "
                                f"{recipe} --resume RUN_DIR`), which trains it first; if the run's results.json "
                                f"already lists that {arm} run as complete (its checkpoints were deleted), start a new "
                                "run instead.")
    with torch.random.fork_rng(devices=[]):
        model = build()
    model.load_state_dict(checkpoint.model)
    return model.to(context.device)


def load_trained_lm(context: RunContext, arm: str, steps: int, model_config: Any, *, recipe: str, what: str) -> Any:
    """``load_trained_model`` for a `TransformerLM` of ``model_config``."""
    from effml.nn import TransformerLM

    return load_trained_model(context, arm, steps, lambda: TransformerLM(model_config), recipe=recipe, what=what)
