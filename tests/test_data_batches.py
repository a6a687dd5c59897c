"""Batch sources: random training windows (determinism, shift, rank sharding), the rank-sharding helper every
recipe's batches go through, and fixed evaluation windows."""

from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from effml.data import WindowBatches, eval_windows
from effml.data.batches import eval_window_starts, rank_batch_ranges, rank_share, shard_batches
from effml.data.tasks import Copying
from effml.data.tasks.regression import InContextRegression

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, size=5000).astype(np.uint16)


def assert_rows_are_windows(tokens: np.ndarray, inputs: torch.Tensor, targets: torch.Tensor,
                            starts: np.ndarray) -> None:
    for row, start in enumerate(starts):
        np.testing.assert_array_equal(inputs[row].numpy(), tokens[start:start + inputs.shape[1]])
        np.testing.assert_array_equal(targets[row].numpy(), tokens[start + 1:start + 1 + inputs.shape[1]])


def test_same_seed_and_step_give_the_same_batch_in_any_call_order(tokens):
    first = WindowBatches(tokens, batch_size=8, seq_len=SEQ_LEN, seed=3)
    second = WindowBatches(tokens, batch_size=8, seq_len=SEQ_LEN, seed=3)
    later = [second.batch(step) for step in (5, 0, 2)]  # "resume" out of order
    for step, (inputs, targets) in zip((5, 0, 2), later, strict=True):
        expected_inputs, expected_targets = first.batch(step)
        assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)


def test_different_steps_and_seeds_differ(tokens):
    batches = WindowBatches(tokens, batch_size=8, seq_len=SEQ_LEN, seed=3)
    assert not torch.equal(batches.batch(0)[0], batches.batch(1)[0])
    other_seed = WindowBatches(tokens, batch_size=8, seq_len=SEQ_LEN, seed=4)
    assert not torch.equal(batches.batch(0)[0], other_seed.batch(0)[0])


