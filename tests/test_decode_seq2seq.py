"""Sequence-to-sequence decoding (effml.decode.seq2seq, effml.decode.refinement) and PaDIR's corruption
(effml.train.masking): cached against uncached greedy decoding, iterative refinement against a per-example reference
loop, the rejecters' exact choices, the corruption's rates, and the inputs of multi-stage training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from effml.decode import build_rejecter, decode_autoregressive, refine_decode
from effml.decode.refinement import LinearSchedule, StutterRemasking, _expand_memory
from effml.nn import EncoderDecoder, EncoderDecoderConfig
from effml.nn.encoder_decoder import Memory
from effml.train.masking import corrupt_targets, masked_target_loss, next_stage_inputs

VOCAB, PAD, BOS, EOS, MASK = 30, 0, 1, 2, 3
SPECIALS = (PAD, BOS, EOS, MASK)


def _model(causal: bool, seed: int = 0, absolute_positions: bool = False) -> EncoderDecoder:
    torch.manual_seed(seed)
    config = EncoderDecoderConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                                  max_source_len=16, max_target_len=20, causal_decoder=causal, length_classes=21,
                                  init_std=0.3, absolute_positions=absolute_positions)
    return EncoderDecoder(config)


def _source(batch: int = 4, length: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    source = torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, 6:] = True
    padding[3, 3:] = True
    return source.masked_fill(padding, PAD), padding


# --------------------------------------------------------------------------- autoregressive

def test_cached_greedy_decoding_equals_recomputing_every_prefix() -> None:
    model = _model(causal=True)
    source, padding = _source()
    cached = decode_autoregressive(model, source, padding, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=12)
    full = decode_autoregressive(model, source, padding, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=12,
                                 use_cache=False)
    assert torch.equal(cached.tokens, full.tokens) and torch.equal(cached.lengths, full.lengths)
    # greedy is a fixed point of teacher forcing: fed BOS + its own output, the model's argmax is that output
    fed = torch.cat([torch.full((4, 1), BOS), cached.tokens[:, :-1]], dim=1)
    with torch.no_grad():
        argmax = model(source, fed, padding).argmax(-1)
    for row, length in enumerate(cached.lengths.tolist()):
        assert torch.equal(argmax[row, :length], cached.tokens[row, :length])


def _count_memory_projections(model: EncoderDecoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-element list counting the calls of every decoder layer's ``memory_keys_values`` from now on."""
    calls = [0]
    for block in model.decoder:
        def counted(states, project=block.cross_attn.memory_keys_values):
            calls[0] += 1
            return project(states)
        monkeypatch.setattr(block.cross_attn, "memory_keys_values", counted)
    return calls


def test_cached_greedy_decoding_projects_the_memory_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache holds the memory's keys/values for every step (the uncached path, the reference, recomputes them)."""
    model = _model(causal=True)
    source, padding = _source()
    calls = _count_memory_projections(model, monkeypatch)
    decode_autoregressive(model, source, padding, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=6)
    assert calls[0] == len(model.decoder)  # one (K, V) per layer, not one per step


def test_greedy_decoding_stops_each_row_at_its_eos_and_pads_after_it() -> None:
    model = _model(causal=True)
    scripts = [[5, 6, EOS], [7, 8, 9, 10, 11, 12], [EOS]]  # row 1 never ends within max_len = 6

    def scripted_decode(target, memory, target_padding=None, cache=None):
        step = cache.self_attention.length
        cache.self_attention.advance(target.shape[1])
        logits = torch.zeros(len(scripts), 1, VOCAB)
        for row, script in enumerate(scripts):
            logits[row, 0, script[min(step, len(script) - 1)]] = 1.0
        return logits

    model.decode = scripted_decode  # type: ignore[method-assign]
    source = torch.randint(4, VOCAB, (3, 5))
    out = decode_autoregressive(model, source, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=6)
    assert out.lengths.tolist() == [2, 6, 0]
    assert out.to_lists() == [[5, 6], [7, 8, 9, 10, 11, 12], []]
    assert out.tokens[0, 2:].eq(PAD).all() and out.tokens[2].eq(PAD).all()


def test_autoregressive_decoding_refuses_a_parallel_decoder_and_bad_ids() -> None:
    source, _ = _source()
    with pytest.raises(ValueError, match="causal decoder"):
        decode_autoregressive(_model(causal=False), source, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="eos_id"):
        decode_autoregressive(_model(causal=True), source, bos_id=BOS, eos_id=VOCAB, pad_id=PAD)
    with pytest.raises(ValueError, match="max_len"):
        decode_autoregressive(_model(causal=True), source, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=21)


