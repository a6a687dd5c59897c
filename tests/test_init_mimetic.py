"""Mimetic initialisation: the implied attention matrix becomes causal linear attention with similarity scores; each
part is switchable; the function reports what it changed and refuses models without SSM layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effml.init import apply_mimetic_init
from effml.nn import Mamba1Mixer, Mamba2Mixer, TransformerConfig, TransformerLM
from effml.nn.scan import heads_of_groups

F64 = torch.float64


def _relative_error(M: torch.Tensor, target: torch.Tensor) -> float:
    target = target.expand_as(M)
    return float((M - target).norm() / target.norm())


def _layer_and_inputs(cls, seed: int, **parts):
    torch.manual_seed(seed)
    layer = cls(32, d_state=16).double()
    if parts:
        apply_mimetic_init(layer, generator=torch.Generator().manual_seed(seed), **parts)
    u = torch.randn(2, 24, 32, dtype=F64, generator=torch.Generator().manual_seed(100 + seed))
    return layer, u


@torch.no_grad()
def _linear_attention(layer, u: torch.Tensor, queries: str) -> torch.Tensor:
    """tril(q_i · k_j) with keys B and queries C ("C") or B ("B"): (b, 1 or h, t, t)."""
    _, _, B, C, _ = layer.ssm_inputs(u)
    q = C if queries == "C" else B
    if isinstance(layer, Mamba1Mixer):
        return torch.einsum("bin,bjn->bij", q, B).tril().unsqueeze(1)
    heads = layer.n_heads
    return torch.einsum("bihn,bjhn->bhij", heads_of_groups(q, heads), heads_of_groups(B, heads)).tril()


@pytest.mark.parametrize("cls", [Mamba1Mixer, Mamba2Mixer])
def test_state_part_turns_the_layer_into_linear_attention_with_its_own_queries_and_keys(cls) -> None:
    default, u = _layer_and_inputs(cls, 0)
    mimetic, _ = _layer_and_inputs(cls, 0, state=True, bc=False)
    assert _relative_error(default.implied_attention(u), _linear_attention(default, u, "C")) > 0.9
    assert _relative_error(mimetic.implied_attention(u), _linear_attention(mimetic, u, "C")) < 0.3


@pytest.mark.parametrize("cls", [Mamba1Mixer, Mamba2Mixer])
def test_full_init_mimics_causal_similarity_attention(cls) -> None:
    # state + bc: M[i, j] ≈ B_i · B_j for j ≤ i (queries ≈ keys: similar tokens attend to each other)
    for parts, bound in (({}, None), ({"state": False, "bc": True}, None), ({"state": True, "bc": True}, 0.2)):
        layer, u = _layer_and_inputs(cls, 1, **parts)
        error = _relative_error(layer.implied_attention(u), _linear_attention(layer, u, "B"))
        if bound is None:
            assert error > 0.9, (parts, error)
        else:
            assert error < bound, (parts, error)


def test_each_part_sets_exactly_its_parameters() -> None:
    torch.manual_seed(2)
    layer = Mamba1Mixer(32, d_state=8)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    changed = apply_mimetic_init(layer, state=True, bc=False)
    assert changed == {"": ["A_log", "dt_proj.bias"]}
    assert torch.allclose(layer.A_log, torch.full_like(layer.A_log, -8.0))
    assert torch.allclose(F.softplus(layer.dt_proj.bias), torch.ones(layer.d_inner))
    untouched = [n for n in before if n not in ("A_log", "dt_proj.bias")]
    assert all(torch.equal(before[n], dict(layer.named_parameters())[n]) for n in untouched)

    apply_mimetic_init(layer, state=False, bc=True, bc_noise=0.0)
    assert torch.equal(layer.W_C, layer.W_B)
    apply_mimetic_init(layer, state=False, bc=True, bc_noise=0.1, generator=torch.Generator().manual_seed(0))
    difference = (layer.W_C - layer.W_B).std() / layer.W_B.std()
    assert 0.05 < difference < 0.2                                  # correlated, not equal

    changed = apply_mimetic_init(layer, state=False, bc=False, conv_identity=True)
    assert changed == {"": ["conv1d.weight", "conv1d.bias"]}
    x = torch.randn(2, 7, layer.d_inner)
    from effml.nn.ssm import _causal_conv
    torch.testing.assert_close(_causal_conv(layer.conv1d, x, None, 0), x)   # pass-through of the current token


def test_mamba2_bc_part_copies_the_conv_channels_of_b_to_c() -> None:
    torch.manual_seed(3)
    layer = Mamba2Mixer(32, d_state=8, headdim=16)
    apply_mimetic_init(layer, state=False, bc=True, bc_noise=0.0)
    b, c = layer.conv_channels_of("B"), layer.conv_channels_of("C")
    assert torch.equal(layer.conv1d.weight[b], layer.conv1d.weight[c])
    _, _, B, C, _ = layer.ssm_inputs(torch.randn(2, 9, 32))
    torch.testing.assert_close(B, C)


def test_applies_to_every_layer_of_an_lm_and_reports_names() -> None:
    model = TransformerLM(TransformerConfig(vocab_size=17, d_model=32, n_layers=3, n_heads=2, mixer="mamba2",
                                            mixer_options={"headdim": 16}))
    changed = apply_mimetic_init(model, conv_identity=True)
    assert sorted(changed) == [f"blocks.{i}.attn" for i in range(3)]
    assert "blocks.1.attn.A_log" in changed["blocks.1.attn"]
    for block in model.blocks:
        assert torch.allclose(block.attn.A_log, torch.full((block.attn.n_heads,), math.log(math.exp(-8.0))))


def test_refuses_models_without_ssm_layers_and_bad_arguments() -> None:
    attention_lm = TransformerLM(TransformerConfig(vocab_size=17, d_model=32, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="found no SSM layer"):
        apply_mimetic_init(attention_lm)
    layer = Mamba1Mixer(16)
    with pytest.raises(ValueError, match="every part is off"):
        apply_mimetic_init(layer, state=False, bc=False)
    with pytest.raises(ValueError, match="dt_value"):
        apply_mimetic_init(layer, dt_value=0.0)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    for switch, value in (("state", "no"), ("bc", 1), ("conv_identity", None)):   # truthy or falsy, not bools
        with pytest.raises(ValueError, match=f"{switch} switches a part on or off and must be True or False"):
            apply_mimetic_init(layer, **{switch: value})
    for constant in ("a_magnitude", "dt_value", "bc_noise"):                     # True is not 1.0
        with pytest.raises(ValueError, match=f"{constant} must be a finite number"):
            apply_mimetic_init(layer, **{constant: True})
    assert all(torch.equal(before[name], p) for name, p in layer.named_parameters())   # refused before any change
