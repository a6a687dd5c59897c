"""Selective-scan kernels in plain PyTorch: a training scan (Mamba-1: an autograd Function with a hand-written
backward; Mamba-2: the chunked SSD form), a sequential reference, and the one-step recurrence used for decoding — for
Mamba-1 (decay per channel and state index) and Mamba-2 (one scalar decay per head).

Papers: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752), eq. (2a)/(2b)
with the zero-order-hold Ā = exp(ΔA) and the simplified B̄ = ΔB of the reference implementation (Algorithm 2);
Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality"
(arXiv 2405.21060), §6 (the chunked SSD algorithm). For every channel c and state index n:

    h_t[c, n] = exp(Δ_t[c] · A[c, n]) · h_{t-1}[c, n] + Δ_t[c] · B_t[n] · x_t[c]          (recurrence)
    y_t[c]    = Σ_n C_t[n] · h_t[c, n] + D[c] · x_t[c]                                      (read-out)

* Mamba-1 (decay differs per (c, n)): ``selective_scan`` is an autograd Function with a hand-written backward
  (``_SelectiveScan``). The forward runs the recurrence one fused multiply-add per step on (b, c, n) slices and keeps
  only the state entering each chunk of Q steps; the backward recomputes a chunk's states from it and runs the
  reverse-time scan of ∂L/∂h_t. Memory for the backward: O(b·c·n·T/Q) beyond the inputs, where autograd through a
  vectorised scan would keep several (b, t, c, n) tensors. No exp(−ℓ) rescaling is involved, so it is exact for any Δ
  and A.
* Mamba-2, chunked (SSD): split the T steps into chunks of Q. With the within-chunk cumulative log-decay
  ℓ_t = Σ_{k ≤ t} Δ_k A (from the chunk start), the state reached from a zero state at the chunk start is
  h_t = Σ_{s ≤ t} exp(ℓ_t − ℓ_s) u_s (u_s = Δ_s B_s x_s), and the true state adds exp(ℓ_t) · H, where H is the state
  carried in from the previous chunk; H is passed from chunk to chunk (a loop over T/Q chunks, never over time steps).
* Mamba-2 (scalar decay per head, B/C shared by a group of heads): the SSD form. Within a chunk
  y_t = Σ_{s ≤ t} (C_t · B_s) exp(ℓ_t − ℓ_s) Δ_s x_s is a masked (Q × Q) matmul whose exponents ℓ_t − ℓ_s ≤ 0 never
  overflow; chunk states are Σ_s exp(ℓ_Q − ℓ_s) B_s ⊗ Δ_s x_s. Its backward is autograd's by default, or hand-written
  (``ssd_scan(..., backward="manual")``, ``_SSDScan``: keeps only the chunk-entering states, recomputes the rest).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["selective_scan", "selective_scan_reference", "selective_step", "ssd_scan", "ssd_scan_reference",
           "ssd_step", "heads_of_groups", "SSD_BACKWARDS"]

SSD_BACKWARDS = ("autograd", "manual")


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


def _decays_and_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, decays: Tensor, inputs: Tensor) -> None:
    """Write Ā_t = exp(Δ_t A) into ``decays`` and u_t = Δ_t x_t B_t into ``inputs`` for a span of q steps:
    x, dt (b, q, c), A (c, n), B (b, q, n); decays, inputs (b, q, c, n) (views of buffers reused by every chunk:
    fresh large tensors per chunk cost more in page faults than the arithmetic)."""
    torch.mul(dt.unsqueeze(-1), A, out=decays).exp_()
    torch.mul((dt * x).unsqueeze(-1), B.unsqueeze(2), out=inputs)


def _states_in_place(decays: Tensor, inputs: Tensor, state: Tensor) -> Tensor:
    """h_t = Ā_t · h_{t-1} + u_t for t = 1..q from h_0 = ``state`` (b, c, n); decays, inputs (b, q, c, n). The
    states overwrite ``inputs`` (returned). One fused multiply-add per step on (b, c, n): no exp(−ℓ) rescaling, so it
    is exact for any decay."""
    for t in range(inputs.shape[1]):
        state = inputs[:, t].addcmul_(decays[:, t], state)
    return inputs


def _chunk_buffers(x: Tensor, d_state: int, chunk_size: int, count: int) -> list[Tensor]:
    """``count`` (b, Q, c, n) work buffers for the chunks of x (b, t, c), Q = min(chunk_size, t)."""
    shape = (x.shape[0], min(chunk_size, x.shape[1]), x.shape[2], d_state)
    return [x.new_empty(shape) for _ in range(count)]


def _chunk_starts(steps: int, chunk_size: int) -> list[int]:
    return list(range(0, steps, max(1, chunk_size)))


class _SelectiveScan(torch.autograd.Function):
    """The Mamba-1 scan with a hand-written backward that keeps only the states entering each chunk.

    Forward, per chunk of Q steps: Ā and u (``_decays_and_inputs``), the Q states by the recurrence, the read-out
    y_t = C_t · h_t; only the state entering the chunk is kept, (b, K, c, n) with K = ⌈T / Q⌉.

    Backward, chunks in reverse: recompute the chunk's Ā, u and states from its entering state, then the reverse-time
    scan of g_t = ∂L/∂h_t = C_t ⊗ ∂y_t + Ā_{t+1} · g_{t+1} (g_T also receives ∂L/∂h_T of the returned final state),
    and the contractions

        ∂C_t = Σ_c ∂y_t[c] h_t[c, :]           ∂B_t = Σ_c g_t[c, :] Δ_t[c] x_t[c]
        w_t[c] = Σ_n g_t[c, n] B_t[n]          q_t = g_t · Ā_t · h_{t-1}   (= ∂L/∂(Δ_t A))
        ∂x_t = w_t Δ_t + D ∂y_t                ∂Δ_t = w_t x_t + Σ_n q_t[:, n] A[:, n]
        ∂A = Σ_{b,t} q_t Δ_t                   ∂D = Σ_{b,t} ∂y_t x_t             ∂h_0 = Ā_1 · g_1

    Working memory beyond inputs and outputs: the K entering states plus a few (b, Q, c, n) buffers of one chunk.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
        batch, steps, channels = x.shape
        state = x.new_zeros(batch, channels, A.shape[1]) if state is None else state
        starts = _chunk_starts(steps, chunk_size)
        entering = x.new_empty(batch, len(starts), channels, A.shape[1])
        y = x.new_empty(batch, steps, channels)
        decay_buffer, state_buffer = _chunk_buffers(x, A.shape[1], chunk_size, 2)
        for k, start in enumerate(starts):
            span = slice(start, start + chunk_size)
            steps_here = len(range(steps)[span])
            entering[:, k] = state
            decays, states = decay_buffer[:, :steps_here], state_buffer[:, :steps_here]
            _decays_and_inputs(x[:, span], dt[:, span], A, B[:, span], decays, states)
            states = _states_in_place(decays, states, entering[:, k])
            torch.matmul(states, C[:, span].unsqueeze(-1), out=y[:, span].unsqueeze(-1))
            state = states[:, -1]
        if D is not None:
            y.addcmul_(D, x)
        ctx.save_for_backward(x, dt, A, B, C, D, entering)
        ctx.chunk_size = chunk_size
        return y, state.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_state: Tensor | None) -> tuple[Tensor | None, ...]:
        x, dt, A, B, C, D, entering = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        grad_x, grad_dt, grad_B, grad_C = (torch.empty_like(t) for t in (x, dt, B, C))
        grad_A = torch.zeros_like(A)
        dt_x = dt * x
        carry = torch.zeros_like(entering[:, 0]) if grad_state is None else grad_state   # ∂L/∂h at the chunk end
        buffers = _chunk_buffers(x, A.shape[1], chunk_size, 3)
        for k, start in reversed(list(enumerate(_chunk_starts(x.shape[1], chunk_size)))):
            span = slice(start, start + chunk_size)
            steps_here = len(range(x.shape[1])[span])
            decays, states, grads = (buffer[:, :steps_here] for buffer in buffers)
            _decays_and_inputs(x[:, span], dt[:, span], A, B[:, span], decays, states)
            states = _states_in_place(decays, states, entering[:, k])
            torch.mul(grad_y[:, span].unsqueeze(-1), C[:, span].unsqueeze(2), out=grads)   # C_t ⊗ ∂y_t, then g_t
            grads[:, -1] += carry
            for t in range(steps_here - 2, -1, -1):
                grads[:, t].addcmul_(decays[:, t + 1], grads[:, t + 1])
            torch.matmul(grad_y[:, span].unsqueeze(-2), states, out=grad_C[:, span].unsqueeze(-2))
            torch.matmul(dt_x[:, span].unsqueeze(-2), grads, out=grad_B[:, span].unsqueeze(-2))
            w = torch.matmul(grads, B[:, span].unsqueeze(-1)).squeeze(-1)               # (b, q, c)
            log_decay_grads = decays.mul_(grads)                                        # Ā_t g_t, then q_t
            carry = log_decay_grads[:, 0].clone()
            log_decay_grads[:, 1:].mul_(states[:, :-1])
            log_decay_grads[:, 0].mul_(entering[:, k])
            torch.addcmul(torch.mul(log_decay_grads, A, out=grads).sum(-1), w, x[:, span], out=grad_dt[:, span])
            grad_A += torch.mul(log_decay_grads, dt[:, span].unsqueeze(-1), out=states).sum((0, 1))
            torch.mul(w, dt[:, span], out=grad_x[:, span])
        grad_D = None
        if D is not None:
            grad_x.addcmul_(D, grad_y)
            grad_D = (grad_y * x).sum((0, 1))
        return grad_x, grad_dt, grad_A, grad_B, grad_C, grad_D, carry if ctx.needs_input_grad[6] else None, None


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   state: Tensor | None = None, chunk_size: int = 32) -> tuple[Tensor, Tensor]:
    """The Mamba-1 recurrence for training (``_SelectiveScan``: checkpointed chunks, hand-written backward); same
    arguments and results as ``selective_scan_reference`` plus ``chunk_size`` Q, the spacing of the kept states
    (memory O(b·c·n·T/Q) for the backward besides the inputs; any T, Q need not divide it).

    Shapes: x, dt (b, t, c); A (c, n); B, C (b, t, n); D (c,) or None; state (b, c, n) or None (zeros).
    Returns y (b, t, c) and the final state (b, c, n)."""
    _check_scan_inputs(x, dt, A, B, C, D, state, chunk_size)
    return _SelectiveScan.apply(x, dt, A, B, C, D, state, chunk_size)


