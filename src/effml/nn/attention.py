"""Multi-head self-attention (causal or bidirectional) with rotary positions, cross-attention to an encoder's
outputs, and the preallocated key/value cache used to decode.

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

__all__ = ["SelfAttention", "CausalSelfAttention", "CrossAttention", "KVCache", "key_padding_mask"]


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


def key_padding_mask(padding: Tensor, queries: int, causal: bool) -> Tensor:
    """SDPA's boolean attention mask from a key padding mask.

    Args:
        padding: (B, S) bool, True at padded key positions (they receive no attention).
        queries: number of query positions T (with ``causal``, T == S: query i sees keys 0..i).
        causal: also hide later keys.

    Returns:
        (B, 1, T or 1, S) bool, True where a query may attend to a key; it broadcasts over the heads.
    """
    mask = ~padding[:, None, None, :]
    if causal:
        keys = padding.shape[1]
        mask = mask & torch.ones(queries, keys, dtype=torch.bool, device=padding.device).tril()
    return mask


class _MultiHead(nn.Module):
    """What every attention module here shares: width D, H heads of size Dh = D / H, attention-weight dropout."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pick n_heads dividing d_model.")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout

    def _merge_heads(self, y: Tensor) -> Tensor:
        """(B, H, T, Dh) attention outputs -> (B, T, D) through the output projection."""
        batch, _, seq, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, self.d_model))


class SelfAttention(_MultiHead):
    """Multi-head self-attention with rotary positions, no biases; causal (a decoder) or bidirectional (an encoder,
    or the non-causal decoder of parallel decoding).

    Args:
        d_model: model width D.
        n_heads: number of heads H (D must be divisible by H; head size Dh = D / H).
        dropout: dropout probability on the attention weights, applied in training mode only.
        causal: each position attends only to itself and earlier positions.

    ``forward(x, rotation, cache=None, cache_slot=0, key_padding=None)``: x (B, T, D); rotation (T, 1, Dh/2) complex
    rotary factors for the absolute positions of the T tokens (``RotaryEmbedding``); returns (B, T, D). With a cache
    (causal only), the tokens are the T positions after ``cache.length`` and their keys/values are stored in
    ``cache`` slot ``cache_slot``. ``key_padding`` (B, T) bool marks padded positions, which no query attends to
    (their own outputs are meaningless and should be ignored); it cannot be combined with a cache.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True) -> None:
        super().__init__(d_model, n_heads, dropout)
        self.causal = causal
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) for the q/k/v projection and normal(0, out_std) for the output projection."""
        nn.init.normal_(self.qkv_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)

    def forward(self, x: Tensor, rotation: Tensor, cache: KVCache | None = None, cache_slot: int = 0,
                key_padding: Tensor | None = None) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).view(batch, seq, 3, self.n_heads, self.head_dim).unbind(2)
        q = apply_rotary(q, rotation).transpose(1, 2)
        k = apply_rotary(k, rotation).transpose(1, 2)
        v = v.transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            if not self.causal or key_padding is not None:
                raise ValueError("a KV cache serves causal attention without key padding (incremental decoding); "
                                 "call this layer without the cache, or build it with causal=True and no padding.")
            y = self._attend_cached(q, k, v, cache, cache_slot, dropout_p)
        elif key_padding is not None:
            mask = key_padding_mask(key_padding, seq, self.causal)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal)
        return self._merge_heads(y)

    @staticmethod
    def _attend_cached(q: Tensor, k: Tensor, v: Tensor, cache: KVCache, cache_slot: int, dropout_p: float) -> Tensor:
        """Write the new keys/values (B, H, T, Dh) into the cache slot and attend over every cached position."""
        seq = q.shape[2]
        start = cache.length
        end = start + seq
        keys, values = cache.keys[cache_slot], cache.values[cache_slot]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        # (a cache may be kept in another dtype than the model computes in, e.g. bf16 to save memory)
        k, v = keys[:, :, :end].to(q.dtype), values[:, :, :end].to(q.dtype)
        if seq == 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        mask = _offset_causal_mask(start, seq, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}, causal={self.causal}"


class CausalSelfAttention(SelfAttention):
    """Causal ``SelfAttention`` (the decoder LM's), with the same arguments except ``causal``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, dropout, causal=True)


class CrossAttention(_MultiHead):
    """Multi-head attention from a decoder's positions to an encoder's outputs (the memory), no biases, no positions.

    Args:
        d_model, n_heads, dropout: as ``SelfAttention``.

    The memory's keys and values depend only on the memory, so decoding computes them once
    (``memory_keys_values``) and passes them to every step. ``forward(x, keys_values, memory_padding=None)``:
    x (B, T, D) queries; keys_values the pair of (B, H, S, Dh) tensors; memory_padding (B, S) bool, True at padded
    memory positions; returns (B, T, D).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, dropout)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) for the q and k/v projections and normal(0, out_std) for the output projection."""
        nn.init.normal_(self.q_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.kv_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)

    def memory_keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the memory (B, S, D): two (B, H, S, Dh) tensors."""
        batch, length, _ = memory.shape
        k, v = self.kv_proj(memory).view(batch, length, 2, self.n_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, keys_values: tuple[Tensor, Tensor], memory_padding: Tensor | None = None) -> Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = keys_values
        mask = None if memory_padding is None else key_padding_mask(memory_padding, seq, causal=False)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout_p)
        return self._merge_heads(y)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}"
