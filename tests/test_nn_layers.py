"""Layer-level mathematics: RMSNorm's formula, rotary position embedding, attention against a hand-written reference,
and the MLP variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import effml.nn.norm as norm_module
from effml.nn.attention import CausalSelfAttention
from effml.nn.mlp import GeluMLP, SwiGLUMLP, build_mlp, mlp_hidden_size
from effml.nn.norm import RMSNorm
from effml.nn.rotary import RotaryEmbedding, apply_rotary


def _rotate_pairs_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoFormer Eq. 34 written out with real cos/sin: pair (x_2i, x_2i+1) at position m rotated by m·base^(-2i/Dh).
    x (T, Dh), positions (T,) -> (T, Dh), float64."""
    dim = x.shape[-1]
    theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions.to(torch.float64)[:, None] * theta[None, :]
    even, odd = x[:, 0::2].double(), x[:, 1::2].double()
    out = torch.empty(x.shape, dtype=torch.float64)
    out[:, 0::2] = even * angle.cos() - odd * angle.sin()
    out[:, 1::2] = even * angle.sin() + odd * angle.cos()
    return out


# ------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("path", ["hand_backward", "fused", "formula"])
def test_rms_norm_matches_its_formula(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm_module, "_HAS_FUSED_RMS_NORM", path == "fused" and hasattr(F, "rms_norm"))
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 3.0
    with torch.set_grad_enabled(path == "hand_backward"):
        got = norm(x.requires_grad_(path == "hand_backward"))
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 16 + 1e-5) * norm.weight
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_rms_norm_without_the_hand_backward_has_second_derivatives() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-3).double()
    norm.hand_backward = False
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: norm(a), (x,))


def test_rms_norm_hand_written_backward_is_exact() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: norm_module._RMSNormFunction.apply(a, w, 1e-3), (x, weight))
    norm = RMSNorm(6, eps=1e-3).double()
    with torch.no_grad():
        norm.weight.copy_(weight)
    upstream = torch.randn(2, 3, 6, dtype=torch.float64)
    got = torch.autograd.grad(norm(x), (x, norm.weight), upstream)
    expected = torch.autograd.grad(norm_module.rms_norm_reference(x, weight, 1e-3), (x, weight), upstream)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_rms_norm_is_scale_invariant_and_unit_rms() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=0.0).double()
    x = torch.randn(4, 32, dtype=torch.float64)
    y = norm(x)
    torch.testing.assert_close(norm(7.5 * x), y)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ rotary


def test_rotary_matches_the_roformer_rotation() -> None:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(head_dim=8, max_seq_len=40, base=100.0)
    x = torch.randn(6, 8)
    rotated = apply_rotary(x, rotary(offset=30, length=6))
    expected = _rotate_pairs_reference(x, torch.arange(30, 36), base=100.0)
    torch.testing.assert_close(rotated.double(), expected, rtol=0, atol=2e-6)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(head_dim=16, max_seq_len=64)
    q, k = torch.randn(1, 16), torch.randn(1, 16)

    def score(query_position: int, key_position: int) -> torch.Tensor:
        q_rot = apply_rotary(q, rotary(query_position, 1))
        k_rot = apply_rotary(k, rotary(key_position, 1))
        return (q_rot * k_rot).sum()

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 17, 40):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n), rtol=0, atol=1e-5)
    # ... but not only on the absolute position of one of them: the test above could not fail for a no-op rotary.
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rotary_position_zero_is_identity_and_norm_is_preserved() -> None:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(head_dim=8, max_seq_len=16)
    x = torch.randn(16, 8)
    rotated = apply_rotary(x, rotary(0, 16))
    torch.testing.assert_close(rotated[0], x[0])
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def test_rotary_gradient_is_exact() -> None:
    rotary = RotaryEmbedding(head_dim=4, max_seq_len=8).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    rotation = rotary(2, 3)  # (3, 2) complex: positions 2..4 of the (2, 3, 4) input's pairs
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, rotation), (x,))


def test_rotary_handles_low_precision_and_strided_inputs() -> None:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(head_dim=8, max_seq_len=8)
    x = torch.randn(8, 3, 8)
    rotation = rotary(0, 8)[:, None]
    expected = apply_rotary(x, rotation)
    low = apply_rotary(x.bfloat16(), rotation)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=2e-2, atol=2e-2)
    strided = torch.randn(8, 3, 16)[..., 1::2]  # odd offset, stride 2 on the last dim
    torch.testing.assert_close(apply_rotary(strided, rotation), apply_rotary(strided.contiguous(), rotation))


