"""The synthetic-task framework: deterministic example generators from a seed, each with its own evaluation.

* :class:`Task` — the general base: a frozen dataclass of parameters plus ``sample(batch_size, seed)`` (a pure
  function of parameters, batch size and seed) and ``evaluate(predict, n, seed, batch_size)``. It fixes no data
  type, so tasks over continuous data (in-context regression) subclass it directly.
* :class:`TokenTask` — tasks over discrete token sequences (copying, recall, reasoning primitives). A subclass
  implements :meth:`TokenTask.generate`, which draws full sequences and marks the answer positions; the base
  turns them into teacher-forced :class:`TaskBatch` es and scores next-token predictions on the answer positions.
* :data:`TASKS` / :func:`build_task` — the registry by name; :func:`register_task` adds a class to it.

Evaluation examples are drawn batch by batch: batch ``k`` uses the seed :func:`derive_seed` ``(seed, k)``, a
64-bit SeedSequence hash, so an evaluation never reuses the small integer seeds a training loop typically passes
to :meth:`Task.sample` (e.g. the step number). Data-parallel ranks can split an evaluation: rank ``r`` of ``W``
scores batches ``k ≡ r (mod W)`` with ``evaluation_sums`` (additive statistics), and ``metrics_from_sums`` combines
every rank's; ``evaluate`` is the two in one process.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

__all__ = ["TaskBatch", "Task", "TokenTask", "TASKS", "register_task", "build_task", "derive_seed",
           "evaluation_batches", "check_int_param"]


@dataclass
class TaskBatch:
    """A teacher-forced batch of token sequences.

    Attributes:
        inputs: int64 ``(B, T)`` token ids.
        targets: int64 ``(B, T)`` next-token targets (``targets[:, t]`` is the token after ``inputs[:, t]``).
        loss_mask: bool ``(B, T)``, True where the target is an answer that the loss and the metrics count.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch on ``device``."""
        return TaskBatch(self.inputs.to(device), self.targets.to(device), self.loss_mask.to(device))

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def derive_seed(seed: int, index: int) -> int:
    """A 64-bit seed for the ``index``-th sub-stream of ``seed`` (SeedSequence hash; stable across platforms)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def _check_count(value: int, what: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}.")


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")


