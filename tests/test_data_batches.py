"""Batch sources: random training windows (determinism, shift, rank sharding) and fixed evaluation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effml.data import WindowBatches, eval_windows
from effml.data.batches import eval_window_starts

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
