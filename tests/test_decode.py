"""Generation with the KV cache against full recomputation, EOS handling, sampling, and the top-k/top-p filters."""

from __future__ import annotations

import pytest
import torch

from effml.decode import filter_logits, generate, select_next_token
from effml.nn import TransformerConfig, TransformerLM

VOCAB = 29


def tiny_model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, init_std=0.3)
    options.update(overrides)
    return TransformerLM(TransformerConfig(**options)).eval()


def prompt(batch: int = 3, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def greedy_by_hand(model: TransformerLM, start: torch.Tensor, new_tokens: int) -> torch.Tensor:
    sequence = start
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(sequence)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


# ------------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("overrides", [{}, {"n_loops": 2, "input_injection": True}])
def test_cached_greedy_generation_equals_recomputation(overrides: dict) -> None:
    model = tiny_model(**overrides)
    start = prompt()
    cached = generate(model, start, 20, temperature=0.0)
    uncached = generate(model, start, 20, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 25)
    assert torch.equal(cached[:, :5], start)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_by_hand(model, start, 20))
    assert len(set(cached[:, 5:].flatten().tolist())) > 1  # not a degenerate constant output


def test_generation_fills_the_context_exactly_and_refuses_more() -> None:
    model = tiny_model(max_seq_len=12)
    start = prompt(2, 4)
    # 4 prompt tokens + 9 new ones need 12 positions: the last token is emitted, never fed back.
    assert torch.equal(generate(model, start, 9, temperature=0.0), greedy_by_hand(model, start, 9))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, start, 10)


def test_rows_keep_emitting_eos_after_it() -> None:
    model = tiny_model()
    start = prompt()
    free = generate(model, start, 12, temperature=0.0)
    eos = int(free[0, 5 + 3])  # the token row 0 emits at its 4th step
    stopped = generate(model, start, 12, temperature=0.0, eos_id=eos)
    assert stopped.shape == free.shape
    for row in range(3):
        hits = (free[row, 5:] == eos).nonzero()
        first = 5 + int(hits[0]) if len(hits) else stopped.shape[1]
        assert torch.equal(stopped[row, :first], free[row, :first])
        assert (stopped[row, first:] == eos).all()


def test_all_rows_finishing_early_still_returns_full_length() -> None:
    model = tiny_model()
    start = prompt(1, 5)
    free = generate(model, start, 10, temperature=0.0)
    eos = int(free[0, 5])
    stopped = generate(model, start, 10, temperature=0.0, eos_id=eos)
    assert stopped.shape == (1, 15)
    assert (stopped[0, 5:] == eos).all()


def test_sampling_is_reproducible_and_top_k_one_is_greedy() -> None:
    model = tiny_model()
    start = prompt()
    first = generate(model, start, 15, generator=torch.Generator().manual_seed(3))
    again = generate(model, start, 15, generator=torch.Generator().manual_seed(3))
    other = generate(model, start, 15, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    uncached = generate(model, start, 15, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(first, uncached)
    top1 = generate(model, start, 15, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(top1, generate(model, start, 15, temperature=0.0))


def test_generate_restores_mode_and_returns_trainable_tokens() -> None:
    model = tiny_model(dropout=0.1).train()
    start = prompt()
    assert torch.equal(generate(model, start, 0), start)
    generated = generate(model, start, 3)
    assert model.training
    assert not generated.is_inference()
    model(generated).sum().backward()  # usable as training data: the embedding saves it for backward


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"eos_id": VOCAB}, "eos_id"), ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_generate_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), prompt(), **arguments)


def test_generate_rejects_prompt_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match=rf"prompt token ids must lie in \[0, vocab_size={VOCAB}\)"):
        generate(tiny_model(), torch.tensor([[1, VOCAB]]), 2)


def test_ssm_models_generate_past_max_seq_len_with_a_constant_size_state() -> None:
    """max_seq_len bounds attention's rotary positions and KV cache; an SSM's recurrence has no such bound."""
    model = tiny_model(mixer="mamba2", mixer_options={"d_state": 4, "headdim": 8}, max_seq_len=8)
    start = prompt(2, 6)
    generated = generate(model, start, 10, temperature=0.0)
    assert generated.shape == (2, 16)
    assert torch.equal(generated, greedy_by_hand(model, start, 10))


