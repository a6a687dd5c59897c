"""Language-model batches from a 1-D token array: random training windows and fixed evaluation windows.

Training (:class:`WindowBatches`): the global batch at ``step`` is ``batch_size`` windows whose start offsets are
drawn by ``numpy.random.default_rng([seed, step])`` — a counter-based derivation, so ``batch(step)`` is a pure
function of ``(seed, step)`` and a run resumed at step ``s`` sees exactly the batches an uninterrupted run would
have seen. Under data parallelism, rank ``r`` of ``world_size`` takes the **contiguous** rows
``[r * B/W, (r + 1) * B/W)`` of that global batch, so the ranks' shares are disjoint and their concatenation in
rank order is the ``world_size=1`` batch.

Sharding (:func:`rank_share`, :func:`shard_batches`, :func:`sampled_batches` for synthetic tasks): the same
contiguous-share rule for any global batch — a tensor,
an array, a tuple of them or a dataclass of them such as a synthetic task's batch — so every recipe that builds its
own batches splits them across ranks exactly as :class:`WindowBatches` does.

Evaluation (:func:`eval_windows`): non-overlapping windows ``tokens[i*T : i*T + T + 1]`` in order; a cap takes
evenly spaced windows across the whole array. :func:`rank_batch_ranges` deals a fixed evaluation set's consecutive
batches out to the ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["WindowBatches", "eval_windows", "eval_window_starts", "rank_batch_ranges", "rank_share",
           "sampled_batches", "shard_batches", "windows_to_tensors"]

Batch = TypeVar("Batch")


def _check_tokens(tokens: np.ndarray, seq_len: int, caller: str) -> np.ndarray:
    array = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{caller} needs a 1-D integer token array, got shape {array.shape} dtype {array.dtype}.")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"{caller}: seq_len must be a positive int, got {seq_len!r}.")
    if len(array) < seq_len + 1:
        raise ValueError(f"{caller}: a window of seq_len={seq_len} needs {seq_len + 1} tokens (inputs plus one "
                         f"target), but the array has {len(array)}; use a shorter seq_len or more data.")
    return array


def _check_positive_int(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}.")


def windows_to_tensors(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``tokens[s : s + seq_len + 1]`` for each start → (inputs, targets), each int64 ``(len(starts), T)``."""
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    inputs = np.ascontiguousarray(windows[:, :-1])
    targets = np.ascontiguousarray(windows[:, 1:])
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def _check_world(rank: int, world_size: int) -> None:
    """Raise ValueError unless ``world_size`` is a positive int and ``rank`` an int in ``[0, world_size)``."""
    _check_positive_int(world_size, "world_size")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}.")


def rank_batch_ranges(length: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[range]:
    """The index ranges of consecutive evaluation batches of ``batch_size`` over ``length`` examples, in order; for
    ``rank`` of ``world_size``, batch ``k`` when ``k % world_size == rank`` (the ranks' shares partition the
    examples; a rank may get one batch fewer)."""
    values = {"length": length, "batch_size": batch_size, "rank": rank, "world_size": world_size}
    for name, value in values.items():  # (numpy integers are welcome: counts often come from arrays)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}.")
    length, batch_size, rank, world_size = (int(value) for value in values.values())
    if length < 0:
        raise ValueError(f"length must be an int >= 0 (the number of examples), got {length}.")
    _check_positive_int(batch_size, "batch_size")
    _check_world(rank, world_size)
    for start in range(rank * batch_size, length, batch_size * world_size):
        yield range(start, min(start + batch_size, length))


def _check_share(batch_size: int, rank: int, world_size: int) -> None:
    """Raise ValueError unless ``rank`` of ``world_size`` ranks can take an equal share of ``batch_size`` rows."""
    _check_world(rank, world_size)
    if batch_size % world_size:
        raise ValueError(f"Global batch_size {batch_size} does not divide by world_size {world_size}; "
                         "choose a batch_size that is a multiple of the number of processes.")


def _batch_leaves(batch: Any) -> list[torch.Tensor | np.ndarray]:
    """The tensors and arrays a batch is made of: itself, the items of a tuple/list, or a dataclass's fields."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [leaf for item in batch for leaf in _batch_leaves(item)]
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return [leaf for item in dataclasses.fields(batch) for leaf in _batch_leaves(getattr(batch, item.name))]
    return []


def _take_rows(batch: Any, rows: slice) -> Any:
    """``batch`` with every tensor/array in it replaced by ``leaf[rows]``; other values are kept as they are."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch[rows]
    if isinstance(batch, (tuple, list)):
        taken = [_take_rows(item, rows) for item in batch]
        return type(batch)(*taken) if hasattr(batch, "_fields") else type(batch)(taken)  # namedtuples too
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{item.name: _take_rows(getattr(batch, item.name), rows)
                                             for item in dataclasses.fields(batch) if item.init})
    return batch


