"""LAuReL: learned augmented residual connections.

Paper: G. Menghani, R. Kumar, S. Kumar, "LAuReL: Learned Augmented Residual Layer", ICML 2025, arXiv 2411.07501.

The ordinary residual connection x_{i+1} = f(x_i) + x_i becomes x_{i+1} = α·f(x_i) + g(x_i, x_{i-1}, …), where g is
a learned *linear* map of the current and earlier stream states. The paper's variants (its Eqs. 2–5), all here:

* RW (residual weights, Eq. 2):      x_{i+1} = α·f(x_i) + β·x_i
* LR (low rank, Eq. 3):              x_{i+1} = f(x_i) + x_i + B·A·x_i            A: D→r (down), B: r→D (up)
* PA (previous activations, Eq. 4):  x_{i+1} = f(x_i) + x_i + Σ_{j=1..k} γ_j·h(x_{i-j})
* RW+LR (Eq. 5):                     x_{i+1} = α·f(x_i) + β·(x_i + B·A·x_i)
* RW+LR+PA:                          x_{i+1} = α·f(x_i) + β·(x_i + B·A·x_i + Σ_{j=1..k} γ_j·h(x_{i-j}))
  (and every other combination of the three parts, e.g. "lr+pa", "rw+pa").

Each part is a small strategy module (``ResidualWeights``, ``LowRankTerm``, ``PreviousActivations``) and a variant is
a set of parts chosen by name (``"rw+lr"``); ``LaurelResidual`` composes them as

    x_{i+1} = α·f(x_i) + β·(x_i + LR(x_i) + PA(x_{i-1}, …, x_{i-k}))        (α = β = 1 without RW)

Choices and readings of the paper (documented where it is not explicit):

* RW bound: the paper requires α, β to stay bounded, "normalised with softmax or sigmoid". ``bound="softmax"`` gives
  (α, β) = s·softmax(a, b) = s·(σ(a−b), σ(b−a)); ``bound="sigmoid"`` gives α = s·σ(a), β = s·σ(b);
  ``"none"`` uses α = a, β = b. With the scale s = 2 and logits 0 (the default) every bounded RW starts *exactly*
  as the plain residual (α = β = 1). ``per_channel=True`` learns D-vectors α, β (2D parameters) instead of 2
  scalars.
* LR: the paper writes the term as B·A·x with A ∈ R^{r×D} (here: ``down``, D→r) and B ∈ R^{D×r} (``up``, r→D).
  Following its LoRA-style recipe the up-projection starts at zero, so LR starts as the plain residual; the
  down-projection is "column-orthogonal" (entry (i, j) of the D×r matrix is 1/√(rD) when i mod r = j, else 0; the
  paper's choice for LLMs) or Xavier-uniform (its choice for ResNets). 2rD parameters.
* PA: the paper sums γ_j·h(x_{i−j}) over the last k activations. Here the current state x_i is already carried by
  the identity (and LR) term, so PA sums over the k states *before* it, x_{i−1} … x_{i−k} (the residual's
  ``history``, newest first; fewer at the bottom of the stack) — so a model keeps exactly k earlier activations.
  h is the identity (k parameters γ, initialised to 0: the block starts as the plain residual) or one shared
  low-rank map B'·A' (2rD + k parameters; γ starts at 1 and B' at 0, so again the block starts as the plain residual
  and both factors receive gradient once B' has moved).

Tensors may carry their channels on any axis (``channel_dim``: -1 for transformers' (B, T, D), 1 for convolutions'
(B, C, H, W)); every learned map acts on that axis only. ``LaurelResidual`` is registered in the residual registry as
``"laurel"``, so ``TransformerConfig(residual="laurel", residual_options={"variant": "rw+lr", "rank": 16})`` works, and
``LaurelBlock`` wraps any branch module f (an MLP, a conv block, a group of layers) on its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from effml.nn.residual import Residual, register_residual

__all__ = ["LAUREL_PARTS", "LaurelConfig", "laurel_options", "parse_variant", "ResidualWeights", "LowRankTerm",
           "PreviousActivations", "LaurelResidual", "LaurelBlock", "laurel_parameter_count"]

LAUREL_PARTS = ("rw", "lr", "pa")  # canonical order of a variant's parts
_BOUNDS = ("softmax", "sigmoid", "none")
_LR_INITS = ("orthogonal", "xavier")
_PA_MAPS = ("identity", "low-rank")


def parse_variant(variant: str) -> tuple[str, ...]:
    """``"lr+rw"`` → ``("rw", "lr")``: the variant's parts in canonical order; ValueError for anything else."""
    if not isinstance(variant, str) or not variant.strip():
        raise ValueError("LAuReL variant must be a non-empty string such as 'rw', 'lr' or 'rw+lr+pa', "
                         f"got {variant!r}.")
    parts = [part.strip().lower() for part in variant.split("+")]
    unknown = [part for part in parts if part not in LAUREL_PARTS]
    if unknown or len(set(parts)) != len(parts):
        problem = f"unknown parts {unknown}" if unknown else "a part is repeated"
        raise ValueError(f"LAuReL variant {variant!r}: {problem}. A variant joins distinct parts from "
                         f"{list(LAUREL_PARTS)} with '+', for example 'rw', 'rw+lr' or 'rw+lr+pa'.")
    return tuple(part for part in LAUREL_PARTS if part in parts)


