"""The softmax-attention looped transformer with input injection, reading an in-context regression prompt.

The comparison model of Gatmiry et al. (arXiv 2410.21698, 2410.08292): effml's pre-norm transformer block
(``effml.nn.block.TransformerBlock``: causal rotary softmax attention + MLP) looped with shared weights, the input
re-added before every loop after the first (input injection), on the prompt read as a sequence of ``n + 1`` tokens
— the columns ``(x_i, y_i)`` of the prompt matrix, the query ``(x_q, 0)`` last — embedded by a linear map:

    h₀ = W_in z_j                       (token j = column j of Z, (d+1) → d_model)
    h ← blocks(h) ; h ← h + h₀ before every loop after the first
    ŷ_q = w_outᵀ RMSNorm(h_{n+1})      (read at the query token; after every loop with ``readouts``)

The causal mask lets the query token (last) attend to every example. The interface is that of
``effml.nn.linear_attention.LinearTransformer`` (prompt matrices in, query predictions out), so the same training
loss and evaluation serve both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from effml.nn.block import TransformerBlock
from effml.nn.norm import RMSNorm
from effml.nn.rotary import RotaryEmbedding
from effml.nn.transformer import TransformerConfig

__all__ = ["PromptTransformer"]


class PromptTransformer(nn.Module):
    """Looped softmax transformer on prompt matrices; ``config.vocab_size`` is unused (inputs are continuous).

    Args:
        d: input dimension (tokens have d+1 features).
        config: depth, width, heads, MLP, ``n_loops`` and ``input_injection`` as for ``TransformerLM``; its
            ``max_seq_len`` bounds n + 1.
    """

    def __init__(self, d: int, config: TransformerConfig) -> None:
        super().__init__()
        if config.residual != "plain":
            raise ValueError(f"PromptTransformer supports the plain residual only, got residual={config.residual!r}.")
        if config.mixer != "attention":
            raise ValueError(f"PromptTransformer supports attention only, got mixer={config.mixer!r}; its blocks read "
                             "the prompt with rotary attention (use TransformerLM for SSM mixers).")
        self.d, self.config = d, config
        self.embed = nn.Linear(d + 1, config.d_model, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_base)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.d_model, config.n_heads, mlp=config.mlp, mlp_ratio=config.mlp_ratio,
                             dropout=config.dropout, residual=config.residual,
                             residual_options=config.residual_options, norm_eps=config.norm_eps, block_index=i)
            for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.readout = nn.Linear(config.d_model, 1, bias=False)
        std = config.init_std
        for linear in (self.embed, self.readout):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        for block in self.blocks:
            block.reset_parameters(std, std / math.sqrt(2 * config.n_layers * config.n_loops))

    @property
    def depth(self) -> int:
        """Block applications per forward pass: ``n_layers · n_loops``."""
        return self.config.n_layers * self.config.n_loops

    def forward(self, z: Tensor, n_loops: int | None = None, readouts: bool = False) -> Tensor:
        """Query predictions from prompt matrices ``z`` ``(B, d+1, n+1)``: ``(B,)``, or ``(n_loops, B)`` with
        ``readouts`` (one per loop; the last is the output). ``n_loops`` overrides ``config.n_loops``."""
        if z.dim() != 3 or z.shape[1] != self.d + 1 or not 2 <= z.shape[2] <= self.config.max_seq_len:
            raise ValueError(f"PromptTransformer(d={self.d}) expects prompt matrices (B, {self.d + 1}, n+1) with "
                             f"2 ≤ n+1 ≤ max_seq_len={self.config.max_seq_len}; got {tuple(z.shape)}.")
        loops = self.config.n_loops if n_loops is None else n_loops
        if not isinstance(loops, int) or loops < 1:
            raise ValueError(f"n_loops must be a positive int, got {loops!r}.")
        tokens = z.transpose(1, 2)  # (B, n+1, d+1)
        rotation = self.rotary(0, tokens.shape[1]).unsqueeze(1)
        embedded = self.embed(tokens)
        h = embedded
        predictions = []
        for loop in range(loops):
            if loop > 0 and self.config.input_injection:
                h = h + embedded
            for block in self.blocks:
                h = block(h, rotation)
            if readouts or loop == loops - 1:
                predictions.append(self.readout(self.final_norm(h[:, -1])).squeeze(-1))
        return torch.stack(predictions) if readouts else predictions[-1]
