"""Synthetic tasks: determinism, answer masks, oracle and chance-level scores, MQAR structure, the registry."""

from __future__ import annotations

import math

import pytest
import torch

from effml.data.tasks import MQAR, TASKS, Copying, TaskBatch, TokenTask, build_task

COPYING = Copying(length=8, n_symbols=6)
RECALL = MQAR(n_pairs=6, n_queries=4, n_keys=12, n_values=10)
ALL_TASKS = [COPYING, RECALL]


def copying_oracle(task: Copying, inputs: torch.Tensor) -> torch.Tensor:
    """After the separator the next token is the one ``length`` positions earlier in the input."""
    predictions = torch.zeros_like(inputs)
    predictions[:, task.length:] = inputs[:, :task.length]
    return predictions


def recall_oracle(task: MQAR, inputs: torch.Tensor) -> torch.Tensor:
    """Read the key → value pairs from the context; after any later key, predict its value."""
    predictions = torch.zeros_like(inputs)
    for row in range(inputs.shape[0]):
        context = inputs[row, :2 * task.n_pairs].tolist()
        memory = dict(zip(context[0::2], context[1::2], strict=True))
        for position in range(2 * task.n_pairs, inputs.shape[1]):
            token = int(inputs[row, position])
            if token in memory:
                predictions[row, position] = memory[token]
    return predictions


def oracle_for(task: TokenTask):
    return (lambda x: copying_oracle(task, x)) if isinstance(task, Copying) else (lambda x: recall_oracle(task, x))


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_sample_is_a_pure_function_of_seed(task: TokenTask):
    first, again, other = task.sample(16, seed=5), task.sample(16, seed=5), task.sample(16, seed=6)
    assert isinstance(first, TaskBatch) and len(first) == 16
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.loss_mask, again.loss_mask)
    assert not torch.equal(first.inputs, other.inputs)
    assert torch.equal(Copying(length=8, n_symbols=6).sample(4, 1).inputs, COPYING.sample(4, 1).inputs)


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_batch_shapes_ids_and_teacher_forcing(task: TokenTask):
    batch = task.sample(32, seed=0)
    assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (32, task.seq_len)
    assert batch.inputs.dtype == torch.int64 and batch.loss_mask.dtype == torch.bool
    assert int(batch.inputs.min()) >= 0 and int(batch.targets.max()) < task.vocab_size
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


def test_copying_mask_covers_exactly_the_copy():
    batch = COPYING.sample(64, seed=1)
    separator_at = (batch.inputs == COPYING.separator).int().argmax(dim=1)
    assert torch.all(separator_at == COPYING.length)
    assert torch.all((batch.inputs == COPYING.separator).sum(dim=1) == 1)
    positions = torch.arange(COPYING.seq_len)
    assert torch.equal(batch.loss_mask, positions[None, :] >= separator_at[:, None])
    assert COPYING.vocab_size == COPYING.n_symbols + 1


