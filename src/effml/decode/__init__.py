"""Decoding: autoregressive generation with a KV cache, and next-token sampling filters."""

from __future__ import annotations

from effml.decode.autoregressive import generate
from effml.decode.sampling import filter_logits, select_next_token

__all__ = ["generate", "filter_logits", "select_next_token"]
