"""Selective-scan kernels in plain PyTorch: a chunked scan for training, a sequential reference, and the one-step
recurrence used for decoding — for Mamba-1 (decay per channel and state index) and Mamba-2 (one scalar decay per head).

Papers: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752), eq. (2a)/(2b)
with the zero-order-hold Ā = exp(ΔA) and the simplified B̄ = ΔB of the reference implementation (Algorithm 2);
Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality"
(arXiv 2405.21060), §6 (the chunked SSD algorithm). For every channel c and state index n:

    h_t[c, n] = exp(Δ_t[c] · A[c, n]) · h_{t-1}[c, n] + Δ_t[c] · B_t[n] · x_t[c]          (recurrence)
    y_t[c]    = Σ_n C_t[n] · h_t[c, n] + D[c] · x_t[c]                                      (read-out)

Chunked evaluation (both variants): split the T steps into chunks of Q. With the within-chunk cumulative log-decay
ℓ_t = Σ_{k ≤ t} Δ_k A (from the chunk start), the state reached from a zero state at the chunk start is
h_t = Σ_{s ≤ t} exp(ℓ_t − ℓ_s) u_s (u_s = Δ_s B_s x_s), and the true state adds exp(ℓ_t) · H, where H is the state
carried in from the previous chunk; H is passed from chunk to chunk (a loop over T/Q chunks, never over time steps).

* Mamba-1 (decay differs per (c, n)): h_t = exp(ℓ_t) · (cumsum_s(exp(−ℓ_s) u_s) + H), O(T·C·N), no Q×Q matrix.
  exp(−ℓ_s) grows with the decay accumulated inside a chunk, so the chunk length is halved (per call) until every
  chunk's total decay stays within exp(±limit) for the dtype — the result is exact for any Δ and A, only the number of
  chunks changes.
* Mamba-2 (scalar decay per head, B/C shared by a group of heads): the SSD form. Within a chunk
  y_t = Σ_{s ≤ t} (C_t · B_s) exp(ℓ_t − ℓ_s) Δ_s x_s is a masked (Q × Q) matmul whose exponents ℓ_t − ℓ_s ≤ 0 never
  overflow; chunk states are Σ_s exp(ℓ_Q − ℓ_s) B_s ⊗ Δ_s x_s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["selective_scan", "selective_scan_reference", "selective_step", "ssd_scan", "ssd_scan_reference",
           "ssd_step", "heads_of_groups"]


# ----------------------------------------------------------------------------------------------- Mamba-1


def selective_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                   state: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the Mamba-1 recurrence.

    Args:
        x, dt: (b, c) input and step size Δ (already positive). A: (c, n), negative. B, C: (b, n).
        D: (c,) skip weight or None. state: (b, c, n).

    Returns:
        y (b, c) and the new state (b, c, n).
    """
    state = torch.exp(dt.unsqueeze(-1) * A) * state + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    y = torch.einsum("bcn,bn->bc", state, C)
    if D is not None:
        y = y + D * x
    return y, state


