"""SoftSRV's soft-prompt parameterisations P_θ(z): a context vector in, t input embeddings for a frozen LM out.

DeSalvo et al., "SoftSRV: Learn to Generate Targeted Synthetic Data" (arXiv 2410.16534). A frozen LM is driven only by
a learned soft prompt P_θ(z) ∈ R^{t×d} (t soft tokens of the LM's width d) computed from a context vector z = E(x) ∈
R^{d_e}; θ is trained to reconstruct target examples x (`effml.synth.softsrv`). Three parameterisations, chosen by
name (`make_soft_prompt`):

* ``"nsp"`` — non-contextual (plain prompt tuning): P_θ(z) = θ, z ignored; diversity comes only from sampling.
* ``"mp"``  — a mixture of k basis prompts with context-dependent weights: P_θ(z) = Σ_j α_j(z) P_j,
  α(z) = softmax(W z + b) (the paper uses k = 2).
* ``"mc"``  — MLP-contextual: P_θ(z) = θ + reshape(W₂ GELU(W₁ z + b₁) + b₂) to t × d, one shared MLP for the whole
  prompt.

The paper's exact mixture gate and MLP shapes are not public (PAPERS.md §6); the forms above are ours. The MLP's output
layer starts at zero, so an ``"mc"`` prompt starts as the ``"nsp"`` prompt with the same θ, and the basis prompts of
``"mp"`` start as θ plus small independent noise (identical bases would get identical gradients forever).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SoftPrompt", "NonContextualPrompt", "MixturePrompt", "ContextualMLPPrompt", "SOFT_PROMPTS",
           "make_soft_prompt", "embedding_rows_init"]


def embedding_rows_init(embedding_weight: Tensor, n_tokens: int, generator: torch.Generator | None = None) -> Tensor:
    """(n_tokens, d) initial soft prompt: the embedding rows of ``n_tokens`` vocabulary tokens drawn without
    replacement (with replacement when the vocabulary is smaller), as in Lester et al. (arXiv 2104.08691), so the prompt
    starts where the frozen LM's inputs live. ``embedding_weight``: (V, d)."""
    vocab = embedding_weight.shape[0]
    if n_tokens <= vocab:
        rows = torch.randperm(vocab, generator=generator)[:n_tokens]
    else:
        rows = torch.randint(0, vocab, (n_tokens,), generator=generator)
    return embedding_weight.detach()[rows.to(embedding_weight.device)].clone().float().cpu()


