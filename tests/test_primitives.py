"""Reasoning primitives: answers checked by an independent solver, fixed shapes, determinism, exact-match scoring."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from effml.data.tasks import Arithmetic, InductionCopying, VariableAssignment, build_task

TASKS = [InductionCopying(), InductionCopying(length=20, shots=0), InductionCopying(length=8, key_length=1),
         InductionCopying(length=10, key_length=3, shots=1), VariableAssignment(depth=0),
         VariableAssignment(depth=1), VariableAssignment(depth=2, n_statements=6, shots=1), Arithmetic(),
         Arithmetic(n_vars=5, shots=2)]


def texts(task, n: int = 64, seed: int = 0) -> list[str]:
    batch = task.sample(n, seed)
    full = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    return [bytes(row.tolist()).decode("ascii") for row in full]


def solve(task, query: str) -> tuple[str, int]:
    """The answer to the last example, computed from its text alone, and the number of variable hops used."""
    if isinstance(task, InductionCopying):
        context, key = re.fullmatch(r"([a-z]+)\|([a-z]+)=", query).groups()
        assert len(key) == task.key_length
        assert len(set(context)) == len(context)  # distinct letters: the key occurs once
        return context[context.index(key) + len(key)], 0
    statements, question = query.split(";")
    values = dict(s.split("=") for s in statements.split(","))
    if isinstance(task, VariableAssignment):
        name, hops = question[0], 0
        while not values[name].isdigit():
            name, hops = values[name], hops + 1
        return values[name], hops
    x, op, y = question[0], question[1], question[2]
    result = int(values[x]) + int(values[y]) if op == "+" else int(values[x]) - int(values[y])
    return str(result), 0


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.name}-{t.params()}")
def test_every_answer_is_what_an_independent_solver_finds(task) -> None:
    for text in texts(task):
        examples = text.split("\n")
        assert len(examples) == task.shots + 1
        for example in examples:
            assert len(example) == task.example_length
            answer, hops = solve(task, example[:-1])
            assert example[-1] == answer
            if isinstance(task, VariableAssignment):
                assert hops == task.depth
            if isinstance(task, Arithmetic):
                assert len(answer) == 1 and answer.isdigit()


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.name}-{t.params()}")
def test_shapes_mask_and_determinism(task) -> None:
    batch = task.sample(8, 3)
    assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (8, task.seq_len)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert batch.loss_mask[:, -1].all() and batch.loss_mask.sum() == 8  # only the query's answer is scored
    assert int(batch.inputs.max()) < task.vocab_size == 256
    again = task.sample(8, 3)
    assert torch.equal(batch.inputs, again.inputs) and torch.equal(batch.targets, again.targets)
    assert not torch.equal(batch.inputs, task.sample(8, 4).inputs)


def test_exact_match_evaluation_scores_an_oracle_1_and_a_constant_guess_at_chance() -> None:
    task = VariableAssignment(depth=2)

    def oracle(inputs: torch.Tensor) -> torch.Tensor:  # reads the answer with the independent solver
        predictions = torch.zeros_like(inputs)
        for row, tokens in enumerate(inputs):
            query = bytes(tokens.tolist()).decode("ascii").split("\n")[-1]
            predictions[row, -1] = ord(solve(task, query)[0])
        return predictions

    assert task.evaluate(oracle, 100, seed=7, batch_size=32)["sequence_accuracy"] == 1.0
    constant = task.evaluate(lambda x: torch.full_like(x, ord("3")), 400, seed=7)["sequence_accuracy"]
    assert 0.04 < constant < 0.18  # one digit in ten


def test_registry_and_bad_parameters() -> None:
    assert build_task("variable-assignment", depth=2) == VariableAssignment(depth=2)
    assert isinstance(build_task("arithmetic"), Arithmetic) and isinstance(build_task("induction"), InductionCopying)
    with pytest.raises(ValueError, match="needs 3 statements"):
        VariableAssignment(depth=2, n_statements=2)
    with pytest.raises(ValueError, match="distinct letters"):
        InductionCopying(length=27)
    with pytest.raises(ValueError, match="length"):
        InductionCopying(length=3, key_length=3)  # no letter follows a key that fills the context
    with pytest.raises(ValueError, match="key_length"):
        InductionCopying(key_length=0)
    with pytest.raises(ValueError, match="depth"):
        VariableAssignment(depth=-1)
    with pytest.raises(ValueError, match="n_vars"):
        Arithmetic(n_vars=1)


def test_arithmetic_uses_both_operations_and_the_full_digit_range() -> None:
    queries = [t.split("\n")[-1] for t in texts(Arithmetic(shots=0), n=400)]
    assert {q.split(";")[1][1] for q in queries} == {"+", "-"}
    assert {q[-1] for q in queries} == set("0123456789")
    assert np.mean([q.split(";")[1][1] == "+" for q in queries]) == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.name}-{t.params()}")
def test_every_answer_mask_marks_each_examples_answer_of_the_same_sequences(task) -> None:
    query_only, every = task.sample(16, 5), task.sample_every_answer(16, 5)
    assert torch.equal(query_only.inputs, every.inputs) and torch.equal(query_only.targets, every.targets)
    assert torch.equal(every.loss_mask & query_only.loss_mask, query_only.loss_mask)  # the query's answer too
    assert (every.loss_mask.sum(dim=1) == task.shots + 1).all()
    for row, text in enumerate(texts(task, n=16, seed=5)):
        answers = [example[-1] for example in text.split("\n")]  # solver-checked above: the last character
        marked = every.targets[row][every.loss_mask[row]]
        assert bytes(marked.tolist()).decode("ascii") == "".join(answers)


def test_chance_accuracy_is_a_uniform_guess_among_the_prompts_candidates() -> None:
    assert InductionCopying(length=12).chance_accuracy == pytest.approx(1 / 10)
    assert InductionCopying(length=8, key_length=1).chance_accuracy == pytest.approx(1 / 7)
    assert VariableAssignment(depth=1, n_statements=4).chance_accuracy == pytest.approx(1 / 3)
    assert Arithmetic().chance_accuracy == pytest.approx(0.1)
    task = VariableAssignment(depth=2, n_statements=5)

    def guess(inputs: torch.Tensor) -> torch.Tensor:  # a uniformly drawn digit among the statements' digits
        generator = torch.Generator().manual_seed(0)
        predictions = torch.zeros_like(inputs)
        for row, tokens in enumerate(inputs):
            query = bytes(tokens.tolist()).decode("ascii").split("\n")[-1]
            digits = [s[-1] for s in query.split(";")[0].split(",") if s[-1].isdigit()]
            predictions[row, -1] = ord(digits[int(torch.randint(len(digits), (1,), generator=generator))])
        return predictions

    accuracy = task.evaluate(guess, 1000, seed=3)["sequence_accuracy"]
    m = 3  # digit statements; the other two digits coincide with the answer with probability 1/10 each
    assert task.chance_accuracy == pytest.approx(1 / m)
    assert accuracy == pytest.approx((1 + (m - 1) / 10) / m, abs=0.04)
