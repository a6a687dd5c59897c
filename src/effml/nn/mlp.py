"""Position-wise feed-forward sub-layers of a transformer block, chosen by name.

- ``"gelu"``: ``down(gelu(up(x)))`` with hidden size ``round(mlp_ratio · D)`` (GPT-2 style, exact erf GELU).
- ``"swiglu"``: ``down(silu(gate(x)) ⊙ up(x))`` (Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202).
  SwiGLU has three matrices instead of two, so to keep the parameter count close to the GELU MLP its hidden size is
  2/3 of ``round(mlp_ratio · D)``, rounded to the nearest multiple of 8 (at least 8). Gate and up projections are
  fused into one Linear.

No biases.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GeluMLP", "SwiGLUMLP", "MLPS", "build_mlp", "mlp_hidden_size"]


def mlp_hidden_size(kind: str, d_model: int, mlp_ratio: float) -> int:
    """Hidden width of the MLP named ``kind`` for width ``d_model`` (see the module docstring for the rule)."""
    hidden = round(mlp_ratio * d_model)
    if kind == "swiglu":
        return max(8, 8 * round(hidden * 2 / 3 / 8))
    return hidden


class GeluMLP(nn.Module):
    """``down(gelu(up(x)))``; x (..., D) -> (..., D), hidden width ``hidden``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) for the input projection, normal(0, out_std) for the output projection."""
        nn.init.normal_(self.up_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.down_proj.weight, mean=0.0, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) ⊙ up(x))`` with gate and up fused in one (D -> 2·hidden) Linear; x (..., D) -> (..., D)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) for the gate/up projection, normal(0, out_std) for the output projection."""
        nn.init.normal_(self.gate_up_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.down_proj.weight, mean=0.0, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "swiglu": SwiGLUMLP}


def build_mlp(kind: str, d_model: int, mlp_ratio: float) -> nn.Module:
    """The MLP named ``kind`` (a key of ``MLPS``) for width ``d_model``."""
    if kind not in MLPS:
        raise ValueError(f"unknown mlp {kind!r}; choose one of {sorted(MLPS)}.")
    return MLPS[kind](d_model, mlp_hidden_size(kind, d_model, mlp_ratio))