def _check_scan_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       state: Tensor | None, chunk_size: int) -> None:
    """Raise ValueError unless the shapes, dtypes and chunk size of ``selective_scan``'s arguments agree."""
    if x.dim() != 3 or A.dim() != 2:
        raise ValueError(f"selective_scan expects x (b, t, c) and A (c, n); got x {tuple(x.shape)} and A "
                         f"{tuple(A.shape)}. Pass the scan input with time as dim 1 and one row of A per channel.")
    batch, steps, channels = x.shape
    n = A.shape[1]
    _check_against("selective_scan", x, "x (b, t, c) and A (c, n)",
                   {"dt": (dt, (batch, steps, channels)), "A": (A, (channels, n)), "B": (B, (batch, steps, n)),
                    "C": (C, (batch, steps, n)), "D": (D, (channels,)), "state": (state, (batch, channels, n))},
                   chunk_size)


def _check_against(owner: str, x: Tensor, basis: str, expected: dict[str, tuple[Tensor | None, tuple[int, ...]]],
                   chunk_size: int) -> None:
    """Raise ValueError unless every given tensor of ``expected`` ({name: (tensor or None, shape)}) has its shape and
    x's dtype, and ``chunk_size`` is a positive int. ``basis``: what the expected shapes were derived from."""
    for name, (tensor, shape) in expected.items():
        if tensor is not None and (tuple(tensor.shape) != shape or tensor.dtype != x.dtype):
            raise ValueError(f"{owner}: {name} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, but {basis} "
                             f"(x {tuple(x.shape)}) call for shape {shape} and dtype {x.dtype}; cast or reshape it "
                             "to match.")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{owner}: chunk_size must be a positive int, got {chunk_size!r}.")


