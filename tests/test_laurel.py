"""LAuReL residuals (effml.nn.laurel): exact special cases, the paper's formulas, parameter counts, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effml.nn import TransformerConfig, TransformerLM
from effml.nn import StreamHistory
from effml.nn.laurel import (LaurelBlock, LaurelConfig, LaurelResidual, LowRankTerm, ResidualWeights,
                              laurel_parameter_count, parse_variant)

VARIANTS = ["rw", "lr", "pa", "rw+lr", "rw+pa", "lr+pa", "rw+lr+pa"]


def lm(residual: str, **options) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=16,
                                           residual=residual, residual_options=options))


def randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)


@pytest.mark.parametrize(("variant", "options"), [
    *[(variant, {}) for variant in VARIANTS],
    ("rw+lr+pa", {"bound": "sigmoid", "per_channel": True}),
    ("rw+lr+pa", {"bound": "none", "lr_init": "xavier", "pa_map": "low-rank"}),
])
def test_every_variant_starts_as_the_plain_residual_exactly(variant, options) -> None:
    plain = lm("plain")
    laurel = lm("laurel", variant=variant, rank=4, k=2, **options)
    missing, unexpected = laurel.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".attn_residual." in m or ".mlp_residual." in m for m in missing)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(plain(idx), laurel(idx))


def test_residual_weights_one_and_one_is_the_plain_residual() -> None:
    residual = LaurelResidual(8, variant="rw", bound="none")
    x, fx = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    alpha, beta = residual.weights()
    assert alpha.item() == 1.0 and beta.item() == 1.0
    assert torch.equal(residual(x, fx), x + fx)


def test_rw_lr_pa_matches_the_explicit_formula() -> None:
    d, r, k = 12, 3, 2
    residual = LaurelResidual(d, variant="rw+lr+pa", rank=r, k=k, pa_map="low-rank", per_channel=True)
    randomise(residual)
    x, fx = torch.randn(2, 4, d), torch.randn(2, 4, d)
    history = [torch.randn(2, 4, d) for _ in range(4)]
    a, b = residual.weights.alpha_logit, residual.weights.beta_logit
    alpha = 2 * torch.exp(a) / (torch.exp(a) + torch.exp(b))  # scale 2 × softmax over the pair
    beta = 2 * torch.exp(b) / (torch.exp(a) + torch.exp(b))
    A, B = residual.low_rank.down, residual.low_rank.up  # noqa: N806 (the paper's names)
    A2, B2 = residual.previous.map.down, residual.previous.map.up  # noqa: N806
    gamma = residual.previous.gamma
    pa = sum(gamma[j] * (history[j] @ A2 @ B2) for j in range(k))  # only the k most recent earlier states
    expected = alpha * fx + beta * (x + x @ A @ B + pa)
    torch.testing.assert_close(residual(x, fx, history), expected, rtol=1e-5, atol=1e-5)


def test_softmax_bound_keeps_the_weights_bounded() -> None:
    residual = LaurelResidual(4, variant="rw", bound="softmax", per_channel=True)
    with torch.no_grad():
        residual.weights.alpha_logit.copy_(torch.tensor([1e4, -1e4, 3.0, 0.0]))
    alpha, beta = residual.weights()
    torch.testing.assert_close(alpha + beta, torch.full((4,), 2.0))
    assert bool(((alpha >= 0) & (alpha <= 2) & (beta >= 0) & (beta <= 2)).all())


def test_pa_reads_only_the_k_most_recent_states() -> None:
    residual = LaurelResidual(6, variant="pa", k=2)
    randomise(residual)
    x, fx = torch.randn(1, 3, 6), torch.randn(1, 3, 6)
    history = [torch.randn(1, 3, 6) for _ in range(4)]
    changed_old = history[:2] + [torch.randn(1, 3, 6) * 100, torch.randn(1, 3, 6)]
    changed_recent = [history[0] + 1.0] + history[1:]
    assert torch.equal(residual(x, fx, history), residual(x, fx, changed_old))
    assert not torch.allclose(residual(x, fx, history), residual(x, fx, changed_recent))


def test_a_pa_model_keeps_exactly_k_previous_activations() -> None:
    k = 2
    model = lm("laurel", variant="rw+lr+pa", rank=4, k=k)
    seen: list[int] = []
    for block in model.blocks:
        for residual in (block.attn_residual, block.mlp_residual):
            residual.register_forward_pre_hook(lambda module, args: seen.append(len(args[2])))
    model(torch.randint(0, 64, (1, 8)))
    # sub-layer i sees min(i, k) earlier states: never more than k are kept
    assert seen == [min(i, k) for i in range(2 * len(model.blocks))]


@pytest.mark.parametrize(("variant", "options", "formula"), [
    ("rw", {}, lambda d, r, k: 2),
    ("rw", {"per_channel": True}, lambda d, r, k: 2 * d),
    ("lr", {}, lambda d, r, k: 2 * r * d),
    ("pa", {}, lambda d, r, k: k),
    ("pa", {"pa_map": "low-rank"}, lambda d, r, k: 2 * r * d + k),
    ("rw+lr", {}, lambda d, r, k: 2 + 2 * r * d),
    ("rw+lr+pa", {"per_channel": True}, lambda d, r, k: 2 * d + 2 * r * d + k),
])
def test_parameter_counts_match_the_papers_formulas(variant, options, formula) -> None:
    d, r, k = 48, 5, 3
    residual = LaurelResidual(d, variant=variant, rank=r, k=k, **options)
    count = sum(p.numel() for p in residual.parameters())
    assert count == formula(d, r, k) == laurel_parameter_count(d, variant, rank=r, k=k, **options)
    n_layers = 3  # a model adds one residual per sub-layer (attention, MLP)
    extra = lm("laurel", variant=variant, rank=r, k=k, **options).num_parameters() - lm("plain").num_parameters()
    assert extra == 2 * n_layers * laurel_parameter_count(32, variant, rank=r, k=k, **options)


def test_gradients_reach_every_laurel_parameter() -> None:
    model = lm("laurel", variant="rw+lr+pa", rank=4, k=2, pa_map="low-rank", per_channel=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(2):  # after one step the zero-initialised up-projections have moved, so every factor gets gradient
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        optimizer.step()
    laurel = {name: p for name, p in model.named_parameters() if "_residual." in name}
    assert len(laurel) == 3 * 2 * 7  # 3 blocks × 2 residuals × (α, β, down, up, γ, PA down, PA up)
    for name, parameter in laurel.items():
        if name.startswith("blocks.0.attn_residual.previous."):  # the first sub-layer has no earlier state to combine
            assert parameter.grad is None, name
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_laurel_block_wraps_a_conv_branch_on_the_channel_axis() -> None:
    channels = 6
    branch = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
    block = LaurelBlock(branch, channels, variant="rw+lr", rank=2, per_channel=True, channel_dim=1)
    randomise(block.residual)
    x = torch.randn(2, channels, 5, 5)
    alpha, beta = (w.view(1, channels, 1, 1) for w in block.residual.weights())
    low_rank = torch.einsum("bchw,cr,rd->bdhw", x, block.residual.low_rank.down, block.residual.low_rank.up)
    torch.testing.assert_close(block(x), alpha * branch(x) + beta * (x + low_rank), rtol=1e-5, atol=1e-5)


def explicit_laurel(residual: LaurelResidual, x: torch.Tensor, fx: torch.Tensor, history: list[torch.Tensor],
                    channel_dim: int) -> torch.Tensor:
    """The paper's α·f(x) + β·(x + B·A·x + Σγ_j·x_{i−j}) written out with einsum (identity PA map)."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    alpha, beta = 1.0, 1.0
    if residual.weights is not None:
        alpha, beta = ((w.reshape(shape) if w.numel() > 1 else w) for w in residual.weights())
    letters = "abcd"[: x.dim()]
    channels_out = letters.replace(letters[channel_dim], "z")
    stream = x
    if residual.low_rank is not None:
        A, B = residual.low_rank.down, residual.low_rank.up  # noqa: N806 (the paper's names)
        stream = stream + torch.einsum(f"{letters},{letters[channel_dim]}r,rz->{channels_out}", x, A, B)
    if residual.previous is not None:
        gamma = residual.previous.gamma[: len(history)]  # fewer earlier states at the bottom of a stack
        stream = stream + sum(g * h for g, h in zip(gamma, history, strict=True))
    return alpha * fx + beta * stream


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("shape", "channel_dim", "per_channel"), [((2, 5, 8), -1, False), ((2, 8, 3, 3), 1, True)])
def test_fused_residual_equals_the_explicit_formula_in_values_and_gradients(variant, shape, channel_dim,
                                                                             per_channel) -> None:
    torch.manual_seed(0)
    d = shape[channel_dim]
    residual = LaurelResidual(d, variant=variant, rank=3, k=2, per_channel=per_channel, channel_dim=channel_dim)
    residual = residual.double()
    randomise(residual)
    inputs = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    x, fx, history = inputs[0], inputs[1], inputs[2:]
    got = residual(x, fx, history)
    expected = explicit_laurel(residual, x, fx, history, channel_dim)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    leaves = [*inputs, *residual.parameters()]
    weights = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad((got * weights).sum(), leaves, allow_unused=True),
                    torch.autograd.grad((expected * weights).sum(), leaves, allow_unused=True), strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "channel_dim"), [((2, 5, 8), -1), ((2, 8, 3, 3), 1)])