def rank_share(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s contiguous share of a global batch: rows ``[r * B/W, (r + 1) * B/W)`` of every tensor in it.

    Args:
        batch: the global batch — a tensor or numpy array of shape ``(B, ...)``, a tuple/list of them, or a dataclass
            whose tensor/array fields all have shape ``(B, ...)`` (e.g. ``TaskBatch``, ``RegressionBatch``);
            non-tensor fields are kept as they are.
        rank, world_size: this process's place in the data-parallel world; ``B`` must divide by ``world_size``.

    Returns:
        A batch of the same structure whose tensors have shape ``(B // world_size, ...)``; the shares of ranks
        ``0 .. W-1`` concatenated in rank order are the global batch. With ``world_size=1`` it is ``batch`` itself
        (not a copy), so a single process trains on exactly what it did before sharding existed.

    Raises:
        ValueError: ``B`` not a multiple of ``world_size``, a rank outside ``[0, world_size)``, a batch holding no
        tensor, or tensors whose leading sizes disagree.
    """
    leaves = _batch_leaves(batch)
    if not leaves:
        raise ValueError(f"rank_share needs a tensor, an array, or a tuple/list/dataclass of them; got "
                         f"{type(batch).__name__}.")
    sizes = {int(leaf.shape[0]) if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"rank_share: every tensor of a batch needs the same leading (batch) size, got "
                         f"{sorted(sizes, key=str)}.")
    batch_size = sizes.pop()
    _check_share(batch_size, rank, world_size)
    if world_size == 1:
        return batch
    per_rank = batch_size // world_size
    return _take_rows(batch, slice(rank * per_rank, (rank + 1) * per_rank))


def shard_batches(global_batches: Callable[[int], Batch], world: Any) -> Callable[[int], Batch]:
    """``index -> this rank's share of global_batches(index)`` (:func:`rank_share`), for a Trainer's ``batches``.

    ``world`` is an :class:`effml.train.distributed.World` (anything with int ``rank`` and ``world_size``). Every
    rank draws the whole global batch and keeps its share: for batch functions that build examples from a seed this
    is what makes a run over ``W`` ranks see exactly the examples of a one-process run, and for the small synthetic
    tasks the recipes generate it costs little next to the training step. The world is checked here, once.
    """
    rank, world_size = world.rank, world.world_size
    _check_world(rank, world_size)
    if world_size == 1:
        return global_batches

    def batches(index: int) -> Batch:
        return rank_share(global_batches(index), rank, world_size)

    return batches


def sampled_batches(task: Any, batch_size: int, seed: int, world: Any) -> Callable[[int], Batch]:
    """``index -> this rank's share of task.sample(batch_size, derive_seed(seed, index))``: a synthetic task's training
    batches for a Trainer, fresh examples at every micro-batch ``index`` from its own seed (so a resumed run draws
    exactly what an uninterrupted one would), sharded across ranks by :func:`shard_batches`.

    ``task``: anything with ``sample(n, seed)`` returning a batch of ``n`` examples (a ``TokenTask``,
    ``InContextRegression``); ``world``: as for :func:`shard_batches`.
    """
    from effml.data.tasks.base import derive_seed

    return shard_batches(lambda index: task.sample(batch_size, derive_seed(seed, index)), world)


class WindowBatches:
    """Random contiguous windows from a 1-D token array; ``batch(step)`` is a pure function of (seed, step, rank).

    Args:
        tokens: 1-D integer array of shape ``(N,)`` (a ``np.memmap`` works; only the windows are read).
        batch_size: global batch size ``B`` (windows per step summed over all ranks).
        seq_len: window length ``T``; each window reads ``T + 1`` tokens.
        seed: non-negative int; different seeds give independent batch streams.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens = _check_tokens(tokens, seq_len, "WindowBatches")
        _check_positive_int(batch_size, "WindowBatches batch_size")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"WindowBatches seed must be a non-negative int, got {seed!r}.")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.n_starts = len(self.tokens) - seq_len  # valid starts: 0 .. N - T - 1

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch at ``step``: int64 array of shape ``(batch_size,)``."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}.")
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, self.n_starts, size=self.batch_size, dtype=np.int64)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch at ``step``.

        Returns:
            inputs, targets: int64 tensors of shape ``(batch_size // world_size, seq_len)`` with
            ``targets[:, t] == inputs[:, t + 1]`` and the last target the token after the window.
        """
        starts = rank_share(self.global_starts(step), rank, world_size)
        return windows_to_tensors(self.tokens, starts, self.seq_len)

    def __repr__(self) -> str:
        return (f"WindowBatches(n_tokens={len(self.tokens)}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"seed={self.seed})")


def eval_window_starts(n_tokens: int, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Start offsets (increasing, multiples of ``seq_len``) of the evaluation windows over ``n_tokens`` tokens.

    All ``(n_tokens - 1) // seq_len`` non-overlapping windows, or, with ``max_windows`` smaller than that,
    ``max_windows`` of them evenly spaced across the array (window ``i`` of ``m`` is the ``floor((2i+1) n / 2m)``-th).
    """
    n_windows = (n_tokens - 1) // seq_len
    if max_windows is not None:
        _check_positive_int(max_windows, "max_windows")
    if max_windows is None or max_windows >= n_windows:
        indices = np.arange(n_windows, dtype=np.int64)
    else:
        indices = (2 * np.arange(max_windows, dtype=np.int64) + 1) * n_windows // (2 * max_windows)
    return indices * seq_len


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_windows: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows in order, for held-out loss.

    Yields ``(inputs, targets)`` int64 tensors of shape ``(b, seq_len)`` with ``b = batch_size`` except possibly
    the last batch. Window ``k`` covers inputs ``tokens[s_k : s_k + T]`` with ``s_k`` from
    :func:`eval_window_starts`; the final ``< T`` leftover tokens are not scored.
    """
    array = _check_tokens(tokens, seq_len, "eval_windows")
    _check_positive_int(batch_size, "eval_windows batch_size")
    starts = eval_window_starts(len(array), seq_len, max_windows)  # validated now, not at first next()
    return (windows_to_tensors(array, starts[first:first + batch_size], seq_len)
            for first in range(0, len(starts), batch_size))