class SoftPrompt(nn.Module, ABC):
    """``prompt(context) -> (B, t, d)`` input embeddings from context vectors ``context`` (B, d_e).

    Args:
        n_tokens: t, the number of soft tokens.
        d_model: d, the frozen LM's embedding width.
        context_dim: d_e, the width of the context vectors (``E(x)``).
        init: optional (t, d) starting prompt θ (e.g. `embedding_rows_init`); default normal(0, init_std).
        init_std: std of the default initialisation.
    """

    name: str

    def __init__(self, n_tokens: int, d_model: int, context_dim: int, init: Tensor | None = None,
                 init_std: float = 0.02) -> None:
        super().__init__()
        for what, value in (("n_tokens", n_tokens), ("d_model", d_model), ("context_dim", context_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__} {what} must be an int ≥ 1, got {value!r}.")
        if init is not None and tuple(init.shape) != (n_tokens, d_model):
            raise ValueError(f"{type(self).__name__}: init has shape {tuple(init.shape)} but the prompt is "
                             f"(n_tokens={n_tokens}, d_model={d_model}); pass a (n_tokens, d_model) tensor.")
        self.n_tokens, self.d_model, self.context_dim = n_tokens, d_model, context_dim
        start = init.detach().float().clone() if init is not None else torch.randn(n_tokens, d_model) * init_std
        self.prompt = nn.Parameter(start)  # θ: (t, d)

    def forward(self, context: Tensor) -> Tensor:
        if context.dim() != 2 or context.shape[1] != self.context_dim:
            raise ValueError(f"{type(self).__name__} expects (batch, context_dim={self.context_dim}) context vectors, "
                             f"got shape {tuple(context.shape)}; embed the examples with the embedder the prompt was "
                             "built for.")
        return self.prompts(context.to(self.prompt.dtype))

    @abstractmethod
    def prompts(self, context: Tensor) -> Tensor:
        """(B, d_e) → (B, t, d)."""

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, d_model={self.d_model}, context_dim={self.context_dim}"


class NonContextualPrompt(SoftPrompt):
    """SS_NSP: P_θ(z) = θ for every context."""

    name = "nsp"

    def prompts(self, context: Tensor) -> Tensor:
        return self.prompt.expand(context.shape[0], -1, -1)


class MixturePrompt(SoftPrompt):
    """SS_MPk: P_θ(z) = Σ_j softmax(W z + b)_j P_j over ``k`` basis prompts P_j (each (t, d)).

    Extra args: k (number of basis prompts, ≥ 2), basis_noise (std of the noise added to θ to start each basis)."""

    name = "mp"

    def __init__(self, n_tokens: int, d_model: int, context_dim: int, init: Tensor | None = None,
                 init_std: float = 0.02, k: int = 2, basis_noise: float = 0.02) -> None:
        super().__init__(n_tokens, d_model, context_dim, init, init_std)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"MixturePrompt k must be an int ≥ 2 (k = 1 is the non-contextual prompt), got {k!r}.")
        self.k = k
        bases = self.prompt.detach()[None] + basis_noise * torch.randn(k, n_tokens, d_model)
        del self.prompt
        self.prompt = nn.Parameter(bases)  # the k bases P_j: (k, t, d)
        self.gate = nn.Linear(context_dim, k)

    def mixture_weights(self, context: Tensor) -> Tensor:
        """α(z): (B, d_e) → (B, k), rows summing to 1."""
        return self.gate(context).softmax(dim=-1)

    def prompts(self, context: Tensor) -> Tensor:
        return torch.einsum("bk,ktd->btd", self.mixture_weights(context), self.prompt)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


class ContextualMLPPrompt(SoftPrompt):
    """SS_MC: P_θ(z) = θ + reshape(W₂ GELU(W₁ z + b₁) + b₂), W₂ and b₂ starting at zero.

    Extra args: hidden (the MLP's hidden width)."""

    name = "mc"

    def __init__(self, n_tokens: int, d_model: int, context_dim: int, init: Tensor | None = None,
                 init_std: float = 0.02, hidden: int = 256) -> None:
        super().__init__(n_tokens, d_model, context_dim, init, init_std)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"ContextualMLPPrompt hidden must be an int ≥ 1, got {hidden!r}.")
        self.hidden = hidden
        self.up = nn.Linear(context_dim, hidden)
        self.down = nn.Linear(hidden, n_tokens * d_model)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def prompts(self, context: Tensor) -> Tensor:
        offsets = self.down(F.gelu(self.up(context))).view(-1, self.n_tokens, self.d_model)
        return self.prompt + offsets

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden={self.hidden}"


SOFT_PROMPTS: dict[str, type[SoftPrompt]] = {cls.name: cls for cls in (NonContextualPrompt, MixturePrompt,
                                                                       ContextualMLPPrompt)}


def make_soft_prompt(name: str, n_tokens: int, d_model: int, context_dim: int, **options: Any) -> SoftPrompt:
    """The soft prompt ``name`` (``"nsp"``, ``"mp"`` or ``"mc"``) with its options (``init``, ``init_std``; ``k`` and
    ``basis_noise`` for ``"mp"``; ``hidden`` for ``"mc"``)."""
    if name not in SOFT_PROMPTS:
        raise ValueError(f"Unknown soft prompt {name!r}; choose one of {', '.join(SOFT_PROMPTS)}.")
    cls = SOFT_PROMPTS[name]
    try:
        return cls(n_tokens, d_model, context_dim, **options)
    except TypeError as error:  # an option this parameterisation does not take
        raise ValueError(f"soft prompt {name!r} ({cls.__name__}) does not take the options {sorted(options)}: "
                         f"{error}. See its docstring for the options it takes.") from None