def _check_ssd_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                      state: Tensor | None, chunk_size: int) -> None:
    """Raise ValueError unless the shapes, dtypes and chunk size of ``ssd_scan``'s arguments agree."""
    if x.dim() != 4 or B.dim() != 4:
        raise ValueError(f"ssd_scan expects x (b, t, h, p) and B (b, t, g, n); got x {tuple(x.shape)} and B "
                         f"{tuple(B.shape)}. Split the channels into heads (and B, C into groups) first.")
    batch, steps, heads, head_dim = x.shape
    groups, n = B.shape[2:]
    if heads % groups:
        raise ValueError(f"ssd_scan: B and C have {groups} groups, which does not divide x's {heads} heads; each "
                         "group must serve a whole number of heads.")
    _check_against("ssd_scan", x, "x (b, t, h, p) and B's groups and state size",
                   {"dt": (dt, (batch, steps, heads)), "A": (A, (heads,)), "B": (B, (batch, steps, groups, n)),
                    "C": (C, (batch, steps, groups, n)), "D": (D, (heads,)),
                    "state": (state, (batch, heads, head_dim, n))},
                   chunk_size)


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


class _SSDChunks:
    """The chunked tensors of the SSD form that the forward and the backward share (module docstring), for x
    (b, t, h, p), dt (b, t, h), A (h,), B, C (b, t, g, n) split into K chunks of Q steps (the last one zero-padded):

        cumulative ℓ (b, K, Q, h)     weighted v = Δ x (b, K, Q, g, r, p)     B, C (b, K, Q, g, n)
        decay L[t, s] = exp(ℓ_t − ℓ_s) for s ≤ t, else 0 (b, K, Q, Q, g, r)   scores S[t, s] = C_t · B_s (b, K, Q, Q, g)
        to_end exp(ℓ_{Q−1} − ℓ_s), from_start exp(ℓ_t) (b, K, Q, g, r)

    with r = h / g heads per group."""

    def __init__(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> None:
        self.steps, heads = x.shape[1], x.shape[2]
        self.groups, self.per_group = B.shape[-2], heads // B.shape[-2]
        self.size = max(1, min(chunk_size, self.steps))
        self.padded = -self.steps % self.size
        heads_split = (self.groups, self.per_group)
        self.cumulative = self.chunked(dt * A).cumsum(2)
        self.weighted = self.chunked(dt.unsqueeze(-1) * x).unflatten(3, heads_split)
        self.B, self.C = self.chunked(B), self.chunked(C)
        gaps = self.cumulative.unsqueeze(3) - self.cumulative.unsqueeze(2)
        causal = torch.ones(self.size, self.size, dtype=torch.bool, device=x.device).tril()
        self.decay = torch.exp(gaps.masked_fill(~causal[:, :, None], float("-inf"))).unflatten(-1, heads_split)
        self.scores = torch.einsum("bktgn,bksgn->bktsg", self.C, self.B)
        self.to_end = torch.exp(self.cumulative[:, :, -1:] - self.cumulative).unflatten(-1, heads_split)
        self.from_start = torch.exp(self.cumulative).unflatten(-1, heads_split)

    def chunked(self, tensor: Tensor) -> Tensor:
        """(b, t, …) → (b, K, Q, …), zero-padded in time."""
        return _pad_time(tensor, self.padded).unflatten(1, (-1, self.size))

    def unchunked(self, tensor: Tensor) -> Tensor:
        """(b, K, Q, …) → (b, t, …), the padding dropped."""
        return tensor.flatten(1, 2)[:, :self.steps]


def _ssd_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor | None,
                 chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The chunked SSD evaluation; returns y (b, t, h, p), the final state (b, h, p, n) and the state entering each
    chunk (b, K, h, p, n)."""
    batch, _, heads, head_dim = x.shape
    parts = _SSDChunks(x, dt, A, B, C, chunk_size)
    # within-chunk: Σ_{s ≤ t} (C_t·B_s) exp(ℓ_t − ℓ_s) Δ_s x_s, a masked (Q × Q) matrix per head
    weights = parts.scores.unsqueeze(-1) * parts.decay                                 # (b, K, t, s, g, r)
    y = torch.einsum("bktsgr,bksgrp->bktgrp", weights, parts.weighted)
    # chunk end states from a zero start, then the state carried into each chunk
    chunk_ends = torch.einsum("bksgn,bksgrp->bkgrpn", parts.B, parts.weighted * parts.to_end.unsqueeze(-1))
    if state is None:
        state = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    totals = parts.cumulative[:, :, -1][..., None, None]                               # (b, K, h, 1, 1)
    entering, state = _carry_states(totals, chunk_ends.flatten(2, 3), state)           # (b, K, h, p, n)
    y = y + torch.einsum("bktgn,bktgr,bkgrpn->bktgrp", parts.C, parts.from_start,
                         entering.unflatten(2, (parts.groups, parts.per_group)))
    y = parts.unchunked(y.flatten(3, 4))
    if D is not None:
        y = y + D[:, None] * x
    return y, state, entering


class _SSDScan(torch.autograd.Function):
    """The chunked Mamba-2 scan with a hand-written backward; it keeps only the inputs and the state H_k entering
    each chunk (autograd through ``_ssd_forward`` keeps every (Q × Q) weight and decay tensor).

    Backward (per chunk; ∂ of a name is the gradient of the loss with respect to it, r heads share a group's B, C):

        inter-chunk read-out  y_t += exp(ℓ_t) C_t · H_k:   R_k = Σ_t exp(ℓ_t) ∂y_t ⊗ C_t,
                              ∂C_t += exp(ℓ_t) ∂y_t · H_k,  ∂ℓ_t += exp(ℓ_t) ∂y_t · (H_k C_t)
        carry (reverse)       G_K = ∂(final state), G_k = exp(T_k) G_{k+1} + R_k, ∂end_k = G_{k+1},
                              ∂T_k = exp(T_k) Σ H_k ⊙ G_{k+1} (T_k = ℓ_{Q−1} of chunk k), ∂(initial state) = G_0
        chunk ends            end_k = Σ_s exp(ℓ_{Q−1} − ℓ_s) v_s ⊗ B_s:  ∂v_s, ∂B_s and ±∂ℓ from it
        within chunk          y_t = Σ_s S_ts L_ts v_s:  ∂W_ts = ∂y_t · v_s, ∂v_s += Σ_t W_ts ∂y_t,
                              ∂S_ts = Σ_r ∂W_ts L_ts → ∂C_t, ∂B_s;  M_ts = ∂W_ts S_ts L_ts: ∂ℓ_t += Σ_s M_ts,
                              ∂ℓ_s −= Σ_t M_ts
        inputs                ℓ = cumsum(Δ A): ∂(Δ_j A) = Σ_{t ≥ j} ∂ℓ_t in the chunk; v = Δ x: ∂x = Δ ∂v + D ∂y,
                              ∂Δ = A ∂(ΔA) + Σ_p ∂v x, ∂A = Σ_{b,t} Δ ∂(ΔA), ∂D = Σ_{b,t,p} ∂y x
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
        y, final, entering = _ssd_forward(x, dt, A, B, C, D, state, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, D, entering)
        ctx.chunk_size = chunk_size
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_final: Tensor | None) -> tuple[Tensor | None, ...]:
        x, dt, A, B, C, D, entering = ctx.saved_tensors
        parts = _SSDChunks(x, dt, A, B, C, ctx.chunk_size)
        heads_split = (parts.groups, parts.per_group)
        grad_out = parts.chunked(grad_y).unflatten(3, heads_split)                     # (b, K, Q, g, r, p)
        held = entering.unflatten(2, heads_split)                                      # (b, K, g, r, p, n)
        # inter-chunk read-out
        read = torch.einsum("bktgr,bktgrp,bktgn->bkgrpn", parts.from_start, grad_out, parts.C).flatten(2, 3)
        grad_out_held = torch.einsum("bktgrp,bkgrpn->bktgrn", grad_out, held)
        grad_C = torch.einsum("bktgr,bktgrn->bktgn", parts.from_start, grad_out_held)
        grad_log = parts.from_start * torch.einsum("bktgn,bktgrn->bktgr", parts.C, grad_out_held)
        # the carry across chunks, in reverse
        totals = torch.exp(parts.cumulative[:, :, -1])                                 # (b, K, h)
        carry = torch.zeros_like(entering[:, 0]) if grad_final is None else grad_final
        grad_ends, grad_totals = torch.empty_like(entering), totals.new_empty(totals.shape)
        for k in range(entering.shape[1] - 1, -1, -1):
            grad_ends[:, k] = carry
            grad_totals[:, k] = totals[:, k] * (entering[:, k] * carry).sum((-2, -1))
            carry = totals[:, k, :, None, None] * carry + read[:, k]
        # chunk end states
        grad_ends = grad_ends.unflatten(2, heads_split)                                # (b, K, g, r, p, n)
        ends_B = torch.einsum("bkgrpn,bksgn->bksgrp", grad_ends, parts.B)
        grad_weighted = parts.to_end.unsqueeze(-1) * ends_B
        grad_B = torch.einsum("bksgr,bksgrp,bkgrpn->bksgn", parts.to_end, parts.weighted, grad_ends)
        to_end_grad = parts.to_end * (ends_B * parts.weighted).sum(-1)                 # (b, K, Q, g, r)
        grad_log = grad_log - to_end_grad
        grad_last = to_end_grad.sum(2) + grad_totals.unflatten(-1, heads_split)        # ∂ℓ_{Q−1}, (b, K, g, r)
        # within chunk
        weights = parts.scores.unsqueeze(-1) * parts.decay                             # W = S L, (b, K, t, s, g, r)
        grad_weights = torch.einsum("bktgrp,bksgrp->bktsgr", grad_out, parts.weighted)
        grad_weighted = grad_weighted + torch.einsum("bktsgr,bktgrp->bksgrp", weights, grad_out)
        grad_scores = (grad_weights * parts.decay).sum(-1)                             # (b, K, t, s, g)
        grad_C = grad_C + torch.einsum("bktsg,bksgn->bktgn", grad_scores, parts.B)
        grad_B = grad_B + torch.einsum("bktsg,bktgn->bksgn", grad_scores, parts.C)
        gaps_grad = grad_weights.mul_(weights)                                         # ∂L_ts · L_ts = ∂W_ts W_ts
        grad_log = grad_log + gaps_grad.sum(3) - gaps_grad.sum(2)
        grad_log[:, :, -1] += grad_last
        grad_log_decay = parts.unchunked(grad_log.flip(2).cumsum(2).flip(2).flatten(3, 4))   # ∂(Δ A), (b, t, h)
        grad_v = parts.unchunked(grad_weighted.flatten(3, 4))                          # (b, t, h, p)
        grad_x = grad_v * dt.unsqueeze(-1)
        grad_dt = grad_log_decay * A + (grad_v * x).sum(-1)
        grad_A = (grad_log_decay * dt).sum((0, 1))
        grad_D = None
        if D is not None:
            grad_x = grad_x + D[:, None] * grad_y
            grad_D = (grad_y * x).sum((0, 1, 3))
        return (grad_x, grad_dt, grad_A, parts.unchunked(grad_B), parts.unchunked(grad_C), grad_D,
                carry if ctx.needs_input_grad[6] else None, None)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             state: Tensor | None = None, chunk_size: int = 32, backward: str = "autograd") -> tuple[Tensor, Tensor]:
    """The Mamba-2 recurrence in the chunked SSD form (module docstring); arguments and results as
    ``ssd_scan_reference`` plus ``chunk_size`` (Q) and ``backward``, one of ``SSD_BACKWARDS``: "autograd" (autograd
    through the chunked forward: the faster on CPU at the bench's shapes) or "manual" (``_SSDScan``: the hand-written
    backward, which keeps only the K chunk-entering states instead of every (Q × Q) tensor, at ~1.35× the time of
    "autograd" for forward + backward of the scan at b 8, T 256, 8 heads of 32, N 16, 1 thread). Same values and
    gradients.

    Shapes: x (b, t, h, p); dt (b, t, h); A (h,); B, C (b, t, g, n) with g dividing h; D (h,) or None;
    state (b, h, p, n) or None. Returns y (b, t, h, p) and the final state (b, h, p, n)."""
    _check_ssd_inputs(x, dt, A, B, C, D, state, chunk_size)
    if backward == "manual":
        return _SSDScan.apply(x, dt, A, B, C, D, state, chunk_size)
    if backward == "autograd":
        y, state, _ = _ssd_forward(x, dt, A, B, C, D, state, chunk_size)
        return y, state
    raise ValueError(f"ssd_scan: backward={backward!r} is not a backward mode; choose one of {SSD_BACKWARDS}.")