# --------------------------------------------------------------------------- rejecters

def test_the_linear_schedule_resets_exactly_the_least_confident_share() -> None:
    confidence = -torch.rand(2, 12, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 8:] = False
    tokens = torch.zeros(2, 12, dtype=torch.long)
    for iteration, expected in ((0, [9, 6]), (1, [6, 4]), (2, [3, 2]), (3, [0, 0])):
        reset = LinearSchedule().select(tokens, confidence, valid, iteration, iterations=4)
        assert reset.sum(1).tolist() == expected  # ⌊L (N − t − 1) / N⌋ for L = 12 and 8
        assert not (reset & ~valid).any()
        for row in range(2):
            length = int(valid[row].sum())
            lowest = confidence[row, :length].argsort()[:expected[row]]
            assert set(reset[row].nonzero().flatten().tolist()) == set(lowest.tolist())


def test_stutter_remasking_resets_the_later_token_of_every_repeat() -> None:
    tokens = torch.tensor([[4, 4, 5, 5, 5, 6, 0, 0], [7, 8, 7, 8, 9, 9, 9, 9]])
    valid = torch.tensor([[True] * 6 + [False] * 2, [True] * 7 + [False]])
    reset = StutterRemasking().select(tokens, torch.zeros(2, 8), valid, 0, 2)
    assert reset.nonzero().tolist() == [[0, 1], [0, 3], [0, 4], [1, 5], [1, 6]]
    union = build_rejecter("linear+stutter")
    assert union.name == "linear+stutter"
    both = union.select(tokens, torch.zeros(2, 8), valid, 0, 2)
    assert (both >= reset).all() and both.sum() > reset.sum()
    with pytest.raises(ValueError, match="unknown remasking"):
        build_rejecter("linear+bogus")


# --------------------------------------------------------------------------- iterative refinement

def _reference_refinement(model: EncoderDecoder, source: torch.Tensor, padding: torch.Tensor, lengths: list[int],
                          iterations: int, update: str) -> list[list[int]]:
    """One example at a time, no padding in the decoder: the linear schedule from all-[MASK], written out. With
    update="masked" (Mask-Predict) a position keeps its token and confidence until it is masked again."""
    outputs = []
    for row, length in enumerate(lengths):
        keep = ~padding[row]
        memory = model.encode(source[row:row + 1, keep[: source.shape[1]]])
        tokens = torch.full((1, length), MASK)
        predicted = confidence = None
        for iteration in range(iterations):
            logits = model.decode(tokens, Memory(memory.states, None, memory.length_logits))[0]
            logits[:, list(SPECIALS)] = float("-inf")
            new_confidence, new_predicted = logits.log_softmax(-1).max(-1)
            if update == "all" or predicted is None:
                predicted, confidence = new_predicted, new_confidence
            else:
                masked = tokens[0] == MASK
                predicted, confidence = predicted.clone(), confidence.clone()
                predicted[masked], confidence[masked] = new_predicted[masked], new_confidence[masked]
            tokens = predicted[None].clone()
            resets = length * (iterations - iteration - 1) // iterations
            tokens[0, confidence.argsort(stable=True)[:resets]] = MASK
        outputs.append(tokens[0].tolist())
    return outputs


@pytest.mark.parametrize(("iterations", "absolute_positions", "update"), [
    (1, False, "all"), (3, False, "all"), (5, False, "all"), (3, True, "all"), (3, False, "masked"),
    (5, True, "masked")])
def test_refinement_equals_a_per_example_reference_loop(iterations: int, absolute_positions: bool,
                                                        update: str) -> None:
    model = _model(causal=False, absolute_positions=absolute_positions).eval()
    source, padding = _source()
    lengths = [7, 11, 3, 9]
    out = refine_decode(model, source, padding, iterations=iterations, mask_id=MASK, pad_id=PAD,
                        lengths=torch.tensor(lengths), suppress_ids=SPECIALS, update=update)
    with torch.no_grad():
        assert out.to_lists() == _reference_refinement(model, source, padding, lengths, iterations, update)
    assert out.lengths.tolist() == lengths and out.tokens.shape == (4, 11)


