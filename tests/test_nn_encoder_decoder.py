"""The encoder-decoder (effml.nn.encoder_decoder): attention against an explicit softmax formula, padding and causality
invariances, cached decoding against the full forward, the length predictor, and clear errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from effml.nn import CrossAttention, EncoderDecoder, EncoderDecoderConfig, SelfAttention
from effml.nn.rotary import RotaryEmbedding, apply_rotary

VOCAB = 40


def _model(causal: bool, length_classes: int = 0, seed: int = 0, **overrides) -> EncoderDecoder:
    torch.manual_seed(seed)
    config = EncoderDecoderConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                                  max_source_len=20, max_target_len=24, causal_decoder=causal,
                                  length_classes=length_classes, init_std=0.2, **overrides)
    return EncoderDecoder(config).eval()


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- attention against the formula

def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √Dh with −∞ where not allowed) v, written out: q (B,H,T,Dh), k, v (B,H,S,Dh), allowed (B,T,S)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_with_padding_equals_the_softmax_formula(causal: bool) -> None:
    torch.manual_seed(0)
    attention = SelfAttention(16, 2, causal=causal).eval()
    x = torch.randn(3, 7, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    padding[2, 3:] = True
    rotation = RotaryEmbedding(8, 16)(0, 7).unsqueeze(1)

    q, k, v = attention.qkv_proj(x).view(3, 7, 3, 2, 8).unbind(2)
    q, k = apply_rotary(q, rotation).transpose(1, 2), apply_rotary(k, rotation).transpose(1, 2)
    allowed = ~padding[:, None, :].expand(3, 7, 7)
    if causal:
        allowed = allowed & torch.ones(7, 7, dtype=torch.bool).tril()
    expected = _reference_attention(q, k, v.transpose(1, 2), allowed)
    expected = attention.out_proj(expected.transpose(1, 2).reshape(3, 7, 16))

    torch.testing.assert_close(attention(x, rotation, key_padding=padding), expected, rtol=1e-5, atol=1e-6)


def test_cross_attention_equals_the_softmax_formula_and_ignores_padded_memory() -> None:
    torch.manual_seed(1)
    attention = CrossAttention(16, 2).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 4:] = True
    k, v = attention.memory_keys_values(memory)
    q = attention.q_proj(x).view(2, 5, 2, 8).transpose(1, 2)
    expected = _reference_attention(q, k, v, ~padding[:, None, :].expand(2, 5, 9))
    expected = attention.out_proj(expected.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attention(x, (k, v), padding), expected, rtol=1e-5, atol=1e-6)

    scrambled = memory.clone()
    scrambled[1, 4:] = torch.randn(5, 16) * 10
    torch.testing.assert_close(attention(x, attention.memory_keys_values(scrambled), padding),
                               attention(x, (k, v), padding))


# --------------------------------------------------------------------------- invariances of the whole model

@pytest.mark.parametrize("absolute_positions", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_neither_its_content_nor_its_length_changes_the_real_positions(causal: bool,
                                                                              absolute_positions: bool) -> None:
    model = _model(causal, length_classes=30, absolute_positions=absolute_positions)
    source, target = _ids(2, 11, seed=1), _ids(2, 9, seed=2)
    source_padding = torch.zeros(2, 11, dtype=torch.bool)
    source_padding[1, 6:] = True
    target_padding = torch.zeros(2, 9, dtype=torch.bool)
    target_padding[0, 7:] = True
    logits = model(source, target, source_padding, target_padding)
    memory = model.encode(source, source_padding)

    # other pad ids, and three more padded positions on each side
    longer_source = torch.cat([source, _ids(2, 3, seed=3)], dim=1)
    longer_source[1, 6:] = 7
    longer_target = torch.cat([target, _ids(2, 3, seed=4)], dim=1)
    longer_target[0, 7:] = 5
    longer_source_padding = torch.cat([source_padding, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    longer_target_padding = torch.cat([target_padding, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    longer = model(longer_source, longer_target, longer_source_padding, longer_target_padding)
    longer_memory = model.encode(longer_source, longer_source_padding)

    torch.testing.assert_close(longer_memory.length_logits, memory.length_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(longer[0, :7], logits[0, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(longer[1, :9], logits[1, :9], rtol=1e-5, atol=1e-5)


def test_a_causal_decoder_position_sees_no_later_target_token_and_a_non_causal_one_does() -> None:
    source, target = _ids(2, 8, seed=5), _ids(2, 10, seed=6)
    changed = target.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    for causal in (True, False):
        model = _model(causal)
        before, after = model(source, target), model(source, changed)
        if causal:
            torch.testing.assert_close(after[:, :6], before[:, :6])
        else:
            assert (after[:, :6] - before[:, :6]).abs().amax() > 1e-3
        assert (after[:, 6:] - before[:, 6:]).abs().amax() > 1e-3


def test_the_decoder_reads_the_source() -> None:
    model = _model(causal=False)
    source, target = _ids(2, 8, seed=7), _ids(2, 10, seed=8)
    other = source.clone()
    other[:, 0] = (other[:, 0] + 1) % VOCAB
    assert (model(other, target) - model(source, target)).abs().amax() > 1e-3


@pytest.mark.parametrize("absolute_positions", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 5], [12]])
def test_cached_decoding_equals_the_full_forward(chunks: list[int], absolute_positions: bool) -> None:
    model = _model(causal=True, length_classes=16, absolute_positions=absolute_positions)
    source, target = _ids(3, 9, seed=9), _ids(3, 12, seed=10)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[2, 4:] = True
    full = model(source, target, padding)
    memory = model.encode(source, padding)
    cache = model.new_cache(memory, max_len=12)
    pieces, start = [], 0
    with torch.no_grad():
        for size in chunks:
            pieces.append(model.decode(target[:, start:start + size], memory, cache=cache))
            start += size
    assert cache.self_attention.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_decoding_with_precomputed_cross_keys_values_equals_computing_them(causal: bool) -> None:
    model = _model(causal=causal, length_classes=16)
    source, target = _ids(3, 9, seed=21), _ids(3, 7, seed=22)
    source_padding = torch.zeros(3, 9, dtype=torch.bool)
    source_padding[1, 5:] = True
    target_padding = torch.zeros(3, 7, dtype=torch.bool)
    target_padding[2, 4:] = True
    with torch.no_grad():
        memory = model.encode(source, source_padding)
        precomputed = model.with_cross_keys_values(memory)
        assert memory.cross_keys_values is None and len(precomputed.cross_keys_values) == 2
        assert all(k.shape == v.shape == (3, 4, 10, 8) for k, v in precomputed.cross_keys_values)
        assert torch.equal(model.decode(target, precomputed, target_padding),
                           model.decode(target, memory, target_padding))
        if causal:  # the cache takes the memory's keys/values instead of computing its own
            cache = model.new_cache(precomputed, max_len=7)
            assert cache.memory.cross_keys_values is precomputed.cross_keys_values
            assert torch.equal(model.decode(target, precomputed, cache=cache),
                               model.decode(target, memory, cache=model.new_cache(memory, max_len=7)))


def test_every_parameter_gets_a_gradient_and_the_length_logits_have_one_class_per_length() -> None:
    model = _model(causal=False, length_classes=25, absolute_positions=True).train()
    source, target = _ids(2, 8, seed=11), _ids(2, 10, seed=12)
    memory = model.encode(source)
    assert memory.length_logits.shape == (2, 25)
    assert memory.states.shape == (2, 9, 32)  # [LENGTH] first
    logits, length_logits = model(source, target, with_length_logits=True)
    torch.testing.assert_close(logits, model.decode(target, memory))
    torch.testing.assert_close(length_logits, memory.length_logits)
    loss = logits.logsumexp(-1).mean() + length_logits.logsumexp(-1).mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_without_a_length_predictor_the_memory_is_the_source_alone() -> None:
    model = _model(causal=True)
    memory = model.encode(_ids(2, 8, seed=13))
    assert memory.states.shape == (2, 8, 32) and memory.length_logits is None
    assert model.length_query is None
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize(("field", "value", "match"), [
    ("n_heads", 3, "even size"), ("d_model", 30, "even size"), ("length_classes", -1, "length_classes"),
    ("causal_decoder", 1, "causal_decoder"), ("dropout", 1.0, "dropout"), ("mlp", "relu", "known MLP"),
    ("max_target_len", 0, "max_target_len"),
])
def test_bad_configs_are_refused_by_name(field: str, value: object, match: str) -> None:
    options = dict(vocab_size=VOCAB, d_model=32, n_heads=4)
    options[field] = value
    with pytest.raises(ValueError, match=match):
        EncoderDecoderConfig(**options)


def test_bad_inputs_get_clear_errors() -> None:
    model, parallel = _model(causal=True), _model(causal=False)
    source = _ids(2, 8, seed=14)
    memory = model.encode(source)
    with pytest.raises(ValueError, match="at most 20"):
        model.encode(_ids(2, 21, seed=15))
    with pytest.raises(ValueError, match="vocab_size=40"):
        model.encode(source + VOCAB)
    with pytest.raises(ValueError, match="integer tensor"):
        model.encode(source.float())
    with pytest.raises(ValueError, match="every position"):
        model.encode(source, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        model.encode(source, torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-causal"):
        parallel.new_cache(parallel.encode(source))
    cache = model.new_cache(memory, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model.decode(_ids(2, 5, seed=16), memory, cache=cache)


@pytest.mark.parametrize("causal", [False, True])
def test_cross_keys_values_that_do_not_fit_the_decoder_or_the_memory_are_refused(causal: bool) -> None:
    model = _model(causal=causal)
    source, target = _ids(2, 8, seed=17), _ids(2, 5, seed=18)
    memory = model.with_cross_keys_values(model.encode(source))
    four_layers = dataclasses.replace(memory, cross_keys_values=memory.cross_keys_values * 2)
    repeated_states = dataclasses.replace(memory, states=memory.states.repeat_interleave(2, dim=0))
    for stale in (four_layers, repeated_states):
        with pytest.raises(ValueError, match="with_cross_keys_values"):
            model.decode(target.repeat_interleave(stale.states.shape[0] // 2, dim=0), stale)
        if causal:
            with pytest.raises(ValueError, match="with_cross_keys_values"):
                model.new_cache(stale)