def test_mqar_keys_distinct_queries_seen_and_mask_on_query_keys():
    batch = RECALL.sample(64, seed=2)
    n_context = 2 * RECALL.n_pairs
    for row in range(64):
        sequence = torch.cat([batch.inputs[row], batch.targets[row, -1:]]).tolist()
        keys, values = sequence[0:n_context:2], sequence[1:n_context:2]
        query_keys, answers = sequence[n_context::2], sequence[n_context + 1::2]
        assert len(set(keys)) == RECALL.n_pairs and all(k < RECALL.n_keys for k in keys)
        assert all(RECALL.n_keys <= v < RECALL.vocab_size for v in values)
        assert len(query_keys) == len(set(query_keys)) == RECALL.n_queries and set(query_keys) <= set(keys)
        assert answers == [values[keys.index(q)] for q in query_keys]
    positions = torch.arange(RECALL.seq_len)
    is_query_key = (positions[None, :] >= n_context) & (batch.inputs < RECALL.n_keys)
    assert torch.equal(batch.loss_mask, is_query_key)


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_oracle_scores_one(task: TokenTask):
    scores = task.evaluate(oracle_for(task), n=100, seed=0, batch_size=32)
    assert scores == {"token_accuracy": 1.0, "sequence_accuracy": 1.0}


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_one_wrong_answer_per_sequence_breaks_sequence_accuracy_only_partly(task: TokenTask):
    oracle = oracle_for(task)

    def one_mistake(inputs: torch.Tensor) -> torch.Tensor:
        predictions = oracle(inputs).clone()
        last = task.seq_len - 1  # the last position is an answer in both tasks
        predictions[:, last] = (predictions[:, last] + 1) % task.vocab_size
        return predictions

    answers_per_sequence = int(task.sample(1, 0).loss_mask.sum())
    scores = task.evaluate(one_mistake, n=50, seed=1, batch_size=16)
    assert scores["sequence_accuracy"] == 0.0
    assert scores["token_accuracy"] == pytest.approx(1 - 1 / answers_per_sequence)


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_random_predictor_scores_chance(task: TokenTask):
    generator = torch.Generator().manual_seed(0)

    def uniform(inputs: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, task.vocab_size, inputs.shape, generator=generator)

    n = 2000
    scores = task.evaluate(uniform, n=n, seed=3, batch_size=250)
    chance = 1 / task.vocab_size
    answers = n * int(task.sample(1, 0).loss_mask.sum())
    assert abs(scores["token_accuracy"] - chance) < 5 * math.sqrt(chance * (1 - chance) / answers)
    assert scores["sequence_accuracy"] < 0.01


def test_evaluate_sees_exactly_n_examples_and_is_deterministic():
    seen = []

    def recording(inputs: torch.Tensor) -> torch.Tensor:
        seen.append(inputs.clone())
        return torch.zeros_like(inputs)

    first = COPYING.evaluate(recording, n=70, seed=4, batch_size=32)
    assert [len(x) for x in seen] == [32, 32, 6]
    first_inputs = torch.cat(seen)
    seen.clear()
    assert COPYING.evaluate(recording, n=70, seed=4, batch_size=32) == first
    assert torch.equal(torch.cat(seen), first_inputs)
    with pytest.raises(ValueError, match="shape"):
        COPYING.evaluate(lambda x: torch.zeros(len(x), 3, dtype=torch.long), n=4, seed=0)


def test_registry_and_build_task_errors():
    assert {"copying", "mqar"} <= set(TASKS)
    task = build_task("mqar", n_pairs=4, n_queries=2)
    assert isinstance(task, MQAR) and task.params() == {"n_pairs": 4, "n_queries": 2, "n_keys": 64, "n_values": 64}
    with pytest.raises(ValueError, match="copying"):
        build_task("no-such-task")
    with pytest.raises(ValueError, match="valid parameters"):
        build_task("copying", lenght=4)
    with pytest.raises(ValueError, match="n_queries"):
        build_task("mqar", n_pairs=2, n_queries=3)
    with pytest.raises(ValueError, match="n_keys"):
        build_task("mqar", n_pairs=10, n_queries=2, n_keys=5)
    with pytest.raises(ValueError, match="length"):
        build_task("copying", length=0)


@pytest.mark.parametrize("world_size", [2, 3, 6])  # 6 ranks, 5 batches: one rank scores nothing
def test_ranks_split_an_evaluation_and_their_sums_give_the_one_process_metrics(world_size) -> None:
    task = Copying(length=6, n_symbols=5)

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        """Copies odd symbols right and answers 0 for even ones: some answers right, some wrong."""
        copied = torch.roll(inputs, task.length, dims=1)
        return copied * (copied % 2)

    one = task.evaluate(predict, n=37, seed=4, batch_size=8)
    shards = [task.evaluation_sums(predict, n=37, seed=4, batch_size=8, rank=rank, world_size=world_size)
              for rank in range(world_size)]
    assert task.metrics_from_sums(shards, n=37) == one
    assert sum(shard["answer_tokens"] for shard in shards) == 37 * task.length  # each example scored once
    assert 0 < one["token_accuracy"] < 1 and 0 < one["sequence_accuracy"] < 1
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        task.evaluation_sums(predict, n=37, seed=4, rank=2, world_size=2)