@pytest.mark.parametrize(("candidates", "lengths"), [(3, None), (1, torch.tensor([7, 11, 3, 9]))])
def test_refinement_projects_the_memory_once_per_call_with_unchanged_outputs(
        candidates: int, lengths: torch.Tensor | None, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(causal=False).eval()
    source, padding = _source()
    options = dict(iterations=4, mask_id=MASK, pad_id=PAD, length_candidates=candidates, lengths=lengths,
                   suppress_ids=SPECIALS, remasking="linear+stutter")
    calls = _count_memory_projections(model, monkeypatch)
    once = refine_decode(model, source, padding, **options)
    assert calls[0] == len(model.decoder)  # one (K, V) per layer, not one per layer and pass
    real_decode = model.decode

    def decode_dropping_the_keys_values(target, memory, target_padding=None, cache=None):
        return real_decode(target, dataclasses.replace(memory, cross_keys_values=None), target_padding, cache)

    monkeypatch.setattr(model, "decode", decode_dropping_the_keys_values)  # projects the memory on every pass
    calls[0] = 0
    every_pass = refine_decode(model, source, padding, **options)
    assert calls[0] == len(model.decoder) * (1 + 4)  # the unused precomputation, then every pass's own
    for name in ("tokens", "lengths", "scores"):
        torch.testing.assert_close(getattr(once, name), getattr(every_pass, name), rtol=1e-6, atol=1e-6)


def test_expanding_a_memory_repeats_its_cross_keys_values_with_its_rows() -> None:
    model = _model(causal=False).eval()
    source, padding = _source()
    with torch.no_grad():
        memory = model.encode(source, padding)
        expanded = _expand_memory(model.with_cross_keys_values(memory), 3)
        reference = model.with_cross_keys_values(_expand_memory(memory, 3))
    assert expanded.states.shape[0] == 12
    for (k, v), (k_ref, v_ref) in zip(expanded.cross_keys_values, reference.cross_keys_values, strict=True):
        torch.testing.assert_close(k, k_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-6)
    assert _expand_memory(memory, 3).cross_keys_values is None


def test_the_two_update_rules_differ_and_a_bad_one_is_refused() -> None:
    model = _model(causal=False).eval()
    source, padding = _source()
    options = dict(iterations=4, mask_id=MASK, pad_id=PAD, lengths=torch.tensor([9, 9, 9, 9]), suppress_ids=SPECIALS)
    every = refine_decode(model, source, padding, update="all", **options)
    masked = refine_decode(model, source, padding, update="masked", **options)
    assert not torch.equal(every.scores, masked.scores)  # the rule is used: kept tokens keep their old confidence
    with pytest.raises(ValueError, match="update"):
        refine_decode(model, source, padding, update="some", **options)


def test_length_candidates_keep_the_best_scoring_length_of_the_predictor_top_k() -> None:
    model = _model(causal=False).eval()
    source, padding = _source()
    with torch.no_grad():
        top = model.encode(source, padding).length_logits[:, 1:].topk(3, dim=1).indices + 1

    def confidence_of(length: int) -> float:  # the scripted decoder is surest of its tokens at length 8
        return 5.0 - 0.1 * (length - 8) ** 2

    real_decode = model.decode

    def scripted_decode(target, memory, target_padding=None, cache=None):
        logits = torch.zeros_like(real_decode(target, memory, target_padding))
        lengths = (~target_padding).sum(1)
        logits[..., 10] = torch.tensor([confidence_of(int(length)) for length in lengths])[:, None]
        return logits

    model.decode = scripted_decode  # type: ignore[method-assign]
    chosen = refine_decode(model, source, padding, iterations=2, mask_id=MASK, pad_id=PAD, length_candidates=3)
    for row in range(4):
        best = max(top[row].tolist(), key=confidence_of)
        assert chosen.lengths[row] == best and chosen.to_lists()[row] == [10] * best
        log_probability = torch.tensor([confidence_of(best)] + [0.0] * (VOCAB - 1)).log_softmax(0)[0]
        assert float(chosen.scores[row]) == pytest.approx(float(log_probability), abs=1e-5)
    assert not chosen.lengths.eq(top[:, 0]).all()  # the test means something: not always the predictor's first


def test_random_initial_tokens_come_from_the_replacement_ids_and_are_seeded() -> None:
    model = _model(causal=False).eval()
    source, padding = _source()
    first_inputs = []
    real_decode = model.decode

    def recording_decode(target, memory, target_padding=None, cache=None):
        first_inputs.append(target.clone())
        return real_decode(target, memory, target_padding)

    model.decode = recording_decode  # type: ignore[method-assign]
    lengths = torch.tensor([5, 3, 5, 2])
    options = dict(iterations=1, mask_id=MASK, pad_id=PAD, init="random", replacement_ids=torch.arange(10, 20),
                   lengths=lengths)
    for seed in (3, 3, 4):
        refine_decode(model, source, padding, generator=torch.Generator().manual_seed(seed), **options)
    valid = torch.arange(5)[None, :] < lengths[:, None]
    for fed in first_inputs:
        assert fed[valid].ge(10).all() and fed[valid].lt(20).all() and fed[~valid].eq(PAD).all()
    assert torch.equal(first_inputs[0], first_inputs[1]) and not torch.equal(first_inputs[0], first_inputs[2])
    with pytest.raises(ValueError, match="replacement_ids"):
        refine_decode(model, source, padding, iterations=1, mask_id=MASK, pad_id=PAD, init="random")


def test_refinement_refuses_a_causal_decoder_and_a_model_without_length_predictor() -> None:
    source, padding = _source()
    with pytest.raises(ValueError, match="non-causal"):
        refine_decode(_model(causal=True), source, padding, iterations=2, mask_id=MASK, pad_id=PAD)
    torch.manual_seed(0)
    plain = EncoderDecoder(EncoderDecoderConfig(vocab_size=VOCAB, d_model=32, n_heads=4, max_source_len=16,
                                                max_target_len=20, causal_decoder=False))
    with pytest.raises(ValueError, match="no length predictor"):
        refine_decode(plain, source, padding, iterations=2, mask_id=MASK, pad_id=PAD)
    with pytest.raises(ValueError, match="iterations"):
        refine_decode(_model(causal=False), source, padding, iterations=0, mask_id=MASK, pad_id=PAD)


# --------------------------------------------------------------------------- corruption and loss

def _targets(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(10, 30, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    return targets.masked_fill(padding, PAD), padding


def test_corruption_at_density_zero_and_one() -> None:
    targets, padding = _targets(8, 12, seed=0)
    clean = corrupt_targets(targets, padding, mask_id=MASK, replacement_ids=torch.arange(4, 8), noise_density=0.0)
    assert torch.equal(clean.inputs, targets) and not clean.noised.any()
    masked = corrupt_targets(targets, padding, mask_id=MASK, replacement_ids=torch.arange(4, 8), noise_density=1.0,
                             keep_prob=0.0, random_prob=0.0)
    assert torch.equal(masked.masked, ~padding) and torch.equal(masked.inputs, targets.masked_fill(~padding, MASK))


def test_corruption_rates_follow_the_80_10_10_split_and_uniform_densities() -> None:
    targets, padding = _targets(4000, 16, seed=1)
    replacements = torch.arange(4, 8)  # disjoint from the targets' ids, so replacements are recognisable
    out = corrupt_targets(targets, padding, mask_id=MASK, replacement_ids=replacements,
                          generator=torch.Generator().manual_seed(2))
    noised = out.noised.sum().item()
    randomised = (out.noised & (out.inputs >= 4) & (out.inputs < 8)).sum().item()
    kept = (out.noised & out.inputs.eq(targets)).sum().item()
    assert out.masked.sum().item() / noised == pytest.approx(0.8, abs=0.01)
    assert randomised / noised == pytest.approx(0.1, abs=0.01) and kept / noised == pytest.approx(0.1, abs=0.01)
    assert not (out.noised & padding).any() and torch.equal(out.inputs[padding], targets[padding])
    assert torch.equal(out.inputs[~out.noised], targets[~out.noised])
    # densities ~ U(0, 1): deciles of 4000 draws within 0.03 of 0.1, 0.2, ...
    deciles = out.density.quantile(torch.linspace(0.1, 0.9, 9))
    torch.testing.assert_close(deciles, torch.linspace(0.1, 0.9, 9), atol=0.03, rtol=0)
    # and per example, the noised share of the real positions follows its density
    real = (~padding).sum(1).float()
    share = out.noised.sum(1) / real
    assert ((share - out.density) * real).sum() / real.sum() == pytest.approx(0.0, abs=0.01)


def test_the_loss_counts_the_positions_its_weighting_names() -> None:
    targets, padding = _targets(6, 10, seed=3)
    out = corrupt_targets(targets, padding, mask_id=MASK, replacement_ids=torch.arange(4, 8), noise_density=0.5,
                          generator=torch.Generator().manual_seed(4))
    logits = torch.randn(6, 10, VOCAB, generator=torch.Generator().manual_seed(5))
    every = F.cross_entropy(logits.flatten(0, 1), targets.masked_fill(padding, -100).flatten(), ignore_index=-100)
    assert masked_target_loss(logits, targets, padding, out, "all")[0].item() == pytest.approx(every.item())
    only = F.cross_entropy(logits[out.masked], targets[out.masked])
    assert masked_target_loss(logits, targets, padding, out, "masked")[0].item() == pytest.approx(only.item())
    with pytest.raises(ValueError, match="weighting"):
        masked_target_loss(logits, targets, padding, out, "some")
    nothing = corrupt_targets(targets, padding, mask_id=MASK, replacement_ids=torch.arange(4, 8), noise_density=0.0)
    leaf = logits.clone().requires_grad_(True)
    empty, selected = masked_target_loss(leaf, targets, padding, nothing, "masked")
    assert not selected.any() and empty.item() == 0.0  # a plain mean over no position would be NaN
    empty.backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))
    with pytest.raises(ValueError, match="at most 1"):
        corrupt_targets(targets, padding, mask_id=MASK, replacement_ids=torch.arange(4, 8), keep_prob=0.6,
                        random_prob=0.6)


def test_a_later_training_stage_is_fed_the_argmax_inside_each_target_and_the_old_input_elsewhere() -> None:
    logits = torch.randn(3, 6, VOCAB, generator=torch.Generator().manual_seed(6))
    logits[0, 2, MASK] = 50.0  # the best id at (0, 2) is suppressed: the runner-up is fed instead
    inputs = torch.full((3, 6), MASK).masked_fill(torch.arange(6) >= torch.tensor([[6], [4], [1]]), PAD)
    valid = inputs.ne(PAD)
    fed = next_stage_inputs(logits.requires_grad_(True), inputs, valid, suppress_ids=SPECIALS)
    expected = logits.detach().clone()
    expected[..., list(SPECIALS)] = float("-inf")
    assert torch.equal(fed, torch.where(valid, expected.argmax(-1), inputs)) and fed[0, 2] != MASK
    assert fed.dtype == torch.long and not fed.requires_grad


def test_stutter_remasking_in_training_keeps_the_old_input_at_each_repeat() -> None:
    predicted = torch.tensor([[5, 5, 6, 6, 6, 7], [8, 9, 9, 4, 4, 4]])
    logits = F.one_hot(predicted, VOCAB).float()
    inputs = torch.tensor([[MASK, 10, MASK, 11, 12, MASK], [MASK] * 4 + [PAD, PAD]])
    valid = inputs.ne(PAD)
    fed = next_stage_inputs(logits, inputs, valid, remask_stutter=True)
    assert fed.tolist() == [[5, 10, 6, 11, 12, 7], [8, 9, MASK, 4, PAD, PAD]]
    assert torch.equal(next_stage_inputs(logits, inputs, valid), torch.where(valid, predicted, inputs))
    with pytest.raises(ValueError, match="must agree"):
        next_stage_inputs(logits[:, :5], inputs, valid)


def test_dropping_repeats_removes_the_later_token_of_each_adjacent_pair_and_shortens_the_rows() -> None:
    model = _model(causal=False, seed=3)
    source, padding = _source()
    options = {"iterations": 1, "mask_id": MASK, "pad_id": PAD, "suppress_ids": SPECIALS,
               "lengths": torch.tensor([12, 9, 15, 4])}
    with_repeats = refine_decode(model, source, padding, **options)
    without = refine_decode(model, source, padding, drop_repeats=True, **options)
    expected = [[t for i, t in enumerate(row) if i == 0 or t != row[i - 1]] for row in with_repeats.to_lists()]
    assert without.to_lists() == expected and expected != with_repeats.to_lists()  # (this model does repeat itself)
    assert without.tokens.shape[1] == max(map(len, expected)) and without.lengths.tolist() == list(map(len, expected))
    assert (without.tokens[torch.arange(without.tokens.shape[1])[None, :] >= without.lengths[:, None]] == PAD).all()
    assert torch.equal(without.scores, with_repeats.scores)
