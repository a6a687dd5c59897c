"""LoRA-RITE (effml.optim.LoRARite): transformation invariance, the update rule against an explicit formula,
exact resume through state_dict, AdamW for the other parameters, and pairing by name."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from effml.optim import LoRARite, find_lora_pairs

M, N, RANK = 30, 20, 4


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random target Z* (M×N) and a random start: lora_A (RANK×N), lora_B (M×RANK), float64."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(M, N, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(RANK, N, generator=generator, dtype=torch.float64) / N ** 0.5
    lora_b = torch.randn(M, RANK, generator=generator, dtype=torch.float64) / M ** 0.5
    return target, lora_a, lora_b


def _trajectory(lora_a: torch.Tensor, lora_b: torch.Tensor, target: torch.Tensor, make_optimizer, steps: int):
    """Z_t = lora_B · lora_A after each of ``steps`` updates on ½‖Z − Z*‖²."""
    a, b = nn.Parameter(lora_a.clone()), nn.Parameter(lora_b.clone())
    optimizer = make_optimizer([a, b])
    products = []
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (b @ a - target).square().sum()).backward()
        optimizer.step()
        products.append((b @ a).detach().clone())
    return torch.stack(products)


def _relative_gap(first: torch.Tensor, second: torch.Tensor) -> float:
    return float(((first - second).norm(dim=(1, 2)) / first.norm(dim=(1, 2))).max())


def _badly_conditioned(seed: int = 1, condition: float = 1e3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(RANK, RANK, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(RANK, RANK, generator=generator, dtype=torch.float64))
    singular = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), RANK, dtype=torch.float64)
    return left @ torch.diag(singular) @ right


def _rite(**options):
    return lambda params: LoRARite(params, lr=0.02, **options)


def _adam(params):
    return torch.optim.Adam(params, lr=0.02)


def test_equivalent_factorizations_give_the_same_trajectory_and_adams_do_not() -> None:
    target, lora_a, lora_b = _problem()
    r = _badly_conditioned()
    # (lora_B R, R⁻¹ lora_A) is the same ΔW; in the paper's notation (A R, B R⁻ᵀ) with A = lora_B, B = lora_Aᵀ.
    equivalent = (torch.linalg.solve(r, lora_a), lora_b @ r)
    assert torch.allclose(equivalent[1] @ equivalent[0], lora_b @ lora_a, atol=1e-12)
    steps = 60
    make = _rite()  # escaped mass on (the default): the basis rotates every step here
    rite = _trajectory(lora_a, lora_b, target, make, steps)
    rite_equivalent = _trajectory(*equivalent, target, make, steps)
    assert _relative_gap(rite, rite_equivalent) < 1e-12  # measured: ~7e-14 (cond(R) = 1e3)
    assert float(0.5 * (rite[-1] - target).square().sum()) < 0.5 * float(target.square().sum())  # it does optimise
    adam_gap = _relative_gap(_trajectory(lora_a, lora_b, target, _adam, steps),
                             _trajectory(*equivalent, target, _adam, steps))
    assert adam_gap > 0.1


@pytest.mark.parametrize("scale", [1e-2, 1e2])
def test_scalar_rescaling_of_the_factors_changes_nothing(scale: float) -> None:
    target, lora_a, lora_b = _problem(seed=3)
    steps = 60
    rite = _trajectory(lora_a, lora_b, target, _rite(), steps)
    rescaled = _trajectory(lora_a * scale, lora_b / scale, target, _rite(), steps)
    assert _relative_gap(rite, rescaled) < 1e-11  # measured: ~3e-15 (scale 100)
    adam_gap = _relative_gap(_trajectory(lora_a, lora_b, target, _adam, steps),
                             _trajectory(lora_a * scale, lora_b / scale, target, _adam, steps))
    assert adam_gap > 0.1


@pytest.mark.parametrize(("out", "d_in", "rank"), [(2, 16, 8), (16, 4, 8)])
def test_a_rank_above_a_dimension_trains_and_keeps_the_invariances_it_can(out, d_in, rank) -> None:
    """PEFT allows r > out (a small head) or r > in. The step of Z is then exactly invariant under scalar and
    orthogonal R, and under a general R to first order in η (the gap of one step shrinks in proportion to η)."""
    generator = torch.Generator().manual_seed(17)
    target = torch.randn(out, d_in, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(rank, d_in, generator=generator, dtype=torch.float64) / d_in ** 0.5
    lora_b = torch.randn(out, rank, generator=generator, dtype=torch.float64) / out ** 0.5
    orthogonal, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    general = torch.randn(rank, rank, generator=generator, dtype=torch.float64) + 2 * torch.eye(rank,
                                                                                                dtype=torch.float64)

    def run(a, b, lr=0.02, steps=20):  # the RMS skip would drop this large-gradient problem's first steps
        return _trajectory(a, b, target, lambda p: LoRARite(p, lr=lr, skip_unmagnified_grad_rms=0.0), steps)

    rite = run(lora_a, lora_b)
    assert torch.isfinite(rite).all()
    assert float((rite[-1] - target).square().sum()) < 0.5 * float((lora_b @ lora_a - target).square().sum())
    assert _relative_gap(rite, run(lora_a * 100, lora_b / 100)) < 1e-9  # measured: ~3e-12
    assert _relative_gap(rite, run(orthogonal.T @ lora_a, lora_b @ orthogonal)) < 1e-9
    start = lora_b @ lora_a
    gaps = []
    for lr in (1e-2, 1e-3):
        step = run(lora_a, lora_b, lr=lr, steps=1)[0]
        other = run(torch.linalg.solve(general, lora_a), lora_b @ general, lr=lr, steps=1)[0]
        gaps.append(float((step - other).norm() / (step - start).norm()))
    assert gaps[0] < 0.05 and 0.05 < gaps[1] / gaps[0] < 0.2  # measured: ratio 0.10


def _inverse_sqrt(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(1.0 / (values.clamp(min=0).sqrt() + eps)) @ vectors.T


@pytest.mark.parametrize("shape", [(M, N, RANK), (3, N, 6), (M, 5, 8)], ids=["r<dims", "r>out", "r>in"])
def test_two_steps_match_the_papers_formulas_written_out(shape) -> None:
    """Steps 1–8 of §4 written out for both factors, with the basis change and escaped mass of step two. With a rank
    above a dimension (PEFT allows it) the thin QR's Q has q = min(rows, r) columns and R is q×r: the same formulas,
    with R's pseudo-inverse (a right inverse) for R⁻¹, and q×q moments on the other side."""
    m, n, rank = shape
    generator = torch.Generator().manual_seed(5)
    target = torch.randn(m, n, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(rank, n, generator=generator, dtype=torch.float64) / n ** 0.5
    lora_b = torch.randn(m, rank, generator=generator, dtype=torch.float64) / m ** 0.5
    lr, (beta1, beta2), eps = 0.05, (0.9, 0.99), 1e-6
    a, b = nn.Parameter(lora_a.clone()), nn.Parameter(lora_b.clone())
    optimizer = LoRARite([a, b], lr=lr, betas=(beta1, beta2), eps=eps, clip_unmagnified_grad_norm=0.0,
                         skip_unmagnified_grad_rms=0.0, escaped_mass=True)
    # Reference state per factor, in the paper's notation: X_A = lora_B (M×r), X_B = lora_Aᵀ (N×r).
    factors = {"A": lora_b.clone(), "B": lora_a.T.clone()}
    width = {"A": min(m, rank), "B": min(n, rank)}  # q: the columns of each factor's thin Q
    previous_basis = {"A": torch.zeros(m, width["A"], dtype=torch.float64),
                      "B": torch.zeros(n, width["B"], dtype=torch.float64)}
    first = {"A": torch.zeros(m, width["B"], dtype=torch.float64), "B": torch.zeros(n, width["A"], dtype=torch.float64)}
    second = {me: torch.zeros(width[other], width[other], dtype=torch.float64)
              for me, other in (("A", "B"), ("B", "A"))}
    escaped = {k: 0.0 for k in factors}
    for t in (1, 2):
        optimizer.zero_grad()
        (0.5 * (b @ a - target).square().sum()).backward()
        optimizer.step()
        grad_z = factors["A"] @ factors["B"].T - target  # ∇_Z L, M×N
        grads = {"A": grad_z @ factors["B"], "B": grad_z.T @ factors["A"]}
        qr = {k: torch.linalg.qr(v) for k, v in factors.items()}
        new = {}
        for me, other in (("A", "B"), ("B", "A")):
            basis_other, magnitude_other = qr[other]
            inverse_other = torch.linalg.pinv(magnitude_other)  # R⁻¹ where R is square (and regular here)
            unmagnified = grads[me] @ inverse_other
            projection = basis_other.T @ previous_basis[other]
            d1 = beta1 * (1 - beta1 ** (t - 1)) / (1 - beta1 ** t)
            d2 = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2 ** t)
            moved = projection @ second[me] @ projection.T
            lost = max(0.0, min(float((torch.linalg.eigvalsh(second[me]) - torch.linalg.eigvalsh(moved)).max()),
                                float(second[me].trace() - moved.trace())))
            escaped[me] = d2 * (escaped[me] + lost)
            second[me] = d2 * moved + (1 - d2) * unmagnified.T @ unmagnified / unmagnified.shape[0]
            identity = torch.eye(width[other], dtype=torch.float64)
            step_dir = unmagnified @ _inverse_sqrt(second[me] + escaped[me] * identity, eps)
            first[me] = d1 * first[me] @ projection.T + (1 - d1) * step_dir
            new[me] = factors[me] - lr * first[me] @ inverse_other.T
        if t == 2:  # the bases rotated, so some mass escaped (not where Q spans all of R^rows: nothing escapes it)
            assert all(escaped[me] > 0 for me, other in (("A", "B"), ("B", "A")) if width[other] == rank)
        previous_basis = {k: qr[k][0] for k in factors}
        factors = new
        assert torch.allclose(b.detach(), factors["A"], rtol=0, atol=1e-10)
        assert torch.allclose(a.detach(), factors["B"].T, rtol=0, atol=1e-10)


