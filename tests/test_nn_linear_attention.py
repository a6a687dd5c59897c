"""Linear self-attention: the update formula, the exact equivalence of the structured (restricted) looped model with
multi-step preconditioned GD, parameter shapes, read-outs, weight sharing and test-time loops."""

from __future__ import annotations

import pytest
import torch

from effml.data.tasks import InContextRegression
from effml.nn import LinearTransformer, LinearTransformerConfig
from effml.nn.linear_attention import (LinearSelfAttention, RestrictedLinearSelfAttention, gd_parameters,
                                       lsa_update, preconditioned_gd, prompt_matrix, read_prediction)


def prompts(d: int, n: int, batch: int = 6, seed: int = 0):
    return InContextRegression(d=d, n_context=n, kappa=10.0).sample(batch, seed, dtype=torch.float64)


def restricted_model(d: int, n_layers: int, n_loops: int, preconditioners: list[torch.Tensor]) -> LinearTransformer:
    model = LinearTransformer(LinearTransformerConfig(d=d, n_layers=n_layers, n_loops=n_loops,
                                                      attention="restricted")).double()
    with torch.no_grad():
        for layer, preconditioner in zip(model.layers, preconditioners, strict=True):
            layer.preconditioner.copy_(preconditioner)
            layer.u.zero_()
    return model


def test_prompt_matrix_layout_and_readout() -> None:
    batch = prompts(3, 5)
    z = prompt_matrix(batch.xs, batch.ys, batch.query)
    assert z.shape == (6, 4, 6)
    assert torch.equal(z[:, :3, :5], batch.xs.transpose(1, 2)) and torch.equal(z[:, 3, :5], batch.ys)
    assert torch.equal(z[:, :3, 5], batch.query) and bool((z[:, 3, 5] == 0).all())
    assert torch.equal(read_prediction(z), torch.zeros(6, dtype=torch.float64))


