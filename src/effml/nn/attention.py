"""Causal multi-head self-attention with rotary positions, and the preallocated key/value cache used to decode.

Attention (Vaswani et al., arXiv 1706.03762) with one fused q/k/v projection, RoPE on queries and keys, and
``torch.nn.functional.scaled_dot_product_attention`` (SDPA) for the softmax(q kᵀ / √Dh) v product.

The cache holds, for every *application* of an attention layer (a looped model applies the same layer several
times, and each application sees different inputs), preallocated key and value tensors of shape
(B, H, max_len, Dh) plus the number of positions already written. A call with T new tokens writes their keys and
values at positions [length, length + T) and attends over [0, length + T): a single new token attends to everything
(no mask), a chunk of T > 1 tokens after a non-empty prefix gets the offset causal mask, and a chunk starting at 0
uses SDPA's own causal mode. The model advances ``length`` once per forward, after every layer has written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.nn.rotary import apply_rotary

__all__ = ["CausalSelfAttention", "KVCache"]


class KVCache:
    """Preallocated key/value storage for incremental decoding.

    Attributes:
        keys, values: (n_slots, B, H, max_len, Dh); slot s belongs to one application of one attention layer.
        length: number of positions already written (a Python int, so reading it never syncs a device).

    Build one with ``TransformerLM.new_cache`` rather than by hand.
    """

    def __init__(self, n_slots: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        for name, value in (("n_slots", n_slots), ("batch_size", batch_size), ("n_heads", n_heads),
                            ("max_len", max_len), ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCache {name} must be a positive int, got {value!r}.")
        shape = (n_slots, batch_size, n_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def n_slots(self) -> int:
        return self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def reset(self) -> None:
        """Forget every cached position (the storage is kept and overwritten by later calls)."""
        self.length = 0

    def check_room(self, new_tokens: int) -> None:
        """Raise ValueError if ``new_tokens`` more positions do not fit."""
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"KV cache overflow: it holds {self.length} of max_len={self.max_len} positions and "
                             f"{new_tokens} more were given; create the cache with a larger max_len "
                             "(TransformerLM.new_cache(batch_size, max_len=...)) or feed fewer tokens.")

    def advance(self, new_tokens: int) -> None:
        """Mark ``new_tokens`` more positions as written (called by the model after all layers wrote)."""
        self.check_room(new_tokens)
        self.length += new_tokens

    def __repr__(self) -> str:
        n, b, h, m, d = self.keys.shape
        return (f"KVCache(n_slots={n}, batch_size={b}, n_heads={h}, max_len={m}, head_dim={d}, "
                f"length={self.length}, dtype={self.keys.dtype}, device={self.keys.device})")


def _offset_causal_mask(start: int, new_tokens: int, device: torch.device) -> Tensor:
    """Boolean (T, start + T) mask, True where query i (absolute position start + i) may attend to key j."""
    query_positions = torch.arange(start, start + new_tokens, device=device)
    key_positions = torch.arange(start + new_tokens, device=device)
    return key_positions[None, :] <= query_positions[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, no biases.

    Args:
        d_model: model width D.
        n_heads: number of heads H (D must be divisible by H; head size Dh = D / H).
        dropout: dropout probability on the attention weights, applied in training mode only.

    ``forward(x, rotation, cache=None, cache_slot=0)``: x (B, T, D); rotation (T, 1, Dh/2) complex rotary factors
    for the absolute positions of the T tokens (``RotaryEmbedding``); returns (B, T, D). With a cache, the tokens
    are the T positions after ``cache.length`` and their keys/values are stored in ``cache`` slot ``cache_slot``.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pick n_heads dividing d_model.")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) for the q/k/v projection and normal(0, out_std) for the output projection."""
        nn.init.normal_(self.qkv_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)

    def forward(self, x: Tensor, rotation: Tensor, cache: KVCache | None = None, cache_slot: int = 0) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).view(batch, seq, 3, self.n_heads, self.head_dim).unbind(2)
        q = apply_rotary(q, rotation).transpose(1, 2)
        k = apply_rotary(k, rotation).transpose(1, 2)
        v = v.transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            start = cache.length
            end = start + seq
            keys, values = cache.keys[cache_slot], cache.values[cache_slot]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            # (a cache may be kept in another dtype than the model computes in, e.g. bf16 to save memory)
            k, v = keys[:, :, :end].to(q.dtype), values[:, :, :end].to(q.dtype)
            if seq == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            elif start == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:
                mask = _offset_causal_mask(start, seq, x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, self.d_model))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}"