def test_state_dict_round_trip_mid_run_continues_identically() -> None:
    target, lora_a, lora_b = _problem(seed=7)
    bias = torch.zeros(M, dtype=torch.float64)

    def make(a, b, c):
        return LoRARite([{"params": [a, b]}, {"params": [c], "kind": "adamw", "weight_decay": 0.01}], lr=0.02)

    def run(a, b, c, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            (0.5 * (b @ a + c[:, None] - target).square().sum()).backward()
            optimizer.step()

    params = [nn.Parameter(t.clone()) for t in (lora_a, lora_b, bias)]
    optimizer = make(*params)
    run(*params, optimizer, 10)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    run(*params, optimizer, 15)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    optimizer_resumed = make(*resumed)
    optimizer_resumed.load_state_dict(saved["optimizer"])
    run(*resumed, optimizer_resumed, 15)
    for original, again in zip(params, resumed, strict=True):
        assert torch.equal(original, again)


def test_adamw_groups_match_torch_adamw_and_closure_returns_the_loss() -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    reference = nn.Parameter(weight.detach().clone())
    data = torch.randn(8, 3, dtype=torch.float64)
    ours = LoRARite([{"params": [weight], "kind": "adamw", "weight_decay": 0.1}], lr=0.01, betas=(0.9, 0.99))
    theirs = torch.optim.AdamW([reference], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        for param, optimizer in ((weight, ours), (reference, theirs)):
            def closure(param=param, optimizer=optimizer):
                optimizer.zero_grad()
                loss = (data @ param.T).sin().sum()
                loss.backward()
                return loss
            loss = optimizer.step(closure)
        assert torch.is_tensor(loss)
    assert torch.allclose(weight, reference, rtol=0, atol=1e-12)
    ours.zero_grad()
    assert weight.grad is None


# -- pairing by name ---------------------------------------------------------------------------------------------------
class _Adapter(nn.Module):
    """A minimal PEFT-named LoRA linear layer: base (frozen), lora_A.default (r×in), lora_B.default (out×r)."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, d_out, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_from_model_pairs_peft_adapters_by_name_and_trains_the_rest_with_adamw() -> None:
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    model.add_module("up", nn.Linear(6, 10))
    model.add_module("down", nn.Linear(10, 4))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["up", "down"], modules_to_save=None))
    head = model.base_model.model.down.base_layer.bias
    head.requires_grad_(True)  # a trainable non-LoRA parameter
    optimizer = LoRARite.from_model(model, lr=1e-2)
    lora, adamw = optimizer.param_groups
    assert lora["kind"] == "lora" and adamw["kind"] == "adamw"
    assert [n.split(".")[-4:] for n in lora["names"]] == [
        ["up", "lora_A", "default", "weight"], ["up", "lora_B", "default", "weight"],
        ["down", "lora_A", "default", "weight"], ["down", "lora_B", "default", "weight"]]
    assert adamw["params"][0] is head
    loss = model(torch.randn(3, 6)).square().mean()
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    # lora_B starts at zero, so lora_A's unmagnified gradient is zero on the first step: only B and the bias move.
    assert changed == {n for n in before if "lora_B" in n or n.endswith("bias")}
    with pytest.raises(ValueError, match=r"not LoRA factors: .*down\.base_layer\.bias.*other='adamw'"):
        LoRARite.from_model(model, lr=1e-2, other="error")


def test_pairing_is_by_name_not_position() -> None:
    # Parameters listed as all B's then all A's, in opposite layer order: names still pair them correctly.
    shapes = {"l1.lora_A.x.weight": (2, 5), "l1.lora_B.x.weight": (7, 2),
              "l2.lora_A.x.weight": (3, 7), "l2.lora_B.x.weight": (4, 3)}
    order = ["l2.lora_B.x.weight", "l1.lora_B.x.weight", "l2.lora_A.x.weight", "l1.lora_A.x.weight", "head.bias"]
    named = [(n, nn.Parameter(torch.zeros(shapes.get(n, (4,))))) for n in order]
    pairs, others = find_lora_pairs(named)
    assert sorted(pairs) == [("l1.lora_A.x.weight", "l1.lora_B.x.weight"),
                             ("l2.lora_A.x.weight", "l2.lora_B.x.weight")]
    assert others == ["head.bias"]


@pytest.mark.parametrize("names_shapes, message", [
    ({"l1.lora_A.w": (2, 5)}, r"l1\.lora_A\.w has no trainable partner l1\.lora_B\.w"),
    ({"l1.lora_B.w": (5, 2)}, r"l1\.lora_B\.w has no trainable lora_A partner"),
    ({"l1.lora_A.w": (2, 5), "l1.lora_B.w": (5, 3)}, r"l1\.lora_A\.w \(2, 5\) and l1\.lora_B\.w \(5, 3\) are not"),
])
def test_unpaired_or_mis_shaped_factors_are_named(names_shapes, message) -> None:
    named = [(n, nn.Parameter(torch.zeros(s))) for n, s in names_shapes.items()]
    with pytest.raises(ValueError, match=message):
        find_lora_pairs(named)


def test_bad_groups_and_options_are_refused_clearly() -> None:
    a, b = nn.Parameter(torch.zeros(2, 5)), nn.Parameter(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="not a LoRA pair"):
        LoRARite([a, b])
    with pytest.raises(ValueError, match="holds pairs"):
        LoRARite([a])
    with pytest.raises(ValueError, match="betas"):
        LoRARite([a, nn.Parameter(torch.zeros(5, 2))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="no trainable LoRA factors"):
        LoRARite.from_model(nn.Linear(3, 3))
    frozen = copy.deepcopy(nn.Linear(3, 3)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA factors"):
        LoRARite.from_model(frozen)


def test_a_pair_passed_reversed_for_a_square_layer_is_refused_clearly() -> None:
    lora_a, lora_b = nn.Parameter(torch.randn(2, 8)), nn.Parameter(torch.randn(8, 2))  # rank 2 on an 8×8 layer
    LoRARite([lora_a, lora_b])
    with pytest.raises(ValueError, match=r"\(8, 2\) and .* \(2, 8\) read as lora_A then lora_B are a rank-8 "
                                         r"adapter of a 2×2 layer.*\[lora_B, lora_A\].*at most 2"):
        LoRARite([lora_b, lora_a])


def test_conv_lora_is_refused_with_a_fix_that_works() -> None:
    peft = pytest.importorskip("peft")

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    model = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=4, target_modules=["conv", "fc"]))
    with pytest.raises(ValueError, match=r"does not support convolution LoRA.*conv\.lora_A\.default\.weight "
                                         r"\(4, 3, 3, 3\).*\{'params': \[\.\.\.\], 'kind': 'adamw'\}"):
        LoRARite.from_model(model)
    # The fix the message gives: the 2-D pair (here of rank 4 > out = 2) in a group, the conv factors with AdamW.
    named = dict(model.named_parameters())
    fc = [named[f"base_model.model.fc.lora_{x}.default.weight"] for x in "AB"]
    conv = [named[f"base_model.model.conv.lora_{x}.default.weight"] for x in "AB"]
    optimizer = LoRARite([{"params": fc}, {"params": conv, "kind": "adamw"}], lr=1e-2)
    images = torch.randn(4, 3, 6, 6)
    before = [p.detach().clone() for p in (*fc, *conv)]
    for _ in range(2):  # lora_B starts at 0: the lora_A factors move from the second step on
        optimizer.zero_grad()
        model(images).square().mean().backward()
        optimizer.step()
    assert all(not torch.equal(p, old) for p, old in zip((*fc, *conv), before, strict=True))


# -- singular magnitudes, batching, low-precision resume --------------------------------------------------------------
def test_inverse_of_r_is_the_triangular_inverse_or_the_pseudo_inverse_where_r_is_singular() -> None:
    from effml.optim.lora_rite import _inverse_magnitude

    generator = torch.Generator().manual_seed(11)
    tall = torch.randn(4, 9, RANK, generator=generator, dtype=torch.float64)
    tall[1] = 0.0  # PEFT's lora_B at initialisation
    tall[2, :, -1] = tall[2, :, 0]  # rank RANK - 1
    magnitudes = torch.linalg.qr(tall).R
    inverses = _inverse_magnitude(magnitudes)
    assert torch.allclose(inverses[0], torch.linalg.inv(magnitudes[0]), rtol=0, atol=1e-12)
    assert torch.allclose(inverses[3], torch.linalg.inv(magnitudes[3]), rtol=0, atol=1e-12)
    assert torch.equal(inverses[1], torch.zeros(RANK, RANK, dtype=torch.float64))
    assert torch.allclose(inverses[2], torch.linalg.pinv(magnitudes[2]), rtol=0, atol=1e-10)
    assert torch.allclose(_inverse_magnitude(magnitudes[[0, 3]]), inverses[[0, 3]], rtol=0, atol=0)  # all regular
    assert torch.equal(_inverse_magnitude(magnitudes[[1]]), inverses[[1]])  # all singular


def _run_pairs(pairs, targets, steps, together: bool, rest_first_pair_every: int = 0):
    """Train each (lora_A, lora_B) on its own ½‖B A − Z*‖², in one optimizer (``together``) or one each. With
    ``rest_first_pair_every`` = n, the first pair gets no gradient (grad None: it is skipped) every n-th step."""
    params = [(nn.Parameter(a.clone()), nn.Parameter(b.clone())) for a, b in pairs]
    # A global clip would couple the pairs; the RMS skip would drop the first steps of this large-gradient problem.
    options = {"lr": 0.03, "clip_unmagnified_grad_norm": 0.0, "skip_unmagnified_grad_rms": 0.0}
    optimizers = ([LoRARite([p for pair in params for p in pair], **options)] if together
                  else [LoRARite(list(pair), **options) for pair in params])
    for step in range(steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        rest = rest_first_pair_every and step % rest_first_pair_every == 0
        sum(0.5 * (b @ a - z).square().sum() for index, ((a, b), z) in enumerate(zip(params, targets, strict=True))
            if not (rest and index == 0)).backward()
        for optimizer in optimizers:
            optimizer.step()
    return params


def test_pairs_batched_together_match_pairs_alone_including_a_zero_lora_b() -> None:
    """Three same-shaped pairs share one batch; one starts with lora_B = 0 (PEFT's init), so at step one the batch
    mixes singular and regular R. Each pair must follow exactly the trajectory it has alone."""
    problems = [_problem(seed) for seed in (21, 22, 23)]
    targets = [target for target, _, _ in problems]
    pairs = [(a, b) for _, a, b in problems]
    pairs[1] = (pairs[1][0], torch.zeros_like(pairs[1][1]))
    after_one = _run_pairs(pairs, targets, 1, together=True)
    assert torch.equal(after_one[1][0].detach(), pairs[1][0])  # lora_B = 0: lora_A's unmagnified gradient is 0
    assert after_one[1][1].detach().abs().amax() > 0  # ... and lora_B moves
    together = _run_pairs(pairs, targets, 25, together=True)
    alone = _run_pairs(pairs, targets, 25, together=False)
    for (a, b), (a_alone, b_alone) in zip(together, alone, strict=True):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.allclose(a, a_alone, rtol=0, atol=1e-12) and torch.allclose(b, b_alone, rtol=0, atol=1e-12)
    zero_start = (together[1][1] @ together[1][0]).detach()
    assert float((zero_start - targets[1]).square().sum()) < float(targets[1].square().sum())  # it trains


def test_a_pair_that_skips_steps_keeps_its_own_state_inside_a_batch() -> None:
    """The first pair has no gradient every third step, so the batch of same-shaped pairs changes its members (and
    the batched state is rebuilt) from step to step; every pair still follows its lone trajectory."""
    problems = [_problem(seed) for seed in (31, 32)]
    targets, pairs = [target for target, _, _ in problems], [(a, b) for _, a, b in problems]
    together = _run_pairs(pairs, targets, 12, together=True, rest_first_pair_every=3)
    alone = _run_pairs(pairs, targets, 12, together=False, rest_first_pair_every=3)
    for (a, b), (a_alone, b_alone) in zip(together, alone, strict=True):
        assert torch.allclose(a, a_alone, rtol=0, atol=1e-12) and torch.allclose(b, b_alone, rtol=0, atol=1e-12)


def test_bfloat16_factors_keep_float32_state_and_resume_exactly() -> None:
    target, lora_a, lora_b = _problem(seed=9)
    target = target.float()

    def run(a, b, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            (0.5 * (b.float() @ a.float() - target).square().sum()).backward()
            optimizer.step()

    params = [nn.Parameter(t.to(torch.bfloat16)) for t in (lora_a, lora_b)]
    optimizer = LoRARite(params, lr=0.02)
    run(*params, optimizer, 5)
    saved = copy.deepcopy({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()})
    run(*params, optimizer, 5)
    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    optimizer_resumed = LoRARite(resumed, lr=0.02)
    optimizer_resumed.load_state_dict(saved["optimizer"])
    assert optimizer_resumed.state[resumed[0]]["first_moment"].dtype == torch.float32  # torch would cast to bf16
    run(*resumed, optimizer_resumed, 5)
    for original, again in zip(params, resumed, strict=True):
        assert torch.equal(original, again)


def test_a_state_that_does_not_fit_the_factors_is_refused_clearly() -> None:
    target, lora_a, lora_b = _problem(seed=13)
    params = [nn.Parameter(lora_a.clone()), nn.Parameter(lora_b.clone())]
    optimizer = LoRARite(params, lr=0.02)
    (0.5 * (params[1] @ params[0] - target).square().sum()).backward()
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][1]["first_moment"] = saved["state"][1]["first_moment"].T.clone()  # lora_B's, untransposed
    fresh = LoRARite([nn.Parameter(lora_a.clone()), nn.Parameter(lora_b.clone())], lr=0.02)
    fresh.load_state_dict(saved)
    (0.5 * (fresh.param_groups[0]["params"][1] @ fresh.param_groups[0]["params"][0] - target).square().sum()).backward()
    with pytest.raises(ValueError, match=r"does not fit it: expected shapes .*start the optimizer afresh"):
        fresh.step()
