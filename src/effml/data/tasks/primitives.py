"""Reasoning primitives: the synthetic probes of MIDAS, as byte-level few-shot prompts.

Saunshi et al., "On the Inductive Bias of Stacking Towards Improving Reasoning" (arXiv 2409.19044) probe a language
model with small procedurally generated tasks — induction copying, variable assignment at depth 0/1/2 and
pre-school math — evaluated few-shot and after a short fine-tune, by exact match. Here each example is a short
ASCII string, tokenised as bytes (ids 0..255, the vocabulary of effml's byte-level LMs), so a language model
pretrained on text can be probed with no new tokens:

* ``induction``: ``xkqbmzt|kq=b`` — distinct random letters, then a run of ``key_length`` of them (here a bigram);
  answer: the letter that followed that run.
* ``variable-assignment`` (``depth`` d): ``a=3,e=c,c=7,b=1;e=`` — ``n_statements`` assignments in random order;
  the queried variable reaches a digit through a chain of d variable-to-variable assignments (d = 0: directly);
  the other statements assign digits to other variables (distractors). Answer: the digit.
* ``arithmetic``: ``a=3,b=4,c=1;a+b=`` — digit-valued variables, then a sum or difference of two of them whose
  result is one digit. Answer: the digit.

A sequence holds ``shots`` solved examples and one query, separated by newlines; every example of a task has the
same length, so sequences have a fixed length. Only the query's answer byte is scored (``answer_mask``), so
``TokenTask.evaluate``'s ``sequence_accuracy`` is the exact-match accuracy of greedy decoding. For fine-tuning,
``sample_every_answer`` marks the answer of every example in the sequence (``shots + 1`` targets per sequence
instead of one), and ``chance_accuracy`` is the exact match of guessing among the answer candidates the prompt
shows — the level a model reaches without using the prompt's structure.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from effml.data.tasks.base import TaskBatch, TokenTask, check_int_param, register_task

__all__ = ["PrimitiveTask", "InductionCopying", "VariableAssignment", "Arithmetic"]

_LETTERS = string.ascii_lowercase
_SEPARATOR = "\n"


class PrimitiveTask(TokenTask):
    """Base of the byte-level primitives: ``shots`` solved examples + one query; subclasses define `example`."""

    shots: int

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def example_length(self) -> int:
        """Characters in one example, prompt plus answer (the same for every example of the task)."""
        raise NotImplementedError

    def example(self, rng: np.random.Generator) -> tuple[str, str]:
        """One ``(prompt, answer)`` pair (ASCII; ``len(prompt + answer) == example_length``)."""
        raise NotImplementedError

    @property
    def chance_accuracy(self) -> float:
        """Exact match of a uniform guess among the answer candidates that every prompt shows."""
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        return (self.shots + 1) * (self.example_length + 1) - 2

    def text(self, rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
        """One full sequence as text and the ``[start, end)`` character span of every example's answer."""
        examples = [self.example(rng) for _ in range(self.shots + 1)]
        spans, offset = [], 0
        for prompt, answer in examples:
            spans.append((offset + len(prompt), offset + len(prompt) + len(answer)))
            offset += len(prompt) + len(answer) + len(_SEPARATOR)
        return _SEPARATOR.join(prompt + answer for prompt, answer in examples), spans

    def _generate(self, rng: np.random.Generator, batch_size: int,
                  every_answer: bool) -> tuple[np.ndarray, np.ndarray]:
        sequences = np.zeros((batch_size, self.seq_len + 1), dtype=np.int64)
        answer_mask = np.zeros((batch_size, self.seq_len), dtype=bool)
        for row in range(batch_size):
            text, spans = self.text(rng)
            encoded = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
            if len(encoded) != self.seq_len + 1:
                raise AssertionError(f"{self.name}: generated {len(encoded)} bytes, expected {self.seq_len + 1}.")
            sequences[row] = encoded
            for start, end in spans if every_answer else spans[-1:]:
                answer_mask[row, start - 1:end - 1] = True  # input t predicts byte t + 1
        return sequences, answer_mask

    def generate(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequences ``(B, seq_len + 1)`` of bytes; the mask is True at the inputs that predict the query's answer."""
        return self._generate(rng, batch_size, every_answer=False)

    def sample_every_answer(self, batch_size: int, seed: int) -> TaskBatch:
        """Like ``sample`` (the same sequences for the same seed), but ``loss_mask`` marks every example's answer,
        the solved shots' as well as the query's: ``shots + 1`` supervised answers per sequence for fine-tuning."""
        query_only = self.sample(batch_size, seed)
        _, every = self._generate(np.random.default_rng(int(seed)), int(batch_size), every_answer=True)
        return TaskBatch(query_only.inputs, query_only.targets, torch.from_numpy(every))


def _letters(rng: np.random.Generator, count: int) -> list[str]:
    return [_LETTERS[i] for i in rng.permutation(len(_LETTERS))[:count]]


@register_task
@dataclass(frozen=True)
class InductionCopying(PrimitiveTask):
    """``length`` distinct letters, ``|``, a run of ``key_length`` consecutive letters from them, ``=``; answer:
    the letter that followed that run in the context (``key_length`` 1: the classic induction pattern …AB…A → B)."""

    name: ClassVar[str] = "induction"
    length: int = 12
    key_length: int = 2
    shots: int = 3

    def __post_init__(self) -> None:
        check_int_param(self.name, "key_length", self.key_length)
        check_int_param(self.name, "length", self.length, minimum=self.key_length + 1)
        check_int_param(self.name, "shots", self.shots, minimum=0)
        if self.length > len(_LETTERS):
            raise ValueError(f"Task 'induction': length={self.length} distinct letters do not exist; use ≤ 26.")

    @property
    def example_length(self) -> int:
        return self.length + self.key_length + 3

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / (self.length - self.key_length)  # the letters that can follow a key inside the context

    def example(self, rng: np.random.Generator) -> tuple[str, str]:
        context = _letters(rng, self.length)
        start = int(rng.integers(0, self.length - self.key_length))  # the key is followed by a context letter
        end = start + self.key_length
        return "".join(context) + "|" + "".join(context[start:end]) + "=", context[end]


@register_task
@dataclass(frozen=True)
class VariableAssignment(PrimitiveTask):
    """Assignments ``v=digit`` / ``v=w`` in random order, then ``q=``; ``q`` reaches its digit in ``depth`` hops."""

    name: ClassVar[str] = "variable-assignment"
    depth: int = 1
    n_statements: int = 4
    shots: int = 3

    def __post_init__(self) -> None:
        check_int_param(self.name, "depth", self.depth, minimum=0)
        check_int_param(self.name, "n_statements", self.n_statements)
        check_int_param(self.name, "shots", self.shots, minimum=0)
        if self.n_statements < self.depth + 1:
            raise ValueError(f"Task 'variable-assignment': a chain of depth {self.depth} needs {self.depth + 1} "
                             f"statements, but n_statements={self.n_statements}; raise n_statements.")
        if self.n_statements > len(_LETTERS):
            raise ValueError(f"Task 'variable-assignment': n_statements={self.n_statements} needs as many distinct "
                             "single-letter variables; use ≤ 26.")

    @property
    def example_length(self) -> int:
        return 4 * self.n_statements + 3

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / (self.n_statements - self.depth)  # one of the digit statements (a bit more if digits repeat)

    def example(self, rng: np.random.Generator) -> tuple[str, str]:
        names = _letters(rng, self.n_statements)
        digits = [str(d) for d in rng.integers(0, 10, size=self.n_statements)]
        chain = names[: self.depth + 1]  # chain[0] is queried, chain[-1] holds the digit
        statements = [f"{chain[i]}={chain[i + 1]}" for i in range(self.depth)]
        statements.append(f"{chain[-1]}={digits[0]}")
        distractors = zip(names[self.depth + 1:], digits[1:self.n_statements - self.depth], strict=True)
        statements += [f"{name}={digit}" for name, digit in distractors]
        order = rng.permutation(len(statements))
        return ",".join(statements[i] for i in order) + f";{chain[0]}=", digits[0]


@register_task
@dataclass(frozen=True)
class Arithmetic(PrimitiveTask):
    """``n_vars`` digit-valued variables, then ``x+y=`` or ``x-y=`` of two of them; the result is one digit."""

    name: ClassVar[str] = "arithmetic"
    n_vars: int = 3
    shots: int = 3

    def __post_init__(self) -> None:
        check_int_param(self.name, "n_vars", self.n_vars, minimum=2)
        check_int_param(self.name, "shots", self.shots, minimum=0)
        if self.n_vars > len(_LETTERS):
            raise ValueError(f"Task 'arithmetic': n_vars={self.n_vars} needs as many distinct letters; use ≤ 26.")

    @property
    def example_length(self) -> int:
        return 4 * self.n_vars + 5

    @property
    def chance_accuracy(self) -> float:
        return 0.1  # the result is a uniformly drawn digit

    def example(self, rng: np.random.Generator) -> tuple[str, str]:
        names = _letters(rng, self.n_vars)
        plus = bool(rng.integers(0, 2))
        result = int(rng.integers(0, 10))
        if plus:  # x + y = result with x, y ≥ 0
            x = int(rng.integers(0, result + 1))
            y = result - x
        else:  # x - y = result with x ≤ 9
            y = int(rng.integers(0, 10 - result))
            x = result + y
        values = [x, y] + [int(v) for v in rng.integers(0, 10, size=self.n_vars - 2)]
        order = rng.permutation(self.n_vars)
        statements = ",".join(f"{names[i]}={values[i]}" for i in order)
        return f"{statements};{names[0]}{'+' if plus else '-'}{names[1]}=", str(result)
