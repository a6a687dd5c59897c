"""SoftSRV's pieces (`effml.synth`): the lossy embedder, the three soft-prompt parameterisations, the reconstruction
loss against a per-example reference, and sampling from a prompt, with effml's LM and a Hugging Face Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effml.decode import generate
from effml.nn import TransformerConfig, TransformerLM
from effml.synth import (ContextualMLPPrompt, HashedNgramEmbedder, MixturePrompt, NonContextualPrompt, cut_at_stop,
                         embedding_rows_init, generate_synthetic, make_soft_prompt, pad_examples, prefixed_logits,
                         reconstruction_loss)

VOCAB, WIDTH, CONTEXT = 23, 16, 6


def tiny_lm(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(TransformerConfig(vocab_size=VOCAB, d_model=WIDTH, n_layers=2, n_heads=2, max_seq_len=40,
                                            init_std=0.3)).eval()
    return model.requires_grad_(False)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=40)
    return transformers.LlamaForCausalLM(config).eval().requires_grad_(False)


# -- the embedder ------------------------------------------------------------------------------------------------------
def _reference_counts(text: str, n: int, buckets: int) -> np.ndarray:
    counts = np.zeros(buckets)
    data = text.encode()
    for start in range(len(data) - n + 1):
        packed = int.from_bytes(data[start:start + n], "big")
        counts[((packed * 0x9E3779B97F4A7C15) % 2**64 >> 32) % buckets] += 1
    return counts


@pytest.mark.parametrize("n", [1, 3, 8])
def test_bucket_counts_equal_a_pure_python_count_of_the_hashed_ngrams(n: int) -> None:
    texts = ["def f(x):\n    return x  # é", "ab", "aaaaaaaaaaaa", ""]
    embedder = HashedNgramEmbedder(dim=4, n=n, buckets=61)
    counts = embedder.bucket_counts(texts).numpy()
    for row, text in enumerate(texts):
        np.testing.assert_array_equal(counts[row], _reference_counts(text, n, 61))


def test_context_vectors_are_unit_length_lossy_and_fixed_by_the_seed() -> None:
    embedder = HashedNgramEmbedder(dim=32, n=1, buckets=512, seed=3)
    z = embedder(["abcd", "dcba", "Return the sum of x and y.", "xy"])
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(z[0], z[1], rtol=0, atol=0)  # unigrams forget the order
    assert not torch.allclose(z[0], z[2])
    torch.testing.assert_close(HashedNgramEmbedder(dim=32, n=1, buckets=512, seed=3)(["abcd"]), z[:1])
    assert not torch.allclose(HashedNgramEmbedder(dim=32, n=1, buckets=512, seed=4)(["abcd"]), z[:1])
    trigram = HashedNgramEmbedder(dim=64)
    near, far = trigram(["Return the sum of x and y.", "Return the sum of a and b."]), trigram(["import os, sys"])
    assert float(near[0] @ near[1]) > float(near[0] @ far[0]) + 0.3


def test_embedder_rejects_bad_settings_and_a_bare_string() -> None:
    for options in ({"dim": 0}, {"n": 9}, {"buckets": True}, {"seed": -1}):
        with pytest.raises(ValueError, match="HashedNgramEmbedder"):
            HashedNgramEmbedder(**options)
    with pytest.raises(TypeError, match="sequence of texts"):
        HashedNgramEmbedder()("one text")


# -- the soft prompts --------------------------------------------------------------------------------------------------
def test_the_non_contextual_prompt_ignores_the_context() -> None:
    init = torch.randn(5, WIDTH)
    prompt = NonContextualPrompt(5, WIDTH, CONTEXT, init=init)
    out = prompt(torch.randn(3, CONTEXT))
    assert out.shape == (3, 5, WIDTH)
    torch.testing.assert_close(out, init.expand(3, -1, -1), rtol=0, atol=0)


def test_the_mixture_is_a_softmax_weighted_sum_of_its_bases() -> None:
    torch.manual_seed(0)
    prompt = MixturePrompt(4, WIDTH, CONTEXT, k=3)
    context = torch.randn(5, CONTEXT)
    weights = torch.softmax(context @ prompt.gate.weight.T + prompt.gate.bias, dim=-1)
    expected = sum(weights[:, j, None, None] * prompt.prompt[j] for j in range(3))
    torch.testing.assert_close(prompt(context), expected)
    torch.testing.assert_close(prompt.mixture_weights(context).sum(-1), torch.ones(5))
    assert not torch.allclose(prompt.prompt[0], prompt.prompt[1])  # the bases start apart


def test_the_mlp_prompt_starts_as_the_non_contextual_one_and_learns_to_depend_on_the_context() -> None:
    init = torch.randn(4, WIDTH)
    mc, nsp = ContextualMLPPrompt(4, WIDTH, CONTEXT, init=init, hidden=8), NonContextualPrompt(4, WIDTH, CONTEXT,
                                                                                              init=init)
    context = torch.randn(3, CONTEXT)
    torch.testing.assert_close(mc(context), nsp(context), rtol=0, atol=0)
    (mc(context) * torch.randn(3, 4, WIDTH)).sum().backward()
    assert all(parameter.grad is not None for parameter in mc.parameters())
    with torch.no_grad():
        for parameter in mc.parameters():
            parameter -= 0.1 * parameter.grad
    out = mc(context)
    assert not torch.allclose(out[0], out[1])


def test_make_soft_prompt_builds_each_by_name_and_refuses_unknowns() -> None:
    assert isinstance(make_soft_prompt("mp", 2, WIDTH, CONTEXT, k=4), MixturePrompt)
    assert isinstance(make_soft_prompt("mc", 2, WIDTH, CONTEXT, hidden=3), ContextualMLPPrompt)
    with pytest.raises(ValueError, match="Unknown soft prompt 'xyz'"):
        make_soft_prompt("xyz", 2, WIDTH, CONTEXT)
    with pytest.raises(ValueError, match="does not take"):
        make_soft_prompt("nsp", 2, WIDTH, CONTEXT, k=2)
    with pytest.raises(ValueError, match="k must be"):
        make_soft_prompt("mp", 2, WIDTH, CONTEXT, k=1)
    with pytest.raises(ValueError, match="init has shape"):
        make_soft_prompt("nsp", 2, WIDTH, CONTEXT, init=torch.zeros(3, WIDTH))
    with pytest.raises(ValueError, match="context_dim=6"):
        make_soft_prompt("nsp", 2, WIDTH, CONTEXT)(torch.zeros(2, 5))


def test_embedding_rows_init_takes_distinct_rows_of_the_embedding() -> None:
    weight = torch.randn(VOCAB, WIDTH)
    init = embedding_rows_init(weight, 7, torch.Generator().manual_seed(0))
    matches = [int((weight == row).all(dim=1).nonzero()) for row in init]
    assert len(set(matches)) == 7


# -- the loss --------------------------------------------------------------------------------------------------------
def _reference_loss(lm, prompt, contexts, examples) -> float:
    """Σ over examples and tokens of −log p(x_t | prompt, x_<t), one unpadded example at a time, token by token."""
    total = 0.0
    for context, example in zip(contexts, examples, strict=True):
        prefix = prompt(context[None])
        for t in range(len(example)):
            logits = prefixed_logits(lm, prefix, torch.tensor([example[:t]], dtype=torch.long))[0, -1]
            total -= float(F.log_softmax(logits.double(), dim=-1)[example[t]])
    return total


@pytest.mark.parametrize("lm_factory", [tiny_lm, tiny_llama], ids=["effml", "hugging-face"])
def test_reconstruction_loss_equals_a_per_example_token_by_token_reference(lm_factory) -> None:
    lm = lm_factory()
    torch.manual_seed(1)
    prompt = make_soft_prompt("mc", 3, WIDTH, CONTEXT, hidden=8)
    torch.nn.init.normal_(prompt.down.weight, std=0.1)  # a prompt that depends on the context
    examples = [[1, 2, 3, 4, 5], [7], [9, 9, 2]]
    tokens, mask = pad_examples(examples, length=6, pad_id=4)
    contexts = torch.randn(3, CONTEXT)
    with torch.no_grad():
        total = reconstruction_loss(lm, prompt, contexts, tokens, mask, reduction="sum")
        mean = reconstruction_loss(lm, prompt, contexts, tokens, mask)
        expected = _reference_loss(lm, prompt, contexts, examples)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(mean) == pytest.approx(expected / 9, rel=1e-5)


@pytest.mark.parametrize("lm_factory", [tiny_lm, tiny_llama], ids=["effml", "hugging-face"])
def test_a_prefix_of_token_embeddings_is_the_tokens_themselves(lm_factory) -> None:
    lm = lm_factory()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    whole = lm(ids)
    whole = whole.logits if hasattr(whole, "logits") else whole
    torch.testing.assert_close(prefixed_logits(lm, lm.get_input_embeddings()(ids[:, :2]) if hasattr(
        lm, "get_input_embeddings") else lm.tok_emb(ids[:, :2]), ids[:, 2:]), whole, rtol=0, atol=1e-5)


def test_training_reaches_the_prompt_through_the_frozen_lm_and_the_context_carries_information() -> None:
    """Two examples with distinct contexts: the MLP prompt can tell them apart and reconstruct both, the
    non-contextual prompt can only spread its bets, and the frozen LM does not move."""
    lm = tiny_lm()
    before = {name: value.clone() for name, value in lm.state_dict().items()}
    examples = [[1, 2, 3, 4, 5, 6], [20, 19, 18, 17, 16, 15]]
    tokens, mask = pad_examples(examples)
    contexts = torch.eye(2, CONTEXT)
    losses = {}
    for name in ("nsp", "mc"):
        torch.manual_seed(0)
        prompt = make_soft_prompt(name, 4, WIDTH, CONTEXT, init=embedding_rows_init(lm.tok_emb.weight, 4))
        optimizer = torch.optim.Adam(prompt.parameters(), lr=3e-2)
        for _ in range(60):
            loss = reconstruction_loss(lm, prompt, contexts, tokens, mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            losses[name] = float(reconstruction_loss(lm, prompt, contexts, tokens, mask))
    assert losses["mc"] < losses["nsp"] - 0.5, losses  # (2.0 and 1.2 nats per token after 60 steps)
    for name, value in lm.state_dict().items():
        assert torch.equal(value, before[name])


# -- generation --------------------------------------------------------------------------------------------------------
def test_greedy_samples_continue_the_prompt_as_the_lm_would_and_do_not_depend_on_the_batching() -> None:
    lm = tiny_lm()
    start = torch.tensor([[2, 7, 1]])
    prompt = NonContextualPrompt(3, WIDTH, CONTEXT, init=lm.tok_emb.weight[start[0]].detach())
    expected = generate(lm, start, 10, temperature=0.0)[0, 3:]
    contexts = torch.randn(5, CONTEXT)
    for batch_size in (2, 5):
        samples = generate_synthetic(lm, prompt, contexts, 10, temperature=0.0, batch_size=batch_size)
        assert samples.shape == (5, 10)
        assert all(torch.equal(row, expected) for row in samples)


@pytest.mark.parametrize("lm_factory", [tiny_lm, tiny_llama], ids=["effml", "hugging-face"])
def test_sampling_is_reproducible_from_the_generator_and_greedy_follows_the_argmax(lm_factory) -> None:
    lm = lm_factory()
    torch.manual_seed(0)
    prompt = make_soft_prompt("mp", 3, WIDTH, CONTEXT)
    contexts = torch.randn(4, CONTEXT)

    def sample(seed: int) -> torch.Tensor:
        return generate_synthetic(lm, prompt, contexts, 12, generator=torch.Generator().manual_seed(seed))

    state = torch.random.get_rng_state()
    first = sample(0)
    assert torch.equal(first, sample(0)) and not torch.equal(first, sample(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    greedy = generate_synthetic(lm, prompt, contexts, 6, temperature=0.0)
    with torch.no_grad():
        prefix, sequence = prompt(contexts), torch.empty(4, 0, dtype=torch.long)
        for _ in range(6):
            sequence = torch.cat([sequence, prefixed_logits(lm, prefix, sequence)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, sequence)


def test_a_bf16_hugging_face_lm_samples_from_a_float32_prompt_in_eval_mode_and_keeps_its_mode() -> None:
    lm = tiny_llama().to(torch.bfloat16).train()
    prompt = make_soft_prompt("nsp", 3, WIDTH, CONTEXT)
    modes = []
    lm.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    samples = generate_synthetic(lm, prompt, torch.randn(2, CONTEXT), 5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 5) and modes and not any(modes)
    assert lm.training


# -- helpers -----------------------------------------------------------------------------------------------------------
def test_pad_examples_and_cut_at_stop() -> None:
    tokens, mask = pad_examples([np.array([1, 2]), [3]], pad_id=9)
    assert tokens.tolist() == [[1, 2], [3, 9]] and mask.tolist() == [[True, True], [True, False]]
    with pytest.raises(ValueError, match="padded length is 1"):
        pad_examples([[1, 2]], length=1)
    assert cut_at_stop([5, 34, 34, 34, 7, 34, 34, 34], [34, 34, 34]) == [5, 34, 34, 34]
    assert cut_at_stop(torch.tensor([34, 34, 1]), [34, 34, 34]) is None
    assert cut_at_stop(np.array([1, 2]), [2]) == [1, 2]
    with pytest.raises(ValueError, match="at least one"):
        cut_at_stop([1], [])
