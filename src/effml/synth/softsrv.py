"""SoftSRV: train a soft prompt to reconstruct target examples through a frozen LM, then sample synthetic ones.

DeSalvo et al., "SoftSRV: Learn to Generate Targeted Synthetic Data" (arXiv 2410.16534). With a frozen LM H, a frozen
lossy embedder E (`effml.synth.embedders`) and a soft prompt P_θ (`effml.synth.soft_prompts`), training minimises the
reconstruction loss over target examples x_i

    L(θ) = Σ_i −log p_H(x_i | P_θ(E(x_i)))  =  Σ_i Σ_t −log p_H(x_{i,t} | P_θ(E(x_i)), x_{i,<t})

(`reconstruction_loss`), and generation feeds P_θ(z) for contexts z — embeddings of target examples — and samples
from H (`generate_synthetic`). The frozen LM sees only the soft prompt: no hard prompt.

The LM is either effml's `TransformerLM` (its ``prefix`` argument) or a Hugging Face causal LM (``inputs_embeds``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.decode import generate
from effml.decode.sampling import check_sampling_options, select_next_token
from effml.nn.transformer import TransformerLM

__all__ = ["prefixed_logits", "reconstruction_loss", "generate_synthetic", "pad_examples", "cut_at_stop"]


def prefixed_logits(lm: nn.Module, prefix: Tensor, tokens: Tensor) -> Tensor:
    """Logits of ``lm`` over a prefix of input embeddings followed by tokens: (B, P, d), (B, T) → (B, P + T, V).

    effml's `TransformerLM` takes the prefix directly; a Hugging Face causal LM gets ``inputs_embeds``, the prefix
    joined to its own embeddings of the tokens."""
    if isinstance(lm, TransformerLM):
        return lm(tokens, prefix=prefix)
    if not hasattr(lm, "get_input_embeddings"):
        raise TypeError(f"prefixed_logits needs an effml TransformerLM or a Hugging Face causal LM (with "
                        f"get_input_embeddings and inputs_embeds), got {type(lm).__name__}.")
    embedded = lm.get_input_embeddings()(tokens.long())
    return lm(inputs_embeds=torch.cat([prefix.to(embedded.dtype), embedded], dim=1)).logits


def reconstruction_loss(lm: nn.Module, prompt: nn.Module, contexts: Tensor, tokens: Tensor, mask: Tensor,
                        reduction: str = "mean") -> Tensor:
    """SoftSRV's loss: −log p_H(x | P_θ(z)) over the examples' real tokens.

    Args:
        lm: the frozen LM H (its parameters may have requires_grad=False; gradients reach the prompt through it).
        prompt: a soft prompt P_θ: (B, d_e) → (B, t, d).
        contexts: (B, d_e) context vectors z = E(x).
        tokens: (B, T) the examples' token ids, padded to a common length T.
        mask: (B, T) bool, True at an example's real tokens (padding is False and never scored).
        reduction: "mean" (nats per real token) or "sum" (total nats).

    Returns: a scalar. Position P − 1 + j of the prefixed sequence predicts token j, so the first token is scored
    given the prompt alone.
    """
    if tokens.shape != mask.shape or tokens.dim() != 2:
        raise ValueError(f"tokens and mask must both be (batch, length), got {tuple(tokens.shape)} and "
                         f"{tuple(mask.shape)}.")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    prefix = prompt(contexts)
    logits = prefixed_logits(lm, prefix, tokens)[:, prefix.shape[1] - 1:-1]
    losses = F.cross_entropy(logits.float().flatten(0, 1), tokens.long().flatten(), reduction="none")
    total = (losses * mask.flatten()).sum()
    return total if reduction == "sum" else total / mask.sum().clamp_min(1)


def generate_synthetic(lm: nn.Module, prompt: nn.Module, contexts: Tensor, max_new_tokens: int, *,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None, batch_size: int = 256) -> Tensor:
    """Sample one sequence per context from the frozen LM driven by the soft prompt alone.

    Args:
        lm: effml's `TransformerLM` (sampled with `effml.decode.generate` and its KV cache) or a Hugging Face causal
            LM (``inputs_embeds``, then one token per step through its own cache), sampled the same way.
        prompt: the trained soft prompt P_θ.
        contexts: (N, d_e) context vectors, one per sample (for a non-contextual prompt they only set N).
        max_new_tokens: length of every sample; cut them at a stop sequence afterwards (`cut_at_stop`).
        temperature, top_k, top_p: sampling options, as in `effml.decode.generate`.
        generator: the random generator of the samples.
        batch_size: samples generated at once.

    Returns: (N, max_new_tokens) token ids (int64, on the CPU).
    """
    check_sampling_options(temperature, top_k, top_p)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}.")
    weight = next(lm.parameters())
    pieces = []
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            for start in range(0, contexts.shape[0], batch_size):
                pieces.append(_sample_batch(lm, prompt(contexts[start:start + batch_size].to(weight.device)).to(
                    weight.dtype), max_new_tokens, temperature, top_k, top_p, generator).cpu())
    finally:
        lm.train(was_training)
    return torch.cat(pieces) if pieces else torch.empty(0, max_new_tokens, dtype=torch.long)


def _sample_batch(lm: nn.Module, prefix: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None, generator: torch.Generator | None) -> Tensor:
    """(B, max_new_tokens) ids sampled after ``prefix`` (B, P, d) in the LM's dtype."""
    if isinstance(lm, TransformerLM):
        empty = torch.empty(prefix.shape[0], 0, dtype=torch.long, device=prefix.device)
        return generate(lm, empty, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=generator, prefix=prefix)
    return _hf_generate(lm, prefix, max_new_tokens, temperature, top_k, top_p, generator)