def test_targets_are_inputs_shifted_by_one_against_the_source(tokens):
    batches = WindowBatches(tokens, batch_size=8, seq_len=SEQ_LEN, seed=1)
    inputs, targets = batches.batch(7)
    assert inputs.shape == targets.shape == (8, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert_rows_are_windows(tokens, inputs, targets, batches.global_starts(7))
    # Identity tokens: each row is a run of consecutive integers, which pins contiguity without global_starts.
    ramp = np.arange(300, dtype=np.uint32)
    ramp_inputs, ramp_targets = WindowBatches(ramp, 4, SEQ_LEN, seed=0).batch(0)
    assert torch.equal(ramp_inputs, ramp_inputs[:, :1] + torch.arange(SEQ_LEN))
    assert torch.equal(ramp_targets, ramp_inputs + 1)


def test_every_start_offset_is_reachable_and_none_overruns():
    tokens = np.arange(SEQ_LEN + 2)  # exactly two valid windows: starts 0 and 1
    batches = WindowBatches(tokens, batch_size=16, seq_len=SEQ_LEN, seed=0)
    starts = np.concatenate([batches.global_starts(step) for step in range(4)])
    assert set(starts.tolist()) == {0, 1}


def test_ranks_take_disjoint_contiguous_slices_of_the_global_batch(tokens):
    batches = WindowBatches(tokens, batch_size=12, seq_len=SEQ_LEN, seed=9)
    global_inputs, global_targets = batches.batch(4)
    world_size = 3
    shares = [batches.batch(4, rank=rank, world_size=world_size) for rank in range(world_size)]
    assert all(inputs.shape == (4, SEQ_LEN) for inputs, _ in shares)
    assert torch.equal(torch.cat([inputs for inputs, _ in shares]), global_inputs)
    assert torch.equal(torch.cat([targets for _, targets in shares]), global_targets)
    starts = batches.global_starts(4)
    for rank, (inputs, targets) in enumerate(shares):
        assert_rows_are_windows(tokens, inputs, targets, starts[rank * 4:(rank + 1) * 4])


def test_window_batches_reject_bad_arguments(tokens):
    batches = WindowBatches(tokens, batch_size=10, seq_len=SEQ_LEN, seed=0)
    with pytest.raises(ValueError, match="world_size"):
        batches.batch(0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        batches.batch(0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="step"):
        batches.batch(-1)
    with pytest.raises(ValueError, match="needs 17 tokens"):
        WindowBatches(np.arange(SEQ_LEN), batch_size=2, seq_len=SEQ_LEN, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        WindowBatches(np.zeros((4, 100), dtype=np.int64), batch_size=2, seq_len=SEQ_LEN, seed=0)


def test_window_batches_read_from_a_memmap(tmp_path, tokens):
    np.save(tmp_path / "tokens.npy", tokens)
    mapped = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    a = WindowBatches(mapped, 4, SEQ_LEN, seed=2).batch(3)
    b = WindowBatches(tokens, 4, SEQ_LEN, seed=2).batch(3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_eval_windows_are_non_overlapping_in_order_and_cover_the_array():
    n_tokens = 10 * SEQ_LEN + 5
    tokens = np.arange(n_tokens, dtype=np.int64)
    batches = list(eval_windows(tokens, SEQ_LEN, batch_size=4))
    assert [len(inputs) for inputs, _ in batches] == [4, 4, 2]
    inputs = torch.cat([i for i, _ in batches])
    targets = torch.cat([t for _, t in batches])
    # With identity tokens the inputs are exactly 0, 1, 2, ... in window order: non-overlapping, no gaps.
    assert torch.equal(inputs.flatten(), torch.arange(10 * SEQ_LEN))
    assert torch.equal(targets, inputs + 1)


def test_eval_windows_last_window_may_end_at_the_final_token():
    tokens = np.arange(3 * SEQ_LEN + 1)
    inputs = torch.cat([i for i, _ in eval_windows(tokens, SEQ_LEN, batch_size=8)])
    assert inputs.shape == (3, SEQ_LEN)


def test_eval_windows_max_windows_takes_evenly_spaced_windows():
    n_windows = 100
    tokens = np.arange(n_windows * SEQ_LEN + 1)
    inputs = torch.cat([i for i, _ in eval_windows(tokens, SEQ_LEN, batch_size=3, max_windows=7)])
    assert inputs.shape == (7, SEQ_LEN)
    starts = inputs[:, 0].numpy()
    assert np.all(starts % SEQ_LEN == 0) and np.all(np.diff(starts) > 0)
    window_index = starts // SEQ_LEN
    # One window in each of the 7 equal slices of the split: the cap still spans the whole array.
    assert np.array_equal(window_index * 7 // n_windows, np.arange(7))
    assert len(eval_window_starts(len(tokens), SEQ_LEN, max_windows=1000)) == n_windows


def test_eval_windows_validate_eagerly():
    with pytest.raises(ValueError, match="needs"):
        eval_windows(np.arange(5), SEQ_LEN, batch_size=2)
    with pytest.raises(ValueError, match="max_windows"):
        eval_windows(np.arange(100), 4, batch_size=2, max_windows=0)


def assert_same_batch(first, second) -> None:
    """Two batches of the same structure (tensor, array, tuple or dataclass of them) hold equal values."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    elif isinstance(first, np.ndarray):
        np.testing.assert_array_equal(first, second)
    elif isinstance(first, (tuple, list)):
        assert type(first) is type(second) and len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            assert_same_batch(a, b)
    else:
        assert type(first) is type(second)
        for name in vars(first):
            assert_same_batch(getattr(first, name), getattr(second, name))


def concatenate(shares: list):
    """The rank shares of a batch joined along the batch axis (the inverse of rank_share over all ranks)."""
    first = shares[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(shares)
    if isinstance(first, np.ndarray):
        return np.concatenate(shares)
    if isinstance(first, tuple):
        joined = [concatenate(list(parts)) for parts in zip(*shares, strict=True)]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    return type(first)(**{name: concatenate([vars(share)[name] for share in shares]) for name in vars(first)})


def leading_size(batch) -> int:
    """The batch size of a tensor, an array, or a tuple/dataclass of them (its first member's)."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return len(batch)
    return leading_size(batch[0] if isinstance(batch, tuple) else next(iter(vars(batch).values())))


Pair = namedtuple("Pair", ["images", "labels"])

GLOBAL_BATCHES = {
    "tensor": lambda: torch.arange(24.0).reshape(12, 2),
    "array": lambda: np.arange(12) * 7,
    "tuple": lambda: (torch.arange(12), torch.arange(36).reshape(12, 3)),
    "namedtuple": lambda: Pair(torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
                               torch.arange(12)),
    "TaskBatch": lambda: Copying(length=3, n_symbols=4).sample(12, 5),
    "RegressionBatch": lambda: InContextRegression(d=3, n_context=5).sample(12, 5),
}


@pytest.mark.parametrize("kind", GLOBAL_BATCHES)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_shares_are_contiguous_and_concatenate_to_the_global_batch(kind, world_size) -> None:
    global_batch = GLOBAL_BATCHES[kind]()
    shares = [rank_share(global_batch, rank, world_size) for rank in range(world_size)]
    for share in shares:
        assert type(share) is type(global_batch) and leading_size(share) == 12 // world_size
    # Equal sizes whose rank-order concatenation is the global batch: share r is exactly rows [r·B/W, (r+1)·B/W).
    assert_same_batch(concatenate(shares), global_batch)


@pytest.mark.parametrize("kind", GLOBAL_BATCHES)
def test_a_world_of_one_gets_the_global_batch_itself(kind) -> None:
    global_batch = GLOBAL_BATCHES[kind]()
    assert rank_share(global_batch, 0, 1) is global_batch


def test_rank_share_refuses_uneven_division_bad_ranks_and_ragged_batches() -> None:
    batch = (torch.zeros(10, 3), torch.zeros(10))
    with pytest.raises(ValueError, match="batch_size 10 does not divide by world_size 4"):
        rank_share(batch, 0, 4)
    with pytest.raises(ValueError, match="rank must be an int in"):
        rank_share(batch, 2, 2)
    with pytest.raises(ValueError, match="rank must be an int in"):
        rank_share(batch, -1, 2)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        rank_share(batch, 0, 0)
    with pytest.raises(ValueError, match="same leading"):
        rank_share((torch.zeros(10), torch.zeros(8)), 0, 2)
    with pytest.raises(ValueError, match="same leading"):
        rank_share(torch.tensor(3.0), 0, 1)
    with pytest.raises(ValueError, match="needs a tensor"):
        rank_share({"inputs": torch.zeros(4)}, 0, 2)


def test_shard_batches_hands_each_rank_its_share_of_every_index() -> None:
    def global_batches(index: int) -> torch.Tensor:
        return torch.arange(8) + 100 * index

    assert shard_batches(global_batches, SimpleNamespace(rank=0, world_size=1)) is global_batches
    halves = [shard_batches(global_batches, SimpleNamespace(rank=rank, world_size=2)) for rank in (0, 1)]
    for index in (0, 3):
        assert torch.equal(halves[0](index), torch.arange(4) + 100 * index)
        assert torch.equal(halves[1](index), torch.arange(4, 8) + 100 * index)
    with pytest.raises(ValueError, match="rank must be an int in"):
        shard_batches(global_batches, SimpleNamespace(rank=2, world_size=2))  # refused before any batch is drawn
    uneven = shard_batches(global_batches, SimpleNamespace(rank=0, world_size=3))
    with pytest.raises(ValueError, match="does not divide by world_size 3"):
        uneven(0)


@pytest.mark.parametrize(("length", "world_size"), [(37, 1), (37, 3), (10, 2), (3, 4), (0, 2)])
def test_evaluation_batch_ranges_are_dealt_round_robin_and_partition_the_examples(length: int,
                                                                                  world_size: int) -> None:
    every = list(rank_batch_ranges(length, 5))
    assert [index for batch in every for index in batch] == list(range(length))
    assert all(len(batch) == 5 for batch in every[:-1])
    for rank in range(world_size):
        assert list(rank_batch_ranges(length, 5, rank, world_size)) == every[rank::world_size]
        assert list(rank_batch_ranges(np.int64(length), np.int64(5), np.int64(rank), world_size)) == \
            every[rank::world_size]


@pytest.mark.parametrize(("args", "match"), [((-1, 5), "length"), ((10, 0), "batch_size"), ((10, 5, 2, 2), "rank"),
                                             ((10, 5, 0, 0), "world_size"), ((10.0, 5), "length"),
                                             ((10, True), "batch_size")])
def test_evaluation_batch_ranges_refuse_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        list(rank_batch_ranges(*args))
