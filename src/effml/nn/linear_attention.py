"""Linear self-attention (LSA) on the in-context regression prompt matrix: multi-layer and looped models.

Implements the models of Gatmiry, Saunshi, Reddi, Jegelka and Kumar, "On the Role of Depth and Looping for In-Context
Learning with Task Diversity" (arXiv 2410.21698) and Gatmiry et al., "Can Looped Transformers Learn to Implement
Multi-step Gradient Descent for In-context Learning?" (ICML 2024, arXiv 2410.08292).

A prompt of ``n`` pairs and a query is the matrix (one column per example, the query last, its label slot 0)

    Z₀ = [[x_1 … x_n  x_q],
          [y_1 … y_n  0  ]]  ∈ R^{(d+1)×(n+1)}.

One LSA layer with parameters ``P, Q ∈ R^{(d+1)×(d+1)}`` is the residual update

    Z ← Z + P Z M (Zᵀ Q Z) / n,        M = diag(1, …, 1, 0)  (the query column is not a key/value),

computed here as ``P (Z_c Z_cᵀ) Q Z / n`` with ``Z_c`` the n context columns. The prediction is read out as
``ŷ_q = −Z[d+1, n+1]`` (1-based: the label slot of the query column).

Parameterisations (strategy objects chosen by name in :data:`LSA_KINDS`):

* ``"unrestricted"``: full trainable ``P`` and ``Q``.
* ``"restricted"`` (the structured form of 2410.08292, §3): only a preconditioner ``A ∈ R^{d×d}`` and a row
  ``u ∈ R^d`` are trained;  ``P = [[0, 0], [uᵀ, 1]]``,  ``Q = [[−Aᵀ, 0], [0, 0]]``.  With ``u = 0`` the label row of
  ``Z`` after t layers holds the residuals ``y_i − x_iᵀ w_t`` (and ``−x_qᵀ w_t`` at the query) of t steps of
  preconditioned gradient descent from ``w_0 = 0``,

      w_{t+1} = w_t − A · Xᵀ (X w_t − y) / n,

  so ``ŷ_q = x_qᵀ w_L`` exactly (:func:`preconditioned_gd`). ``Q``'s block is ``−Aᵀ`` so that this holds for any
  ``A``; for a symmetric ``A`` (the paper's case) it is ``−A``.

:class:`LinearTransformer` stacks ``n_layers`` distinct layers and applies the stack ``n_loops`` times with shared
weights: ``n_layers = L, n_loops = 1`` is the multi-layer model, ``n_layers = 1, n_loops = L`` the looped one. It can
read the prediction out after every layer application, and a looped model can be run with more loops than it was
trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["prompt_matrix", "read_prediction", "lsa_update", "LinearSelfAttention", "RestrictedLinearSelfAttention",
           "LSA_KINDS", "LinearTransformerConfig", "LinearTransformer", "preconditioned_gd", "gd_parameters"]


def prompt_matrix(xs: Tensor, ys: Tensor, query: Tensor) -> Tensor:
    """The prompt matrix ``Z₀``: xs ``(B, n, d)``, ys ``(B, n)``, query ``(B, d)`` → ``(B, d+1, n+1)``."""
    if xs.dim() != 3 or ys.shape != xs.shape[:2] or query.shape != (xs.shape[0], xs.shape[2]):
        raise ValueError(f"prompt_matrix expects xs (B, n, d), ys (B, n) and query (B, d); got shapes "
                         f"{tuple(xs.shape)}, {tuple(ys.shape)}, {tuple(query.shape)}.")
    inputs = torch.cat([xs, query.unsqueeze(1)], dim=1)  # (B, n+1, d)
    labels = torch.cat([ys, torch.zeros_like(ys[:, :1])], dim=1)  # (B, n+1)
    return torch.cat([inputs, labels.unsqueeze(-1)], dim=2).transpose(1, 2)


def read_prediction(z: Tensor) -> Tensor:
    """The query prediction ``−Z[d+1, n+1]``: ``(B, d+1, n+1)`` → ``(B,)``."""
    return -z[:, -1, -1]


def lsa_update(z: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """One LSA layer ``Z + P Z M Zᵀ Q Z / n``: z ``(B, d+1, n+1)``, p and q ``(d+1, d+1)`` → ``(B, d+1, n+1)``."""
    context = z[:, :, :-1]
    n = context.shape[-1]
    gram = context @ context.transpose(1, 2)  # Z M Zᵀ: (B, d+1, d+1)
    return z + p @ gram @ q @ z / n


class LinearSelfAttention(nn.Module):
    """Unrestricted LSA layer: full ``P`` and ``Q`` of shape ``(d+1, d+1)``.

    Initialised at the gradient-descent form with a small step, ``P = e_{d+1} e_{d+1}ᵀ``, ``Q = −init_scale ·
    diag(1, …, 1, 0)``, plus N(0, init_std²) noise on every entry (``init_scale = 0``: purely random). A deep stack of
    LSA layers is a polynomial of degree 3^L in the prompt, so a purely random start easily diverges at L ≥ 8; this
    start is a contraction for any depth, and the noise lets training leave the structured form.
    """

    def __init__(self, d: int, init_scale: float = 0.1, init_std: float = 0.02) -> None:
        super().__init__()
        p = torch.zeros(d + 1, d + 1)
        p[d, d] = 1.0 if init_scale > 0 else 0.0
        q = -init_scale * torch.diag(torch.cat([torch.ones(d), torch.zeros(1)]))
        self.p_matrix = nn.Parameter(p + torch.randn(d + 1, d + 1) * init_std)
        self.q_matrix = nn.Parameter(q + torch.randn(d + 1, d + 1) * init_std)

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``(P, Q)``, each ``(d+1, d+1)``."""
        return self.p_matrix, self.q_matrix

    def forward(self, z: Tensor) -> Tensor:
        return lsa_update(z, *self.matrices())


