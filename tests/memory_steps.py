"""Step factories for the CPU peak-memory tests (imported by name in fresh interpreters)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def allocate(mib: int) -> Callable[[], None]:
    """A step that holds ``mib`` MiB of float32 (touched, so resident) until it returns."""
    def step() -> None:
        block = torch.ones(mib * 2**18)
        block.add_(1.0)
    return step


def first_use_of_many_kernels() -> Callable[[], None]:
    """A step that runs kernels this process has not run before on tiny tensors: it reads torch's code in (file
    pages) while allocating almost nothing."""
    def step() -> None:
        x = torch.randn(8, 3, 16, 16)
        conv = torch.nn.functional.conv2d(x, torch.randn(4, 3, 3, 3), padding=1)
        torch.linalg.svd(torch.randn(6, 6))
        torch.fft.rfft(conv.flatten()).abs().sum()
        torch.nn.functional.layer_norm(conv, conv.shape[-1:]).softmax(-1).cumsum(0).sort(-1)
    return step
