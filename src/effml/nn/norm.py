"""Root-mean-square layer normalisation (Zhang & Sennrich, "Root Mean Square Layer Normalization", arXiv 1910.07467).

    RMSNorm(x) = x / sqrt(mean(x², over the last dim) + eps) · weight

No mean subtraction and no bias. Uses the fused ``torch.nn.functional.rms_norm`` kernel where torch has it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm"]

_HAS_FUSED_RMS_NORM = hasattr(F, "rms_norm")


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-feature gain (initialised to 1).

    Args:
        dim: size D of the normalised (last) dimension.
        eps: added to the mean square before the square root.

    Shapes: input (..., D) -> output (..., D).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if _HAS_FUSED_RMS_NORM:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
