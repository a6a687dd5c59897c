"""Rotary position embedding, RoPE (Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv 2104.09864, Eq. 34).

The features of a query or key at absolute position m are taken in adjacent pairs (x_{2i}, x_{2i+1}); pair i is
rotated by the angle m·θ_i with θ_i = base^(-2i/Dh):

    (x_{2i}, x_{2i+1}) -> (x_{2i} cos mθ_i − x_{2i+1} sin mθ_i,  x_{2i} sin mθ_i + x_{2i+1} cos mθ_i)

i.e. the pair, read as the complex number x_{2i} + i·x_{2i+1}, is multiplied by e^{i m θ_i}. Then
<rope(q, m), rope(k, n)> depends on m and n only through m − n. The rotation is computed as one complex
multiplication (one elementwise kernel forward and one backward, instead of the half-rotation's five), in float32 for
lower-precision inputs. cos and sin are precomputed once for every position up to ``max_seq_len`` as (non-persistent)
buffers, which stay float32 (or float64) when the module is cast to a lower precision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "apply_rotary"]

_COMPLEX_VIEWABLE = (torch.float32, torch.float64)


def apply_rotary(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate the adjacent feature pairs of ``x`` (..., Dh) by the unit complex numbers ``rotation``, which must
    broadcast against (..., Dh/2) — e.g. (T, 1, Dh/2) for x of shape (B, T, H, Dh). Returns x's shape and dtype."""
    dtype = x.dtype
    if dtype not in _COMPLEX_VIEWABLE:
        x = x.float()
    pairs = x.unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # The same product in real arithmetic: the stride checks below would break the graph, and inductor fuses
        # these elementwise ops anyway.
        real, imag = pairs.unbind(-1)
        cos, sin = rotation.real, rotation.imag
        return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).to(dtype)
    # view_as_complex needs unit stride on the pair and even strides/offset elsewhere; fused q/k/v views satisfy it.
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
    return rotated.to(dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed rotary tables for positions [0, max_seq_len).

    Args:
        head_dim: per-head feature size Dh (must be even).
        max_seq_len: number of positions tabulated.
        base: the frequency base (10000 in RoFormer).

    Buffers ``cos`` and ``sin``: (max_seq_len, Dh/2). ``forward(offset, length)`` returns the complex rotations
    e^{i m θ} (length, Dh/2) for absolute positions m in [offset, offset + length), for ``apply_rotary``.
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head dimension, got head_dim={head_dim}; "
                             "choose d_model and n_heads so that d_model // n_heads is even.")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.base = base
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # float64 angles: position × frequency loses precision in float32 at long contexts.
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
        return angles.cos().float().to(device), angles.sin().float().to(device)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Casting the model to bf16/fp16 must not round the tables (angles would lose ~3 digits): rebuild them in
        # float32 on the new device instead.
        super()._apply(fn, recurse)
        if self.cos.dtype not in _COMPLEX_VIEWABLE:
            self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(self, offset: int, length: int) -> Tensor:
        end = offset + length
        if offset < 0 or end > self.max_seq_len:
            raise ValueError(f"rotary positions [{offset}, {end}) fall outside the tabulated range "
                             f"[0, {self.max_seq_len}); raise max_seq_len in the model config or use shorter inputs.")
        return torch.complex(self.cos[offset:end], self.sin[offset:end])

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, base={self.base}"
