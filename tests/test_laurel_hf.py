"""apply_laurel on Hugging Face models built offline from tiny configs: exactness at conversion, training, errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from effml.nn import laurel_hf  # noqa: E402
from effml.nn.laurel import LaurelConfig, laurel_parameter_count  # noqa: E402
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


def fine_tuned(family: str, variant: str = "rw+lr+pa") -> torch.nn.Module:
    """A converted model whose LAuReL parameters moved off their identity initialisation (as after fine-tuning)."""
    model = apply_laurel(BUILDERS[family](), variant=variant, rank=4, k=2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".laurel_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def shared_history(model: torch.nn.Module) -> list[torch.Tensor]:
    layer = next(m for m in model.modules() if getattr(m, "_laurel_shared", None) is not None)
    return layer._laurel_shared.history.states


@pytest.mark.parametrize("family", BUILDERS)
def test_pa_keeps_no_stream_states_after_a_forward_so_the_model_deep_copies(family) -> None:
    model = fine_tuned(family).train()
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert shared_history(model) == []  # neither the (B, T, D) states nor their autograd graph stay on the model
    clone = copy.deepcopy(model)  # raised "Only Tensors created explicitly by the user ..." while they did
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           clone(input_ids=ids, attention_mask=mask).logits)
    last_mlp = [m for m in model.modules() if hasattr(m, "laurel_mlp")][-1].mlp

    def fail(module, args):
        raise RuntimeError("a failure in the last MLP")

    handle = last_mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="last MLP"):
        model(input_ids=ids)
    handle.remove()
    assert shared_history(model) == []  # cleared also when the forward raises


@pytest.mark.parametrize("family", BUILDERS)
def test_a_converted_model_pickles_also_into_a_process_that_never_converted_one(family, monkeypatch) -> None:
    model = fine_tuned(family).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    # A fresh process has neither the converted class nor the cache: the module builds the class on look-up.
    data = pickle.dumps(model)
    name = type(next(m for m in model.modules() if hasattr(m, "laurel_mlp"))).__name__
    monkeypatch.setattr(laurel_hf, "_CONVERTED", {})
    monkeypatch.delattr(laurel_hf, name)
    unpickled = pickle.loads(data)
    layer_classes = {type(m) for m in unpickled.modules() if hasattr(m, "laurel_mlp")}
    assert [cls.__name__ for cls in layer_classes] == [name] and layer_classes == {getattr(laurel_hf, name)}
    with torch.no_grad():
        assert torch.equal(unpickled(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("family", BUILDERS)
def test_a_fine_tuned_model_reloads_as_apply_laurel_documents(family, tmp_path) -> None:
    """from_pretrained drops the laurel_* weights; converting with the same options and then loading the saved
    weights restores the outputs exactly (the recipe in apply_laurel's docstring)."""
    safetensors = pytest.importorskip("safetensors.torch")
    model = fine_tuned(family).eval()
    model.save_pretrained(tmp_path)
    ids, mask = padded_batch()
    reloaded = apply_laurel(type(model).from_pretrained(tmp_path).eval(), variant="rw+lr+pa", rank=4, k=2)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(reloaded(input_ids=ids, attention_mask=mask).logits, expected)  # weights dropped
    missing, unexpected = reloaded.load_state_dict(safetensors.load_file(tmp_path / "model.safetensors"),
                                                   strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # GPT-2 ties lm_head to the embedding
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_a_laurel_config_converts_as_its_options_do_and_bad_options_are_named() -> None:
    config = LaurelConfig(variant="rw+lr", rank=4, bound="sigmoid", per_channel=True)
    torch.manual_seed(5)
    from_config = apply_laurel(llama(), config)
    torch.manual_seed(5)
    from_names = apply_laurel(llama(), "rw+lr", rank=4, bound="sigmoid", per_channel=True, channel_dim=-1)
    first = from_config.model.layers[0]
    assert first.laurel_attn.config == from_names.model.layers[0].laurel_attn.config == config
    assert torch.equal(first.laurel_mlp.low_rank.down, from_names.model.layers[0].laurel_mlp.low_rank.down)
    with pytest.raises(ValueError, match=r"apply_laurel: unknown LAuReL options \['rnk'\]"):
        apply_laurel(llama(), "rw+lr", rnk=4)
    with pytest.raises(ValueError, match="channel_dim=1, but Hugging Face hidden states are"):
        apply_laurel(llama(), "rw", channel_dim=1)
    with pytest.raises(ValueError, match="apply_laurel: got a LaurelConfig and the options"):
        apply_laurel(llama(), config, k=2)


def test_a_gpt2_with_cross_attention_is_refused() -> None:
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                     add_cross_attention=True)
    with pytest.raises(ValueError, match="has cross-attention"):
        apply_laurel(transformers.GPT2LMHeadModel(config))