def selective_scan_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Mamba-1 recurrence evaluated step by step (a Python loop over time: the reference, not for training).

    Shapes: x, dt (b, t, c); A (c, n); B, C (b, t, n); D (c,) or None; state (b, c, n) or None (zeros).
    Returns y (b, t, c) and the final state (b, c, n).
    """
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    outputs = []
    for t in range(x.shape[1]):
        y, state = selective_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def _exponent_limit(dtype: torch.dtype) -> float:
    """Largest |log-decay| a chunk may accumulate so that exp(±it), times activations and gradients, stays finite."""
    return 0.5 * math.log(torch.finfo(dtype).max) - 8.0


def _pad_time(tensor: Tensor, steps: int) -> Tensor:
    """Append ``steps`` zeros along dim 1 (padded steps have zero input and zero log-decay, i.e. decay 1)."""
    if steps == 0:
        return tensor
    shape = list(tensor.shape)
    shape[1] = steps
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)


def _carry_states(totals: Tensor, chunk_ends: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Pass the state across chunks: H_k = exp(total_k) · H_{k-1} + end_k.

    Args:
        totals: (b, K, *d) log-decay of each whole chunk, broadcastable against the state. chunk_ends: (b, K, *s)
            end state of each chunk from a zero start. state: (b, *s) state before the first chunk.

    Returns:
        (b, K, *s) the state entering each chunk, and the final state (b, *s).
    """
    entering = []
    for k in range(chunk_ends.shape[1]):
        entering.append(state)
        state = torch.exp(totals[:, k]) * state + chunk_ends[:, k]
    return torch.stack(entering, dim=1), state


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   state: Tensor | None = None, chunk_size: int = 32) -> tuple[Tensor, Tensor]:
    """The Mamba-1 recurrence by chunks (see the module docstring); same arguments and results as
    ``selective_scan_reference`` plus ``chunk_size``, the longest chunk tried (halved while a chunk's total decay
    exceeds what the dtype can scale by). Internally time is the last dimension, (b, c, n, t), because cumulative
    sums along the last dimension are several times faster on the CPU than along a middle one."""
    batch, steps, channels = x.shape
    dt_t = dt.transpose(1, 2).unsqueeze(2)                                   # (b, c, 1, t)
    log_decay = dt_t * A.unsqueeze(-1)                                       # (b, c, n, t), ≤ 0
    inputs = (dt_t * x.transpose(1, 2).unsqueeze(2)) * B.transpose(1, 2).unsqueeze(1)   # (b, c, n, t)
    limit = _exponent_limit(log_decay.dtype)
    size = max(1, min(chunk_size, steps))
    while True:
        padded = -steps % size
        cumulative = F.pad(log_decay, (0, padded)).unflatten(-1, (-1, size)).cumsum(-1)    # (b, c, n, K, Q)
        if size == 1 or float(cumulative[..., -1].detach().min()) >= -limit:
            break
        size = max(1, size // 2)
    chunk_inputs = F.pad(inputs, (0, padded)).unflatten(-1, (-1, size))
    # h_t = exp(ℓ_t) · (Σ_{s≤t} u_s / exp(ℓ_s) + H): one exp and one division (exp(ℓ) ≥ e^-limit, no underflow)
    growth = torch.exp(cumulative)                                                          # (b, c, n, K, Q)
    sums = torch.cumsum(chunk_inputs / growth, dim=-1)
    if state is None:
        state = x.new_zeros(batch, channels, A.shape[1])
    chunk_ends = (growth[..., -1] * sums[..., -1]).movedim(-1, 1)                           # (b, K, c, n)
    entering, state = _carry_states(cumulative[..., -1].movedim(-1, 1), chunk_ends, state)
    states = growth * (sums + entering.movedim(1, -1).unsqueeze(-1))                        # (b, c, n, K, Q)
    y = torch.einsum("bcnt,btn->btc", states.flatten(-2)[..., :steps], C)
    if D is not None:
        y = y + D * x
    return y, state


# ----------------------------------------------------------------------------------------------- Mamba-2 (SSD)


def heads_of_groups(tensor: Tensor, heads: int) -> Tensor:
    """(…, g, n) per-group tensor → (…, heads, n): each group serves heads / g consecutive heads."""
    return tensor.repeat_interleave(heads // tensor.shape[-2], dim=-2)


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             state: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the Mamba-2 recurrence.

    Args:
        x: (b, h, p) input of h heads of p channels. dt: (b, h) positive step sizes. A: (h,) negative.
        B, C: (b, g, n) shared by the h / g heads of each group. D: (h,) or None. state: (b, h, p, n).

    Returns:
        y (b, h, p) and the new state (b, h, p, n).
    """
    heads = x.shape[1]
    B, C = heads_of_groups(B, heads), heads_of_groups(C, heads)
    decay = torch.exp(dt * A)[..., None, None]
    state = decay * state + (dt.unsqueeze(-1) * x).unsqueeze(-1) * B.unsqueeze(2)
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        y = y + D[:, None] * x
    return y, state


def ssd_scan_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Mamba-2 recurrence step by step (the reference).

    Shapes: x (b, t, h, p); dt (b, t, h); A (h,); B, C (b, t, g, n) with g dividing h; D (h,) or None;
    state (b, h, p, n) or None. Returns y (b, t, h, p) and the final state (b, h, p, n).
    """
    if state is None:
        state = x.new_zeros(*x.shape[:1], *x.shape[2:], B.shape[-1])
    outputs = []
    for t in range(x.shape[1]):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             state: Tensor | None = None, chunk_size: int = 32) -> tuple[Tensor, Tensor]:
    """The Mamba-2 recurrence in the chunked SSD form (module docstring); arguments and results as
    ``ssd_scan_reference`` plus ``chunk_size`` (Q)."""
    batch, steps, heads, head_dim = x.shape
    groups, d_state = B.shape[-2:]
    per_group = heads // groups
    size = max(1, min(chunk_size, steps))
    padded = -steps % size

    def chunked(tensor: Tensor) -> Tensor:
        return _pad_time(tensor, padded).unflatten(1, (-1, size))

    cumulative = chunked(dt * A).cumsum(2)                                          # (b, K, Q, h)
    weighted = chunked(dt.unsqueeze(-1) * x).unflatten(3, (groups, per_group))      # (b, K, Q, g, r, p)
    B_chunks, C_chunks = chunked(B), chunked(C)                                     # (b, K, Q, g, n)
    # within-chunk: (C_t·B_s) exp(ℓ_t − ℓ_s) for s ≤ t, a masked (Q × Q) matrix per head
    gaps = cumulative.unsqueeze(3) - cumulative.unsqueeze(2)                        # (b, K, t, s, h)
    causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(gaps.masked_fill(~causal[:, :, None], float("-inf")))
    scores = torch.einsum("bktgn,bksgn->bktsg", C_chunks, B_chunks)
    weights = scores.unsqueeze(-1) * decay.unflatten(-1, (groups, per_group))      # (b, K, t, s, g, r)
    y = torch.einsum("bktsgr,bksgrp->bktgrp", weights, weighted)
    # chunk end states from a zero start, then the state carried into each chunk
    to_end = torch.exp(cumulative[:, :, -1:] - cumulative).unflatten(-1, (groups, per_group))   # (b, K, Q, g, r)
    chunk_ends = torch.einsum("bksgn,bksgrp->bkgrpn", B_chunks, weighted * to_end.unsqueeze(-1))
    if state is None:
        state = x.new_zeros(batch, heads, head_dim, d_state)
    totals = cumulative[:, :, -1][..., None, None]                                  # (b, K, h, 1, 1)
    entering, state = _carry_states(totals, chunk_ends.flatten(2, 3), state)        # (b, K, h, p, n)
    from_start = torch.exp(cumulative).unflatten(-1, (groups, per_group))           # (b, K, Q, g, r)
    y = y + torch.einsum("bktgn,bktgr,bkgrpn->bktgrp", C_chunks, from_start,
                         entering.unflatten(2, (groups, per_group)))
    y = y.flatten(3, 4).flatten(1, 2)[:, :steps]
    if D is not None:
        y = y + D[:, None] * x
    return y, state
