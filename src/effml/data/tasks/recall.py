"""Multi-query associative recall (MQAR), the recall benchmark of Zoology (Arora et al., "Zoology: Measuring and
Improving Recall in Efficient Language Models", arXiv 2312.04927).

An example lists ``n_pairs`` key–value pairs ``k_1 v_1 … k_P v_P`` with distinct keys, then ``n_queries`` queries
``q_1 a_1 … q_Q a_Q``: each ``q_j`` is a key from the context (distinct queries, so ``n_queries <= n_pairs``) and
``a_j`` its value. Teacher forcing shows the answers; the score counts only the predictions made at the query
keys, i.e. the value that follows each ``q_j``. Keys use ids ``0 .. n_keys - 1`` and values ids
``n_keys .. n_keys + n_values - 1`` (disjoint ranges, so the role of a token is visible from its id); values are
drawn independently and may repeat. Total length ``2 (n_pairs + n_queries)`` tokens, ``seq_len`` one less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from effml.data.tasks.base import TokenTask, check_int_param, register_task

__all__ = ["MQAR"]


def _distinct_choices(rng: np.random.Generator, batch_size: int, population: int, count: int) -> np.ndarray:
    """Per row, ``count`` distinct integers from ``[0, population)`` in random order: int64 ``(batch_size, count)``."""
    return np.argsort(rng.random((batch_size, population)), axis=1)[:, :count].astype(np.int64)


@register_task
@dataclass(frozen=True)
class MQAR(TokenTask):
    """Multi-query associative recall; ``vocab_size = n_keys + n_values``, ``seq_len = 2 (n_pairs + n_queries) - 1``."""

    name: ClassVar[str] = "mqar"
    n_pairs: int = 8
    n_queries: int = 8
    n_keys: int = 64
    n_values: int = 64

    def __post_init__(self) -> None:
        check_int_param(self.name, "n_pairs", self.n_pairs)
        check_int_param(self.name, "n_queries", self.n_queries)
        check_int_param(self.name, "n_keys", self.n_keys)
        check_int_param(self.name, "n_values", self.n_values, minimum=2)
        if self.n_pairs > self.n_keys:
            raise ValueError(f"Task 'mqar': n_pairs={self.n_pairs} distinct keys cannot be drawn from n_keys="
                             f"{self.n_keys}; raise n_keys or lower n_pairs.")
        if self.n_queries > self.n_pairs:
            raise ValueError(f"Task 'mqar': queries are distinct context keys, so n_queries={self.n_queries} must "
                             f"not exceed n_pairs={self.n_pairs}.")

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values

    @property
    def seq_len(self) -> int:
        return 2 * (self.n_pairs + self.n_queries) - 1

    def generate(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequences ``(B, 2P + 2Q)``; answer mask ``(B, 2P + 2Q - 1)`` True at the query keys ``2P, 2P+2, …``."""
        keys = _distinct_choices(rng, batch_size, self.n_keys, self.n_pairs)
        values = self.n_keys + rng.integers(0, self.n_values, size=(batch_size, self.n_pairs), dtype=np.int64)
        asked = _distinct_choices(rng, batch_size, self.n_pairs, self.n_queries)
        context = np.stack([keys, values], axis=2).reshape(batch_size, 2 * self.n_pairs)
        queries = np.stack([np.take_along_axis(keys, asked, axis=1), np.take_along_axis(values, asked, axis=1)],
                           axis=2).reshape(batch_size, 2 * self.n_queries)
        answer_mask = np.zeros((batch_size, self.seq_len), dtype=bool)
        answer_mask[:, 2 * self.n_pairs::2] = True
        return np.concatenate([context, queries], axis=1), answer_mask
