"""A frozen, deliberately lossy sequence embedder: hashed byte n-grams under a fixed random projection.

SoftSRV (arXiv 2410.16534) conditions its soft prompt on a context vector z = E(x) of the example x the frozen LM is
asked to reconstruct. E must summarise x without spelling it out — a lossy code — or the prompt could carry the text
itself and generation would copy the training examples. This embedder keeps only which byte n-grams occur, how often,
folded into a fixed number of buckets, and projected to ``dim`` dimensions:

    c_b(x) = #{n-grams g of x : hash(g) mod buckets = b}        (counts per bucket, b < buckets)
    h(x)   = √c(x) / ‖√c(x)‖₂                                    (square roots damp frequent n-grams)
    z(x)   = R h(x) / ‖R h(x)‖₂,   R ~ N(0, 1/dim)^{dim × buckets}, drawn once from ``seed``

Order beyond n bytes is lost, and so is the identity of n-grams that share a bucket. Any other callable mapping a list
of texts to a (B, d_e) tensor (a sentence encoder, say) can stand in for it wherever effml takes an embedder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["HashedNgramEmbedder"]

_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: 2^64 / golden ratio, odd


class HashedNgramEmbedder:
    """``embedder(texts) -> (B, dim)`` float32 unit vectors (zero for a text shorter than ``n`` bytes).

    Args:
        dim: output width d_e.
        n: n-gram length in UTF-8 bytes (1 to 8).
        buckets: number of hash buckets the n-grams are counted in.
        seed: seed of the projection R (the embedder is a fixed function of its four arguments).
    """

    def __init__(self, dim: int = 64, n: int = 3, buckets: int = 4096, seed: int = 0) -> None:
        for name, value, low in (("dim", dim, 1), ("n", n, 1), ("buckets", buckets, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"HashedNgramEmbedder {name} must be an int ≥ {low}, got {value!r}.")
        if n > 8:
            raise ValueError(f"HashedNgramEmbedder n must be at most 8 (an n-gram is packed into 64 bits), got {n}.")
        self.dim, self.n, self.buckets, self.seed = dim, n, buckets, seed
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(buckets, dim, generator=generator) / dim ** 0.5  # Rᵀ: (buckets, dim)

    def bucket_counts(self, texts: Sequence[str | bytes]) -> Tensor:
        """(B, buckets) float32 counts c(x) of each text's n-grams per bucket."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("HashedNgramEmbedder takes a sequence of texts; wrap a single text in a list.")
        counts = np.zeros((len(texts), self.buckets), dtype=np.float32)
        for row, text in enumerate(texts):
            data = np.frombuffer(text.encode("utf-8") if isinstance(text, str) else bytes(text), dtype=np.uint8)
            if len(data) < self.n:
                continue
            grams = np.zeros(len(data) - self.n + 1, dtype=np.uint64)
            for offset in range(self.n):  # pack the n bytes of every n-gram into one integer
                grams = (grams << np.uint64(8)) | data[offset:len(data) - self.n + 1 + offset].astype(np.uint64)
            buckets = (grams * _HASH_MULTIPLIER) >> np.uint64(32)  # the well-mixed high bits (wraps mod 2^64)
            np.add.at(counts[row], (buckets % np.uint64(self.buckets)).astype(np.int64), 1.0)
        return torch.from_numpy(counts)

    def __call__(self, texts: Sequence[str | bytes]) -> Tensor:
        """(B, dim) float32 context vectors z(x), unit length (zero for texts shorter than ``n`` bytes)."""
        roots = self.bucket_counts(texts).sqrt()
        hashed = roots / roots.norm(dim=1, keepdim=True).clamp_min(1e-12)
        projected = hashed @ self.projection
        return projected / projected.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def __repr__(self) -> str:
        return f"HashedNgramEmbedder(dim={self.dim}, n={self.n}, buckets={self.buckets}, seed={self.seed})"
