"""The one training loop every effml recipe uses.

A run is described by four things: a loss function ``(model, batch, step) -> (loss, metrics)``, a batch source
``index -> batch`` (a pure function of the micro-batch index, so a resumed run sees exactly the batches an uninterrupted
one would), an optimizer with a schedule that is a function of the global step, and callbacks called at step
boundaries that may change the model and the optimizer (growth, loss-mix schedules, ...).

The loop adds what every recipe needs and none should rewrite: gradient accumulation and clipping, periodic
evaluation, metrics to JSONL, atomic checkpoints with exact resume, a clean stop on SIGINT/SIGTERM (checkpoint, then
`TrainingInterrupted`), a stop on a non-finite loss (`NonFiniteLoss`, the last good checkpoint kept), DDP across
``torchrun`` processes (the same initial weights on every rank, but each rank's own random stream for dropout from
the start of training), or FSDP with ``TrainConfig.data_parallel="fsdp"`` (effml.train.parallelism), ``torch.compile``
of the training step's model with ``TrainConfig.compile``, bf16 autocast on CUDA, and a progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from effml.config import ConfigError, check_choice, check_positive
from effml.data.tasks.base import derive_seed
from effml.io import atomic_write_text
from effml.optim import WarmupCosine, build_adamw
from effml.train.checkpoint import (Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint,
                                    save_checkpoint)
from effml.train.distributed import World, all_gather_objects, all_reduce_sum, current_world
from effml.train.parallelism import DATA_PARALLEL, data_parallel

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "Callback",
    "TrainingInterrupted",
    "NonFiniteLoss",
    "LossFn",
    "to_device",
    "bf16_autocast",
    "compiled",
]

LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, Any]]]
BatchFn = Callable[[int], Any]
EvalFn = Callable[[nn.Module, int], dict[str, float]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every recipe."""

    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 0  # 0: checkpoint only at the end and on interruption
    log_every: int = 10
    keep_checkpoints: int = 1
    data_parallel: str = "ddp"  # under torchrun: "ddp" replicates the model on every rank, "fsdp" shards it
    compile: str = ""  # a torch.compile backend for the training step's model ("inductor"); "" runs it eagerly

    def __post_init__(self) -> None:
        owner = "train"
        check_choice(owner, "data_parallel", self.data_parallel, DATA_PARALLEL)
        if self.compile and self.compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ConfigError(f"train.compile = {self.compile!r} is not a torch.compile backend: choose one of "
                              f"{', '.join(map(repr, torch.compiler.list_backends()))} (or a debugging backend such as "
                              "'aot_eager'), or '' to train eagerly.")
        check_positive(owner, "steps", self.steps)
        check_positive(owner, "lr", self.lr)
        check_positive(owner, "warmup_steps", self.warmup_steps, allow_zero=True)
        if self.warmup_steps > self.steps:
            raise ValueError(f"train.warmup_steps = {self.warmup_steps} exceeds train.steps = {self.steps}.")
        for name in ("weight_decay", "grad_clip", "eval_every", "checkpoint_every"):
            check_positive(owner, name, getattr(self, name), allow_zero=True)
        for name in ("grad_accum", "log_every", "keep_checkpoints"):
            check_positive(owner, name, getattr(self, name))
        for name in ("beta1", "beta2", "min_lr_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"train.{name} = {value} is out of range: it must lie in [0, 1].")


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written at ``step`` and the run can be resumed."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint at {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted at step {step}{where}")
        self.step, self.checkpoint = step, checkpoint


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept untouched."""


class Callback:
    """Hooks at step boundaries. Any hook may replace ``trainer.model`` / ``trainer.optimizer`` (see Trainer.set_model).

    ``state_dict``/``load_state_dict`` are saved in checkpoints; ``load_state_dict`` runs *before* the model weights are
    loaded, so a callback that grew the model can grow it again to the checkpoint's shape first. One that replaces the
    model sets ``replaces_model``: FSDP shards a model once, so the trainer refuses such a callback under it.
    """

    replaces_model: ClassVar[bool] = False

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_start(self, trainer: Trainer, step: int) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None: ...


def _callback_name(callback: Callback) -> str:
    """The key a callback's saved state is stored under: its class's module and qualified name."""
    return f"{type(callback).__module__}.{type(callback).__qualname__}"


@dataclass
class TrainResult:
    """What a finished run measured."""

    final_metrics: dict[str, float]
    curves: dict[str, list[list[float]]]
    step_times: list[float] = field(default_factory=list)

    @property
    def median_step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")


def bf16_autocast(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """A fresh context that runs its body under bf16 autocast on CUDA (when ``enabled``) and as is elsewhere: how
    effml's trainer, step timer and benchmarks run forward passes, so that they time and train the same computation."""
    if not enabled or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def compiled(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile(model, backend=backend)``, or ``model`` itself when ``backend`` is "" (eager). The compiled
    wrapper shares ``model``'s parameters and hands attribute look-ups (``no_sync``, ...) on to it; state_dicts are
    taken from ``model``, so checkpoints keep plain names."""
    return torch.compile(model, backend=backend) if backend else model


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor inside a (nested) tuple/list/dict/dataclass batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch)})
    return batch


def _rng_key(generator: str, rank: int) -> str:
    """Where ``rank``'s state of ``generator`` ("torch": the CPU one, "cuda") lies in a checkpoint's rng tensors:
    rank 0's under the bare name (so a one-process checkpoint is what it always was), rank r's under
    ``"<generator>.rank<r>"``."""
    return generator if rank == 0 else f"{generator}.rank{rank}"


def _scalar(value: Any) -> float:
    if not isinstance(value, torch.Tensor):
        return float(value)
    if hasattr(value, "full_tensor"):  # a DTensor, e.g. the gradient norm over FSDP shards
        value = value.full_tensor()
    return float(value.detach().float().item())


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop polls between steps (main thread only; a no-op elsewhere);
    subclasses extend ``_handle`` (effml.experiments.parallel forwards the stop to its workers)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs the loop for one (arm, seed): see the module docstring.

    Args:
        model: the model to train (plain module; on several ranks the trainer wraps it in DDP, or shards it in place
            with FSDP when ``config.data_parallel`` is "fsdp").
        loss_fn: ``(model, batch, step) -> (scalar loss, {name: value})``; called with the model as trained
            (DDP-wrapped, FSDP-sharded and/or compiled, as configured).
        batches: ``micro_batch_index -> batch``; index = step · grad_accum + micro. Must be deterministic.
        config: optimisation settings.
        evaluate: ``(model, step) -> {name: value}`` run in eval mode without gradients, every ``eval_every`` steps
            and at the end; it must reduce across ranks itself if it shards work.
        optimizer: defaults to AdamW with weight-decay groups from ``config``; one passed in must not have stepped
            (under FSDP its parameters are replaced by their shards, by name).
        schedule: step → learning-rate multiplier; defaults to warmup + cosine from ``config``.
        callbacks: step-boundary hooks.
        run_dir: where checkpoints/ and metrics.jsonl go (rank 0 writes); None keeps nothing on disk.
        device: "cpu", "cuda", "cuda:1", ...; bf16 autocast is used on CUDA when ``bf16`` is true.
        resume: continue from ``run_dir/checkpoints`` when a checkpoint exists there.
        quiet: no progress bar.
        description: shown on the progress bar.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: BatchFn,
        config: TrainConfig,
        *,
        evaluate: EvalFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        schedule: Callable[[int], float] | None = None,
        callbacks: Sequence[Callback] = (),
        run_dir: str | Path | None = None,
        device: str = "cpu",
        bf16: bool = True,
        resume: bool = False,
        quiet: bool = False,
        description: str = "train",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.world: World = current_world()
        self.loss_fn, self.batches, self.evaluate_fn = loss_fn, batches, evaluate
        self.schedule = schedule or WarmupCosine(config.steps, config.warmup_steps, config.min_lr_ratio)
        self.callbacks = list(callbacks)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.parallel = data_parallel(config.data_parallel)
        replacing = [type(cb).__name__ for cb in callbacks if cb.replaces_model]
        if replacing and self.world.distributed and not self.parallel.allows_model_replacement:
            raise ValueError(f"train.data_parallel='{self.parallel.name}' shards the model once, at the start of "
                             f"training, but {', '.join(replacing)} replaces it during training (growth); train with "
                             "train.data_parallel='ddp'.")
        self.autocast_dtype = torch.bfloat16 if (bf16 and self.device.type == "cuda") else None
        self.resume, self.quiet, self.description = resume, quiet, description
        self.step = 0
        self.model: nn.Module = model
        self.train_model: nn.Module = model
        self.set_model(model, optimizer or build_adamw(
            model.to(self.device), config.lr, config.weight_decay, (config.beta1, config.beta2)))

    # -- model and optimizer replacement (growth callbacks use this) -------------------------------------------------
    def set_model(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Install a (new) model and optimizer, wrapped (DDP) or sharded (FSDP) when training on several ranks, and
        compiled when ``config.compile`` names a backend (the loss function gets that; evaluation runs eagerly)."""
        self.model = model.to(self.device)
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.train_model = compiled(self.parallel.wrap(self.model, optimizer, self.world), self.config.compile)

    # -- files ---------------------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    @property
    def metrics_path(self) -> Path | None:
        return self.run_dir / "metrics.jsonl" if self.run_dir is not None else None

    def _log(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        if self.metrics_path is not None and self.world.is_main:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _read_log(self) -> list[dict[str, Any]]:
        if self.metrics_path is None or not self.metrics_path.exists():
            return []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == len(lines):  # a final line cut short by a kill: its step is logged again on resume
                    break
                raise CheckpointError(f"{self.metrics_path}, line {number}, is corrupted ({error}); restore the file "
                                      "or start a new run.") from error
        return records

    def save(self) -> Path | None:
        """Checkpoint the current state. Every rank must call it (they hand rank 0 their generator states, so that
        each rank's random stream resumes exactly, and under FSDP their shards); rank 0 writes and returns the path,
        other ranks return None."""
        if self.checkpoint_dir is None:
            return None
        states = all_gather_objects(self._rng_state())
        model_state, optimizer_state = self.parallel.full_state(self.model, self.optimizer, self.world)
        if not self.world.is_main:
            return None
        rng = {_rng_key(generator, rank): tensor
               for rank, state in enumerate(states) for generator, tensor in state.items()}
        extra = {
            "callbacks": [{"callback": _callback_name(cb), "state": cb.state_dict()} for cb in self.callbacks],
            "step_times": self._step_times,
        }
        checkpoint = Checkpoint(step=self.step, model=model_state, optimizer=optimizer_state, rng=rng, extra=extra)
        return save_checkpoint(self.checkpoint_dir, checkpoint, keep_last=self.config.keep_checkpoints)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """This process's generator states: "torch" (CPU) and, when training on CUDA, "cuda" (of ``self.device``)."""
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _own_random_stream(self) -> None:
        """Give each rank of a data-parallel world a random stream of its own (dropout masks, ...) from here on.

        Every rank seeds the global generators alike so as to build the same initial model; left so, every rank would
        draw the same dropout masks for its own shard of the batch. Each rank reseeds (CPU and CUDA generators) with
        ``derive_seed(s, rank)``, where s is drawn from the stream the ranks share. A world of one is left untouched,
        so one process draws exactly what it always drew.
        """
        if not self.world.distributed:
            return
        shared = int(torch.randint(0, 2**62, (1,)).item())
        torch.manual_seed(derive_seed(shared, self.world.rank))

    def _restore_rng(self, rng: dict[str, torch.Tensor]) -> None:
        """Continue this rank's random stream where the checkpoint left it. A checkpoint that lacks this rank's states
        (written by a smaller world, or by an effml that saved rank 0's alone) gives rank 0's, branched off as a fresh
        start would (`_own_random_stream`)."""
        saved_rank = self.world.rank if _rng_key("torch", self.world.rank) in rng else 0
        torch.set_rng_state(rng[_rng_key("torch", saved_rank)])
        if _rng_key("cuda", saved_rank) in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng[_rng_key("cuda", saved_rank)], self.device)
        if saved_rank != self.world.rank:
            self._own_random_stream()

    def _restore(self) -> bool:
        """Load the latest checkpoint when there is one; return whether there was."""
        if self.checkpoint_dir is None or latest_checkpoint(self.checkpoint_dir) is None:
            return False
        checkpoint = load_checkpoint(self.checkpoint_dir, map_location=self.parallel.checkpoint_device(self.device))
        self._restore_callbacks(checkpoint.extra.get("callbacks", []))
        self.parallel.load_full_state(self.model, self.optimizer, checkpoint.model, checkpoint.optimizer, self.world)
        self._restore_rng(checkpoint.rng)
        self.step = checkpoint.step
        self._step_times = list(checkpoint.extra.get("step_times", []))
        # Forget what was logged after the checkpoint: the resumed run logs those steps again. A training record
        # carries the index of its step (kept if < checkpoint step); an evaluation record carries the count of steps
        # done, and the checkpoint is saved after the evaluation of its step, so that one is kept too.
        self._records = [r for r in self._read_log()
                         if r["step"] < self.step or (r["step"] == self.step and "train_loss" not in r)]
        if self.world.is_main and self.metrics_path is not None:
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self._records))
        return True

    def _restore_callbacks(self, saved: list[Any]) -> None:
        """Hand each callback the state saved by the callback of its class (the n-th of a class gets the n-th saved
        state of that class), so that a stateless callback (an interrupt hook, say) present in only one of the two
        runs shifts nothing. Checkpoints of older versions saved bare states: those are matched by position."""
        if not all(isinstance(entry, dict) and set(entry) == {"callback", "state"} for entry in saved):
            for callback, state in zip(self.callbacks, saved, strict=False):
                callback.load_state_dict(state, self)
            return
        by_class: dict[str, list[dict[str, Any]]] = {}
        for entry in saved:
            by_class.setdefault(entry["callback"], []).append(entry["state"])
        for callback in self.callbacks:
            states = by_class.get(_callback_name(callback))
            if states:
                callback.load_state_dict(states.pop(0), self)

    # -- the loop ------------------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return bf16_autocast(self.device, enabled=self.autocast_dtype is not None)

    def _train_step(self, step: int) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, mean metrics)."""
        accum = self.config.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=self.device)
        summed: dict[str, float] = {}
        for micro in range(accum):
            batch = to_device(self.batches(step * accum + micro), self.device)
            last = micro == accum - 1
            with contextlib.nullcontext() if last else self.parallel.no_sync(self.train_model, self.world):
                with self._autocast():
                    loss, metrics = self.loss_fn(self.train_model, batch, step)
                (loss / accum).backward()
            total_loss += loss.detach().float()
            for name, value in metrics.items():
                summed[name] = summed.get(name, 0.0) + _scalar(value) / accum
        mean_loss = total_loss / accum
        if self.config.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            summed["grad_norm"] = _scalar(grad_norm)
        return _scalar(mean_loss), summed

    def _evaluate(self) -> dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = {k: _scalar(v) for k, v in self.evaluate_fn(self.model, self.step).items()}
        self.model.train(was_training)
        return metrics

    def fit(self) -> TrainResult:
        """Train to ``config.steps`` (from the last checkpoint when resuming) and return what was measured."""
        from tqdm.auto import tqdm

        self._step_times: list[float] = []
        self._records: list[dict[str, Any]] = []
        restored = self.resume and self._restore()
        if not restored and self.metrics_path is not None and self.world.is_main:  # a fresh start, resumed or not
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.metrics_path, "")
        if not restored:
            self._own_random_stream()
        for callback in self.callbacks:
            callback.on_train_start(self)
        cfg = self.config
        self.model.train()
        progress = tqdm(total=cfg.steps, initial=self.step, desc=self.description, leave=False,
                        disable=self.quiet or not self.world.is_main, dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        with StopSignals() as stop:
            while self.step < cfg.steps:
                step = self.step
                for callback in self.callbacks:
                    callback.on_step_start(self, step)
                multiplier = self.schedule(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * multiplier
                started = time.perf_counter()
                local_loss, metrics = self._train_step(step)
                # One collective per step: the means over ranks of the loss and of the loss function's metrics (for
                # logging: each rank saw its share of the batch), and whether a rank saw a stop signal. grad_norm is
                # already global (DDP averaged the gradients).
                names = sorted(name for name in metrics if name != "grad_norm")
                shared = all_reduce_sum(torch.tensor([local_loss, 1.0 if stop.requested else 0.0,
                                                      *(metrics[name] for name in names)], dtype=torch.float64))
                loss, interrupted = float(shared[0]) / self.world.world_size, bool(shared[1] > 0)
                metrics.update({name: float(value) / self.world.world_size
                                for name, value in zip(names, shared[2:].tolist(), strict=True)})
                if not math.isfinite(loss):
                    last = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
                    raise NonFiniteLoss(
                        f"the training loss became {loss} at step {step} ({self.description}). The run stopped; "
                        + (f"the last good checkpoint ({last}) is kept. " if last else "no checkpoint was written. ")
                        + "Lower the learning rate (--set train.lr=...), keep gradient clipping on "
                          "(train.grad_clip), or check the data for invalid tokens."
                    )
                self.optimizer.step()
                self._step_times.append(time.perf_counter() - started)
                self.step = step + 1
                metrics.update(train_loss=loss, lr=self.optimizer.param_groups[0]["lr"])
                for callback in self.callbacks:
                    callback.on_step_end(self, step, metrics)
                if step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log({"step": step, **metrics, "step_time_s": self._step_times[-1]})
                    progress.set_postfix(loss=f"{loss:.4f}")
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps:
                    last_eval = self._evaluate()
                    self._log({"step": self.step, **last_eval})
                checkpoint_step = ((cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                                   or self.step == cfg.steps)
                saved = self.save() if checkpoint_step else None
                progress.update(1)
                if interrupted and self.step < cfg.steps:
                    progress.close()  # (a second save of the same step would replace the one LATEST names; every
                    # rank decides alike, since save is collective and only rank 0's returns a path)
                    raise TrainingInterrupted(self.step, saved if checkpoint_step else self.save())
        progress.close()
        if not last_eval:  # resumed from a checkpoint written at the very end
            last_eval = self._evaluate()
        return TrainResult(final_metrics=last_eval, curves=self.curves(), step_times=list(self._step_times))

    def curves(self) -> dict[str, list[list[float]]]:
        """Every logged metric as a [[step, value], ...] curve (what metrics.jsonl holds)."""
        curves: dict[str, list[list[float]]] = {}
        for record in self._records:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    curves.setdefault(name, []).append([record["step"], value])
        return curves
