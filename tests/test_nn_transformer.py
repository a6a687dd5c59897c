"""TransformerLM: configuration checks, causality, parameter accounting, initialisation, looping, growth and the
KV cache, each checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch

from effml.nn import KVCache, TransformerConfig, TransformerLM

VOCAB = 37


def tiny_config(**overrides) -> TransformerConfig:
    options = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=24, init_std=0.2)
    options.update(overrides)
    return TransformerConfig(**options)


def tiny_model(seed: int = 0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(tiny_config(**overrides)).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(("overrides", "field_name"), [
    ({"d_model": 18, "n_heads": 4}, "d_model"),
    ({"mlp": "relu"}, "mlp"),
    ({"d_model": 0}, "d_model"),
    ({"n_layers": -1}, "n_layers"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"n_heads": 0}, "n_heads"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"n_loops": 0}, "n_loops"),
    ({"n_layers": 2.0}, "n_layers"),
    ({"n_layers": True}, "n_layers"),
    ({"mlp_ratio": 0.0}, "mlp_ratio"),
    ({"dropout": 1.0}, "dropout"),
    ({"residual": "no-such-residual"}, "residual"),
    ({"residual_options": {"alpha": 1.0}}, "residual"),
    ({"residual_options": [1]}, "residual_options"),
    ({"d_model": 6, "n_heads": 2}, "odd"),
    ({"norm_eps": -1e-6}, "norm_eps"),
    ({"tie_embeddings": "yes"}, "tie_embeddings"),
])
def test_config_rejects_bad_values_naming_the_field(overrides: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        tiny_config(**overrides)


def test_config_error_mentions_value_and_allowed_choices() -> None:
    with pytest.raises(ValueError, match=r"(?s)'relu'.*gelu.*swiglu"):
        tiny_config(mlp="relu")
    with pytest.raises(ValueError, match=r"(?s)no-such.*plain"):
        tiny_config(residual="no-such")


def test_model_rejects_non_config_and_bad_token_tensors() -> None:
    with pytest.raises(TypeError, match="TransformerConfig"):
        TransformerLM({"d_model": 16})  # type: ignore[arg-type]
    model = tiny_model()
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 25))
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, vocab_size={vocab}\)"):
            model(torch.tensor([[1, bad]]))


# ------------------------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("overrides", [{}, {"n_loops": 2, "input_injection": True}, {"mlp": "swiglu"}])
def test_causality_later_tokens_do_not_change_earlier_logits(overrides: dict) -> None:
    model = tiny_model(**overrides)
    idx = tokens(2, 12)
    changed = idx.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t:], before[:, t:], atol=1e-4)


def test_tied_embeddings_share_storage_and_count_once() -> None:
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 16
    unique = {p.data_ptr(): p.numel() for p in tied.state_dict().values()}
    assert tied.num_parameters() == sum(unique.values())


@pytest.mark.parametrize(("mlp", "tie", "n_loops"), [("gelu", True, 1), ("swiglu", False, 1), ("gelu", True, 3)])
def test_parameter_count_and_flops_match_hand_formulas(mlp: str, tie: bool, n_loops: int) -> None:
    d, n_layers, vocab, seq = 16, 3, VOCAB, 20
    model = tiny_model(mlp=mlp, tie_embeddings=tie, n_layers=n_layers, n_loops=n_loops)
    hidden = round(4.0 * d) if mlp == "gelu" else 8 * round(round(4.0 * d) * 2 / 3 / 8)  # 64, or 40 for swiglu
    mlp_params = (2 if mlp == "gelu" else 3) * d * hidden
    per_block = 2 * d + 3 * d * d + d * d + mlp_params  # two RMSNorm gains, qkv, out, MLP
    embedding = vocab * d
    expected = embedding + n_layers * per_block + d + (0 if tie else vocab * d)
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - embedding
    applied = n_loops * n_layers * per_block + d + vocab * d
    assert model.flops_per_token(seq) == 6 * applied + 12 * n_layers * n_loops * d * seq


def test_initialisation_scales() -> None:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=512, d_model=128, n_layers=3, n_heads=4, n_loops=2, init_std=0.05)
    model = TransformerLM(config)
    out_std = 0.05 / math.sqrt(2 * 3 * 2)
    for block in model.blocks:
        assert block.attn.qkv_proj.weight.std().item() == pytest.approx(0.05, rel=0.03)
        assert block.mlp.up_proj.weight.std().item() == pytest.approx(0.05, rel=0.03)
        assert block.attn.out_proj.weight.std().item() == pytest.approx(out_std, rel=0.03)
        assert block.mlp.down_proj.weight.std().item() == pytest.approx(out_std, rel=0.03)
        assert torch.equal(block.attn_norm.weight, torch.ones(128))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.05, rel=0.03)


def test_dropout_is_active_only_in_training() -> None:
    reference = tiny_model(dropout=0.0)
    model = tiny_model(dropout=0.3)
    model.load_state_dict(reference.state_dict())
    idx = tokens(2, 10)
    torch.testing.assert_close(model(idx), reference(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


# ------------------------------------------------------------------------------------------------ looping


def _looped_by_hand(model: TransformerLM, idx: torch.Tensor, n_loops: int, inject: bool) -> torch.Tensor:
    rotation = model.rotary(0, idx.shape[1])[:, None]
    x = embedded = model.tok_emb(idx)
    for loop in range(n_loops):
        if inject and loop > 0:
            x = x + embedded
        for block in model.blocks:
            x = block(x, rotation)
    return model.lm_head(model.final_norm(x))


@pytest.mark.parametrize("inject", [False, True])
def test_looped_model_equals_stack_applied_repeatedly(inject: bool) -> None:
    model = tiny_model(n_loops=3, input_injection=inject)
    idx = tokens(2, 9)
    torch.testing.assert_close(model(idx), _looped_by_hand(model, idx, 3, inject))
    assert not torch.allclose(model(idx), _looped_by_hand(model, idx, 1, inject), atol=1e-4)


def test_looped_model_equals_unrolled_model_with_copied_blocks() -> None:
    looped = tiny_model(n_loops=2)
    unrolled = tiny_model(n_layers=4)
    unrolled.tok_emb.load_state_dict(looped.tok_emb.state_dict())
    unrolled.final_norm.load_state_dict(looped.final_norm.state_dict())
    for i in range(4):
        unrolled.blocks[i].load_state_dict(looped.blocks[i % 2].state_dict())
    idx = tokens(2, 9)
    torch.testing.assert_close(looped(idx), unrolled(idx))


@pytest.mark.parametrize("inject", [False, True])
def test_loop_readouts_are_the_outputs_of_shallower_loops(inject: bool) -> None:
    model = tiny_model(n_loops=3, input_injection=inject)
    idx = tokens(2, 8)
    readouts = model(idx, loop_readouts=True)
    assert readouts.shape == (3, 2, 8, VOCAB)
    torch.testing.assert_close(readouts[-1], model(idx))
    for loops in (1, 2):
        shallower = tiny_model(n_loops=loops, input_injection=inject)
        shallower.load_state_dict(model.state_dict())
        torch.testing.assert_close(readouts[loops - 1], shallower(idx))


# ------------------------------------------------------------------------------------------------ growth


def test_grow_midas_style_inserts_an_independent_exact_copy_after_the_middle() -> None:
    model = tiny_model(n_layers=4)
    originals = list(model.blocks)
    middle = 2
    new_block = model.grow(insert_at=middle + 1, copy_from=middle)
    assert model.config.n_layers == 5 and len(model.blocks) == 5
    assert list(model.blocks) == originals[:middle + 1] + [new_block] + originals[middle + 1:]
    source = dict(originals[middle].named_parameters())
    for name, param in new_block.named_parameters():
        assert torch.equal(param, source[name])
        assert param.data_ptr() != source[name].data_ptr()
    with torch.no_grad():
        next(new_block.parameters()).add_(1.0)
    assert not torch.equal(next(new_block.parameters()), next(originals[middle].parameters()))


def test_grow_stacking_style_appends_a_copy_of_the_last_block() -> None:
    model = tiny_model(n_layers=2)
    originals = list(model.blocks)
    new_block = model.grow(insert_at=2, copy_from=1)
    assert list(model.blocks) == originals + [new_block]
    assert all(torch.equal(a, b) for a, b in zip(new_block.parameters(), originals[1].parameters(), strict=True))


@pytest.mark.parametrize(("insert_at", "copy_from"), [(2, 1), (3, 2), (0, 0)])
def test_grown_model_with_silenced_copy_computes_the_old_function(insert_at: int, copy_from: int) -> None:
    model = tiny_model(n_layers=3)
    idx = tokens(2, 10)
    before = model(idx)
    new_block = model.grow(insert_at=insert_at, copy_from=copy_from)
    assert not torch.allclose(model(idx), before, atol=1e-4)  # the copy really acts on the stream ...
    with torch.no_grad():
        new_block.attn.out_proj.weight.zero_()
        new_block.mlp.down_proj.weight.zero_()
    assert torch.equal(model(idx), before)  # ... and with zero output projections it is exactly the identity


def test_grow_validates_indices_and_invalidates_old_caches() -> None:
    model = tiny_model(n_layers=2)
    with pytest.raises(ValueError, match="copy_from"):
        model.grow(insert_at=1, copy_from=2)
    with pytest.raises(ValueError, match="insert_at"):
        model.grow(insert_at=3, copy_from=0)
    cache = model.new_cache(1)
    model.grow(insert_at=2, copy_from=1)
    with pytest.raises(ValueError, match="grow"):
        model(tokens(1, 3), cache=cache)
    model(tokens(1, 3), cache=model.new_cache(1))


# ------------------------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("overrides", [{}, {"n_loops": 2, "input_injection": True}, {"mlp": "swiglu"}])
@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1], [4, 3, 1, 5], [1, 1, 1, 1, 1, 1, 1, 6], [13]])
def test_cached_logits_equal_full_forward(overrides: dict, chunks: list[int]) -> None:
    model = tiny_model(**overrides)
    idx = tokens(3, sum(chunks))
    full = model(idx)
    cache = model.new_cache(3, max_len=16)
    pieces, start = [], 0
    for size in chunks:
        pieces.append(model(idx[:, start:start + size], cache=cache))
        start += size
        assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_cache_layout_and_errors() -> None:
    model = tiny_model(n_loops=3)
    cache = model.new_cache(2, max_len=6)
    assert isinstance(cache, KVCache)
    assert cache.keys.shape == (3 * 2, 2, 2, 6, 8)  # (loops × layers, B, H, max_len, Dh)
    model(tokens(2, 4), cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(tokens(2, 3), cache=cache)
    assert cache.length == 4  # a refused call writes nothing
    with pytest.raises(ValueError, match="batch size"):
        model(tokens(3, 1), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(1, max_len=25)
    cache.reset()
    model(tokens(2, 6), cache=cache)
    assert cache.length == 6


def test_a_cache_in_another_dtype_decodes_like_the_full_forward() -> None:
    model = tiny_model().eval()
    idx = tokens(2, 7)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, dtype=torch.bfloat16)  # half the memory; keys and values rounded to bf16
        pieces = [model(idx[:, :4], cache)] + [model(idx[:, t:t + 1], cache) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0.0, atol=5e-2)


def test_small_integer_token_ids_are_accepted_and_bools_refused() -> None:
    model = tiny_model()
    idx = tokens(2, 5)
    torch.testing.assert_close(model(idx.to(torch.uint8)), model(idx))
    with pytest.raises(ValueError, match="integer tensor of token ids"):
        model(idx > 3)


def test_cache_rewrite_after_reset_gives_fresh_results() -> None:
    model = tiny_model()
    first, second = tokens(1, 6, seed=1), tokens(1, 6, seed=2)
    cache = model.new_cache(1, max_len=6)
    model(first, cache=cache)
    cache.reset()
    torch.testing.assert_close(model(second, cache=cache), model(second), rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"residual": "laurel", "residual_options": {"variant": "rw+lr", "rank": 4}}])
def test_torch_compile_traces_the_whole_model_as_one_graph(overrides: dict) -> None:
    """Graph breaks (a max(default=) call, rotary's stride checks) split the compiled model into 11 graphs."""
    import torch._dynamo as dynamo

    dynamo.reset()
    explanation = dynamo.explain(tiny_model(**overrides))(tokens(2, 8))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


# ------------------------------------------------------------------------------------------------ prefix embeddings


@pytest.mark.parametrize("overrides", [{}, {"n_loops": 2, "input_injection": True},
                                       {"mixer": "mamba2", "mixer_options": {"d_state": 8, "headdim": 8}}])
@pytest.mark.parametrize("split", [0, 3, 7])
def test_a_prefix_of_token_embeddings_computes_what_the_tokens_do(overrides: dict, split: int) -> None:
    model = tiny_model(**overrides)
    idx = tokens(2, 7)
    prefix = model.tok_emb(idx[:, :split])
    torch.testing.assert_close(model(idx[:, split:], prefix=prefix), model(idx), rtol=0, atol=1e-6)


def test_hidden_states_are_what_the_head_reads() -> None:
    model = tiny_model(n_loops=2)
    idx, prefix = tokens(2, 5), torch.randn(2, 3, 16)
    torch.testing.assert_close(model.lm_head(model.hidden_states(idx, prefix=prefix)), model(idx, prefix=prefix),
                               rtol=0, atol=0)
    assert model.hidden_states(idx).shape == (2, 5, 16)


def test_a_prefix_is_cached_with_the_tokens_and_gradients_reach_it() -> None:
    model = tiny_model()
    idx, prefix = tokens(2, 6), torch.randn(2, 4, 16, requires_grad=True)
    full = model(idx, prefix=prefix)
    assert full.shape == (2, 10, VOCAB)
    full[:, 3:].logsumexp(-1).sum().backward()  # positions 3.. see the whole prefix
    assert prefix.grad is not None and bool((prefix.grad.abs().sum(-1) > 0).all())
    with torch.no_grad():
        cache = model.new_cache(2, max_len=10)
        first = model(idx[:, :2], cache=cache, prefix=prefix)
        rest = model(idx[:, 2:], cache=cache)
    assert cache.length == 10
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full.detach(), rtol=0, atol=1e-5)


def test_bad_prefixes_are_refused_by_name() -> None:
    model = tiny_model()
    for prefix in (torch.randn(2, 3, 8), torch.randn(3, 3, 16), torch.randn(2, 16), torch.ones(2, 3, 16).long()):
        with pytest.raises(ValueError, match="prefix must be"):
            model(tokens(2, 2), prefix=prefix)
    with pytest.raises(ValueError, match="no tokens and no prefix"):
        model(tokens(2, 0))
    with pytest.raises(ValueError, match="prefix included"):
        model(tokens(1, 20), prefix=torch.randn(1, 5, 16))
