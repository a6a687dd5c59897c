"""Greedy autoregressive decoding of an ``EncoderDecoder`` with a causal decoder, and the padded output both
sequence-to-sequence decoders (this one and ``effml.decode.refinement``) return.

The source is encoded once; the decoder starts from BOS and feeds one token per step through its ``DecoderCache``
(self-attention keys/values grow by one position, the memory's cross-attention keys/values were computed once), so
a step costs O(current length) attention and no recomputation. ``use_cache=False`` recomputes the whole prefix at
every step: the reference the cached path must match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from effml.nn.encoder_decoder import EncoderDecoder

__all__ = ["DecodedTargets", "decode_autoregressive", "check_special_id", "within_lengths"]


@dataclass
class DecodedTargets:
    """Decoded target sequences.

    Attributes:
        tokens: (B, T) int64 ids, each row's ``lengths[b]`` tokens followed by padding (BOS/EOS are not included).
        lengths: (B,) int64 number of tokens of each row.
        scores: (B,) the mean log-probability of each row's tokens under the decoder's last pass (iterative
            refinement), or None (autoregressive decoding).
    """

    tokens: Tensor
    lengths: Tensor
    scores: Tensor | None = None

    def to_lists(self) -> list[list[int]]:
        """Each row's tokens as a list of ints (padding dropped)."""
        return [row[:length].tolist() for row, length in zip(self.tokens.cpu(), self.lengths.tolist(), strict=True)]


def within_lengths(lengths: Tensor, width: int) -> Tensor:
    """(B, width) bool, True at the positions inside each row's length of ``lengths`` (B,) (padding is False)."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def check_special_id(name: str, value: object, vocab_size: int) -> None:
    """Raise a ValueError unless ``value`` is a token id in [0, vocab_size)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, vocab_size={vocab_size}), got {value!r}.")


def decode_autoregressive(model: EncoderDecoder, source: Tensor, source_padding: Tensor | None = None, *,
                          bos_id: int, eos_id: int, pad_id: int, max_len: int | None = None,
                          use_cache: bool = True) -> DecodedTargets:
    """Greedy (argmax) decoding until every row has emitted ``eos_id`` or ``max_len`` tokens.

    Args:
        model: an ``EncoderDecoder`` with a causal decoder (put in eval mode for the call; its mode is restored).
        source: (B, S) source ids; source_padding: (B, S) bool, True at padded positions, or None.
        bos_id: the token that starts every target; eos_id: the token that ends one (not part of the output);
            pad_id: the filler after each row's end in the returned tokens.
        max_len: the most tokens per row, EOS not counted (default and upper limit: max_target_len; the decoder is
            fed BOS and all but the last token).
        use_cache: one token per step through the ``DecoderCache`` (True) or recompute every prefix (False).

    Returns:
        ``DecodedTargets``: (B, max_len) tokens padded with ``pad_id`` and each row's length. A row that never
        emits EOS has length ``max_len``.
    """
    config = model.config
    if not config.causal_decoder:
        raise ValueError("decode_autoregressive needs a causal decoder; a non-causal one decodes by iterative "
                         "refinement (effml.decode.refine_decode).")
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        check_special_id(name, value, config.vocab_size)
    limit = config.max_target_len
    max_len = limit if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= limit:
        raise ValueError(f"max_len must be an int in [1, max_target_len={limit}], got {max_len!r}.")
    batch = source.shape[0]
    device = source.device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            memory = model.encode(source, source_padding)
            cache = model.new_cache(memory, max_len=max_len) if use_cache else None
            fed = torch.full((batch, max_len + 1), pad_id, dtype=torch.long, device=device)
            fed[:, 0] = bos_id
            lengths = torch.full((batch,), max_len, dtype=torch.long, device=device)
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            for step in range(max_len):
                if cache is not None:
                    logits = model.decode(fed[:, step:step + 1], memory, cache=cache)[:, -1]
                else:
                    logits = model.decode(fed[:, :step + 1], memory)[:, -1]
                token = logits.argmax(-1)
                ends = token.eq(eos_id) & ~finished
                lengths = torch.where(ends, step, lengths)
                finished |= ends
                fed[:, step + 1] = torch.where(finished, pad_id, token)
                if bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    tokens = fed[:, 1:].clone()
    return DecodedTargets(tokens, lengths.clone())