def test_lsa_update_is_the_masked_formula() -> None:
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)
    p, q = (torch.randn(5, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.diag(torch.tensor([1.0] * 7 + [0.0], dtype=torch.float64))
    explicit = torch.stack([zb + p @ zb @ mask @ (zb.T @ q @ zb) / 7 for zb in z])
    assert torch.allclose(lsa_update(z, p, q), explicit, atol=1e-12)
    # the query column is never a key/value: changing it changes no context column's update
    changed = z.clone()
    changed[:, :, -1] += 1.0
    assert torch.allclose((lsa_update(changed, p, q) - changed)[:, :, :-1], (lsa_update(z, p, q) - z)[:, :, :-1])


@pytest.mark.parametrize(("d", "n", "loops", "seed"), [(1, 1, 1, 0), (3, 2, 5, 1), (5, 40, 3, 2), (4, 9, 8, 3)])
def test_looped_restricted_lsa_equals_preconditioned_gd_exactly(d: int, n: int, loops: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    preconditioner = 0.3 * torch.randn(d, d, generator=generator, dtype=torch.float64)  # not symmetric
    batch = prompts(d, n, seed=seed)
    model = restricted_model(d, 1, loops, [preconditioner])
    readouts = model(prompt_matrix(batch.xs, batch.ys, batch.query), readouts=True)
    gd = preconditioned_gd(batch.xs, batch.ys, batch.query, preconditioner, loops)
    assert readouts.shape == gd.shape == (loops, 6)
    assert torch.allclose(readouts, gd, rtol=1e-10, atol=1e-12)
    assert gd.abs().max() > 1e-3  # the comparison is not between zeros


def test_multilayer_restricted_lsa_is_gd_with_a_preconditioner_per_step() -> None:
    generator = torch.Generator().manual_seed(4)
    preconditioners = [0.3 * torch.randn(3, 3, generator=generator, dtype=torch.float64) for _ in range(3)]
    batch = prompts(3, 7)
    model = restricted_model(3, 3, 1, preconditioners)
    weights = torch.zeros(6, 3, dtype=torch.float64)
    for preconditioner in preconditioners:  # explicit GD, one preconditioner per step
        gradient = torch.einsum("bnd,bn->bd", batch.xs, torch.einsum("bnd,bd->bn", batch.xs, weights) - batch.ys) / 7
        weights = weights - gradient @ preconditioner.T
    assert torch.allclose(model(prompt_matrix(batch.xs, batch.ys, batch.query)), (weights * batch.query).sum(-1),
                          atol=1e-12)


def test_gd_with_the_inverse_covariance_converges_to_the_least_squares_prediction() -> None:
    task = InContextRegression(d=4, n_context=400, covariance="fixed", kappa=5.0)
    batch = task.sample(8, 0, dtype=torch.float64)
    gd = preconditioned_gd(batch.xs, batch.ys, batch.query, torch.linalg.inv(batch.covariance[0]), 30)
    assert torch.allclose(gd[-1], batch.target, atol=1e-8)
    assert (gd[0] - batch.target).abs().max() > 1e-4  # one step is not yet exact at finite n


def test_restricted_and_unrestricted_parameter_shapes_and_structure() -> None:
    d = 4
    full = LinearTransformer(LinearTransformerConfig(d=d, n_layers=3, attention="unrestricted"))
    restricted = LinearTransformer(LinearTransformerConfig(d=d, n_layers=3, attention="restricted"))
    assert {n: tuple(p.shape) for n, p in full.layers[0].named_parameters()} == {
        "p_matrix": (d + 1, d + 1), "q_matrix": (d + 1, d + 1)}
    assert {n: tuple(p.shape) for n, p in restricted.layers[0].named_parameters()} == {
        "preconditioner": (d, d), "u": (d,)}
    assert sum(p.numel() for p in full.parameters()) == 3 * 2 * (d + 1) ** 2
    assert sum(p.numel() for p in restricted.parameters()) == 3 * (d * d + d)
    layer = restricted.layers[0]
    p, q = (m.detach() for m in layer.matrices())
    assert torch.equal(p[:d], torch.zeros(d, d + 1)) and torch.equal(p[d, :d], layer.u.detach())
    assert float(p[d, d]) == 1.0
    assert torch.equal(q[:d, :d], -layer.preconditioner.detach().T) and not q[d].any() and not q[:, d].any()
    # the restricted layer never changes the x rows, only the label row
    z = prompt_matrix(*(getattr(prompts(d, 6), k).float() for k in ("xs", "ys", "query")))
    assert torch.equal(layer(z)[:, :d], z[:, :d])


def test_unrestricted_start_without_noise_is_gd_with_a_scaled_identity() -> None:
    batch = prompts(3, 12)
    model = LinearTransformer(LinearTransformerConfig(d=3, n_layers=1, n_loops=4, init_scale=0.3,
                                                      init_std=0.0)).double()
    assert isinstance(model.layers[0], LinearSelfAttention)
    gd = preconditioned_gd(batch.xs, batch.ys, batch.query, 0.3 * torch.eye(3, dtype=torch.float64), 4)
    assert torch.allclose(model(prompt_matrix(batch.xs, batch.ys, batch.query), readouts=True), gd, atol=1e-12)


def test_readouts_shapes_weight_sharing_and_test_time_loops() -> None:
    torch.manual_seed(0)
    batch = prompts(3, 10)
    z = prompt_matrix(batch.xs, batch.ys, batch.query)
    looped = LinearTransformer(LinearTransformerConfig(d=3, n_layers=1, n_loops=4, init_std=0.05)).double()
    multi = LinearTransformer(LinearTransformerConfig(d=3, n_layers=4, n_loops=1)).double()
    multi.load_state_dict({f"layers.{i}.{name}": value for i in range(4)
                           for name, value in looped.layers[0].state_dict().items()})
    assert looped.depth == multi.depth == 4
    assert sum(p.numel() for p in looped.parameters()) * 4 == sum(p.numel() for p in multi.parameters())
    readouts = looped(z, readouts=True)
    assert readouts.shape == (4, 6) and torch.equal(readouts[-1], looped(z))
    assert torch.allclose(readouts, multi(z, readouts=True), atol=1e-12)  # looping = stacking copies
    more = looped(z, n_loops=7, readouts=True)
    assert more.shape == (7, 6) and torch.allclose(more[:4], readouts, atol=1e-12)
    two_by_three = LinearTransformer(LinearTransformerConfig(d=3, n_layers=2, n_loops=3))
    assert two_by_three(z.float(), readouts=True).shape == (6, 6)
    restricted_layer = RestrictedLinearSelfAttention(3)
    assert restricted_layer(z.float()).shape == z.shape


def test_bad_shapes_and_configs_are_refused() -> None:
    model = LinearTransformer(LinearTransformerConfig(d=3))
    with pytest.raises(ValueError, match=r"\(B, 4, n\+1\)"):
        model(torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="n_loops must be a positive int"):
        model(torch.zeros(2, 4, 7), n_loops=0)
    with pytest.raises(ValueError, match="attention='softmax' is not known"):
        LinearTransformerConfig(attention="softmax")
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        LinearTransformerConfig(n_layers=0)
    with pytest.raises(ValueError, match="prompt_matrix expects"):
        prompt_matrix(torch.zeros(2, 5, 3), torch.zeros(2, 4), torch.zeros(2, 3))


def test_softmax_prompt_transformer_loops_one_block_with_input_injection() -> None:
    from effml.nn import PromptTransformer, TransformerConfig

    torch.manual_seed(0)
    batch = prompts(3, 10)
    z = prompt_matrix(batch.xs, batch.ys, batch.query).float()
    model = PromptTransformer(3, TransformerConfig(d_model=16, n_heads=2, n_layers=1, n_loops=3, input_injection=True,
                                                   max_seq_len=11))
    readouts = model(z, readouts=True)
    assert readouts.shape == (3, 6) and torch.allclose(readouts[-1], model(z))
    assert model(z, n_loops=5, readouts=True)[:3].allclose(readouts)  # later loops do not change earlier read-outs
    assert len(model.blocks) == 1 and model.depth == 3
    # the prediction at the query depends on the in-context examples, and on nothing after the query (causal)
    changed = z.clone()
    changed[:, -1, 0] += 1.0
    assert not torch.allclose(model(changed), model(z))
    without_injection = PromptTransformer(3, TransformerConfig(d_model=16, n_heads=2, n_layers=1, n_loops=3,
                                                               max_seq_len=11))
    without_injection.load_state_dict(model.state_dict())
    assert torch.allclose(without_injection(z, n_loops=1), model(z, n_loops=1))
    assert not torch.allclose(without_injection(z), model(z))
    with pytest.raises(ValueError, match="max_seq_len=11"):
        model(torch.zeros(2, 4, 12))


def test_gd_reading_of_a_layer_recovers_a_and_u_and_predicts_like_gd() -> None:
    generator = torch.Generator().manual_seed(5)
    restricted = RestrictedLinearSelfAttention(3).double()
    with torch.no_grad():
        restricted.preconditioner.copy_(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    a, u = gd_parameters(*restricted.matrices())
    assert torch.equal(a, restricted.preconditioner) and torch.equal(u, restricted.u)
    # an unrestricted layer in the structured form with corner c: P[d+1, d+1] = c, Q₁₁ = −Aᵀ/c
    preconditioner = 0.2 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    model = LinearTransformer(LinearTransformerConfig(d=3, n_loops=3, init_std=0.0)).double()
    layer = model.layers[0]
    with torch.no_grad():
        layer.p_matrix.zero_()
        layer.p_matrix[3, 3] = 2.5
        layer.q_matrix.zero_()
        layer.q_matrix[:3, :3] = -preconditioner.T / 2.5
    read_a, read_u = gd_parameters(*layer.matrices())
    assert torch.allclose(read_a, preconditioner, atol=1e-15) and not read_u.any()
    batch = prompts(3, 8)
    gd = preconditioned_gd(batch.xs, batch.ys, batch.query, read_a.detach(), 3)
    assert torch.allclose(model(prompt_matrix(batch.xs, batch.ys, batch.query), readouts=True), gd, atol=1e-12)


def test_prompt_transformer_refuses_an_ssm_mixer_it_would_ignore() -> None:
    from effml.nn import PromptTransformer, TransformerConfig

    with pytest.raises(ValueError, match="supports attention only"):
        PromptTransformer(3, TransformerConfig(d_model=16, n_heads=2, n_layers=1, mixer="mamba2",
                                               mixer_options={"headdim": 8}))