def test_low_rank_term_keeps_a_wider_stream_dtype(shape, channel_dim) -> None:
    """Under autocast the LR product comes out in bf16 while the stream is fp32: the sum must stay in the stream's
    dtype (modelled here by a float32 product added to a float64 stream)."""
    term = LowRankTerm(shape[channel_dim], 3, channel_dim=channel_dim)
    randomise(term)
    base, x = torch.randn(shape, dtype=torch.float64), torch.randn(shape)
    got = term.add_to(base, x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, base + term(x).double())


def test_column_orthogonal_init() -> None:
    d, r = 12, 4
    down = LaurelResidual(d, variant="lr", rank=r).low_rank.down
    gram = down.T @ down
    torch.testing.assert_close(gram, torch.eye(r) * (d / r) / (r * d))  # orthogonal columns, each of norm 1/r
    assert torch.count_nonzero(down) == d


@pytest.mark.parametrize(("options", "message"), [
    ({"variant": "rw+xx"}, "unknown parts"),
    ({"variant": "rw+rw"}, "repeated"),
    ({"variant": "lr", "rank": 100}, "rank must be in"),
    ({"bound": "tanh"}, "bound='tanh'"),
    ({"k": 0}, "k must be a positive int"),
])
def test_bad_options_fail_with_a_clear_message(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        LaurelResidual(32, **options)


@pytest.mark.parametrize(("module", "inputs", "message"), [
    # (B, T, D) of the wrong width: scalar RW used to broadcast over any width, LR to fail inside a matmul
    (LaurelResidual(8, variant="rw"), (torch.randn(2, 3, 6),) * 2,
     r"axis channel_dim=-1 of the input of shape \(2, 3, 6\) has size 6 but d_model is 8; .*pass channel_dim=1"),
    (LaurelResidual(8, variant="rw+lr", rank=2), (torch.randn(2, 3, 6),) * 2, "has size 6 but d_model is 8"),
    # an axis beyond the input's rank used to wrap round (here onto the batch axis, of size D)
    (LaurelResidual(8, variant="lr", rank=2, channel_dim=4), (torch.randn(8, 8, 3, 3),) * 2,
     r"channel_dim=4 is not an axis of the 4-D input of shape \(8, 8, 3, 3\)"),
    (LaurelResidual(8, variant="rw"), (torch.randn(2, 3, 8), torch.randn(2, 3, 1)),
     r"branch output has shape \(2, 3, 1\) but the stream has \(2, 3, 8\)"),
], ids=["rw-width", "lr-width", "axis-out-of-range", "branch-shape"])
def test_an_input_whose_channel_axis_does_not_hold_d_model_is_refused(module, inputs, message) -> None:
    with pytest.raises(ValueError, match=message):
        module(*inputs)


def test_laurel_block_checks_the_channel_axis_before_running_the_branch() -> None:
    calls = []
    branch = nn.Conv2d(8, 8, 3, padding=1)
    branch.register_forward_pre_hook(lambda module, args: calls.append(1))
    block = LaurelBlock(branch, 8, variant="rw+lr", rank=2)  # channel_dim=1 forgotten for (B, C, H, W)
    with pytest.raises(ValueError, match=r"axis channel_dim=-1 .* has size 5 but d_model is 8; for \(B, C, H, W\) "
                                         r"inputs pass channel_dim=1"):
        block(torch.randn(1, 8, 5, 5))
    assert not calls
    right = LaurelBlock(branch, 8, variant="rw+lr", rank=2, channel_dim=1)
    assert right(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5) and calls


@pytest.mark.parametrize(("variant", "options", "message"), [
    ("lr", {"rank": 16}, r"rank must be in \[1, d_model=4\], got 16"),
    ("pa", {"rank": 16, "pa_map": "low-rank"}, r"rank must be in \[1, d_model=4\]"),
    ("pa", {"pa_map": "lowrank"}, r"pa_map='lowrank' is not one of"),
    ("rw+pa", {"k": 0}, "k must be a positive int"),
])
def test_parameter_count_validates_its_options_like_the_modules(variant, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        laurel_parameter_count(4, variant, **options)
    with pytest.raises(ValueError, match=message):  # the module refuses the same options with the same message
        LaurelResidual(4, variant=variant, **options)
    assert laurel_parameter_count(4, "rw+pa", rank=16) == 2 + 3  # no low-rank map: the rank is not used


def test_unknown_option_is_reported_by_the_model_config() -> None:
    with pytest.raises(ValueError, match="does not accept"):
        TransformerConfig(d_model=32, n_heads=2, residual="laurel", residual_options={"rnk": 4})
    assert parse_variant("pa+RW") == ("rw", "pa")


@pytest.mark.parametrize("variant", ["rw", "rw+lr"])
def test_residual_with_a_narrower_branch_output_keeps_the_stream_dtype(variant) -> None:
    """Autocast's case (bf16 branch output fx, fp32 stream x), modelled by a float32 fx and a float64 stream."""
    residual = LaurelResidual(8, variant=variant, rank=3).double()
    randomise(residual)
    x, fx = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8)
    got = residual(x, fx)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, explicit_laurel(residual, x, fx.double(), [], -1))


