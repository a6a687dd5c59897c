"""apply_laurel on Hugging Face models built offline from tiny configs: exactness at conversion, training, errors."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from effml.nn.laurel import laurel_parameter_count  # noqa: E402
from effml.nn.laurel_hf import apply_laurel  # noqa: E402


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": llama, "gpt2": gpt2}


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    return ids, mask


@pytest.mark.parametrize("family", BUILDERS)
@pytest.mark.parametrize("variant", ["rw", "lr", "rw+lr", "rw+lr+pa"])
def test_identity_initialised_conversion_keeps_the_outputs(family, variant) -> None:
    original = BUILDERS[family]()
    converted = apply_laurel(copy.deepcopy(original), variant=variant, rank=4, k=2)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).logits
        got = converted(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(expected, got)
    extra = sum(p.numel() for n, p in converted.named_parameters() if ".laurel_" in n)
    assert extra == 2 * 2 * laurel_parameter_count(32, variant, rank=4, k=2)  # 2 layers × (attention, MLP)


@pytest.mark.parametrize("family", BUILDERS)
def test_kv_cache_generation_matches_the_original_and_full_recomputation(family) -> None:
    original = BUILDERS[family]()
    converted = apply_laurel(copy.deepcopy(original), variant="rw+lr+pa", rank=4, k=2)
    with torch.no_grad():  # move the LAuReL parameters off the identity so the comparison has something to see
        for name, parameter in converted.named_parameters():
            if ".laurel_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the converted layers really run through the LAuReL residuals
        assert not torch.allclose(original(input_ids=ids).logits, converted(input_ids=ids).logits)
    generated = converted.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():  # the cached greedy path must agree with argmax over a full recomputation
        full = converted(input_ids=generated[:, :-1]).logits[0, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, generated[0, ids.shape[1]:])
    plain = original.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    identity = apply_laurel(copy.deepcopy(original), variant="rw+lr+pa", rank=4, k=2)
    assert torch.equal(plain, identity.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True,
                                                pad_token_id=0))


def test_converted_model_trains_its_laurel_parameters() -> None:
    model = apply_laurel(llama().train(), variant="rw+lr", rank=4)
    ids, _ = padded_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    laurel = {n: p for n, p in model.named_parameters() if ".laurel_" in n}
    assert len(laurel) == 2 * 2 * 4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in laurel.values())
    state = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in state and "model.layers.0.laurel_attn.low_rank.up" in state


def test_unsupported_architecture_and_double_conversion_fail_clearly() -> None:
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    with pytest.raises(ValueError, match="cannot convert BertModel.*GPT2Block.*LlamaDecoderLayer"):
        apply_laurel(transformers.BertModel(config))
    model = apply_laurel(gpt2())
    with pytest.raises(ValueError, match="already has LAuReL"):
        apply_laurel(model)
    with pytest.raises(ValueError, match="unknown parts"):
        apply_laurel(llama(), variant="rw+foo")
    checkpointed = apply_laurel(llama().train(), variant="rw+lr+pa", rank=4)
    enable = (getattr(checkpointed, "activation_checkpointing_enable", None)
              or checkpointed.gradient_checkpointing_enable)
    enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        checkpointed(input_ids=padded_batch()[0])
