"""The copying task: reproduce a random token string after a separator.

Used by mimetic initialisation for SSMs (Trockman et al., "Mimetic Initialization Helps State Space Models Learn
to Recall", arXiv 2410.11135) and by copying studies of recurrent models (Jelassi et al., "Repeat After Me",
arXiv 2402.01032). An example is ``x_1 … x_L  SEP  x_1 … x_L`` with ``x_i`` uniform over ``n_symbols`` symbols
(ids ``0 .. n_symbols - 1``) and ``SEP = n_symbols``; the model reads the first ``2L`` tokens and is scored on
the ``L`` predictions of the copy (input positions ``L .. 2L - 1``, i.e. from the separator on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from effml.data.tasks.base import TokenTask, check_int_param, register_task

__all__ = ["Copying"]


@register_task
@dataclass(frozen=True)
class Copying(TokenTask):
    """Copy a string of ``length`` symbols from ``n_symbols`` after a separator.

    ``vocab_size = n_symbols + 1`` (the separator), ``seq_len = 2 * length``.
    """

    name: ClassVar[str] = "copying"
    length: int = 16
    n_symbols: int = 16

    def __post_init__(self) -> None:
        check_int_param(self.name, "length", self.length)
        check_int_param(self.name, "n_symbols", self.n_symbols, minimum=2)

    @property
    def separator(self) -> int:
        """Id of the separator token."""
        return self.n_symbols

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    def generate(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequences ``(B, 2L + 1)`` = string, separator, string; answer mask ``(B, 2L)`` True on ``[L, 2L)``."""
        string = rng.integers(0, self.n_symbols, size=(batch_size, self.length), dtype=np.int64)
        separator = np.full((batch_size, 1), self.separator, dtype=np.int64)
        sequences = np.concatenate([string, separator, string], axis=1)
        answer_mask = np.zeros((batch_size, self.seq_len), dtype=bool)
        answer_mask[:, self.length:] = True
        return sequences, answer_mask
