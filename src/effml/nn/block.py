"""A pre-norm transformer decoder block whose two residual connections are pluggable ``Residual`` modules.

    h = residual_attn(x, dropout(attention(RMSNorm(x))))
    y = residual_mlp(h, dropout(mlp(RMSNorm(h))))

With the plain residual this is the GPT-2 / LLaMA pre-norm block ``x + f(norm(x))``. ``mixer`` replaces attention
by a selective SSM ("mamba1" | "mamba2", ``effml.nn.ssm``); the token-mixing sub-layer keeps the name ``attn``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from effml.nn.attention import CausalSelfAttention, KVCache
from effml.nn.mlp import build_mlp
from effml.nn.norm import RMSNorm
from effml.nn.residual import Residual, StreamHistory, build_residual
from effml.nn.ssm import SSMCache, build_mixer

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """Pre-norm block: causal self-attention then MLP, each wrapped by a residual from the registry.

    Args:
        d_model, n_heads: width D and number of attention heads.
        mlp, mlp_ratio: MLP kind ("gelu" | "swiglu") and width ratio (see ``effml.nn.mlp``).
        dropout: probability for attention weights and for both residual branches (training mode only).
        residual, residual_options: registry name and constructor options of the residual connections.
        norm_eps: RMSNorm epsilon.
        block_index: position of this block in the stack; the residuals get sub-layer indices
            2·block_index (attention) and 2·block_index + 1 (MLP).
        mixer, mixer_options: "attention" (default) or an SSM mixer name and its constructor options.

    ``forward(x, rotation, cache=None, cache_slot=0, history=None)``: x (B, T, D) -> (B, T, D); rotation as in
    ``CausalSelfAttention``; ``history`` is the forward pass's ``StreamHistory`` or None when no residual needs one.
    """

    def __init__(self, d_model: int, n_heads: int, mlp: str = "gelu", mlp_ratio: float = 4.0,
                 dropout: float = 0.0, residual: str = "plain", residual_options: dict[str, Any] | None = None,
                 norm_eps: float = 1e-6, block_index: int = 0, mixer: str = "attention",
                 mixer_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        options = residual_options or {}
        self.attn_norm = RMSNorm(d_model, norm_eps)
        if mixer == "attention":
            self.attn: nn.Module = CausalSelfAttention(d_model, n_heads, dropout)
        else:
            self.attn = build_mixer(mixer, d_model, **(mixer_options or {}))
        self.attn_residual: Residual = build_residual(residual, d_model, 2 * block_index, **options)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = build_mlp(mlp, d_model, mlp_ratio)
        self.mlp_residual: Residual = build_residual(residual, d_model, 2 * block_index + 1, **options)
        self.branch_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def history_size(self) -> int:
        """The most previous stream states either residual of this block needs."""
        return max(self.attn_residual.history_size, self.mlp_residual.history_size)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Re-initialise the norms, attention and MLP (the residual modules keep their own initialisation)."""
        self.attn_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.attn.reset_parameters(std, out_std)
        self.mlp.reset_parameters(std, out_std)

    def forward(self, x: Tensor, rotation: Tensor, cache: KVCache | SSMCache | None = None, cache_slot: int = 0,
                history: StreamHistory | None = None) -> Tensor:
        attn_out = self.attn(self.attn_norm(x), rotation, cache, cache_slot)
        x = self._connect(self.attn_residual, x, self.branch_dropout(attn_out), history)
        mlp_out = self.mlp(self.mlp_norm(x))
        return self._connect(self.mlp_residual, x, self.branch_dropout(mlp_out), history)

    @staticmethod
    def _connect(residual: Residual, x: Tensor, fx: Tensor, history: StreamHistory | None) -> Tensor:
        if history is None:
            return residual(x, fx)
        out = residual(x, fx, history.recent(residual.history_size))
        history.push(x)
        return out