def _hf_generate(lm: nn.Module, prefix: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, generator: torch.Generator | None) -> Tensor:
    """(B, max_new_tokens) ids from a Hugging Face causal LM after ``inputs_embeds=prefix``, one token per step through
    its key/value cache, chosen by effml's `select_next_token` (so the same options mean the same distribution as
    with effml's LM, and the draws come from ``generator``). No end-of-sequence token ends a sample early."""
    tokens = torch.empty(prefix.shape[0], max_new_tokens, dtype=torch.long, device=prefix.device)
    if max_new_tokens == 0:
        return tokens
    output = lm(inputs_embeds=prefix, use_cache=True)
    for position in range(max_new_tokens):
        tokens[:, position] = select_next_token(output.logits[:, -1], temperature, top_k, top_p, generator)
        if position + 1 < max_new_tokens:
            output = lm(input_ids=tokens[:, position:position + 1], past_key_values=output.past_key_values,
                        use_cache=True)
    return tokens


def pad_examples(examples: Sequence[Sequence[int] | np.ndarray], length: int | None = None,
                 pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token-id sequences → ``(tokens, mask)``, both (N, length): each example left-aligned, padded with ``pad_id``
    (mask False there). ``length`` defaults to the longest example; a longer example is an error, not cut."""
    lengths = [len(example) for example in examples]
    length = max(lengths, default=0) if length is None else length
    if lengths and max(lengths) > length:
        raise ValueError(f"an example has {max(lengths)} tokens but the padded length is {length}; filter the "
                         "examples by length first, or raise the length.")
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, example in enumerate(examples):
        tokens[row, :len(example)] = torch.as_tensor(np.asarray(example, dtype=np.int64))
        mask[row, :len(example)] = True
    return tokens, mask


def cut_at_stop(ids: Sequence[int] | np.ndarray | Tensor, stop: Sequence[int]) -> list[int] | None:
    """The ids up to and including the first occurrence of the sequence ``stop``; None if it never occurs (a sample
    that ran out of tokens before it ended)."""
    values = ids.tolist() if isinstance(ids, (Tensor, np.ndarray)) else list(ids)
    stop = list(stop)
    if not stop:
        raise ValueError("stop must hold at least one token id.")
    for start in range(len(values) - len(stop) + 1):
        if values[start:start + len(stop)] == stop:
            return values[:start + len(stop)]
    return None
