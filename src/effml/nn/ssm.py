"""Selective state-space mixers — Mamba-1 and Mamba-2 — usable in place of attention in effml's LM, with recurrent
decoding from a constant-size state.

Papers: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752), §3 and
Algorithm 2; Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality" (arXiv 2405.21060), §7 (the Mamba-2 block). The scans themselves are in ``effml.nn.scan``.

Mamba-1 block, input u (b, t, d_model), inner width E = expand · d_model:

    x, z   = in_proj(u)                           (b, t, E) each
    x      = silu(causal depthwise conv1d(x))     kernel d_conv
    δ, B, C = x_proj(x)                            (b, t, R), (b, t, N), (b, t, N); R = dt_rank
    Δ      = softplus(dt_proj(δ) + dt_bias)       (b, t, E)
    A      = −exp(A_log)                           (E, N), S4D-real init A_log[:, n] = log(n + 1)
    y      = scan(x, Δ, A, B, C) + D ⊙ x          the selective recurrence, eq. (2)
    out    = out_proj(y ⊙ silu(z))

Mamba-2 block: one projection gives z, x, B, C (g groups) and Δ (one per head); x, B and C go through the causal
conv; A is a scalar per head (h heads of size headdim); y = RMSNorm((ssd(x, Δ, A, B, C) + D x) ⊙ silu(z)), the
reference's gated norm; out = out_proj(y).

The PyTorch scans run in the promoted dtype of their inputs and parameters: under bf16 autocast the projections give
bf16 x, B, C while A and D stay fp32, so the recurrence itself runs in fp32 (as in mamba_ssm's reference scan).

Both mixers take ``forward(x, rotation=None, cache=None, cache_slot=0)`` like ``CausalSelfAttention`` (rotation is
ignored: an SSM is position-aware through its recurrence). With an ``SSMCache`` they continue from the stored conv
window and SSM state, so a sequence fed one token at a time gives the full-sequence outputs.

``implied_attention(x)`` materialises the matrix M with y = M x that the SSM applies for a given input (per channel or
head): M[i, j] = C_i · (Π_{j<k≤i} exp(Δ_k A)) Δ_j B_j for j ≤ i — the "attention map" that mimetic initialisation
(``effml.init.mimetic``) shapes.

On CUDA, ``use_kernels=True`` (the default) routes the scans through the ``mamba_ssm`` package's fused kernels when it
is importable (``selective_scan_fn`` and ``mamba_chunk_scan_combined``; same mathematics). Without ``mamba_ssm`` the
PyTorch scans run; an installed ``mamba_ssm`` that fails to import warns once. CPU CI checks the calls against
stand-ins; a test that runs only on CUDA with ``mamba_ssm`` compares the real kernels with the PyTorch scans.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.nn.norm import RMSNorm
from effml.nn.scan import (SSD_BACKWARDS, heads_of_groups, selective_scan, selective_scan_reference, selective_step,
                           ssd_scan, ssd_scan_reference, ssd_step)

__all__ = ["Mamba1Mixer", "Mamba2Mixer", "SSMCache", "SSM_MIXERS", "build_mixer", "check_mixer_options",
           "SCAN_MODES"]

SCAN_MODES = ("chunked", "reference")


class SSMCache:
    """Constant-size recurrent state of every SSM mixer application, for decoding.

    Attributes:
        conv: per slot, the last d_conv − 1 conv inputs (b, d_conv − 1, channels) or None before the first call.
        ssm: per slot, the SSM state ((b, E, N) for Mamba-1, (b, h, headdim, N) for Mamba-2) or None.
        length: positions consumed so far (advanced by the model once per forward, like ``KVCache``).
    """

    def __init__(self, n_slots: int, batch_size: int) -> None:
        for name, value in (("n_slots", n_slots), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SSMCache {name} must be a positive int, got {value!r}.")
        self.conv: list[Tensor | None] = [None] * n_slots
        self.ssm: list[Tensor | None] = [None] * n_slots
        self.batch_size = batch_size
        self.length = 0

    @property
    def n_slots(self) -> int:
        return len(self.ssm)

    def reset(self) -> None:
        """Forget the stored states."""
        self.conv = [None] * self.n_slots
        self.ssm = [None] * self.n_slots
        self.length = 0

    def check_room(self, new_tokens: int) -> None:
        """Always room: the state has a constant size."""

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def __repr__(self) -> str:
        return f"SSMCache(n_slots={self.n_slots}, batch_size={self.batch_size}, length={self.length})"


class _DepthwiseCausalConv(torch.autograd.Function):
    """y_t = bias + Σ_k weight_k ⊙ window_{t+k} over a (b, t + K − 1, c) window of inputs (the K − 1 earlier ones
    first), as K multiply-adds on strided (b, t, c) views. On the CPU it trains faster than ``nn.Conv1d`` with
    ``groups = c`` at every length measured (forward + backward at b 32, c 256, K 4, 1 thread: 1.4 vs 3.8 ms at t 15,
    5.6 vs 9.2 ms at t 64, 52 vs 63 ms at t 512), whose depthwise backward dominates short sequences; the forward
    equals the conv's bit for bit."""

    @staticmethod
    def forward(ctx: Any, window: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """window (b, t + K − 1, c), weight (K, c), bias (c,) → y (b, t, c)."""
        taps, steps = weight.shape[0], window.shape[1] - weight.shape[0] + 1
        y = torch.addcmul(bias, window[:, :steps], weight[0])
        for k in range(1, taps):
            y.addcmul_(window[:, k:k + steps], weight[k])
        ctx.save_for_backward(window, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        window, weight = ctx.saved_tensors
        taps, steps = weight.shape[0], grad_y.shape[1]
        grad_window = torch.zeros_like(window)
        for k in range(taps):
            grad_window[:, k:k + steps].addcmul_(grad_y, weight[k])
        grad_weight = torch.stack([(grad_y * window[:, k:k + steps]).sum((0, 1)) for k in range(taps)])
        return grad_window, grad_weight, grad_y.sum((0, 1))


def _causal_conv(conv: nn.Conv1d, x: Tensor, cache: SSMCache | None, slot: int) -> Tensor:
    """Depthwise causal conv over time with ``conv``'s weights. x (b, t, channels) → (b, t, channels); with a cache,
    the stored last d_conv − 1 inputs precede x (zeros at the start) and the new last ones are stored. The module
    itself runs on CUDA (cuDNN, autocast); elsewhere `_DepthwiseCausalConv` (same values, faster on the CPU)."""
    width = conv.kernel_size[0] - 1
    previous = cache.conv[slot] if cache is not None else None
    if previous is None:
        previous = x.new_zeros(x.shape[0], width, x.shape[2])
    window = torch.cat([previous, x], dim=1)
    if cache is not None:
        cache.conv[slot] = window[:, window.shape[1] - width:].detach()
    if x.is_cuda:
        return conv(window.transpose(1, 2)).transpose(1, 2)
    return _DepthwiseCausalConv.apply(window, conv.weight[:, 0].t(), conv.bias)


#: the ``mamba_ssm`` kernels the mixers call → the module that defines each
_KERNEL_MODULES = {"selective_scan_fn": "mamba_ssm.ops.selective_scan_interface",
                   "mamba_chunk_scan_combined": "mamba_ssm.ops.triton.ssd_combined"}


@functools.cache
def _mamba_ssm_kernels() -> dict[str, Callable[..., Any]] | None:
    """``mamba_ssm``'s fused CUDA kernels by name (``_KERNEL_MODULES``), or None; looked up once per process.

    Not installed (no ``mamba_ssm`` module at all): None, silently, and the mixers run the PyTorch scans. Installed
    but failing to import (built against another torch or CUDA, no Triton, a version without these functions): None
    as well, with one warning naming the failure, so that a broken install is not mistaken for a working one."""
    try:
        return {name: getattr(importlib.import_module(module), name) for name, module in _KERNEL_MODULES.items()}
    except Exception as error:  # noqa: BLE001  (a broken build fails in many ways: linker, CUDA, Triton errors)
        if not (isinstance(error, ModuleNotFoundError) and error.name == "mamba_ssm"):
            _warn_broken_mamba_ssm(error)
        return None


def _warn_broken_mamba_ssm(error: Exception) -> None:
    """One RuntimeWarning for an installed ``mamba_ssm`` whose kernels failed to import (``error``): what failed,
    the fallback, and the two fixes."""
    warnings.warn(
        f"mamba_ssm is installed but its CUDA kernels failed to import ({type(error).__name__}: {error}), so the "
        "Mamba mixers run effml's PyTorch scans on CUDA instead (same results, slower). Reinstall mamba_ssm built "
        "against this torch and CUDA (pip install mamba-ssm --no-build-isolation), or turn the kernels off with "
        "mixer_options={'use_kernels': False} (use_kernels=False on a mixer) to run the PyTorch scans without this "
        "warning.", RuntimeWarning, stacklevel=1)  # deep in a forward pass no caller frame says more than this one


def _inverse_softplus(value: Tensor) -> Tensor:
    """softplus⁻¹(value) = value + log(−expm1(−value)), so that softplus(result) == value."""
    return value + torch.log(-torch.expm1(-value))


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")


class _SelectiveMixer(nn.Module):
    """What both mixers share: option checks, dt initialisation and the step/scan dispatch."""

    #: parameters ``effml.optim.decay_groups`` leaves undecayed, as the Mamba reference does (Mamba-1's A_log is a
    #: matrix, which the shape rule alone would decay)
    no_weight_decay: tuple[str, ...] = ("A_log", "D")

    def _common_checks(self, owner: str, d_state: int, d_conv: int, expand: int, dt_min: float, dt_max: float,
                       chunk_size: int, scan: str, use_kernels: bool) -> None:
        for name, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                            ("chunk_size", chunk_size)):
            _check_positive_int(owner, name, value)
        if not (_is_finite_number(dt_min) and _is_finite_number(dt_max) and 0 < dt_min <= dt_max):
            raise ValueError(f"{owner}: need finite numbers 0 < dt_min <= dt_max, got dt_min={dt_min!r}, "
                             f"dt_max={dt_max!r}.")
        if scan not in SCAN_MODES:
            raise ValueError(f"{owner}: scan={scan!r} is not a scan mode; choose one of {SCAN_MODES}.")
        if not isinstance(use_kernels, bool):  # a string such as "no" would read as true
            raise ValueError(f"{owner}: use_kernels must be True or False, got {use_kernels!r}.")

    def _draw_dt_bias(self, bias: Tensor) -> None:
        """dt_bias such that softplus(dt_bias) is log-uniform in [dt_min, dt_max] (Mamba's initialisation)."""
        with torch.no_grad():
            dt = torch.exp(torch.rand_like(bias) * (math.log(self.dt_max) - math.log(self.dt_min))
                           + math.log(self.dt_min)).clamp(min=1e-4)
            bias.copy_(_inverse_softplus(dt))

    def _use_kernels(self, x: Tensor) -> dict[str, Callable[..., Any]] | None:
        """``mamba_ssm``'s kernels when this mixer may use them for ``x`` (CUDA, ``use_kernels``), else None."""
        return _mamba_ssm_kernels() if (self.use_kernels and x.is_cuda) else None

    # per subclass: the one-step recurrence, the step-by-step reference and the training scan of ``effml.nn.scan``
    _step: Callable[..., tuple[Tensor, Tensor]]
    _reference: Callable[..., tuple[Tensor, Tensor]]
    _chunked: Callable[..., tuple[Tensor, Tensor]]

    def _kernel_scan(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     state: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """The fused ``mamba_ssm`` CUDA kernel's (y, final state), or None where it does not apply."""
        raise NotImplementedError

    def _scan(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, cache: SSMCache | None,
              cache_slot: int) -> Tensor:
        """y of the SSM (D skip included) for the scan inputs of ``ssm_inputs``: one recurrent step from the cached
        state when decoding a single token, else the CUDA kernel when it applies, else the reference or the chunked
        scan (``scan``). With a cache, it starts from the cached state and stores the final one."""
        state = cache.ssm[cache_slot] if cache is not None else None
        result = None if x.shape[1] == 1 and state is not None else self._kernel_scan(x, dt, A, B, C, state)
        if result is None:
            dtype = functools.reduce(torch.promote_types, [t.dtype for t in (x, dt, A, B, C, self.D)])
            x, dt, A, B, C, D = (t.to(dtype) for t in (x, dt, A, B, C, self.D))
            state = state.to(dtype) if state is not None else None
            if x.shape[1] == 1 and state is not None:
                y, state = self._step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state)
                result = y.unsqueeze(1), state
            elif self.scan == "reference":
                result = self._reference(x, dt, A, B, C, D, state)
            else:
                result = self._chunked(x, dt, A, B, C, D, state, self.chunk_size)
        y, state = result
        if cache is not None:
            cache.ssm[cache_slot] = state.detach()
        return y


class Mamba1Mixer(_SelectiveMixer):
    """The Mamba-1 mixer (module docstring).

    Args:
        d_model: model width. d_state: N. d_conv: conv kernel width. expand: E = expand · d_model.
        dt_rank: rank R of Δ's projection, or "auto" = ceil(d_model / 16). dt_min, dt_max: range of the initial Δ.
        chunk_size: steps between the states the training scan keeps for its backward. scan: "chunked" (training)
            or "reference" (step by step).
        use_kernels: on CUDA, use ``mamba_ssm``'s selective-scan kernel when importable.

    ``forward(x, rotation=None, cache=None, cache_slot=0)``: x (b, t, d_model) → (b, t, d_model).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, chunk_size: int = 32, scan: str = "chunked",
                 use_kernels: bool = True) -> None:
        super().__init__()
        owner = "Mamba1Mixer"
        _check_positive_int(owner, "d_model", d_model)
        self._common_checks(owner, d_state, d_conv, expand, dt_min, dt_max, chunk_size, scan, use_kernels)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        _check_positive_int(owner, "dt_rank", dt_rank)
        self.d_model, self.d_state, self.d_inner, self.dt_rank = d_model, d_state, expand * d_model, dt_rank
        self.dt_min, self.dt_max, self.chunk_size, self.scan, self.use_kernels = dt_min, dt_max, chunk_size, scan, \
            use_kernels
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=True)
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, self.d_inner, bias=True)   # its bias is dt_bias
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_parameters(0.02, 0.02)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Mamba's default initialisation: normal(0, std) in_proj and normal(0, out_std) out_proj (effml's scheme
        for the projections to and from the residual stream), PyTorch's default conv1d and x_proj, dt_proj weight
        uniform(±R^-1/2), dt_bias for Δ log-uniform in [dt_min, dt_max], A_log[:, n] = log(n + 1), D = 1."""
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        self.conv1d.reset_parameters()
        self.x_proj.reset_parameters()
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        self._draw_dt_bias(self.dt_proj.bias)
        with torch.no_grad():
            states = torch.arange(1, self.d_state + 1, dtype=self.A_log.dtype)
            self.A_log.copy_(torch.log(states).expand(self.d_inner, -1))
            self.D.fill_(1.0)

    @property
    def W_B(self) -> Tensor:
        """(N, E) rows of x_proj that produce B."""
        return self.x_proj.weight[self.dt_rank:self.dt_rank + self.d_state]

    @property
    def W_C(self) -> Tensor:
        """(N, E) rows of x_proj that produce C."""
        return self.x_proj.weight[self.dt_rank + self.d_state:]

    def ssm_inputs(self, u: Tensor, cache: SSMCache | None = None,
                   cache_slot: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """From the block input u (b, t, d_model): the scan's x, Δ (b, t, E), B, C (b, t, N) and the gate z
        (b, t, E)."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = F.silu(_causal_conv(self.conv1d, x, cache, cache_slot))
        low_rank, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(low_rank))
        return x, dt, B, C, z

    _step, _reference, _chunked = (staticmethod(selective_step), staticmethod(selective_scan_reference),
                                   staticmethod(selective_scan))

    def _kernel_scan(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     state: Tensor | None) -> tuple[Tensor, Tensor] | None:
        kernels = self._use_kernels(x)
        if kernels is None or state is not None:        # selective_scan_fn takes no initial state
            return None
        # selective_scan_cuda wants Δ, B and C in the input's dtype; under bf16 autocast softplus has made Δ fp32
        dt, B, C = (t.to(x.dtype).transpose(1, 2).contiguous() for t in (dt, B, C))
        y, state = kernels["selective_scan_fn"](x.transpose(1, 2).contiguous(), dt, A, B, C, self.D.float(),
                                                return_last_state=True)
        return y.transpose(1, 2), state

    def forward(self, u: Tensor, rotation: Tensor | None = None, cache: SSMCache | None = None,
                cache_slot: int = 0) -> Tensor:
        x, dt, B, C, z = self.ssm_inputs(u, cache, cache_slot)
        y = self._scan(x, dt, -torch.exp(self.A_log), B, C, cache, cache_slot)
        return self.out_proj(y * F.silu(z))

    @torch.no_grad()
    def implied_attention(self, u: Tensor) -> Tensor:
        """The matrices M (b, E, t, t) with y_i = Σ_j M[i, j] x_j (D skip excluded) that the SSM applies to the scan
        input x for the block input u (b, t, d_model)."""
        x, dt, B, C, _ = self.ssm_inputs(u)
        A = -torch.exp(self.A_log)
        cumulative = torch.cumsum(dt.unsqueeze(-1) * A, dim=1)                          # (b, t, E, N)
        gaps = cumulative.unsqueeze(2) - cumulative.unsqueeze(1)                       # (b, i, j, E, N)
        causal = torch.ones(u.shape[1], u.shape[1], dtype=torch.bool, device=u.device).tril()
        decay = torch.exp(gaps.masked_fill(~causal[:, :, None, None], float("-inf")))
        M = torch.einsum("bin,bijen,bjn,bje->beij", C, decay, B, dt)
        return M

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"scan={self.scan}")


class Mamba2Mixer(_SelectiveMixer):
    """The Mamba-2 mixer (module docstring).

    Args:
        d_model: model width. d_state: N. d_conv: conv kernel width. expand: E = expand · d_model.
        headdim: channels per head (E / headdim heads). ngroups: groups sharing B and C (divides the heads).
        A_init_range: A = −a with a uniform in this range at init. dt_min, dt_max: range of the initial Δ.
        chunk_size: SSD chunk length Q. scan: "chunked" or "reference". norm_eps: epsilon of the gated RMSNorm.
        ssd_backward: the chunked scan's backward, "autograd" or "manual" (``ssd_scan``: same gradients, far less
            memory kept for the backward, somewhat slower on the CPU).
        use_kernels: on CUDA, use ``mamba_ssm``'s ``mamba_chunk_scan_combined`` when importable.
    """

    def __init__(self, d_model: int, d_state: int = 32, d_conv: int = 4, expand: int = 2, headdim: int = 16,
                 ngroups: int = 1, A_init_range: tuple[float, float] = (1.0, 16.0), dt_min: float = 0.001,
                 dt_max: float = 0.1, chunk_size: int = 32, scan: str = "chunked", norm_eps: float = 1e-5,
                 ssd_backward: str = "autograd", use_kernels: bool = True) -> None:
        super().__init__()
        owner = "Mamba2Mixer"
        _check_positive_int(owner, "d_model", d_model)
        self._common_checks(owner, d_state, d_conv, expand, dt_min, dt_max, chunk_size, scan, use_kernels)
        for name, value in (("headdim", headdim), ("ngroups", ngroups)):
            _check_positive_int(owner, name, value)
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"{owner}: inner width expand·d_model = {d_inner} is not a multiple of headdim="
                             f"{headdim}; pick a headdim dividing it.")
        n_heads = d_inner // headdim
        if n_heads % ngroups:
            raise ValueError(f"{owner}: ngroups={ngroups} does not divide the {n_heads} heads; pick a divisor.")
        if not (isinstance(A_init_range, (tuple, list)) and len(A_init_range) == 2
                and all(_is_finite_number(v) for v in A_init_range) and 0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"{owner}: A_init_range must be two finite numbers (low, high) with 0 < low <= high "
                             f"(the range the heads' −A is drawn from), got {A_init_range!r}.")
        low, high = A_init_range
        if not (_is_finite_number(norm_eps) and norm_eps > 0):
            raise ValueError(f"{owner}: norm_eps must be a finite number > 0, got {norm_eps!r}.")
        if ssd_backward not in SSD_BACKWARDS:
            raise ValueError(f"{owner}: ssd_backward={ssd_backward!r} is not a backward mode of ssd_scan; choose "
                             f"one of {SSD_BACKWARDS}.")
        self.d_model, self.d_state, self.d_inner, self.headdim = d_model, d_state, d_inner, headdim
        self.n_heads, self.ngroups, self.A_init_range = n_heads, ngroups, (float(low), float(high))
        self.dt_min, self.dt_max, self.chunk_size, self.scan, self.use_kernels = dt_min, dt_max, chunk_size, scan, \
            use_kernels
        self.ssd_backward = ssd_backward
        self.conv_channels = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_channels + n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, d_conv, groups=self.conv_channels, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = RMSNorm(d_inner, norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.reset_parameters(0.02, 0.02)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Mamba-2's default initialisation: normal(0, std) in_proj, normal(0, out_std) out_proj, PyTorch's default
        conv1d, dt_bias for Δ log-uniform in [dt_min, dt_max], A_log = log(uniform(A_init_range)), D = 1."""
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        self.conv1d.reset_parameters()
        self.norm.reset_parameters()
        self._draw_dt_bias(self.dt_bias)
        with torch.no_grad():
            low, high = self.A_init_range
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(low, high)))
            self.D.fill_(1.0)

    def _rows(self, part: str) -> slice:
        """Rows of in_proj (and, minus d_inner, of conv1d's channels) that produce z, x, B, C or dt."""
        sizes = {"z": self.d_inner, "x": self.d_inner, "B": self.ngroups * self.d_state,
                 "C": self.ngroups * self.d_state, "dt": self.n_heads}
        start = 0
        for name, size in sizes.items():
            if name == part:
                return slice(start, start + size)
            start += size
        raise KeyError(part)

    @property
    def W_B(self) -> Tensor:
        """(g·N, d_model) rows of in_proj that produce B."""
        return self.in_proj.weight[self._rows("B")]

    @property
    def W_C(self) -> Tensor:
        """(g·N, d_model) rows of in_proj that produce C."""
        return self.in_proj.weight[self._rows("C")]

    def conv_channels_of(self, part: str) -> slice:
        """conv1d channels that carry x, B or C."""
        rows = self._rows(part)
        return slice(rows.start - self.d_inner, rows.stop - self.d_inner)

    def ssm_inputs(self, u: Tensor, cache: SSMCache | None = None,
                   cache_slot: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """From u (b, t, d_model): x (b, t, h, p), Δ (b, t, h), B, C (b, t, g, N) and the gate z (b, t, E)."""
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_channels, self.n_heads], dim=-1)
        xBC = F.silu(_causal_conv(self.conv1d, xBC, cache, cache_slot))
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        return (x.unflatten(-1, (self.n_heads, self.headdim)), dt, B.unflatten(-1, (self.ngroups, self.d_state)),
                C.unflatten(-1, (self.ngroups, self.d_state)), z)

    _step, _reference = staticmethod(ssd_step), staticmethod(ssd_scan_reference)

    def _chunked(self, *scan_inputs: Any) -> tuple[Tensor, Tensor]:
        return ssd_scan(*scan_inputs, backward=self.ssd_backward)

    def _kernel_scan(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     state: Tensor | None) -> tuple[Tensor, Tensor] | None:
        kernels = self._use_kernels(x)
        if kernels is None:
            return None
        return kernels["mamba_chunk_scan_combined"](x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D,
                                                    initial_states=state, return_final_states=True)

    def forward(self, u: Tensor, rotation: Tensor | None = None, cache: SSMCache | None = None,
                cache_slot: int = 0) -> Tensor:
        x, dt, B, C, z = self.ssm_inputs(u, cache, cache_slot)
        y = self._scan(x, dt, -torch.exp(self.A_log), B, C, cache, cache_slot)
        y = self.norm(y.flatten(2) * F.silu(z))
        return self.out_proj(y)

    @torch.no_grad()
    def implied_attention(self, u: Tensor) -> Tensor:
        """The matrices M (b, h, t, t) with y_i = Σ_j M[i, j] x_j per head (D skip excluded) for block input u."""
        x, dt, B, C, _ = self.ssm_inputs(u)
        A = -torch.exp(self.A_log)
        cumulative = torch.cumsum(dt * A, dim=1)                                       # (b, t, h)
        gaps = cumulative.unsqueeze(2) - cumulative.unsqueeze(1)                       # (b, i, j, h)
        causal = torch.ones(u.shape[1], u.shape[1], dtype=torch.bool, device=u.device).tril()
        decay = torch.exp(gaps.masked_fill(~causal[:, :, None], float("-inf")))
        scores = torch.einsum("bihn,bjhn->bhij", heads_of_groups(C, self.n_heads), heads_of_groups(B, self.n_heads))
        return scores * decay.permute(0, 3, 1, 2) * dt.permute(0, 2, 1).unsqueeze(2)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, heads={self.n_heads}x{self.headdim}, "
                f"d_state={self.d_state}, ngroups={self.ngroups}, scan={self.scan}")


SSM_MIXERS: dict[str, type[nn.Module]] = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer}


def check_mixer_options(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError if ``name`` is not an SSM mixer or ``options`` are not its constructor's options."""
    import inspect

    if name not in SSM_MIXERS:
        raise ValueError(f"mixer {name!r} is unknown; choose 'attention' or one of {sorted(SSM_MIXERS)}.")
    accepted = [p for p in inspect.signature(SSM_MIXERS[name]).parameters if p != "d_model"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"mixer {name!r} has no option(s) {unknown}; its options are {accepted}.")


def build_mixer(name: str, d_model: int, **options: Any) -> nn.Module:
    """The SSM mixer ``name`` ("mamba1" | "mamba2") of width ``d_model`` with constructor ``options``."""
    check_mixer_options(name, options)
    return SSM_MIXERS[name](d_model, **options)
