"""Autoregressive generation from a ``TransformerLM`` with its preallocated KV cache.

The prompt is prefilled in one forward call; each following step feeds only the newest token, whose keys and
values join the cache, so a step costs O(current length) attention and no recomputation. Without the cache
(``use_cache=False``) every step recomputes the whole sequence — the reference the cached path must match.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effml.decode.sampling import check_sampling_options, select_next_token
from effml.nn.transformer import TransformerLM

__all__ = ["generate"]


def generate(model: TransformerLM, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             prefix: Tensor | None = None) -> Tensor:
    """Extend ``prompt`` by ``max_new_tokens`` tokens.

    Args:
        model: the language model; put in eval mode for the call (its previous mode is restored afterwards).
        prompt: (B, T0) token ids, T0 >= 1 (T0 may be 0 when ``prefix`` is given).
        max_new_tokens: number of tokens appended to every row; with attention, P + T0 + max_new_tokens - 1 must
            not exceed ``model.config.max_seq_len`` (the last token is emitted, never fed back); SSM mixers have no
            such limit (their state has a constant size).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_k, top_p: sampling filters (see ``effml.decode.sampling.filter_logits``).
        eos_id: once a row emits this token it keeps emitting it; generation stops early when every row has.
        generator: the random generator used for sampling (for reproducible samples).
        use_cache: feed one token per step through the KV cache (True) or recompute the full sequence (False).
        prefix: optional (B, P, d_model) input embeddings before the prompt (a soft prompt; see
            ``TransformerLM.forward``); they are prefilled with the prompt and are not part of the returned ids.

    Returns:
        (B, T0 + max_new_tokens) token ids: the prompt followed by the generated tokens.

    Runs under ``torch.inference_mode``; the returned tensor is an ordinary tensor (usable as training data).
    """
    check_sampling_options(temperature, top_k, top_p)
    if not isinstance(model, TransformerLM):
        raise TypeError(f"generate expects an effml TransformerLM, got {type(model).__name__}.")
    min_prompt = 0 if prefix is not None else 1
    if prompt.dim() != 2 or prompt.shape[1] < min_prompt or prompt.is_floating_point() or prompt.is_complex():
        raise ValueError(f"prompt must be a (batch, length >= {min_prompt}) integer tensor of token ids, got dtype "
                         f"{prompt.dtype} and shape {tuple(prompt.shape)}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    prefix_len = 0 if prefix is None else prefix.shape[1]
    positions = prefix_len + max(total - 1, prompt_len)  # the positions the model is fed
    if model.config.mixer == "attention" and positions > model.config.max_seq_len:  # an SSM state has no length
        raise ValueError(f"a prompt of {prompt_len} tokens (after a prefix of {prefix_len}) plus {max_new_tokens} "
                         f"new tokens needs {positions} positions but the model's max_seq_len is "
                         f"{model.config.max_seq_len}; shorten the prompt or generate fewer tokens.")
    if prompt.numel() and not 0 <= int(prompt.min()) <= int(prompt.max()) < model.config.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={model.config.vocab_size}), got ids from "
                         f"{int(prompt.min())} to {int(prompt.max())}; the tokenizer and the model disagree.")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < model.config.vocab_size):
        raise ValueError(f"eos_id must be None or a token id in [0, {model.config.vocab_size}), got {eos_id!r}.")

    # Allocated outside inference mode so callers can train on the result (inference tensors cannot be saved for
    # backward); writing into it under inference mode is allowed.
    tokens = torch.empty(batch, total, dtype=torch.long, device=prompt.device)
    tokens[:, :prompt_len] = prompt
    if max_new_tokens == 0:
        return tokens
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = model.new_cache(batch, max_len=positions) if use_cache else None
            logits = model(tokens[:, :prompt_len], cache=cache, prefix=prefix)[:, -1]
            finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device) if eos_id is not None else None
            for position in range(prompt_len, total):
                next_token = select_next_token(logits, temperature, top_k, top_p, generator)
                if finished is not None:
                    next_token = next_token.masked_fill(finished, eos_id)
                    finished |= next_token == eos_id
                tokens[:, position] = next_token
                if position == total - 1:
                    break
                if finished is not None and bool(finished.all()):
                    tokens[:, position + 1:] = eos_id
                    break
                if use_cache:
                    logits = model(tokens[:, position:position + 1], cache=cache)[:, -1]
                else:
                    logits = model(tokens[:, :position + 1], prefix=prefix)[:, -1]
            return tokens
    finally:
        model.train(was_training)
