"""Encoder-decoder transformer (Vaswani et al., arXiv 1706.03762) with a causal or non-causal decoder and an optional
length predictor: the model behind autoregressive and parallel (iterative-refinement) sequence-to-sequence decoding.

    source -> embedding -> [LENGTH]? + n_encoder_layers × [bidirectional self-attention, MLP] -> RMSNorm = memory
    target -> embedding -> n_decoder_layers × [self-attention, cross-attention to memory, MLP] -> RMSNorm -> head

Blocks are pre-norm (RMSNorm) with plain residuals, rotary self-attention and no biases, as effml's decoder LM
(``effml.nn.transformer``); cross-attention carries no positions. One embedding table serves source and target
(one vocabulary), tied to the output head by default.

``causal_decoder=True`` is the ordinary autoregressive decoder, decoded token by token with a KV cache
(``new_cache``: the self-attention keys/values grow, the memory's keys/values are computed once). ``False`` is
PaDIR's non-causal decoder (Li et al., "Promises and pitfalls of generative masked language modeling", arXiv
2407.21046): every target position sees every other, so a whole (corrupted) target is predicted in one parallel pass.

``length_classes = K > 0`` adds PaDIR's token length predictor: a learned [LENGTH] embedding is put before the
source; its encoder output h is classified against a table of K length embeddings (logits h · E_lenᵀ for target
lengths 0 … K − 1). The [LENGTH] position stays in the memory, like any source token.

The memory's cross-attention keys and values depend on the memory alone. ``decode`` computes them on every call
unless the memory carries them: ``with_cross_keys_values(memory)`` computes them once, for a memory that several
``decode`` calls (parallel passes, or steps without a cache) attend to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from effml.nn.attention import CrossAttention, KVCache, SelfAttention
from effml.nn.mlp import MLPS, build_mlp
from effml.nn.norm import RMSNorm
from effml.nn.rotary import RotaryEmbedding
from effml.nn.transformer import (_require_dropout, _require_flags, _require_positive_int,
                                  _require_positive_number)

__all__ = ["EncoderDecoderConfig", "EncoderDecoder", "Memory", "DecoderCache", "Seq2SeqBlock"]


@dataclass
class EncoderDecoderConfig:
    """Shape and options of an ``EncoderDecoder``; validated on construction (ValueError naming the bad field).

    Attributes:
        vocab_size, d_model, n_heads: the shared vocabulary, width and attention heads (n_heads divides d_model,
            with an even head size for rotary positions).
        n_encoder_layers, n_decoder_layers: depths of the two stacks.
        max_source_len, max_target_len: the longest source (without the [LENGTH] position) and target fed.
        causal_decoder: True for an autoregressive decoder, False for a non-causal (parallel) one.
        length_classes: K > 0 adds the length predictor over target lengths 0 … K − 1; 0 means none.
        absolute_positions: also add learned absolute position embeddings to the encoder's and the decoder's inputs
            (as the original Transformer and Mask-Predict's CMLM do); rotary self-attention sees only relative
            offsets, and a non-causal decoder fed identical [MASK] tokens needs to know where each position is.
        mlp, mlp_ratio, dropout, tie_embeddings, rope_base, norm_eps, init_std: as ``TransformerConfig``.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    max_source_len: int = 256
    max_target_len: int = 256
    causal_decoder: bool = True
    length_classes: int = 0
    absolute_positions: bool = False
    mlp: str = "gelu"
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "max_source_len",
                     "max_target_len"):
            _require_positive_int(owner, name, getattr(self, name))
        if self.d_model % self.n_heads != 0 or (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(f"{owner}: d_model={self.d_model} must split into n_heads={self.n_heads} heads of an "
                             "even size (rotary positions rotate pairs of features); change d_model or n_heads.")
        if isinstance(self.length_classes, bool) or not isinstance(self.length_classes, int) \
                or self.length_classes < 0:
            raise ValueError(f"{owner}.length_classes must be an int >= 0 (0: no length predictor), "
                             f"got {self.length_classes!r}.")
        if self.mlp not in MLPS:
            raise ValueError(f"{owner}.mlp={self.mlp!r} is not a known MLP; choose one of {sorted(MLPS)}.")
        for name in ("mlp_ratio", "rope_base", "norm_eps", "init_std"):
            _require_positive_number(owner, name, getattr(self, name))
        _require_dropout(owner, self.dropout)
        _require_flags(owner, self, ("causal_decoder", "tie_embeddings", "absolute_positions"))

    @property
    def head_dim(self) -> int:
        """Per-head size d_model / n_heads."""
        return self.d_model // self.n_heads


@dataclass
class Memory:
    """The encoder's output.

    Attributes:
        states: (B, S', D) final-norm encoder outputs; S' = S + 1 with a length predictor ([LENGTH] first).
        padding: (B, S') bool, True at padded source positions (never at [LENGTH]), or None when nothing is padded.
        length_logits: (B, length_classes) target-length logits, or None without a length predictor.
        cross_keys_values: per decoder layer, the cross-attention keys and values of ``states`` ((B, H, S', Dh)
            each), from ``EncoderDecoder.with_cross_keys_values``; or None (the default): ``decode`` and
            ``new_cache`` compute them from ``states``. They belong to ``states`` and to the model that computed
            them: a memory built from changed states needs them recomputed (or None).
    """

    states: Tensor
    padding: Tensor | None
    length_logits: Tensor | None
    cross_keys_values: list[tuple[Tensor, Tensor]] | None = None


@dataclass
class DecoderCache:
    """What autoregressive decoding keeps between steps: the decoder's self-attention ``KVCache`` (one slot per
    layer) and the memory it decodes against, carrying its cross-attention keys and values (computed once)."""

    self_attention: KVCache
    memory: Memory


class Seq2SeqBlock(nn.Module):
    """Pre-norm block: self-attention, then (in a decoder) cross-attention to the memory, then an MLP, each added to
    the stream: ``x + dropout(f(RMSNorm(x)))``.

    Args:
        d_model, n_heads, dropout, mlp, mlp_ratio, norm_eps: as ``TransformerBlock``.
        causal: causal self-attention (an autoregressive decoder) or bidirectional.
        cross: add the cross-attention sub-layer (decoder blocks).

    ``forward(x, rotation, padding=None, memory=None, memory_padding=None, cache=None, cache_slot=0)``:
    x (B, T, D) -> (B, T, D); padding (B, T) bool marks padded positions of x; memory the cross-attention keys and
    values (see ``CrossAttention``), required when ``cross``; cache a ``KVCache`` for causal self-attention.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool, cross: bool, mlp: str = "gelu",
                 mlp_ratio: float = 4.0, dropout: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.self_attn_norm = RMSNorm(d_model, norm_eps)
        self.self_attn = SelfAttention(d_model, n_heads, dropout, causal=causal)
        self.cross_attn_norm = RMSNorm(d_model, norm_eps) if cross else None
        self.cross_attn = CrossAttention(d_model, n_heads, dropout) if cross else None
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = build_mlp(mlp, d_model, mlp_ratio)
        self.branch_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Re-initialise norms, attention and MLP: normal(0, std), output projections normal(0, out_std)."""
        for module in (self.self_attn_norm, self.cross_attn_norm, self.mlp_norm):
            if module is not None:
                module.reset_parameters()
        for module in (self.self_attn, self.cross_attn, self.mlp):
            if module is not None:
                module.reset_parameters(std, out_std)

    def forward(self, x: Tensor, rotation: Tensor, padding: Tensor | None = None,
                memory: tuple[Tensor, Tensor] | None = None, memory_padding: Tensor | None = None,
                cache: KVCache | None = None, cache_slot: int = 0) -> Tensor:
        x = x + self.branch_dropout(self.self_attn(self.self_attn_norm(x), rotation, cache, cache_slot, padding))
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("a decoder block needs the memory's keys and values (memory=...).")
            x = x + self.branch_dropout(self.cross_attn(self.cross_attn_norm(x), memory, memory_padding))
        return x + self.branch_dropout(self.mlp(self.mlp_norm(x)))


class EncoderDecoder(nn.Module):
    """Encoder-decoder transformer; see the module docstring.

    Attributes:
        config: the validated ``EncoderDecoderConfig``.
        tok_emb: (vocab_size, d_model) shared embedding. encoder, decoder: ``Seq2SeqBlock`` stacks.
        encoder_norm, decoder_norm: final RMSNorms. lm_head: Linear d_model -> vocab_size (tied to tok_emb by
        default). length_query, length_table: the [LENGTH] embedding (d_model,) and the (K, d_model) length
        embeddings, when ``length_classes > 0``.

    Initialisation (GPT-2 style, as ``TransformerLM``): normal(0, init_std) everywhere, with each stack's output
    projections scaled by 1/√(number of residual branches of that stack): 2·n_encoder_layers, 3·n_decoder_layers.
    """

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        if not isinstance(config, EncoderDecoderConfig):
            raise TypeError(f"EncoderDecoder needs an EncoderDecoderConfig, got {type(config).__name__}.")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        longest = max(config.max_source_len + (config.length_classes > 0), config.max_target_len)
        self.rotary = RotaryEmbedding(config.head_dim, longest, config.rope_base)
        if config.absolute_positions:
            self.source_positions = nn.Parameter(torch.empty(longest, config.d_model))
            self.target_positions = nn.Parameter(torch.empty(config.max_target_len, config.d_model))
        else:
            self.register_parameter("source_positions", None)
            self.register_parameter("target_positions", None)

        def stack(n_layers: int, causal: bool, cross: bool) -> nn.ModuleList:
            return nn.ModuleList(
                Seq2SeqBlock(config.d_model, config.n_heads, causal=causal, cross=cross, mlp=config.mlp,
                             mlp_ratio=config.mlp_ratio, dropout=config.dropout, norm_eps=config.norm_eps)
                for _ in range(n_layers))

        self.encoder = stack(config.n_encoder_layers, causal=False, cross=False)
        self.encoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.decoder = stack(config.n_decoder_layers, causal=config.causal_decoder, cross=True)
        self.decoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.length_classes > 0:
            self.length_query = nn.Parameter(torch.empty(config.d_model))
            self.length_table = nn.Parameter(torch.empty(config.length_classes, config.d_model))
        else:
            self.register_parameter("length_query", None)
            self.register_parameter("length_table", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw every weight as described in the class docstring."""
        std = self.config.init_std
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        for blocks, branches in ((self.encoder, 2), (self.decoder, 3)):
            for block in blocks:
                block.reset_parameters(std, std / math.sqrt(branches * len(blocks)))
        self.encoder_norm.reset_parameters()
        self.decoder_norm.reset_parameters()
        for table in (self.length_query, self.length_table, self.source_positions, self.target_positions):
            if table is not None:
                nn.init.normal_(table, mean=0.0, std=std)

    # ------------------------------------------------------------------ encoder

    def encode(self, source: Tensor, source_padding: Tensor | None = None) -> Memory:
        """Encode (B, S) source ids; ``source_padding`` (B, S) bool is True at padded positions (None: no padding).

        Returns the ``Memory`` (states, padding and length logits) that ``decode`` attends to."""
        self._check_ids("source", source, self.config.max_source_len)
        self._check_padding("source_padding", source_padding, source)
        x = self._embed("source", source)
        padding = source_padding
        if self.length_query is not None:
            length_position = self.length_query.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([length_position, x], dim=1)
            if padding is not None:
                padding = torch.cat([padding.new_zeros(padding.shape[0], 1), padding], dim=1)
        if self.source_positions is not None:
            x = x + self.source_positions[:x.shape[1]].to(x.dtype)
        rotation = self.rotary(0, x.shape[1]).unsqueeze(1)
        for block in self.encoder:
            x = block(x, rotation, padding)
        states = self.encoder_norm(x)
        length_logits = None
        if self.length_table is not None:
            length_logits = states[:, 0] @ self.length_table.to(states.dtype).T
        return Memory(states, padding, length_logits)

    # ------------------------------------------------------------------ decoder

    def with_cross_keys_values(self, memory: Memory) -> Memory:
        """``memory`` carrying every decoder layer's cross-attention keys and values of its states (list of
        (K, V), each (B, H, S', Dh)), computed now, so that decoding against it many times does not recompute them
        (any keys/values it carried are replaced). Inference only: training goes through ``forward``."""
        keys_values = [block.cross_attn.memory_keys_values(memory.states) for block in self.decoder]
        return replace(memory, cross_keys_values=keys_values)

    def _carrying_keys_values(self, memory: Memory) -> Memory:
        """``memory`` with each decoder layer's cross-attention (K, V), each (B, H, S', Dh): its own, checked
        against the decoder and the states, or computed from the states when it carries none."""
        if memory.cross_keys_values is None:
            return self.with_cross_keys_values(memory)  # fresh: nothing to check
        batch, length, _ = memory.states.shape
        expected = (batch, self.config.n_heads, length, self.config.head_dim)
        found = [tuple(tensor.shape) for pair in memory.cross_keys_values for tensor in pair]
        if len(memory.cross_keys_values) != len(self.decoder) or any(shape != expected for shape in found):
            raise ValueError(f"memory.cross_keys_values do not fit this decoder and memory: expected "
                             f"{len(self.decoder)} layers of (K, V) pairs shaped {expected} (B, H, S', Dh from the "
                             f"memory's states), got {len(memory.cross_keys_values)} layers shaped "
                             f"{sorted(set(found))}; they were computed by a model with another decoder, or from "
                             "states whose rows have since changed (e.g. been repeated). Recompute them with "
                             "model.with_cross_keys_values(memory), or set cross_keys_values=None to compute them on "
                             "each call.")
        return memory

    def decode(self, target: Tensor, memory: Memory, target_padding: Tensor | None = None,
               cache: DecoderCache | None = None) -> Tensor:
        """Logits (B, T, vocab_size) for the (B, T) decoder input ``target`` given the encoder's ``memory``.

        Causal decoder: position t predicts the token after ``target[:, t]`` (feed BOS + the target shifted right);
        right padding needs no mask (no earlier position sees it), and ``target_padding`` is not used. Non-causal
        decoder: position t predicts the target token at t from the whole (corrupted) input; ``target_padding``
        (B, T) bool hides padded positions. ``cache`` (causal only, from ``new_cache``): the T tokens follow the
        ``cache.self_attention.length`` already decoded against ``cache.memory`` (``memory`` is not read), and the
        cache advances by T. Without a cache, the memory's cross-attention keys/values are
        ``memory.cross_keys_values`` when it carries them (see ``with_cross_keys_values``), else computed from
        ``memory.states`` for this call.
        """
        self._check_ids("target", target, self.config.max_target_len)
        padding = None
        if not self.config.causal_decoder:
            self._check_padding("target_padding", target_padding, target)
            padding = target_padding
        offset = 0
        if cache is not None:
            if not self.config.causal_decoder:
                raise ValueError("a DecoderCache serves a causal (autoregressive) decoder; this model's decoder is "
                                 "non-causal and decodes every position at once: call decode without a cache.")
            offset = cache.self_attention.length
            cache.self_attention.check_room(target.shape[1])
            memory = cache.memory
        else:
            memory = self._carrying_keys_values(memory)
        rotation = self.rotary(offset, target.shape[1]).unsqueeze(1)
        x = self._embed("target", target)
        if self.target_positions is not None:
            x = x + self.target_positions[offset:offset + target.shape[1]].to(x.dtype)
        for layer, (block, memory_kv) in enumerate(zip(self.decoder, memory.cross_keys_values, strict=True)):
            x = block(x, rotation, padding, memory_kv, memory.padding,
                      cache.self_attention if cache is not None else None, layer)
        if cache is not None:
            cache.self_attention.advance(target.shape[1])
        return self.lm_head(self.decoder_norm(x))

    def forward(self, source: Tensor, target: Tensor, source_padding: Tensor | None = None,
                target_padding: Tensor | None = None,
                with_length_logits: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """``decode(target, encode(source, source_padding), target_padding)``: logits (B, T, vocab_size); with
        ``with_length_logits``, also the memory's (B, length_classes) length logits. Training goes through this
        method, not ``encode``/``decode``, so that a DDP-wrapped model synchronises its gradients."""
        memory = self.encode(source, source_padding)
        logits = self.decode(target, memory, target_padding)
        return (logits, memory.length_logits) if with_length_logits else logits

    def new_cache(self, memory: Memory, max_len: int | None = None) -> DecoderCache:
        """An empty ``DecoderCache`` for autoregressive decoding of up to ``max_len`` target positions (default
        max_target_len) against ``memory``, whose cross-attention keys and values it takes from
        ``memory.cross_keys_values`` or, when the memory carries none, computes now."""
        if not self.config.causal_decoder:
            raise ValueError("new_cache serves a causal decoder; this model's decoder is non-causal.")
        max_len = self.config.max_target_len if max_len is None else max_len
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 0 < max_len <= self.config.max_target_len:
            raise ValueError(f"cache max_len must be an int in [1, max_target_len={self.config.max_target_len}], "
                             f"got {max_len!r}.")
        states = memory.states
        kv_cache = KVCache(len(self.decoder), states.shape[0], self.config.n_heads, max_len, self.config.head_dim,
                           dtype=states.dtype, device=states.device)
        return DecoderCache(kv_cache, self._carrying_keys_values(memory))

    # ------------------------------------------------------------------ checks and accounting

    def _check_ids(self, name: str, ids: Tensor, max_len: int) -> None:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() \
                or ids.dtype == torch.bool or ids.shape[1] == 0:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be a (batch, length >= 1) integer tensor of token ids, got {shape}.")
        if ids.shape[1] > max_len:
            raise ValueError(f"{name} has {ids.shape[1]} positions but the model takes at most {max_len} "
                             f"(EncoderDecoderConfig.max_{name}_len); build the model with a larger limit.")

    def _embed(self, name: str, ids: Tensor) -> Tensor:
        """(B, T, D) embeddings of token ids. On the CPU, ids outside the vocabulary raise a clear error (the lookup
        itself checks them, so decoding step by step does not synchronise a GPU on every call); on CUDA such an id
        trips the lookup's device-side assert instead."""
        try:
            return self.tok_emb(ids)
        except IndexError:
            raise ValueError(f"{name} token ids must lie in [0, vocab_size={self.config.vocab_size}), got ids from "
                             f"{int(ids.min())} to {int(ids.max())}; the tokenizer and the model disagree.") from None

    @staticmethod
    def _check_padding(name: str, padding: Tensor | None, ids: Tensor) -> None:
        if padding is None:
            return
        if not isinstance(padding, Tensor) or padding.dtype != torch.bool or padding.shape != ids.shape:
            shape = tuple(padding.shape) if isinstance(padding, Tensor) else type(padding).__name__
            raise ValueError(f"{name} must be a bool tensor of the ids' shape {tuple(ids.shape)}, True at padded "
                             f"positions, got {shape}.")
        if bool(padding.all(dim=1).any()):
            raise ValueError(f"{name} marks every position of some sequence as padding; each needs a real token.")

    def num_parameters(self) -> int:
        """Number of parameters, each tensor counted once (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters())
