"""Decoder-only transformer language model with pluggable residuals, optional weight-shared looping and a KV cache.

    token embedding -> n_loops × [blocks 0 … n_layers-1] -> RMSNorm -> LM head (tied to the embedding by default)

Blocks are pre-norm (RMSNorm), with causal rotary self-attention and a GELU or SwiGLU MLP, no biases
(``effml.nn.block``). ``n_loops > 1`` applies the whole stack repeatedly with the same weights — the looped transformer
of Gatmiry et al. (arXiv 2410.21698, 2410.08292) — optionally re-adding the token embedding before every loop after
the first (input injection); ``loop_readouts=True`` returns the logits read out after every loop. ``prefix`` puts
input embeddings (a soft prompt) before the tokens' embeddings.

Initialisation (GPT-2 style): normal(0, init_std) for the embedding and every linear layer, with the output
projections of attention and MLP scaled down by 1/√(2 · n_layers · n_loops), the number of residual branches each
token's stream passes through. Residual modules keep the initialisation their own constructor gives them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from effml.nn.attention import KVCache
from effml.nn.block import TransformerBlock
from effml.nn.mlp import MLPS, mlp_hidden_size
from effml.nn.norm import RMSNorm
from effml.nn.residual import StreamHistory, check_residual_options
from effml.nn.rotary import RotaryEmbedding
from effml.nn.ssm import SSMCache, check_mixer_options

__all__ = ["TransformerConfig", "TransformerLM"]


def _require_positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}.")


def _require_positive_number(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}.")


def _require_dropout(owner: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.dropout must be a number in [0, 1), got {value!r}.")


def _require_flags(owner: str, config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{owner}.{name} must be True or False, got {getattr(config, name)!r}.")


@dataclass
class TransformerConfig:
    """Shape and options of a ``TransformerLM``; validated on construction (ValueError naming the bad field).

    Attributes:
        vocab_size, d_model, n_layers, n_heads, max_seq_len: sizes (positive ints; with attention, n_heads divides
            d_model and the head size d_model / n_heads is even, as rotary embeddings need; SSM mixers use neither
            n_heads nor a position limit).
        mlp: "gelu" or "swiglu". mlp_ratio: GELU hidden width = round(mlp_ratio · d_model); SwiGLU uses 2/3 of that,
            rounded to the nearest multiple of 8 (so both have about the same parameter count).
        dropout: in [0, 1); on attention weights and on both residual branches of every block.
        residual, residual_options: residual-registry name and its constructor options (``effml.nn.residual``).
        n_loops: how many times the block stack is applied with shared weights (1 = ordinary transformer).
        input_injection: add the token embedding to the stream before every loop after the first (no effect when
            n_loops == 1).
        tie_embeddings: the LM head reuses the token-embedding matrix.
        rope_base: rotary frequency base. norm_eps: RMSNorm epsilon. init_std: std of the normal initialisation.
        mixer, mixer_options: the token mixer of every block: "attention" (default), or a selective SSM ("mamba1" |
            "mamba2", ``effml.nn.ssm``) with its constructor options; n_heads then only matters to attention.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    mlp: str = "gelu"
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    residual: str = "plain"
    residual_options: dict[str, Any] = field(default_factory=dict)
    n_loops: int = 1
    input_injection: bool = False
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    mixer: str = "attention"
    mixer_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "n_loops"):
            _require_positive_int(owner, name, getattr(self, name))
        if self.mixer == "attention" and self.d_model % self.n_heads != 0:
            raise ValueError(f"{owner}.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             "choose n_heads dividing d_model.")
        if self.mixer == "attention" and self.head_dim % 2 != 0:
            raise ValueError(f"{owner}: head size d_model / n_heads = {self.head_dim} is odd, but rotary embeddings "
                             "need an even head size; change d_model or n_heads.")
        if self.mlp not in MLPS:
            raise ValueError(f"{owner}.mlp={self.mlp!r} is not a known MLP; choose one of {sorted(MLPS)}.")
        for name in ("mlp_ratio", "rope_base", "norm_eps", "init_std"):
            _require_positive_number(owner, name, getattr(self, name))
        _require_dropout(owner, self.dropout)
        if not isinstance(self.residual_options, dict):
            raise ValueError(f"{owner}.residual_options must be a dict of constructor options, "
                             f"got {self.residual_options!r}.")
        try:
            check_residual_options(self.residual, self.residual_options)
        except ValueError as error:
            raise ValueError(f"{owner}.residual: {error}") from None
        if not isinstance(self.mixer_options, dict):
            raise ValueError(f"{owner}.mixer_options must be a dict of constructor options, "
                             f"got {self.mixer_options!r}.")
        if self.mixer == "attention" and self.mixer_options:
            raise ValueError(f"{owner}.mixer_options={self.mixer_options!r} were given but mixer='attention' takes "
                             "no options (they configure an SSM mixer); set mixer='mamba1' or 'mamba2', or drop "
                             "mixer_options.")
        if self.mixer != "attention":
            try:
                check_mixer_options(self.mixer, self.mixer_options)
            except ValueError as error:
                raise ValueError(f"{owner}.mixer: {error}") from None
        _require_flags(owner, self, ("input_injection", "tie_embeddings"))

    @property
    def head_dim(self) -> int:
        """Per-head size d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP."""
        return mlp_hidden_size(self.mlp, self.d_model, self.mlp_ratio)


class TransformerLM(nn.Module):
    """Decoder-only language model; see the module docstring for the architecture.

    Attributes:
        config: the (validated) ``TransformerConfig``; ``grow`` replaces it with one whose n_layers is updated.
        tok_emb: (vocab_size, d_model) embedding. blocks: the ``TransformerBlock`` stack. final_norm: RMSNorm.
        lm_head: Linear d_model -> vocab_size whose weight *is* ``tok_emb.weight`` when tie_embeddings.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"TransformerLM needs a TransformerConfig, got {type(config).__name__}.")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = (RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_base)
                       if config.mixer == "attention" else None)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.d_model, config.n_heads, mlp=config.mlp, mlp_ratio=config.mlp_ratio,
                             dropout=config.dropout, residual=config.residual,
                             residual_options=config.residual_options, norm_eps=config.norm_eps, block_index=i,
                             mixer=config.mixer, mixer_options=config.mixer_options)
            for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw every weight as described in the module docstring (residual modules are left alone)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers * self.config.n_loops)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        for block in self.blocks:
            block.reset_parameters(std, out_std)
        self.final_norm.reset_parameters()

    # ------------------------------------------------------------------ forward

    def forward(self, idx: Tensor, cache: KVCache | SSMCache | None = None, loop_readouts: bool = False,
                prefix: Tensor | None = None) -> Tensor:
        """Next-token logits.

        Args:
            idx: (B, T) token ids. With ``cache``, the T tokens at positions [cache.length, cache.length + T).
            cache: a ``KVCache`` (an ``SSMCache`` for SSM mixers) from ``new_cache``; it is written and advanced by
                P + T.
            loop_readouts: also read out (final norm + head) after every loop.
            prefix: optional (B, P, d_model) input embeddings placed before the tokens' (a soft prompt, as in prompt
                tuning or SoftSRV); T may then be 0. The logits of the prefix positions are returned too, so position
                P - 1 predicts the first token.

        Returns:
            (B, P + T, vocab_size) logits, or (n_loops, B, P + T, vocab_size) when ``loop_readouts`` (the last entry
            equals the ordinary output).
        """
        states = self._final_states(idx, cache, prefix, every_loop=loop_readouts)
        if loop_readouts:
            return torch.stack([self.lm_head(state) for state in states])
        return self.lm_head(states[-1])

    def hidden_states(self, idx: Tensor, prefix: Tensor | None = None) -> Tensor:
        """The final-norm outputs the LM head reads, (B, P + T, d_model), for features of a sequence (e.g. mean-pooled
        over its positions); ``idx`` and ``prefix`` as in ``forward``."""
        return self._final_states(idx, None, prefix, every_loop=False)[-1]

    def _final_states(self, idx: Tensor, cache: KVCache | SSMCache | None, prefix: Tensor | None,
                      every_loop: bool) -> list[Tensor]:
        """The normed stream after the last loop, or after every loop when ``every_loop``: a list of (B, P+T, D)."""
        if idx.dim() != 2 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"idx must be an integer tensor of token ids with shape (batch, seq), got dtype "
                             f"{idx.dtype} and shape {tuple(idx.shape)}.")
        if idx.dtype not in (torch.int32, torch.int64):  # e.g. uint8 ids of a byte-level corpus
            idx = idx.long()
        batch = idx.shape[0]
        self._check_prefix(prefix, batch)
        seq = idx.shape[1] + (0 if prefix is None else prefix.shape[1])
        if seq == 0:
            raise ValueError("idx has no tokens and no prefix was given: there is no position to compute.")
        offset = 0
        if cache is not None:
            self._check_cache(cache, batch, seq)
            offset = cache.length
        if offset + seq > self.config.max_seq_len and self.config.mixer == "attention":
            raise ValueError(f"{seq} positions after {offset} cached ones exceed max_seq_len="
                             f"{self.config.max_seq_len}; feed at most max_seq_len positions (prefix included) or "
                             "build the model with a larger max_seq_len.")
        rotation = self.rotary(offset, seq).unsqueeze(1) if self.rotary is not None else None
        # rotation (T, 1, Dh/2) broadcasts over the heads of (B, T, H, Dh); SSM mixers take no positions

        try:
            x = self.tok_emb(idx)
        except IndexError:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}), got ids from "
                             f"{int(idx.min())} to {int(idx.max())}; the tokenizer and the model's vocab_size "
                             "disagree.") from None
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        embedded = x
        history_size = max([0, *(block.history_size for block in self.blocks)])  # (torch.compile: no default=)
        history = StreamHistory(history_size) if history_size > 0 else None
        n_layers = len(self.blocks)
        states = []
        for loop in range(self.config.n_loops):
            if loop > 0 and self.config.input_injection:
                x = x + embedded
            for layer, block in enumerate(self.blocks):
                x = block(x, rotation, cache, loop * n_layers + layer, history)
            if every_loop or loop == self.config.n_loops - 1:
                states.append(self.final_norm(x))
        if cache is not None:
            cache.advance(seq)
        return states

    def _check_prefix(self, prefix: Tensor | None, batch: int) -> None:
        if prefix is None:
            return
        if not isinstance(prefix, Tensor) or not prefix.is_floating_point() or prefix.dim() != 3 \
                or prefix.shape[0] != batch or prefix.shape[2] != self.config.d_model:
            shape = tuple(prefix.shape) if isinstance(prefix, Tensor) else type(prefix).__name__
            raise ValueError(f"prefix must be a floating-point (batch={batch}, positions, d_model="
                             f"{self.config.d_model}) tensor of input embeddings, got {shape}; build it in the "
                             "model's embedding space (e.g. a soft prompt of width d_model).")

    # ------------------------------------------------------------------ KV cache

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache | SSMCache:
        """An empty ``KVCache`` for ``batch_size`` sequences of up to ``max_len`` positions (default max_seq_len),
        one slot per (loop, layer) application, in the dtype/device of the model's weights unless given.
        SSM mixers get an ``SSMCache`` instead (constant size: ``max_len`` is not needed). Caches are for decoding,
        under ``torch.no_grad``/``inference_mode`` (as ``generate`` runs): they are written in place, so autograd
        cannot differentiate through several cached calls."""
        if self.config.mixer != "attention":
            return SSMCache(self.config.n_loops * len(self.blocks), batch_size)
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 0 < max_len <= self.config.max_seq_len:
            raise ValueError(f"cache max_len must be an int in [1, max_seq_len={self.config.max_seq_len}], "
                             f"got {max_len!r}; rotary positions exist only up to max_seq_len.")
        weight = self.tok_emb.weight
        return KVCache(self.config.n_loops * len(self.blocks), batch_size, self.config.n_heads, max_len,
                       self.config.head_dim, dtype=dtype or weight.dtype, device=device or weight.device)

    def _check_cache(self, cache: KVCache | SSMCache, batch: int, seq: int) -> None:
        if self.config.mixer != "attention":
            if not isinstance(cache, SSMCache) or cache.n_slots != self.config.n_loops * len(self.blocks) \
                    or cache.batch_size != batch:
                raise ValueError(f"an SSM-mixer model needs the SSMCache of new_cache(batch_size={batch}), "
                                 f"got {cache!r}.")
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from TransformerLM.new_cache, got {type(cache).__name__}.")
        expected_slots = self.config.n_loops * len(self.blocks)
        if cache.n_slots != expected_slots:
            raise ValueError(f"the cache has {cache.n_slots} slots but the model applies {expected_slots} attention "
                             "layers (n_loops × n_layers; did the model grow?); create a new one with new_cache.")
        if cache.keys.shape[2] != self.config.n_heads or cache.keys.shape[4] != self.config.head_dim:
            raise ValueError(f"the cache stores {cache.keys.shape[2]} heads of size {cache.keys.shape[4]} but the "
                             f"model has {self.config.n_heads} of size {self.config.head_dim}; use new_cache.")
        if cache.batch_size != batch:
            raise ValueError(f"the cache was made for batch size {cache.batch_size} but idx has batch size {batch}; "
                             "create the cache with new_cache(batch_size=idx.shape[0]).")
        cache.check_room(seq)

    # ------------------------------------------------------------------ accounting

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of trainable-or-not parameters, each tensor counted once (a tied head is not counted twice).
        ``exclude_embeddings`` leaves out the token-embedding matrix (and so the head too when tied; an untied
        head is counted, as it is an ordinary matmul)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_emb.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token at context ``seq_len``, PaLM-style (arXiv 2204.02311, App. B):

            6 · N_applied + 12 · n_layers · n_loops · d_model · seq_len

        where N_applied = n_loops · (parameters of the blocks) + final-norm parameters + vocab_size · d_model counts
        every weight once per time it multiplies a token's activations: shared blocks once per loop, and the LM head
        (a d_model × vocab_size matmul, tied or not), but not the embedding lookup, which costs no multiply-adds.
        The second term is the q·kᵀ and attention·v products (2 matmuls × 2 FLOPs × 3 for forward + backward); SSM
        mixers have no such term (their scan's elementwise O(E·N) work per token is not counted).
        """
        _require_positive_int("flops_per_token", "seq_len", seq_len)
        config = self.config
        block_params = sum(p.numel() for p in self.blocks.parameters())
        norm_params = sum(p.numel() for p in self.final_norm.parameters())
        applied = config.n_loops * block_params + norm_params + config.vocab_size * config.d_model
        attention = 12 * len(self.blocks) * config.n_loops * config.d_model * seq_len
        if config.mixer != "attention":  # SSM mixers: their matmuls are in the parameter term, no q·kᵀ products
            attention = 0
        return float(6 * applied + attention)

    # ------------------------------------------------------------------ growth (stacking, MIDAS)

    def grow(self, insert_at: int, copy_from: int) -> nn.Module:
        """Insert an exact, independent deep copy of ``blocks[copy_from]`` so that it sits at ``blocks[insert_at]``
        (later blocks shift up by one) and return it; ``config`` is replaced by one with n_layers + 1.

        Gradual stacking: ``grow(insert_at=n, copy_from=n - 1)``; MIDAS: ``grow(insert_at=m + 1, copy_from=m)`` for
        the middle block m. Any KV cache made before growing no longer fits the model. The copy keeps the source's
        residual ``layer_index`` and the init scale is not revisited (the weights are copied, not re-drawn).
        """
        n_layers = len(self.blocks)
        for name, value, upper in (("copy_from", copy_from, n_layers - 1), ("insert_at", insert_at, n_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= upper:
                raise ValueError(f"grow: {name} must be an int in [0, {upper}] for a model with {n_layers} blocks, "
                                 f"got {value!r}.")
        new_block = copy.deepcopy(self.blocks[copy_from])
        self.blocks.insert(insert_at, new_block)
        self.config = dataclasses.replace(self.config, n_layers=n_layers + 1)
        return new_block