@dataclass(frozen=True)
class LaurelConfig:
    """Typed options of a LAuReL residual (validated on construction; ValueError naming the bad option).

    Attributes:
        variant: parts joined by '+': "rw", "lr", "pa", "rw+lr", "rw+lr+pa", ...
        rank: r of the LR term (and of the PA map when ``pa_map="low-rank"``); 1 ≤ r ≤ D is checked at build time.
        lr_init: "orthogonal" (column-orthogonal down-projection) or "xavier".
        bound: how RW bounds α, β: "softmax" (over the pair), "sigmoid" (each) or "none".
        scale: s in α = s·softmax(...)/s·σ(...); 2 makes the initial α = β = 1 (the plain residual).
        per_channel: RW learns D-vectors α, β instead of two scalars.
        k: how many earlier stream states PA combines.
        pa_map: "identity" or "low-rank" h in PA.
        channel_dim: the tensor axis holding the D channels (-1 for (B, T, D), 1 for (B, C, H, W)).
    """

    variant: str = "rw"
    rank: int = 16
    lr_init: str = "orthogonal"
    bound: str = "softmax"
    scale: float = 2.0
    per_channel: bool = False
    k: int = 3
    pa_map: str = "identity"
    channel_dim: int = -1

    def __post_init__(self) -> None:
        parse_variant(self.variant)
        for name in ("rank", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LAuReL option {name} must be a positive int, got {value!r}.")
        for name, value, choices in (("lr_init", self.lr_init, _LR_INITS), ("bound", self.bound, _BOUNDS),
                                     ("pa_map", self.pa_map, _PA_MAPS)):
            if value not in choices:
                raise ValueError(f"LAuReL option {name}={value!r} is not one of {list(choices)}.")
        if (not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale)
                or self.scale <= 0):
            raise ValueError(f"LAuReL option scale must be a positive finite number, got {self.scale!r}.")
        for name in ("per_channel",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LAuReL option {name} must be True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.channel_dim, int) or isinstance(self.channel_dim, bool):
            raise ValueError(f"LAuReL option channel_dim must be an int axis, got {self.channel_dim!r}.")

    @property
    def parts(self) -> tuple[str, ...]:
        return parse_variant(self.variant)


def laurel_options(owner: str, variant: str | LaurelConfig, options: dict[str, Any]) -> dict[str, Any]:
    """``LaurelResidual``'s keyword options from a variant name and options, or from a ``LaurelConfig`` alone;
    ValueError (naming ``owner``) for an unknown option, or for options given beside a ``LaurelConfig``."""
    if isinstance(variant, LaurelConfig):
        if options:
            raise ValueError(f"{owner}: got a LaurelConfig and the options {sorted(options)} besides it; set them in "
                             "the LaurelConfig instead.")
        return dataclasses.asdict(variant)
    known = [option.name for option in dataclasses.fields(LaurelConfig) if option.name != "variant"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{owner}: unknown LAuReL options {unknown}; the options are {known} (see LaurelConfig).")
    return {"variant": variant, **options}


def _channels_last(x: Tensor, channel_dim: int) -> Tensor:
    return x if channel_dim in (-1, x.dim() - 1) else x.movedim(channel_dim, -1)


def _channels_back(x: Tensor, channel_dim: int) -> Tensor:
    return x if channel_dim in (-1, x.dim() - 1) else x.movedim(-1, channel_dim)


def _check_rank(rank: int, d_model: int) -> None:
    """ValueError unless 1 ≤ ``rank`` ≤ ``d_model`` (the rank of an LR or low-rank PA map of width D)."""
    if not 1 <= rank <= d_model:
        raise ValueError(f"LAuReL rank must be in [1, d_model={d_model}], got {rank}; a low-rank map of rank "
                         "above the width adds parameters without adding expressiveness.")


def _check_channel_axis(x: Tensor, channel_dim: int, d_model: int) -> None:
    """ValueError unless ``channel_dim`` is an axis of ``x`` and that axis has size ``d_model`` (shapes only)."""
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"LAuReL: channel_dim={channel_dim} is not an axis of the {x.dim()}-D input of shape "
                         f"{tuple(x.shape)}; pass the axis holding the d_model={d_model} channels (-1 for (B, T, D), "
                         "1 for (B, C, H, W)).")
    if x.shape[channel_dim] != d_model:
        raise ValueError(f"LAuReL: axis channel_dim={channel_dim} of the input of shape {tuple(x.shape)} has size "
                         f"{x.shape[channel_dim]} but d_model is {d_model}; for (B, C, H, W) inputs pass "
                         "channel_dim=1, for (B, T, D) inputs channel_dim=-1, and build the residual with the "
                         "input's channel count as d_model.")


