"""Timing that stays fair on a busy machine: contenders interleaved in balanced rounds, medians, paired ratios.

``time_interleaved``: every contender is first called ``warmup`` times, then ``repeats`` *rounds* are run; in each
round every contender is called once, in the order ``round_order`` gives (the rows of a balanced Latin square in
turn), and the wall time of each call is taken with ``time.perf_counter`` (``torch.cuda.synchronize`` before and after
on CUDA). A slow patch of the machine (another process, thermal throttling, a page-cache flush) then falls on all
contenders of a round alike instead of on whichever happened to be measured then; nobody is always first (cold caches)
or last, and nobody always runs right after the same neighbour (whose caches and clock state it would inherit: a plain
rotation of 3+ contenders keeps every neighbour fixed). ``paired_rate_ratios``
and ``paired_time_ratios`` turn two contenders' per-round times into per-round ratios (of rates, or of times), which
are far less noisy than a quotient of medians.

Used by ``effml bench`` (``effml.benchmarks``) and by recipes whose claims are about speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TimingResult", "paired_rate_ratios", "paired_time_ratios", "require_count", "round_order", "synchronize",
           "time_interleaved"]


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU), so that a wall-clock reading covers finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TimingResult:
    """Wall times of one contender. ``samples``: seconds of each timed call, in round order (warm-ups excluded);
    ``positions``: where in its round the contender ran (0 = first), one per sample."""

    name: str
    samples: tuple[float, ...]
    positions: tuple[int, ...]

    @property
    def median(self) -> float:
        """Median seconds per call over the rounds."""
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        return min(self.samples)

    @property
    def maximum(self) -> float:
        return max(self.samples)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (seconds)."""
        return {"median_s": self.median, "min_s": self.minimum, "max_s": self.maximum, "samples_s": list(self.samples)}


def require_count(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def round_order(count: int, round_index: int) -> list[int]:
    """The order in which round ``round_index`` (>= 0) calls ``count`` (>= 1) contenders, as contender indices.

    The rounds take in turn the rows of a Williams design (a Latin square balanced for neighbours): row r is
    ``(w + r) mod count`` for w = 0, 1, count-1, 2, count-2, ...; for an odd ``count`` each row is followed by its
    reverse. Over every cycle of rounds (``count`` rounds when ``count`` is even, ``2·count`` when odd) each contender
    runs in every position of a round equally often (once or twice), and right after each other contender equally
    often, so none always inherits the caches and clocks that the same neighbour left. Two contenders alternate who
    goes first. Deterministic: the same ``(count, round_index)`` always gives the same order.
    """
    require_count("count", count, 1)
    require_count("round_index", round_index, 0)
    base = [0] + [(j + 1) // 2 if j % 2 else count - j // 2 for j in range(1, count)]
    reverse = count % 2 == 1 and round_index % 2 == 1
    row = round_index // 2 if count % 2 else round_index
    order = [(w + row) % count for w in base]
    return order[::-1] if reverse else order


def time_interleaved(contenders: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                     device: str | torch.device = "cpu",
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, TimingResult]:
    """Time zero-argument callables against each other, interleaved in balanced rounds (see the module docstring).

    Args:
        contenders: name -> callable; each call is one unit of work (e.g. one training step).
        repeats: number of timed rounds (>= 1); every contender is timed once per round.
        warmup: untimed calls of every contender before the first round (also interleaved), >= 0.
        device: synchronised before and after each timed call (CUDA); ``"cpu"`` needs nothing.
        clock: seconds as a float; injectable for tests.

    Returns:
        name -> ``TimingResult``, in the order of ``contenders``. Round r calls them in the order ``round_order(n, r)``
        (n contenders; warm-ups in the given order), so that each runs first, and right after each other contender,
        equally often when ``repeats`` is a multiple of n (n even) or of 2n (n odd).
    """
    if not contenders:
        raise ValueError("time_interleaved needs at least one contender.")
    require_count("repeats", repeats, 1)
    require_count("warmup", warmup, 0)
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    positions: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(repeats):
        for position, index in enumerate(round_order(len(names), round_index)):
            name = names[index]
            synchronize(device)
            start = clock()
            contenders[name]()
            synchronize(device)
            samples[name].append(clock() - start)
            positions[name].append(position)
    return {name: TimingResult(name, tuple(samples[name]), tuple(positions[name])) for name in names}



def paired_time_ratios(numerator_times: Sequence[float], denominator_times: Sequence[float]) -> list[float]:
    """Round-by-round ratio of two contenders' times measured in the same interleaved rounds: for each round r,
    ``numerator_times[r] / denominator_times[r]`` (above 1: the numerator is slower). The inverse of
    ``paired_rate_ratios`` at equal work."""
    return paired_rate_ratios(denominator_times, numerator_times)


def paired_rate_ratios(numerator_times: Sequence[float], denominator_times: Sequence[float], *,
                       work_ratio: float = 1.0) -> list[float]:
    """Round-by-round ratio of two rates (work ÷ time) timed in the same interleaved rounds.

    For each round r: ``work_ratio · denominator_times[r] / numerator_times[r]``, i.e. (W_num / t_num) ÷
    (W_den / t_den) with ``work_ratio`` = W_num / W_den (1 when both do the same work). Because both calls of a
    round ran under the same machine conditions, these ratios are far less noisy than a quotient of two medians
    when the load on the machine changes during the run.
    """
    if len(numerator_times) != len(denominator_times) or not numerator_times:
        raise ValueError(f"paired ratios need equally many rounds on both sides, got {len(numerator_times)} and "
                         f"{len(denominator_times)}.")
    return [work_ratio * bottom / top for top, bottom in zip(numerator_times, denominator_times, strict=True)]
