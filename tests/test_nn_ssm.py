"""Selective SSMs: chunked scans equal the sequential reference (values and gradients), recurrent decoding equals the
full-sequence forward, the implied attention matrix reproduces the layer, and the LM's attention path is untouched."""

from __future__ import annotations

import warnings

import pytest
import torch

from effml.nn import Mamba1Mixer, Mamba2Mixer, SSMCache, TransformerConfig, TransformerLM
from effml.nn.attention import CausalSelfAttention
from effml.nn.scan import SSD_BACKWARDS, selective_scan, selective_scan_reference, ssd_scan, ssd_scan_reference

F64 = torch.float64


def _mamba1_inputs(seed: int, steps: int = 37, decay_scale: float = 20.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, c, n = 2, 5, 4
    return [torch.randn(b, steps, c, generator=g, dtype=F64),                    # x
            torch.rand(b, steps, c, generator=g, dtype=F64) * 2,                 # dt
            -torch.rand(c, n, generator=g, dtype=F64) * decay_scale,             # A
            torch.randn(b, steps, n, generator=g, dtype=F64),                    # B
            torch.randn(b, steps, n, generator=g, dtype=F64),                    # C
            torch.randn(c, generator=g, dtype=F64),                              # D
            torch.randn(b, c, n, generator=g, dtype=F64)]                        # initial state


def _mamba2_inputs(seed: int, steps: int = 37) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, h, p, groups, n = 2, 4, 3, 2, 5
    return [torch.randn(b, steps, h, p, generator=g, dtype=F64), torch.rand(b, steps, h, generator=g, dtype=F64),
            -torch.rand(h, generator=g, dtype=F64) * 5, torch.randn(b, steps, groups, n, generator=g, dtype=F64),
            torch.randn(b, steps, groups, n, generator=g, dtype=F64), torch.randn(h, generator=g, dtype=F64),
            torch.randn(b, h, p, n, generator=g, dtype=F64)]


def _values_and_grads(scan, inputs: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    y, state = scan(*leaves, **kwargs)
    weights = torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)
    ((y * weights).sum() + state.square().sum()).backward()
    return [y.detach(), state.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk_size", [1, 8, 10, 64])
def test_mamba1_scan_equals_reference_values_and_gradients(chunk_size: int) -> None:
    # 37 steps: chunks of 8 and 10 leave a shorter last chunk; 64 is one chunk longer than the sequence
    inputs = _mamba1_inputs(0)
    expected = _values_and_grads(selective_scan_reference, inputs)
    got = _values_and_grads(selective_scan, inputs, chunk_size=chunk_size)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_mamba1_scan_without_skip_or_initial_state_equals_reference() -> None:
    x, dt, A, B, C, _, _ = _mamba1_inputs(7, steps=13)
    expected = _values_and_grads(selective_scan_reference, [x, dt, A, B, C])
    got = _values_and_grads(selective_scan, [x, dt, A, B, C], chunk_size=5)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_mamba1_scan_passes_gradcheck_in_float64() -> None:
    # the hand-written backward against finite differences, every input at once (a loss on y and the final state)
    inputs = [t.requires_grad_(True) for t in _mamba1_inputs(8, steps=11, decay_scale=3.0)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk_size=4), inputs)


def test_mamba1_scan_keeps_only_the_chunk_entering_states_for_the_backward() -> None:
    x, dt, A, B, C, D, state = (t.requires_grad_(True) for t in _mamba1_inputs(9, steps=37))
    y, _ = selective_scan(x, dt, A, B, C, D, state, chunk_size=8)
    inputs = {id(t) for t in (x, dt, A, B, C, D)}
    extra = [t.shape for t in y.grad_fn.saved_tensors if id(t) not in inputs]
    assert extra == [torch.Size([2, 5, 5, 4])]          # (b, ⌈37 / 8⌉ chunks, c, n): no (b, t, c, n) tensor


def test_mamba1_scan_rejects_mismatched_inputs_with_a_clear_message() -> None:
    x, dt, A, B, C, D, state = _mamba1_inputs(10, steps=6)
    with pytest.raises(ValueError, match=r"B has shape \(2, 5, 4\)"):
        selective_scan(x, dt, A, B[:, :5], C, D)
    with pytest.raises(ValueError, match="dtype"):
        selective_scan(x, dt.float(), A, B, C, D)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        selective_scan(x, dt, A, B, C, D, chunk_size=0)


def test_mamba2_ssd_scan_rejects_mismatched_inputs_with_a_clear_message() -> None:
    x, dt, A, B, C, D, state = _mamba2_inputs(10, steps=6)
    with pytest.raises(ValueError, match="3 groups, which does not divide x's 4 heads"):
        ssd_scan(x, dt, A, torch.cat([B, B[:, :, :1]], 2), C, D)
    with pytest.raises(ValueError, match=r"B has shape \(2, 5, 2, 5\)"):
        ssd_scan(x, dt, A, B[:, :5], C, D)
    with pytest.raises(ValueError, match=r"dt has shape \(2, 6, 1\)"):
        ssd_scan(x, dt[..., :1], A, B, C, D)
    with pytest.raises(ValueError, match=r"state has shape \(2, 4, 5, 3\)"):
        ssd_scan(x, dt, A, B, C, D, state.transpose(2, 3))
    with pytest.raises(ValueError, match="dtype"):
        ssd_scan(x, dt.float(), A, B, C, D)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ssd_scan(x, dt, A, B, C, D, chunk_size=0)


def test_mamba1_scan_stays_exact_when_a_chunk_decays_beyond_float32_range() -> None:
    # Δ·A down to −80 per step: a 32-step chunk decays by e^-2500, far below float32's range
    x, dt, A, B, C, D, state = _mamba1_inputs(1, steps=64, decay_scale=40.0)
    y_ref, h_ref = selective_scan_reference(x, dt, A, B, C, D, state)
    y, h = selective_scan(*(t.float() for t in (x, dt, A, B, C, D, state)), chunk_size=32)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backward", SSD_BACKWARDS)
@pytest.mark.parametrize("chunk_size", [1, 8, 10, 64])
def test_mamba2_ssd_scan_equals_reference_values_and_gradients(chunk_size: int, backward: str) -> None:
    # both backwards of the chunked scan against autograd through the step-by-step reference
    inputs = _mamba2_inputs(2)
    expected = _values_and_grads(ssd_scan_reference, inputs)
    got = _values_and_grads(ssd_scan, inputs, chunk_size=chunk_size, backward=backward)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_mamba2_ssd_scan_without_skip_or_initial_state_equals_reference() -> None:
    x, dt, A, B, C, _, _ = _mamba2_inputs(5, steps=13)
    expected = _values_and_grads(ssd_scan_reference, [x, dt, A, B, C])
    got = _values_and_grads(ssd_scan, [x, dt, A, B, C], chunk_size=5, backward="manual")
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_mamba2_ssd_scan_passes_gradcheck_in_float64() -> None:
    # every input at once, a loss on y and the final state; 11 steps in chunks of 4 (a shorter last chunk)
    inputs = [t.requires_grad_(True) for t in _mamba2_inputs(6, steps=11)]
    assert torch.autograd.gradcheck(lambda *a: ssd_scan(*a, chunk_size=4, backward="manual"), inputs)


def test_mamba2_ssd_scan_keeps_only_the_chunk_entering_states_for_the_backward() -> None:
    x, dt, A, B, C, D, state = (t.requires_grad_(True) for t in _mamba2_inputs(8, steps=37))
    y, _ = ssd_scan(x, dt, A, B, C, D, state, chunk_size=8, backward="manual")
    inputs = {id(t) for t in (x, dt, A, B, C, D)}
    extra = [t.shape for t in y.grad_fn.saved_tensors if id(t) not in inputs]
    assert extra == [torch.Size([2, 5, 4, 3, 5])]       # (b, ⌈37 / 8⌉ chunks, h, p, n): no (Q × Q) tensors
    with pytest.raises(ValueError, match="backward='fused' is not a backward mode"):
        ssd_scan(x, dt, A, B, C, D, state, backward="fused")


def test_scan_with_zero_decay_and_unit_step_is_causal_linear_attention() -> None:
    # A = 0, Δ = 1: y_i = Σ_{j ≤ i} (C_i · B_j) x_j + D x_i exactly
    x, _, A, B, C, D, _ = _mamba1_inputs(3, steps=9)
    y, _ = selective_scan(x, torch.ones_like(x), torch.zeros_like(A), B, C, D)
    scores = torch.einsum("bin,bjn->bij", C, B).tril()
    torch.testing.assert_close(y, torch.einsum("bij,bjc->bic", scores, x) + D * x)


def _lm(mixer: str, **options) -> TransformerLM:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, max_seq_len=64, mixer=mixer,
                               mixer_options={"chunk_size": 4, "d_state": 4, **options})
    return TransformerLM(config).double()


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_step_by_step_decoding_equals_full_sequence_forward(mixer: str) -> None:
    model = _lm(mixer).eval()
    idx = torch.randint(0, 23, (2, 13), generator=torch.Generator().manual_seed(4))
    full = model(idx)
    cache = model.new_cache(2)
    assert isinstance(cache, SSMCache)
    pieces = [model(idx[:, :6], cache)]                       # a prefill chunk, then one token at a time
    pieces += [model(idx[:, t:t + 1], cache) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 13
    # constant-size state: the cached tensors do not grow with the number of tokens consumed
    sizes = [s.numel() for s in cache.ssm] + [c.numel() for c in cache.conv]
    model(idx[:, :1], cache)
    assert [s.numel() for s in cache.ssm] + [c.numel() for c in cache.conv] == sizes


def test_causal_conv_equals_a_left_padded_depthwise_conv1d_with_and_without_a_cache() -> None:
    """The CPU path (`_DepthwiseCausalConv`) against ``nn.Conv1d`` on a zero-padded window: values and gradients of
    input, weight and bias in float64, float64 gradcheck, and a cached continuation equal to the whole sequence."""
    from effml.nn.ssm import _causal_conv, _DepthwiseCausalConv

    torch.manual_seed(7)
    channels, taps = 6, 4
    conv = torch.nn.Conv1d(channels, channels, taps, groups=channels, bias=True).double()
    x = torch.randn(3, 11, channels, dtype=F64, requires_grad=True)
    y = _causal_conv(conv, x, None, 0)
    padded = torch.nn.functional.pad(x.transpose(1, 2), (taps - 1, 0))
    expected = torch.nn.functional.conv1d(padded, conv.weight, conv.bias, groups=channels).transpose(1, 2)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)
    ours = torch.autograd.grad((y * weights).sum(), (x, conv.weight, conv.bias))
    theirs = torch.autograd.grad((expected * weights).sum(), (x, conv.weight, conv.bias))
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    window = torch.randn(2, 9, channels, dtype=F64, requires_grad=True)
    weight = torch.randn(taps, channels, dtype=F64, requires_grad=True)
    bias = torch.randn(channels, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_DepthwiseCausalConv.apply, (window, weight, bias))
    cache = SSMCache(n_slots=1, batch_size=3)
    pieces = [_causal_conv(conv, x[:, :5], cache, 0)] + [_causal_conv(conv, x[:, t:t + 1], cache, 0)
                                                          for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_lm_with_reference_scan_matches_chunked_scan(mixer: str) -> None:
    chunked, reference = _lm(mixer), _lm(mixer, scan="reference")
    reference.load_state_dict(chunked.state_dict())
    idx = torch.randint(0, 23, (2, 30), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(chunked(idx), reference(idx), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [Mamba1Mixer, Mamba2Mixer])
def test_implied_attention_reproduces_the_scan(cls) -> None:
    torch.manual_seed(6)
    layer = cls(16, d_state=8, chunk_size=4).double()
    u = torch.randn(2, 11, 16, dtype=F64)
    x, dt, B, C, _ = layer.ssm_inputs(u)
    M = layer.implied_attention(u)
    A = -torch.exp(layer.A_log)
    if cls is Mamba1Mixer:
        y, _ = selective_scan(x, dt, A, B, C, None)
        torch.testing.assert_close(torch.einsum("beij,bje->bie", M, x), y)
    else:
        y, _ = ssd_scan(x, dt, A, B, C, None)
        torch.testing.assert_close(torch.einsum("bhij,bjhp->bihp", M, x), y)
    assert (M.triu(diagonal=1) == 0).all()


def test_default_mixer_is_attention_and_unknown_mixers_are_rejected() -> None:
    model = TransformerLM(TransformerConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    assert isinstance(model.blocks[0].attn, CausalSelfAttention)
    with pytest.raises(ValueError, match="mixer 'mamba3' is unknown"):
        TransformerConfig(mixer="mamba3")
    with pytest.raises(ValueError, match=r"no option\(s\) \['d_stat'\]"):
        TransformerConfig(mixer="mamba1", mixer_options={"d_stat": 4})
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Mixer(24, headdim=7)
    with pytest.raises(ValueError, match="scan="):
        Mamba1Mixer(16, scan="parallel")


def test_bad_mixer_options_get_a_message_naming_the_option() -> None:
    for options, message in [({"A_init_range": (1.0, 2.0, 3.0)}, "A_init_range"),
                             ({"A_init_range": 5.0}, "A_init_range"),
                             ({"A_init_range": (1.0, float("inf"))}, "A_init_range"),
                             ({"norm_eps": -1.0}, "norm_eps"), ({"norm_eps": "x"}, "norm_eps"),
                             ({"dt_max": float("inf")}, "dt_max"), ({"ssd_backward": "fast"}, "ssd_backward")]:
        with pytest.raises(ValueError, match=message):
            Mamba2Mixer(16, **options)
    with pytest.raises(ValueError, match="dt_max"):
        Mamba1Mixer(16, dt_max=float("inf"))
    with pytest.raises(ValueError, match="use_kernels must be True or False"):
        Mamba1Mixer(16, use_kernels="no")


def test_ssm_models_need_no_attention_heads_and_no_attention_options_are_accepted() -> None:
    for width in (30, 36):  # neither splits into 4 heads of an even size, which only rotary attention needs
        model = TransformerLM(TransformerConfig(vocab_size=11, d_model=width, n_layers=1, n_heads=4, max_seq_len=8,
                                                mixer="mamba1", mixer_options={"d_state": 4}))
        assert model.rotary is None and model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 11)
    with pytest.raises(ValueError, match="mixer_options.*mixer='attention' takes no options"):
        TransformerConfig(mixer_options={"d_state": 4})


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_bf16_autocast_runs_the_scan_in_float32_and_decodes_like_the_full_forward(mixer: str) -> None:
    """Under autocast the projections give bf16 x, B, C beside fp32 A and D: the scan runs in fp32 (Mamba-1's scan,
    which wants one dtype, refused the mix before), forward, backward and cached decoding alike."""
    model = _lm(mixer).float()
    idx = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        cache = model.new_cache(2)
        pieces = [model(idx[:, :4], cache)] + [model(idx[:, t:t + 1], cache) for t in range(4, 9)]
    logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
    assert all(state.dtype == torch.float32 for state in cache.ssm)
    torch.testing.assert_close(torch.cat(pieces, 1).float(), logits.float(), rtol=0.0, atol=2e-2)
    torch.testing.assert_close(logits.float(), model(idx), rtol=0.0, atol=5e-2)  # bf16 matmuls vs fp32


def test_mamba2_manual_ssd_backward_option_gives_autograd_s_gradients() -> None:
    idx = torch.randint(0, 23, (2, 13), generator=torch.Generator().manual_seed(6))
    grads = []
    for backward in SSD_BACKWARDS:
        torch.manual_seed(0)
        model = TransformerLM(TransformerConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                                                mixer="mamba2", mixer_options={"d_state": 4, "headdim": 8,
                                                                               "chunk_size": 4,
                                                                               "ssd_backward": backward}))
        model.double()(idx).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for manual, autograd in zip(*grads, strict=True):
        torch.testing.assert_close(manual, autograd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_adamw_leaves_the_state_matrix_and_skip_undecayed(mixer: str) -> None:
    """As in the Mamba reference: Mamba-1's A_log is (E, N), a matrix the shape rule alone would decay (to A = −1)."""
    import copy

    from effml.optim import decay_groups

    model = copy.deepcopy(_lm(mixer))  # the exemption must survive copies (growth copies blocks)
    decayed = {name for group in decay_groups(model, 0.1) if group["weight_decay"] > 0 for name in group["names"]}
    assert decayed and not any(name.endswith(("A_log", ".D")) for name in decayed)
    assert any(name.endswith("in_proj.weight") for name in decayed)


# --- the mamba_ssm kernel path, against stand-ins written from mamba_ssm's documented semantics -------------------
def fake_selective_scan_fn(u, delta, A, B, C, D=None, return_last_state=False):
    """mamba_ssm's selective_scan_fn (its selective_scan_ref): u, delta (b, d, l), A (d, n), B, C (b, n, l)."""
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[2]):
        state = (torch.exp(delta[:, :, t, None] * A) * state
                 + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None])
        outputs.append((state * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(outputs, dim=2), state


def fake_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, initial_states=None,
                                   return_final_states=False):
    """mamba_ssm's mamba_chunk_scan_combined: x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n); head i reads
    group i // (h / g); states (b, h, p, n)."""
    b, length, heads, p = x.shape
    group = torch.arange(heads) // (heads // B.shape[2])
    state = initial_states if initial_states is not None else x.new_zeros(b, heads, p, B.shape[-1])
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group][:, :, None, :]
        outputs.append((state * C[:, t, group][:, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize("mixer_class", [Mamba1Mixer, Mamba2Mixer])
def test_kernel_path_passes_mamba_ssm_its_layout(mixer_class, monkeypatch) -> None:
    """With mamba_ssm's kernels (stand-ins here; the real ones need CUDA) the mixer's output equals its reference scan,
    with and without a state carried over from a cached prefix."""
    torch.manual_seed(0)
    options = {"d_state": 8, "headdim": 4, "ngroups": 2} if mixer_class is Mamba2Mixer else {"d_state": 8}
    kernel = mixer_class(16, **options).double()
    reference = mixer_class(16, scan="reference", use_kernels=False, **options).double()
    reference.load_state_dict(kernel.state_dict())
    fakes = {"selective_scan_fn": fake_selective_scan_fn,
             "mamba_chunk_scan_combined": fake_mamba_chunk_scan_combined}
    calls = []
    monkeypatch.setattr(kernel, "_use_kernels", lambda x: calls.append(x.shape) or fakes)
    u = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(kernel(u), reference(u), rtol=1e-10, atol=1e-10)
    assert calls
    caches = [SSMCache(n_slots=1, batch_size=2), SSMCache(n_slots=1, batch_size=2)]
    outputs = [mixer(u[:, :5], cache=cache) for mixer, cache in zip((kernel, reference), caches, strict=True)]
    outputs += [mixer(u[:, 5:], cache=cache) for mixer, cache in zip((kernel, reference), caches, strict=True)]
    torch.testing.assert_close(outputs[2], outputs[3], rtol=1e-10, atol=1e-10)


def test_mamba1_kernel_path_gives_the_kernel_one_input_dtype(monkeypatch) -> None:
    """selective_scan_cuda refuses Δ, B or C in another dtype than u ("Expected delta.scalar_type() == input_type");
    under bf16 autocast softplus leaves Δ in fp32 while x, B, C are bf16 (seen on an H100), so the mixer must cast."""
    def strict_selective_scan_fn(u, delta, A, B, C, D=None, return_last_state=False):
        assert delta.dtype == B.dtype == C.dtype == u.dtype, (u.dtype, delta.dtype, B.dtype, C.dtype)
        return fake_selective_scan_fn(u.double(), delta.double(), A.double(), B.double(), C.double(), D.double(),
                                      return_last_state)

    mixer = Mamba1Mixer(16, d_state=8)
    monkeypatch.setattr(mixer, "_use_kernels", lambda x: {"selective_scan_fn": strict_selective_scan_fn})
    x, B, C = (torch.randn(2, 7, n).bfloat16() for n in (32, 8, 8))
    dt = torch.rand(2, 7, 32)
    A = -torch.exp(mixer.A_log)
    y, state = mixer._kernel_scan(x, dt, A, B, C, None)
    expected, _ = fake_selective_scan_fn(*(t.double().transpose(1, 2) for t in (x, dt.bfloat16())), A.double(),
                                         *(t.double().transpose(1, 2) for t in (B, C)), mixer.D.double(), True)
    torch.testing.assert_close(y, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)


# --- looking up mamba_ssm: once per process, silent when it is absent, one warning when it is broken -------------
@pytest.fixture
def fresh_kernel_lookup():
    """The cached lookup forgotten before and after the test, so that a faked import stays inside it."""
    from effml.nn.ssm import _mamba_ssm_kernels

    _mamba_ssm_kernels.cache_clear()
    yield _mamba_ssm_kernels
    _mamba_ssm_kernels.cache_clear()


BOTH_KERNELS = {"selective_scan_fn": fake_selective_scan_fn,
                "mamba_chunk_scan_combined": fake_mamba_chunk_scan_combined}


def _fake_importer(monkeypatch, outcome: Exception | dict) -> list[str]:
    """Replace importlib.import_module for mamba_ssm's modules: raise ``outcome`` when it is an exception, else return
    a module holding ``outcome``'s attributes. Returns the list of the module names asked for."""
    import importlib
    import types

    real_import_module, asked = importlib.import_module, []

    def import_module(name: str, package: str | None = None):
        if not name.startswith("mamba_ssm"):
            return real_import_module(name, package)
        asked.append(name)
        if isinstance(outcome, Exception):
            raise outcome
        return types.SimpleNamespace(**outcome)

    monkeypatch.setattr(importlib, "import_module", import_module)
    return asked


CUDA_INPUT = type("CudaInput", (), {"is_cuda": True})()   # what _use_kernels reads of a CUDA tensor


def test_kernel_lookup_without_mamba_ssm_is_silent_and_not_repeated(fresh_kernel_lookup, monkeypatch) -> None:
    asked = _fake_importer(monkeypatch, ModuleNotFoundError("No module named 'mamba_ssm'", name="mamba_ssm"))
    mixer = Mamba2Mixer(16, d_state=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # any warning fails the test
        assert [mixer._use_kernels(CUDA_INPUT) for _ in range(3)] == [None, None, None]
    assert len(asked) == 1                                      # looked up on the first call only


@pytest.mark.parametrize("outcome, named", [
    (ImportError("libcudart.so.11.0: cannot open shared object file"), "libcudart"),   # built for another CUDA
    (ModuleNotFoundError("No module named 'triton'", name="triton"), "triton"),        # a dependency missing
    ({"selective_scan_fn": fake_selective_scan_fn}, "mamba_chunk_scan_combined"),       # an older mamba_ssm
], ids=["linker", "dependency", "old-version"])
def test_kernel_lookup_with_a_broken_mamba_ssm_warns_once_and_falls_back(fresh_kernel_lookup, monkeypatch,
                                                                         outcome, named) -> None:
    asked = _fake_importer(monkeypatch, outcome)
    mixer = Mamba1Mixer(16, d_state=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")                         # so that a repeated warning would be seen
        assert mixer._use_kernels(CUDA_INPUT) is None
        looked_up = len(asked)
        assert [mixer._use_kernels(CUDA_INPUT) for _ in range(2)] == [None, None]
    assert looked_up and len(asked) == looked_up and len(caught) == 1
    message = str(caught[0].message)
    assert "mamba_ssm is installed but its CUDA kernels failed to import" in message and named in message
    assert "mixer_options={'use_kernels': False}" in message


def test_kernel_lookup_warns_for_a_mamba_ssm_that_is_not_a_usable_package(fresh_kernel_lookup, monkeypatch) -> None:
    """Through the real import machinery: a ``mamba_ssm`` without its ``ops`` subpackage is broken, not absent."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "mamba_ssm", types.ModuleType("mamba_ssm"))
    with pytest.warns(RuntimeWarning, match="mamba_ssm is installed but its CUDA kernels failed to import"):
        assert fresh_kernel_lookup() is None


def test_kernel_lookup_returns_the_kernels_and_only_cuda_inputs_with_use_kernels_ask(fresh_kernel_lookup,
                                                                                     monkeypatch) -> None:
    asked = _fake_importer(monkeypatch, BOTH_KERNELS)
    assert Mamba1Mixer(16, d_state=4)._use_kernels(CUDA_INPUT) == BOTH_KERNELS
    assert Mamba1Mixer(16, d_state=4)._use_kernels(torch.zeros(1)) is None              # a CPU tensor
    assert Mamba1Mixer(16, d_state=4, use_kernels=False)._use_kernels(CUDA_INPUT) is None
    assert len(asked) == 2                                      # both kernels' modules, once


# --- the real mamba_ssm kernels against the PyTorch scans (needs CUDA and mamba_ssm; skipped elsewhere) -----------
def _mamba_ssm_on_cuda() -> bool:
    from effml.nn.ssm import _mamba_ssm_kernels

    return torch.cuda.is_available() and _mamba_ssm_kernels() is not None


#: per mixer, the largest relative error (‖kernel − PyTorch‖ / ‖PyTorch‖) of the output and of each gradient in fp32:
#: Mamba-1's CUDA scan differs from the PyTorch scan by summation order only; Mamba-2's Triton kernels multiply in TF32
FP32_TOLERANCE = {"mamba1": (1e-4, 1e-3), "mamba2": (5e-3, 3e-2)}


def _output_and_gradients(mixer: torch.nn.Module, u: torch.Tensor, weights: torch.Tensor,
                          bf16: bool) -> dict[str, torch.Tensor]:
    """The mixer's output for u (b, t, d_model) and the gradients of Σ weights ⊙ output with respect to u and every
    parameter, in fp32 or under bf16 autocast."""
    mixer.zero_grad(set_to_none=True)
    leaf = u.clone().requires_grad_(True)
    with torch.autocast(u.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = mixer(leaf)
    (output.float() * weights).sum().backward()
    return {"output": output.detach().float(), "input": leaf.grad.float(),
            **{name: p.grad.float() for name, p in mixer.named_parameters()}}


def _relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((got[name] - want[name]).norm() / want[name].norm()) for name in want}


@pytest.mark.skipif(not _mamba_ssm_on_cuda(), reason="needs CUDA and an importable mamba_ssm")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("mixer_name", ["mamba1", "mamba2"])
def test_cuda_mamba_ssm_kernels_equal_the_pytorch_scans(mixer_name: str, bf16: bool, monkeypatch) -> None:
    """The kernel path (use_kernels=True) against the PyTorch scans on the same weights and input: output and
    gradients of the input and of every parameter. In fp32 the two must agree to ``FP32_TOLERANCE``. Under bf16
    autocast both are compared with the fp32 PyTorch result: the kernel path may be at most 4× as far from it as the
    PyTorch path under the same autocast (plus the fp32 tolerance), so a layout or dtype error, which costs O(1),
    fails while bf16 rounding passes. 100 steps leave Mamba-2's last 32-step chunk short; 2 groups share B and C."""
    from effml.nn import ssm

    kernels, called = ssm._mamba_ssm_kernels(), []

    def spy(name: str):
        def call(*args, **kwargs):
            called.append(name)
            return kernels[name](*args, **kwargs)
        return call

    monkeypatch.setattr(ssm, "_mamba_ssm_kernels", lambda: {name: spy(name) for name in kernels})
    options = {"d_state": 16} if mixer_name == "mamba1" else {"d_state": 32, "headdim": 16, "ngroups": 2}
    torch.manual_seed(0)
    kernel_mixer = ssm.build_mixer(mixer_name, 64, **options).cuda()
    pytorch_mixer = ssm.build_mixer(mixer_name, 64, use_kernels=False, **options).cuda()
    pytorch_mixer.load_state_dict(kernel_mixer.state_dict())
    u = torch.randn(2, 100, 64, device="cuda")
    weights = torch.randn(2, 100, 64, device="cuda")
    kernel = _output_and_gradients(kernel_mixer, u, weights, bf16)
    assert called == ["selective_scan_fn" if mixer_name == "mamba1" else "mamba_chunk_scan_combined"]
    reference = _output_and_gradients(pytorch_mixer, u, weights, bf16=False)
    kernel_errors = _relative_errors(kernel, reference)
    output_tolerance, gradient_tolerance = FP32_TOLERANCE[mixer_name]
    tolerances = {name: output_tolerance if name == "output" else gradient_tolerance for name in reference}
    if bf16:
        pytorch_errors = _relative_errors(_output_and_gradients(pytorch_mixer, u, weights, bf16=True), reference)
        tolerances = {name: 4 * pytorch_errors[name] + tolerances[name] for name in reference}
    too_far = {name: (error, tolerances[name]) for name, error in kernel_errors.items() if error > tolerances[name]}
    assert not too_far, f"(relative error, tolerance) of the kernel path: {too_far}"
