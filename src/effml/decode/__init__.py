"""Decoding: autoregressive generation with a KV cache, next-token sampling filters, and sequence-to-sequence
decoding of encoder-decoders (greedy autoregressive, and parallel by iterative refinement, PaDIR)."""

from __future__ import annotations

from effml.decode.autoregressive import generate
from effml.decode.refinement import REJECTERS, Rejecter, build_rejecter, refine_decode
from effml.decode.sampling import filter_logits, select_next_token
from effml.decode.seq2seq import DecodedTargets, decode_autoregressive

__all__ = ["generate", "filter_logits", "select_next_token", "DecodedTargets", "decode_autoregressive",
           "refine_decode", "build_rejecter", "Rejecter", "REJECTERS"]