def test_rotary_tables_stay_float32_when_the_module_is_cast() -> None:
    rotary = RotaryEmbedding(head_dim=8, max_seq_len=300)
    reference = rotary(250, 10)
    rotary.to(torch.bfloat16)
    assert rotary.cos.dtype == torch.float32
    assert torch.equal(rotary(250, 10), reference)


def test_rotary_rejects_odd_head_dim_and_out_of_range_positions() -> None:
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(head_dim=5, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        RotaryEmbedding(head_dim=4, max_seq_len=8)(offset=6, length=3)


# ------------------------------------------------------------------------------------------------ attention


def _attention_reference(attn: CausalSelfAttention, x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Multi-head causal attention with RoPE, written with explicit loops over batch and heads (float64)."""
    batch, seq, d_model = x.shape
    heads, head_dim = attn.n_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv_proj.weight.double().split(d_model)
    positions = torch.arange(seq)
    out = torch.zeros(batch, seq, d_model, dtype=torch.float64)
    causal = torch.ones(seq, seq).tril().bool()
    for b in range(batch):
        xb = x[b].double()
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            q = _rotate_pairs_reference(xb @ w_q[rows].T, positions, base)
            k = _rotate_pairs_reference(xb @ w_k[rows].T, positions, base)
            v = xb @ w_v[rows].T
            scores = (q @ k.T / math.sqrt(head_dim)).masked_fill(~causal, float("-inf"))
            out[b, :, rows] = scores.softmax(-1) @ v
    return out @ attn.out_proj.weight.double().T


def test_attention_matches_explicit_reference() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(d_model=16, n_heads=2)
    attn.reset_parameters(std=0.3, out_std=0.3)
    rotary = RotaryEmbedding(head_dim=8, max_seq_len=16)
    x = torch.randn(2, 7, 16)
    got = attn(x, rotary(0, 7)[:, None])
    torch.testing.assert_close(got.double(), _attention_reference(attn, x), rtol=1e-4, atol=1e-5)


def test_attention_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(d_model=16, n_heads=2, dropout=0.5)
    rotation = RotaryEmbedding(head_dim=8, max_seq_len=16)(0, 9)[:, None]
    x = torch.randn(2, 9, 16)
    attn.eval()
    torch.testing.assert_close(attn(x, rotation), attn(x, rotation))
    attn.train()
    assert not torch.allclose(attn(x, rotation), attn(x, rotation))


# ------------------------------------------------------------------------------------------------ MLP


def test_mlp_hidden_sizes() -> None:
    assert mlp_hidden_size("gelu", 256, 4.0) == 1024
    # swiglu: 2/3 of round(4 * 256) = 682.67 -> nearest multiple of 8 is 85 * 8 = 680.
    assert mlp_hidden_size("swiglu", 256, 4.0) == 680
    # never below 8
    assert mlp_hidden_size("swiglu", 2, 1.0) == 8
    assert isinstance(build_mlp("swiglu", 256, 4.0), SwiGLUMLP)
    assert build_mlp("swiglu", 256, 4.0).down_proj.in_features == 680
    with pytest.raises(ValueError, match="relu"):
        build_mlp("relu", 8, 4.0)


def test_mlps_match_their_formulas() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    gelu = GeluMLP(8, 32).double()
    w_up, w_down = gelu.up_proj.weight, gelu.down_proj.weight
    phi = 0.5 * (1 + torch.erf(x @ w_up.T / math.sqrt(2)))  # exact GELU: u · Φ(u)
    torch.testing.assert_close(gelu(x), ((x @ w_up.T) * phi) @ w_down.T)
    swiglu = SwiGLUMLP(8, 16).double()
    w_gate, w_up = swiglu.gate_up_proj.weight.split(16)
    gate = x @ w_gate.T
    expected = (gate * torch.sigmoid(gate) * (x @ w_up.T)) @ swiglu.down_proj.weight.T
    torch.testing.assert_close(swiglu(x), expected)


def test_rotary_in_real_arithmetic_under_torch_compile_equals_the_complex_product(monkeypatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    rotation = RotaryEmbedding(8, 16)(2, 5).unsqueeze(1)
    eager = apply_rotary(x, rotation)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rotary(x, rotation), eager, rtol=1e-6, atol=1e-6)