class RestrictedLinearSelfAttention(nn.Module):
    """Restricted LSA layer of 2410.08292: trainable preconditioner ``A (d, d)`` and row ``u (d,)`` only.

    Initialised at ``A = init_scale · I`` and ``u ~ N(0, init_std²)`` (``u`` starts away from the optimum u = 0, so that
    training has to find it).
    """

    def __init__(self, d: int, init_scale: float = 0.1, init_std: float = 0.1) -> None:
        super().__init__()
        self.preconditioner = nn.Parameter(torch.eye(d) * init_scale)
        self.u = nn.Parameter(torch.randn(d) * init_std)

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``P = [[0, 0], [uᵀ, 1]]`` and ``Q = [[−Aᵀ, 0], [0, 0]]``, each ``(d+1, d+1)``."""
        d = self.u.shape[0]
        zeros_row = self.u.new_zeros(d, d + 1)
        p = torch.cat([zeros_row, torch.cat([self.u, self.u.new_ones(1)]).unsqueeze(0)], dim=0)
        q = nn.functional.pad(-self.preconditioner.T, (0, 1, 0, 1))
        return p, q

    def forward(self, z: Tensor) -> Tensor:
        return lsa_update(z, *self.matrices())


LSA_KINDS: dict[str, type[nn.Module]] = {"unrestricted": LinearSelfAttention,
                                         "restricted": RestrictedLinearSelfAttention}


@dataclass(frozen=True)
class LinearTransformerConfig:
    """Shape of a :class:`LinearTransformer` (validated on construction).

    Attributes:
        d: input dimension (Z has d+1 rows). n_layers: distinct layers. n_loops: applications of the whole stack.
        attention: a key of :data:`LSA_KINDS`. init_scale: every layer starts as a GD step with preconditioner
        ``init_scale · I``. init_std: std of the noise added to that start (unrestricted: every entry of P and Q;
        restricted: u).
    """

    d: int = 5
    n_layers: int = 1
    n_loops: int = 1
    attention: str = "unrestricted"
    init_scale: float = 0.1
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d", "n_layers", "n_loops"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LinearTransformerConfig.{name} must be a positive int, got {value!r}.")
        if self.attention not in LSA_KINDS:
            raise ValueError(f"LinearTransformerConfig.attention={self.attention!r} is not known; choose one of "
                             f"{sorted(LSA_KINDS)}.")
        for name in ("init_std", "init_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LinearTransformerConfig.{name} must be a finite number ≥ 0, got {value!r}.")


class LinearTransformer(nn.Module):
    """``n_loops × [n_layers LSA layers]`` on the prompt matrix; see the module docstring."""

    def __init__(self, config: LinearTransformerConfig) -> None:
        super().__init__()
        self.config = config
        kind = LSA_KINDS[config.attention]
        self.layers = nn.ModuleList(kind(config.d, config.init_scale, config.init_std) for _ in range(config.n_layers))

    @property
    def depth(self) -> int:
        """Layer applications per forward pass: ``n_layers · n_loops``."""
        return self.config.n_layers * self.config.n_loops

    def forward(self, z: Tensor, n_loops: int | None = None, readouts: bool = False) -> Tensor:
        """Query predictions.

        Args:
            z: ``(B, d+1, n+1)`` prompt matrices (:func:`prompt_matrix`).
            n_loops: applications of the stack (default ``config.n_loops``; more or fewer at test time is allowed).
            readouts: return the prediction read out after every layer application.

        Returns:
            ``(B,)`` predictions, or ``(n_loops · n_layers, B)`` with ``readouts`` (the last row is the output).
        """
        if z.dim() != 3 or z.shape[1] != self.config.d + 1 or z.shape[2] < 2:
            raise ValueError(f"LinearTransformer(d={self.config.d}) expects prompt matrices of shape "
                             f"(B, {self.config.d + 1}, n+1) with n ≥ 1; got {tuple(z.shape)}.")
        loops = self.config.n_loops if n_loops is None else n_loops
        if not isinstance(loops, int) or loops < 1:
            raise ValueError(f"n_loops must be a positive int, got {loops!r}.")
        predictions = []
        for _ in range(loops):
            for layer in self.layers:
                z = layer(z)
                if readouts:
                    predictions.append(read_prediction(z))
        return torch.stack(predictions) if readouts else read_prediction(z)


def preconditioned_gd(xs: Tensor, ys: Tensor, query: Tensor, preconditioner: Tensor, steps: int) -> Tensor:
    """Query predictions of ``steps`` steps of ``w ← w − A Xᵀ(X w − y)/n`` from ``w = 0``, after every step.

    Args:
        xs ``(B, n, d)``, ys ``(B, n)``, query ``(B, d)``; preconditioner ``A`` ``(d, d)`` or ``(B, d, d)``.

    Returns:
        ``(steps, B)``: row ``t`` is ``x_qᵀ w_{t+1}``.
    """
    n = xs.shape[1]
    weights = xs.new_zeros(xs.shape[0], xs.shape[2])
    predictions = []
    for _ in range(steps):
        residuals = (xs @ weights.unsqueeze(-1)).squeeze(-1) - ys  # (B, n)
        gradient = (xs.transpose(1, 2) @ residuals.unsqueeze(-1)).squeeze(-1) / n  # (B, d)
        weights = weights - (preconditioner @ gradient.unsqueeze(-1)).squeeze(-1)
        predictions.append((weights * query).sum(-1))
    return torch.stack(predictions)


def gd_parameters(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """The preconditioner ``A`` ``(d, d)`` and row ``u`` ``(d,)`` that an LSA layer ``(P, Q)`` implements on the label
    row when its other blocks are zero: ``A = −(P[d+1, d+1] · Q[:d, :d])ᵀ``, ``u = P[d+1, :d] / P[d+1, d+1]``
    (1-based). For a restricted layer these are exactly its ``A`` and ``u``; for an unrestricted one they are the
    GD reading of its weights, whose faithfulness is measured by comparing predictions with :func:`preconditioned_gd`.
    """
    d = p.shape[0] - 1
    corner = p[d, d]
    return -(corner * q[:d, :d]).T, p[d, :d] / corner