def _broadcast_channels(vector: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """A (D,) or (1,) vector shaped to broadcast along ``channel_dim`` of ``like``."""
    if vector.numel() == 1:
        return vector.reshape(())
    shape = [1] * like.dim()
    shape[channel_dim] = vector.numel()
    return vector.reshape(shape)


class ResidualWeights(nn.Module):
    """RW: the learned, bounded weights (α, β) of the branch and of the stream.

    Parameters ``alpha_logit``, ``beta_logit`` of shape (1,) (2 parameters) or (D,) with ``per_channel`` (2D);
    both start at 0, so that (α, β) = (scale/2, scale/2) — (1, 1) at the default scale 2 — or, with
    ``bound="none"``, at 1 (α = β = 1).
    ``forward()`` returns (α, β), each of the parameters' shape.
    """

    def __init__(self, d_model: int, bound: str = "softmax", scale: float = 2.0, per_channel: bool = False) -> None:
        super().__init__()
        self.bound, self.scale = bound, float(scale)
        size = d_model if per_channel else 1
        start = 1.0 if bound == "none" else 0.0
        self.alpha_logit = nn.Parameter(torch.full((size,), start))
        self.beta_logit = nn.Parameter(torch.full((size,), start))

    def forward(self) -> tuple[Tensor, Tensor]:
        a, b = self.alpha_logit, self.beta_logit
        if self.bound == "softmax":  # softmax over the pair (a, b) is (σ(a − b), σ(b − a))
            return self.scale * torch.sigmoid(a - b), self.scale * torch.sigmoid(b - a)
        if self.bound == "sigmoid":
            return self.scale * torch.sigmoid(a), self.scale * torch.sigmoid(b)
        return a, b


class LowRankTerm(nn.Module):
    """LR: the low-rank linear map x ↦ B·A·x applied along the channel axis (2rD parameters).

    ``down`` (D, r) is A (D→r) and ``up`` (r, D) is B (r→D), used in row-vector form (x·down)·up. ``up`` starts
    at 0;
    ``down`` is column-orthogonal (entry (i, j) = 1/√(rD) if i mod r = j) or Xavier-uniform.
    ``forward(x)``: x (..., D, ...) with D on ``channel_dim`` → the same shape.
    """

    def __init__(self, d_model: int, rank: int, init: str = "orthogonal", channel_dim: int = -1) -> None:
        super().__init__()
        _check_rank(rank, d_model)
        self.channel_dim = channel_dim
        self.down = nn.Parameter(torch.empty(d_model, rank))
        self.up = nn.Parameter(torch.zeros(rank, d_model))
        if init == "orthogonal":
            with torch.no_grad():
                self.down.zero_()
                rows = torch.arange(d_model)
                self.down[rows, rows % rank] = 1.0 / math.sqrt(rank * d_model)
        else:
            nn.init.xavier_uniform_(self.down)

    def forward(self, x: Tensor) -> Tensor:
        return _channels_back(_channels_last(x, self.channel_dim) @ self.down @ self.up, self.channel_dim)

    def add_to(self, base: Tensor, x: Tensor, up: Tensor | None = None) -> Tensor:
        """``base + B·A·x`` (with ``up`` in place of B when given, e.g. B with its output channels scaled by β).

        base, x: the same shape, D on ``channel_dim`` → that shape. The sum is the epilogue of the up-projection's
        GEMM (``addmm``/``baddbmm``: no separate add kernel, no (…, D) product tensor) whenever the product comes out
        in base's dtype; under autocast (bf16 product, fp32 stream) it is added separately, so that the residual
        stream keeps its precision.
        """
        up = self.up if up is None else up
        channel_dim = self.channel_dim % x.dim()
        if channel_dim == x.dim() - 1:  # (N, D) rows: h = x·A, base + h·B
            hidden = x.reshape(-1, x.shape[-1]) @ self.down
            if hidden.dtype != base.dtype:
                return base + (hidden @ up).view(base.shape)
            return torch.addmm(base.reshape(hidden.shape[0], -1), hidden, up).view(base.shape)
        # channels inside, e.g. (B, C, H, W): (P, C, Q) columns, h = Aᵀ·x (P, r, Q), base + Bᵀ·h
        outer = math.prod(x.shape[:channel_dim])
        hidden = torch.matmul(self.down.t(), x.reshape(outer, x.shape[channel_dim], -1))
        up_t = up.t().expand(outer, *up.t().shape)
        if hidden.dtype != base.dtype:
            return base + torch.bmm(up_t, hidden).view(base.shape)
        columns = base.reshape(outer, base.shape[channel_dim], -1)
        return torch.baddbmm(columns, up_t, hidden).view(base.shape)


class PreviousActivations(nn.Module):
    """PA: Σ_{j=1..k} γ_j · h(x_{i−j}) over the k stream states before the current one.

    ``gamma`` (k,) learned scalars; h the identity (γ starts at 0) or a shared ``LowRankTerm`` (γ starts at 1, its
    up-projection at 0). ``history_size = k``. ``forward(history, like)``: ``history`` the earlier states, newest
    first (each shaped like ``like``; fewer than k at the bottom of a stack) → the sum, shaped like ``like``.
    """

    def __init__(self, d_model: int, k: int, pa_map: str = "identity", rank: int = 16, lr_init: str = "orthogonal",
                 channel_dim: int = -1) -> None:
        super().__init__()
        self.history_size = k
        self.channel_dim = channel_dim
        low_rank = pa_map == "low-rank"
        self.gamma = nn.Parameter(torch.full((k,), 1.0 if low_rank else 0.0))
        self.map: nn.Module | None = LowRankTerm(d_model, rank, lr_init, channel_dim) if low_rank else None

    def forward(self, history: Sequence[Tensor], like: Tensor) -> Tensor:
        states = list(history)[: self.history_size]
        if not states:
            return torch.zeros_like(like)
        for state in states:
            if state.shape != like.shape:
                raise ValueError(f"LAuReL-PA: a previous activation has shape {tuple(state.shape)} but the current "
                                 f"stream has {tuple(like.shape)}; PA combines states of one shape only (reset the "
                                 "history where the width or resolution changes).")
        stacked = torch.stack(states)  # (n, *shape), newest first
        weights = self.gamma[: len(states)].reshape((len(states),) + (1,) * like.dim())
        combined = (weights * stacked).sum(0)
        return self.map(combined) if self.map is not None else combined  # h is linear: Σγ h(x) = h(Σγ x)


@register_residual("laurel")
class LaurelResidual(Residual):
    """A LAuReL residual connection: x_{i+1} = α·f(x_i) + β·(x_i + LR(x_i) + PA(x_{i-1}, …, x_{i-k})).

    Args: ``d_model`` (D), ``layer_index`` (the residual registry's sub-layer index, unused by the maths), then the
    options of ``LaurelConfig`` (variant, rank, lr_init, bound, scale, per_channel, k, pa_map, channel_dim).

    Attributes ``weights`` (``ResidualWeights`` or None), ``low_rank`` (``LowRankTerm`` or None), ``previous``
    (``PreviousActivations`` or None); ``history_size`` = k with PA, else 0.

    ``forward(x, fx, history=())``: x, fx and each history entry share one shape (D on ``channel_dim``) → that shape.
    ValueError if ``channel_dim`` is not an axis of x, that axis does not have size D, or fx has another shape.
    """

    def __init__(self, d_model: int, layer_index: int = 0, variant: str = "rw", rank: int = 16,
                 lr_init: str = "orthogonal", bound: str = "softmax", scale: float = 2.0, per_channel: bool = False,
                 k: int = 3, pa_map: str = "identity", channel_dim: int = -1) -> None:
        super().__init__(d_model, layer_index)
        self.config = LaurelConfig(variant=variant, rank=rank, lr_init=lr_init, bound=bound, scale=scale,
                                   per_channel=per_channel, k=k, pa_map=pa_map, channel_dim=channel_dim)
        parts = self.config.parts
        self.weights = ResidualWeights(d_model, bound, scale, per_channel) if "rw" in parts else None
        self.low_rank = LowRankTerm(d_model, rank, lr_init, channel_dim) if "lr" in parts else None
        self.previous = (PreviousActivations(d_model, k, pa_map, rank, lr_init, channel_dim)
                         if "pa" in parts else None)
        self.history_size = k if self.previous is not None else 0

    def forward(self, x: Tensor, fx: Tensor, history: Sequence[Tensor] = ()) -> Tensor:
        _check_channel_axis(x, self.config.channel_dim, self.d_model)
        if fx.shape != x.shape:
            raise ValueError(f"LAuReL: the branch output has shape {tuple(fx.shape)} but the stream has "
                             f"{tuple(x.shape)}; a residual adds tensors of one shape, so the branch must keep its "
                             "input's shape (put a projection in the shortcut where the shape changes).")
        # Evaluated as α·fx + β·(x + PA) + (x·A)·(B·β): β is folded into B's output channels, so that the LR term is
        # added in the up-projection's GEMM epilogue and no (…, D) "stream" tensor is kept for β's gradient.
        stream = x if self.previous is None else x + self.previous(history, x)
        up = self.low_rank.up if self.low_rank is not None else None
        if self.weights is None:
            combined = fx + stream
        else:
            alpha, beta = self.weights()
            channel_dim = self.config.channel_dim
            alpha_x, beta_x = _broadcast_channels(alpha, fx, channel_dim), _broadcast_channels(beta, x, channel_dim)
            if fx.dtype == stream.dtype:
                combined = torch.addcmul(beta_x * stream, alpha_x, fx)
            else:  # autocast: addcmul would be cast to fp32 and save an fp32 copy of the bf16 fx
                combined = beta_x * stream + alpha_x * fx
            if up is not None:
                up = up * beta  # (r, D) · (D,) or (1,): scales column c of B by β_c
        return combined if self.low_rank is None else self.low_rank.add_to(combined, x, up)

    def extra_repr(self) -> str:
        return f"variant={'+'.join(self.config.parts)!r}, d_model={self.d_model}"


class LaurelBlock(nn.Module):
    """Any branch f wrapped with a LAuReL residual: y = LaurelResidual(x, f(x), history).

    Args:
        branch: a module mapping x to a tensor of x's shape (an MLP, a conv block, a group of layers).
        d_model: the number of channels D (on ``channel_dim``).
        variant, **options: as ``LaurelResidual``, or a ``LaurelConfig`` as ``variant`` and no options.

    ``forward(x, history=())``: x with D on ``channel_dim`` → the same shape. With PA, pass the earlier block inputs
    (newest first) as ``history``; in a stack of blocks, ``effml.nn.StreamHistory(k)`` keeps them: call
    ``block(x, history.recent(block.history_size))``, then ``history.push(x)``. x's channel axis is checked before the
    branch runs (ValueError naming the axis).
    """

    def __init__(self, branch: nn.Module, d_model: int, variant: str | LaurelConfig = "rw", **options: Any) -> None:
        super().__init__()
        self.branch = branch
        self.residual = LaurelResidual(d_model, 0, **laurel_options("LaurelBlock", variant, options))

    @property
    def history_size(self) -> int:
        return self.residual.history_size

    def forward(self, x: Tensor, history: Sequence[Tensor] = ()) -> Tensor:
        _check_channel_axis(x, self.residual.config.channel_dim, self.residual.d_model)
        return self.residual(x, self.branch(x), history)


def laurel_parameter_count(d_model: int, variant: str, rank: int = 16, per_channel: bool = False, k: int = 3,
                           pa_map: str = "identity") -> int:
    """The paper's parameter count of one LAuReL residual of width D = ``d_model``:
    RW 2 (2D per channel), LR 2rD, PA k (identity h) or 2rD + k (low-rank h); a combination adds its parts.

    The options are validated as ``LaurelResidual`` validates them (ValueError naming the bad option), including
    1 ≤ rank ≤ D where the variant has a low-rank map.
    """
    parts = LaurelConfig(variant=variant, rank=rank, per_channel=per_channel, k=k, pa_map=pa_map).parts
    if "lr" in parts or ("pa" in parts and pa_map == "low-rank"):
        _check_rank(rank, d_model)
    count = 0
    if "rw" in parts:
        count += 2 * d_model if per_channel else 2
    if "lr" in parts:
        count += 2 * rank * d_model
    if "pa" in parts:
        count += k + (2 * rank * d_model if pa_map == "low-rank" else 0)
    return count
