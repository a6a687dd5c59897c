"""Next-token selection from logits: temperature, top-k and nucleus (top-p) filtering, greedy or sampled choice.

Top-k keeps the k largest logits. Top-p (Holtzman et al., "The Curious Case of Neural Text Degeneration",
arXiv 1904.09751) keeps the smallest set of most-probable tokens whose probability mass is at least p — the shortest
prefix of the tokens sorted by decreasing probability with cumulative mass ≥ p — which always includes the argmax.
When both are given, top-k is applied first and top-p acts on the renormalised survivors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_logits", "select_next_token", "check_sampling_options"]


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError unless temperature >= 0, top_k is None or an int >= 1, and top_p is None or in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}.")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}.")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set the logits of tokens outside the top-k / top-p sets to -inf.

    Args:
        logits: (B, V) unnormalised scores.
        top_k: keep exactly the k highest logits per row (ties at the boundary are broken by index order); None or
            k >= V keeps all.
        top_p: keep the smallest prefix of the tokens sorted by decreasing probability whose mass is >= top_p
            (always at least the argmax); None or 1.0 keeps all.

    Returns:
        (B, V) logits, a new tensor; kept entries are unchanged.
    """
    check_sampling_options(0.0, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"filter_logits expects (batch, vocab) logits, got shape {tuple(logits.shape)}.")
    filtered = logits
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)
        filtered = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = filtered.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # A token is dropped when the more probable tokens before it already reach top_p; the first never is.
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    return logits.clone() if filtered is logits else filtered


def select_next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Choose one token per row: argmax when ``temperature == 0``, otherwise a sample from
    softmax(filter_logits(logits / temperature)). logits (B, V) -> token ids (B,) (int64)."""
    check_sampling_options(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    peak = logits.amax(dim=-1, keepdim=True)
    # Shifted so that the largest logit is 0 (the same distribution): a tiny temperature then drives the others to
    # −inf instead of overflowing all of them to ±inf, whose softmax is NaN.
    filtered = filter_logits((logits - torch.where(peak.isfinite(), peak, 0.0)) / temperature, top_k, top_p)
    return torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(-1)