def test_xavier_down_projection_is_xavier_uniform() -> None:
    d, r = 512, 64
    torch.manual_seed(0)
    down = LaurelResidual(d, variant="lr", rank=r, lr_init="xavier").low_rank.down
    bound = (6 / (d + r)) ** 0.5  # Xavier-uniform: U(−a, a), a = √(6 / (fan_in + fan_out)), std a/√3
    assert down.shape == (d, r) and down.abs().max() <= bound
    assert abs(down.std().item() / (bound / 3**0.5) - 1) < 0.02  # 32,768 draws: the std's sampling error is ~0.4 %
    assert down.abs().max() > 0.99 * bound


@pytest.mark.parametrize(("bound", "expected"), [
    ("softmax", lambda a, b: (2 * torch.sigmoid(a - b), 2 * torch.sigmoid(b - a))),
    ("sigmoid", lambda a, b: (2 * torch.sigmoid(a), 2 * torch.sigmoid(b))),
    ("none", lambda a, b: (a, b)),
])
def test_residual_weights_follow_their_bound_away_from_the_start(bound, expected) -> None:
    weights = ResidualWeights(4, bound=bound, scale=2.0, per_channel=True)
    a, b = torch.tensor([-3.0, -0.5, 0.7, 4.0]), torch.tensor([1.0, 2.0, -2.0, 0.3])
    with torch.no_grad():
        weights.alpha_logit.copy_(a)
        weights.beta_logit.copy_(b)
    alpha, beta = weights()
    want_alpha, want_beta = expected(a, b)
    torch.testing.assert_close(alpha, want_alpha)
    torch.testing.assert_close(beta, want_beta)
    if bound != "none":
        assert ((alpha > 0) & (alpha < 2) & (beta > 0) & (beta < 2)).all()