def test_sample_frequencies_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    samples = select_next_token(logits, temperature=2.0, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(samples, minlength=4).double() / 20000
    expected = torch.softmax(torch.tensor([0.0, 0.5, 1.0, -0.5], dtype=torch.float64), dim=0)
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)


# ------------------------------------------------------------------------------------------------ filters


def test_a_temperature_too_small_for_float32_samples_the_argmax() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.5]])
    assert select_next_token(logits, temperature=1e-45).tolist() == [1, 0]


def test_top_k_keeps_exactly_the_k_largest_even_with_ties() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 20)
    logits[0, :5] = 3.0  # a five-way tie at the top of row 0
    for k in (1, 3, 7):
        filtered = filter_logits(logits, top_k=k, top_p=None)
        kept = torch.isfinite(filtered)
        assert (kept.sum(-1) == k).all()
        assert torch.equal(filtered[kept], logits[kept])
        smallest_kept = filtered.masked_fill(~kept, float("inf")).min(-1).values
        largest_dropped = logits.masked_fill(kept, float("-inf")).max(-1).values
        assert (smallest_kept >= largest_dropped).all()
    assert torch.equal(filter_logits(logits, top_k=20), logits)


def _top_p_reference(row: torch.Tensor, p: float) -> set[int]:
    probs = torch.softmax(row.double(), dim=0)
    order = sorted(range(len(row)), key=lambda i: -float(probs[i]))
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += float(probs[i])
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(p: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 15) * 2.0
    filtered = filter_logits(logits, top_k=None, top_p=p)
    for row in range(8):
        kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
        assert kept == _top_p_reference(logits[row], p)
        assert int(logits[row].argmax()) in kept
    finite = torch.isfinite(filtered)
    assert torch.equal(filtered[finite], logits[finite])


def test_top_p_always_keeps_the_argmax_and_combines_after_top_k() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9, -2.0]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-6))[0].nonzero().flatten().tolist() == [1]
    # top-k=3 keeps {1, 3, 2}; renormalised over them, token 1 alone has mass ~0.52 < 0.6, so 1 and 3 survive.
    combined = filter_logits(logits, top_k=3, top_p=0.6)
    assert torch.isfinite(combined)[0].nonzero().flatten().tolist() == [1, 3]
    # top-p acts on the renormalised top-k survivors: e^2 / (e^2 + 7) = 0.51 < 0.7 over all eight tokens, but
    # e^2 / (e^2 + 1) = 0.88 >= 0.7 over the top-2, so only the argmax is left.
    peaked = torch.tensor([[2.0, 0, 0, 0, 0, 0, 0, 0]])
    assert torch.isfinite(filter_logits(peaked, top_p=0.7)).sum() > 1
    assert torch.isfinite(filter_logits(peaked, top_k=2, top_p=0.7))[0].nonzero().flatten().tolist() == [0]
    assert filter_logits(logits, top_p=1.0) is not logits
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    with pytest.raises(ValueError, match="batch, vocab"):
        filter_logits(logits[0], top_k=2)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_prefix_of_prompt_embeddings_generates_what_the_prompt_does(use_cache: bool) -> None:
    model = tiny_model()
    start = prompt()
    expected = generate(model, start, 12, temperature=0.0)
    with torch.no_grad():
        whole = generate(model, start[:, :0], 12, temperature=0.0, prefix=model.tok_emb(start), use_cache=use_cache)
        half = generate(model, start[:, 2:], 12, temperature=0.0, prefix=model.tok_emb(start[:, :2]),
                        use_cache=use_cache)
    assert torch.equal(whole, expected[:, 5:])
    assert torch.equal(half, expected[:, 2:])


def test_the_prefix_counts_against_the_context_length() -> None:
    model = tiny_model()  # max_seq_len 32: a prefix of 8, 1 prompt token and 24 new tokens need 32 positions
    prefix = torch.randn(3, 8, 16)
    assert generate(model, prompt(length=1), 24, temperature=0.0, prefix=prefix).shape == (3, 25)
    with pytest.raises(ValueError, match="needs 33 positions"):
        generate(model, prompt(length=1), 25, temperature=0.0, prefix=prefix)
    with pytest.raises(ValueError, match="length >= 1"):
        generate(model, prompt(length=0), 4)
