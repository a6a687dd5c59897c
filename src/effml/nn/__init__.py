"""Layers and models: norms, rotary attention with a KV cache, MLPs, pluggable residuals, the decoder LM and the
encoder-decoder."""

from __future__ import annotations

from effml.nn.attention import CausalSelfAttention, CrossAttention, KVCache, SelfAttention
from effml.nn.block import TransformerBlock
from effml.nn.encoder_decoder import DecoderCache, EncoderDecoder, EncoderDecoderConfig, Memory
from effml.nn.linear_attention import LinearTransformer, LinearTransformerConfig
from effml.nn.laurel import LaurelBlock, LaurelConfig, LaurelResidual, laurel_parameter_count
from effml.nn.mlp import MLPS, GeluMLP, SwiGLUMLP, build_mlp
from effml.nn.norm import RMSNorm
from effml.nn.prompt_transformer import PromptTransformer
from effml.nn.residual import RESIDUALS, PlainResidual, Residual, StreamHistory, build_residual, register_residual
from effml.nn.rotary import RotaryEmbedding, apply_rotary
from effml.nn.ssm import SSM_MIXERS, Mamba1Mixer, Mamba2Mixer, SSMCache, build_mixer
from effml.nn.transformer import TransformerConfig, TransformerLM

__all__ = [
    "SelfAttention", "CausalSelfAttention", "CrossAttention", "KVCache",
    "EncoderDecoder", "EncoderDecoderConfig", "Memory", "DecoderCache",
    "TransformerBlock", "MLPS", "GeluMLP", "SwiGLUMLP", "build_mlp", "RMSNorm",
    "RESIDUALS", "PlainResidual", "Residual", "StreamHistory", "build_residual", "register_residual",
    "LaurelBlock", "LaurelConfig", "LaurelResidual", "laurel_parameter_count",
    "RotaryEmbedding", "apply_rotary", "TransformerConfig", "TransformerLM",
    "LinearTransformer", "LinearTransformerConfig", "PromptTransformer",
    "SSM_MIXERS", "Mamba1Mixer", "Mamba2Mixer", "SSMCache", "build_mixer",
]