def test_a_group_of_layers_with_pa_follows_the_formula_through_a_stream_history() -> None:
    """LaurelBlocks around groups of layers, stacked by hand with a StreamHistory as their docstring says: each block
    adds γ-weighted earlier block inputs (newest first) to the formula's stream."""
    torch.manual_seed(0)
    d = 6
    blocks = [LaurelBlock(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.LayerNorm(d)), d,
                          variant="rw+lr+pa", rank=2, k=2) for _ in range(4)]
    for block in blocks:  # move every LAuReL parameter off its identity start
        for parameter in block.residual.parameters():
            with torch.no_grad():
                parameter.add_(0.3 * torch.randn_like(parameter))
    x = torch.randn(3, 5, d)
    history, inputs = StreamHistory(2), []
    for block in blocks:
        earlier = inputs[::-1][:2]
        expected = explicit_laurel(block.residual, x, block.branch(x), earlier, -1)
        got = block(x, history.recent(block.history_size))
        torch.testing.assert_close(got, expected)
        history.push(x)
        inputs.append(x)
        x = got
    assert len(history.states) == 2


def test_a_laurel_config_or_named_options_build_the_same_block_and_a_misspelt_option_is_named() -> None:
    config = LaurelConfig(variant="rw+lr", rank=2, bound="sigmoid", per_channel=True, channel_dim=1)
    torch.manual_seed(0)
    from_config = LaurelBlock(nn.Conv2d(4, 4, 1), 4, config)
    torch.manual_seed(0)
    from_names = LaurelBlock(nn.Conv2d(4, 4, 1), 4, "rw+lr", rank=2, bound="sigmoid", per_channel=True, channel_dim=1)
    assert from_config.residual.config == from_names.residual.config == config
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(from_config(x), from_names(x))
    with pytest.raises(ValueError, match=r"LaurelBlock: unknown LAuReL options \['rnk'\]; the options are \['rank'"):
        LaurelBlock(nn.Identity(), 4, "rw+lr", rnk=2)
    with pytest.raises(ValueError, match=r"LaurelBlock: got a LaurelConfig and the options \['rank'\]"):
        LaurelBlock(nn.Identity(), 4, config, rank=3)
