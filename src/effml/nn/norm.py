"""Root-mean-square layer normalisation (Zhang & Sennrich, "Root Mean Square Layer Normalization", arXiv 1910.07467).

    RMSNorm(x) = x / sqrt(mean(x², over the last dim) + eps) · weight

No mean subtraction and no bias. Forward uses ``torch.nn.functional.rms_norm`` where torch has it. When gradients
are needed on CPU in float32/float64, a hand-written backward is used instead: torch's CPU ``rms_norm`` is a
composite of elementwise ops whose autograd backward makes about twice as many passes over the activations. With
x̂ = x·r, r = (mean(x²) + eps)^(-1/2) and upstream gradient g:

    dL/dx = r · (h − x̂ · mean(h ⊙ x̂)),  h = g ⊙ weight;     dL/dweight = Σ_tokens g ⊙ x̂
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["RMSNorm"]

_HAS_FUSED_RMS_NORM = hasattr(F, "rms_norm")
_HAND_BACKWARD_DTYPES = (torch.float32, torch.float64)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension with the closed-form backward of the module docstring."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        normalized = x * inv_rms
        ctx.save_for_backward(normalized, inv_rms, weight)
        return normalized * weight

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor | None, None]:
        normalized, inv_rms, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_normalized = grad_out * weight
        projection = torch.linalg.vecdot(grad_normalized, normalized).unsqueeze(-1)
        grad_x = torch.addcmul(grad_normalized, normalized, projection, value=-1.0 / normalized.shape[-1])
        grad_x.mul_(inv_rms)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            grad_weight = (grad_out * normalized).flatten(0, -2).sum(0)
        return grad_x, grad_weight, None


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The defining formula with plain autograd ops; x (..., D), weight (D,) -> (..., D)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-feature gain (initialised to 1).

    Args:
        dim: size D of the normalised (last) dimension.
        eps: added to the mean square before the square root.

    Shapes: input (..., D) -> output (..., D).

    On the CPU in float32/float64 the backward is the hand-written closed form (``_RMSNormFunction``), which is
    once-differentiable: for second derivatives (gradient penalties, Hessian-vector products, ``torch.func``) set
    ``hand_backward = False`` on the module (or the class), which uses autograd through the formula instead.
    """

    hand_backward: bool = True

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if (self.hand_backward and x.device.type == "cpu" and x.dtype in _HAND_BACKWARD_DTYPES
                and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        if _HAS_FUSED_RMS_NORM:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