def check_int_param(task: str, param: str, value: Any, minimum: int = 1) -> None:
    """Raise a ValueError naming ``task`` and ``param`` unless ``value`` is an int ``>= minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Task {task!r}: parameter {param} must be an int >= {minimum}, got {value!r}.")


def evaluation_batches(n: int, seed: int, batch_size: int, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[int, int]]:
    """``(size, seed)`` of each evaluation batch: ``ceil(n / batch_size)`` batches holding ``n`` examples in all, or,
    for ``rank`` of ``world_size``, the batches ``k`` with ``k % world_size == rank`` (the same sizes and seeds)."""
    _check_count(n, "n (number of evaluation examples)")
    _check_count(batch_size, "batch_size")
    _check_seed(seed)
    _check_count(world_size, "world_size")
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}.")
    for index, first in enumerate(range(0, n, batch_size)):
        if index % world_size == rank:
            yield min(batch_size, n - first), derive_seed(seed, index)


class Task(ABC):
    """Base of all synthetic tasks. Subclasses are frozen dataclasses whose fields are the task's parameters."""

    name: ClassVar[str]

    @abstractmethod
    def sample(self, batch_size: int, seed: int) -> Any:
        """A batch of ``batch_size`` examples; a pure function of (parameters, batch_size, seed)."""

    @abstractmethod
    def evaluate(self, predict: Callable[[Any], Any], n: int, seed: int, batch_size: int = 64) -> dict[str, float]:
        """Metrics of ``predict`` on ``n`` fresh examples drawn from ``seed``."""

    def params(self) -> dict[str, Any]:
        """The task's parameters as a plain dict (its dataclass fields)."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


class TokenTask(Task):
    """A task over token sequences with a fixed vocabulary and length, scored on answer positions.

    Subclasses define ``vocab_size`` and ``seq_len`` (the model's input length ``T``) and :meth:`generate`.
    """

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id is in ``[0, vocab_size)``."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Input length ``T``; each generated sequence has ``T + 1`` tokens."""

    @abstractmethod
    def generate(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``batch_size`` full sequences from ``rng``.

        Returns:
            sequences: int64 ``(batch_size, seq_len + 1)``.
            answer_mask: bool ``(batch_size, seq_len)``; ``answer_mask[b, t]`` is True when ``sequences[b, t + 1]``
            is an answer to be predicted from ``sequences[b, : t + 1]``.
        """

    def sample(self, batch_size: int, seed: int) -> TaskBatch:
        """``batch_size`` teacher-forced examples drawn with ``numpy.random.default_rng(seed)``."""
        _check_count(batch_size, "batch_size")
        _check_seed(seed)
        sequences, answer_mask = self.generate(np.random.default_rng(int(seed)), int(batch_size))
        sequences = torch.from_numpy(np.asarray(sequences, dtype=np.int64))
        return TaskBatch(inputs=sequences[:, :-1].contiguous(), targets=sequences[:, 1:].contiguous(),
                         loss_mask=torch.from_numpy(np.asarray(answer_mask, dtype=bool)))

    def evaluate(self, predict: Callable[[torch.Tensor], torch.Tensor], n: int, seed: int,
                 batch_size: int = 64) -> dict[str, float]:
        """Teacher-forced accuracy of ``predict`` on ``n`` examples.

        Args:
            predict: maps inputs ``(B, T)`` int64 (on CPU) to predicted next tokens ``(B, T)`` (any device),
                e.g. ``lambda x: model(x.to(device)).argmax(-1)``.
            n: number of examples; seed: evaluation seed; batch_size: examples per ``predict`` call.

        Returns:
            ``token_accuracy``: correct answer tokens / answer tokens; ``sequence_accuracy``: fraction of examples
            whose answer tokens are all correct.
        """
        return self.metrics_from_sums([self.evaluation_sums(predict, n, seed, batch_size)], n)

    @torch.no_grad()
    def evaluation_sums(self, predict: Callable[[torch.Tensor], torch.Tensor], n: int, seed: int,
                        batch_size: int = 64, rank: int = 0, world_size: int = 1) -> dict[str, int]:
        """The counts behind :meth:`evaluate` over this rank's share of the ``n`` examples (see
        :func:`evaluation_batches`): ``correct_tokens``, ``answer_tokens``, ``correct_sequences``."""
        correct_tokens = answer_tokens = correct_sequences = 0
        for size, batch_seed in evaluation_batches(n, seed, batch_size, rank, world_size):
            batch = self.sample(size, batch_seed)
            predictions = torch.as_tensor(predict(batch.inputs)).cpu()
            if predictions.shape != batch.targets.shape:
                raise ValueError(f"predict must return next-token ids of shape {tuple(batch.targets.shape)} "
                                 f"(one per input position), got {tuple(predictions.shape)}; take argmax over the "
                                 "vocabulary of the logits.")
            hits = (predictions.long() == batch.targets) & batch.loss_mask
            correct_tokens += int(hits.sum())
            answer_tokens += int(batch.loss_mask.sum())
            correct_sequences += int((hits | ~batch.loss_mask).all(dim=1).sum())
        return {"correct_tokens": correct_tokens, "answer_tokens": answer_tokens,
                "correct_sequences": correct_sequences}

    def metrics_from_sums(self, sums: list[dict[str, int]], n: int) -> dict[str, float]:
        """:meth:`evaluate`'s metrics from every rank's :meth:`evaluation_sums` of the same ``n`` examples."""
        total = {key: sum(rank_sums[key] for rank_sums in sums) for key in sums[0]}
        return {"token_accuracy": total["correct_tokens"] / max(total["answer_tokens"], 1),
                "sequence_accuracy": total["correct_sequences"] / n}


#: Task classes by name; filled by :func:`register_task`.
TASKS: dict[str, type[Task]] = {}

TaskClass = TypeVar("TaskClass", bound=type[Task])


def register_task(cls: TaskClass) -> TaskClass:
    """Class decorator: add a :class:`Task` subclass (a dataclass with a ``name``) to :data:`TASKS`."""
    if not (isinstance(cls, type) and issubclass(cls, Task) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_task expects a dataclass subclass of Task, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name: ClassVar[str]` to be registered.")
    if name in TASKS and TASKS[name] is not cls:
        raise ValueError(f"A task named {name!r} is already registered ({TASKS[name].__name__}); pick another name.")
    TASKS[name] = cls
    return cls


def build_task(name: str, **params: Any) -> Task:
    """Instantiate the registered task ``name`` with ``params`` (unspecified parameters keep their defaults)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; registered tasks: {sorted(TASKS)}.")
    cls = TASKS[name]
    valid = [field.name for field in dataclasses.fields(cls) if field.init]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for task {name!r}; valid parameters: {valid}.")
    return cls(**params)
