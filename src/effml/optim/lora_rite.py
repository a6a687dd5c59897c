"""LoRA-RITE: a transformation-invariant adaptive optimizer for LoRA factors.

Paper: Jui-Nan Yen, Si Si, Zhao Meng, Felix Yu, Sai Surya Duvvuri, Inderjit S. Dhillon, Cho-Jui Hsieh, Sanjiv Kumar,
"LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA Optimization", ICLR 2025, arXiv 2410.20625.

A LoRA update ``ΔW = Z = A Bᵀ`` (A: m×r, B: n×r) can be written with any factorization ``(A R, B R⁻ᵀ)``, R invertible
r×r. Adam and its relatives are not invariant to that choice (not even to a scalar R = s·I), so the trajectory of Z
depends on how the factors happen to be scaled. LoRA-RITE preconditions on the low-rank side with an r×r matrix,
expressed in the orthonormal basis of the *other* factor, and its update of Z is the same for every equivalent
factorization. For the factor A (the rule for B swaps the roles), at step t (§4 of the paper, Algorithm 1):

1. basis and magnitude of the other factor: ``B_t = U_B R_B`` (thin QR as in the authors' code; products with
   ``R_B⁻¹`` are triangular solves, and where R_B is singular its pseudo-inverse is used, as in the authors' code, so
   a zero factor such as PEFT's initial lora_B gives a zero unmagnified gradient);
2. unmagnified gradient ``Ḡ_t = ∇_A L · R_B⁻¹`` (= ∇_Z L · U_B, m×r: it no longer depends on B's magnitude);
3. basis change ``P_t = U_{B,t}ᵀ U_{B,t−1}`` (r×r; zero at the first step);
4. second moment transported to the new basis ``V̄_t = β̂₂ P_t V̄_{t−1} P_tᵀ + (1 − β̂₂) Ḡ_tᵀ Ḡ_t / m``;
5. escaped mass ``ρ_t = β̂₂ (ρ_{t−1} + e_t)`` with
   ``e_t = max(0, min(max_i[λ_i(V̄_{t−1}) − λ_i(P V̄_{t−1} Pᵀ)], tr V̄_{t−1} − tr P V̄_{t−1} Pᵀ))``:
   second-moment mass lost because the basis rotated out of the old span (eigenvalues in ascending order);
6. preconditioned step ``S̄_t = Ḡ_t (V̄_t + ρ_t I)^{−1/2}`` (eigh; eigenvalues w ↦ 1 / (√(max(w, 0) + ρ) + ε));
7. first moment transported likewise ``M̄_t = β̂₁ M̄_{t−1} P_tᵀ + (1 − β̂₁) S̄_t``;
8. update ``A ← A − η (M̄_t R_B⁻ᵀ + λ A)`` (λ: decoupled weight decay; λ > 0 breaks invariance, default 0).

β̂ is Adafactor's bias-corrected decay ``β̂_t = β (1 − β^{t−1}) / (1 − β^t)`` (Shazeer & Stern, arXiv 1804.04235,
§7.1), as in the authors' code, so no separate bias correction is applied. As in that code, the unmagnified
gradients of all pairs are clipped together to a global norm, and a factor's unmagnified gradient is zeroed when its
RMS exceeds a threshold (both are invariant, because Ḡ only rotates across equivalent factorizations). Both factors
of a pair are updated from the gradients and decompositions taken at the same point.

Ranks above a dimension (PEFT allows r > in or r > out, e.g. a 2-class head): the thin QR of a factor X (rows × r)
with rows < r gives a basis U of all of R^rows (q = min(rows, r) columns) and a wide magnitude R (q × r), whose
pseudo-inverse is a right inverse (R R⁺ = I where X has full rank). The rule is then unchanged with q in place of r
on the other factor's side: Ḡ = ∇_Z L · U is m×q, V̄ and P are q×q, and the update M̄ R⁺ᵀ of X moves Z by exactly
−η M̄ Uᵀ as before. The step of Z is invariant to first order in η for every equivalent factorization, and exactly
invariant under scalar and orthogonal R; only the second-order cross term η² ΔA ΔBᵀ depends on a general R, because
a right inverse of a wide R does not transform with it. (Where m < q, Ḡ has rank ≤ m and V̄ is singular; ε bounds its
inverse root, as for any rank-deficient gradient.) A rank above both dimensions of a square layer is refused in
positional groups: it is what a pair passed as [lora_B, lora_A] looks like.

Layout: PEFT's. A pair is ``(lora_A.weight: r×in, lora_B.weight: out×r)`` with ``ΔW = lora_B · lora_A``; in the
paper's notation ``A = lora_B`` (m = out) and ``B = lora_Aᵀ`` (n = in). Parameters that are not LoRA factors (biases,
heads) can be trained by AdamW inside the same optimizer (param groups with ``kind="adamw"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["LoRARite", "find_lora_pairs"]

_LORA_A = re.compile(r"(^|\.)lora_(embedding_)?A(\.|$)")


def _partner_name(name_a: str) -> str:
    return _LORA_A.sub(lambda m: f"{m.group(1)}lora_{m.group(2) or ''}B{m.group(3)}", name_a, count=1)


def find_lora_pairs(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pair LoRA factors by parameter name, never by position.

    A parameter whose name has a ``lora_A`` component (PEFT: ``...q_proj.lora_A.default.weight``; embeddings:
    ``lora_embedding_A``) is paired with the parameter of the same name with ``lora_B`` in its place. Only parameters
    with ``requires_grad`` are considered.

    Returns ``(pairs, others)``: the (lora_A name, lora_B name) pairs in model order, and the remaining trainable
    names. Raises ValueError naming every unpaired or mis-shaped factor (lora_A must be r×in and lora_B out×r with the
    same r) and every convolution adapter (4-D factors: unsupported), with a fix for each.
    """
    trainable = {name: p for name, p in named_parameters if p.requires_grad}
    pairs: list[tuple[str, str]] = []
    paired: set[str] = set()
    problems: list[str] = []
    not_2d: list[str] = []  # factors of convolution adapters (4-D): no r×r preconditioner is defined for them
    for name, param in trainable.items():
        if not _LORA_A.search(name):
            continue
        partner = _partner_name(name)
        if partner not in trainable:
            problems.append(f"{name} has no trainable partner {partner}")
            continue
        other = trainable[partner]
        if param.ndim != 2 or other.ndim != 2:
            not_2d.append(f"{name} {tuple(param.shape)} and {partner} {tuple(other.shape)}")
            continue
        if param.shape[0] != other.shape[1]:
            problems.append(f"{name} {tuple(param.shape)} and {partner} {tuple(other.shape)} are not a LoRA pair "
                            "(expected lora_A r×in and lora_B out×r with the same rank r)")
            continue
        pairs.append((name, partner))
        paired.update((name, partner))
    for name in trainable:
        if re.search(r"(^|\.)lora_(embedding_)?B(\.|$)", name) and name not in paired and not any(
                name in problem for problem in (*problems, *not_2d)):
            problems.append(f"{name} has no trainable lora_A partner")
    messages = []
    if problems:
        messages.append("LoRA-RITE pairs LoRA factors by parameter name, and some factors cannot be paired: "
                        + "; ".join(problems) + ". Make sure both factors of every adapter are trainable and named "
                        "PEFT-style (…lora_A… / …lora_B…), or pass the pairs yourself as a param group "
                        "{'params': [lora_A, lora_B, ...]}.")
    if not_2d:
        messages.append("LoRA-RITE preconditions 2-D LoRA factors (adapters of Linear and Embedding layers) and does "
                        "not support convolution LoRA, whose factors are 4-D: " + "; ".join(not_2d) + ". Leave the "
                        "conv layers out of LoraConfig.target_modules, freeze their factors (requires_grad_(False)), "
                        "or build LoRARite from param groups yourself: the 2-D pairs in a group "
                        "{'params': [lora_A, lora_B, ...]} and the conv factors in an AdamW group "
                        "{'params': [...], 'kind': 'adamw'}.")
    if messages:
        raise ValueError(" ".join(messages))
    others = [name for name in trainable if name not in paired]
    return pairs, others


_STATE_NAMES = ("step", "first_moment", "second_moment", "escaped_mass", "basis")


def _symmetric(x: torch.Tensor) -> torch.Tensor:
    return (x + x.transpose(-1, -2)) / 2


def _inverse_magnitude(magnitude: torch.Tensor) -> torch.Tensor:
    """R⁻¹ for a batch of upper-triangular R (k, r, r) from a thin QR, by a triangular solve against the identity;
    for a wide R (k, q, r), q < r (a factor with fewer rows than its rank), the pseudo-inverse R⁺ (k, r, q).

    Where R is singular — its factor has rank < r, e.g. PEFT's lora_B, which starts at exactly zero — the
    pseudo-inverse R⁺ takes R⁻¹'s place (as in the authors' code), so a zero factor gives a zero unmagnified gradient
    and a zero update; only those entries of the batch pay for pinv's SVD. Singular: a diagonal entry of R at most
    r·ε·max|diag R|. The inverse is r×r, so the (rows × r) products with it are plain batched matrix products.
    """
    rank = magnitude.shape[-1]
    if magnitude.shape[-2] != rank:
        return torch.linalg.pinv(magnitude)
    diagonal = magnitude.diagonal(dim1=-2, dim2=-1).abs()
    tolerance = diagonal.amax(dim=-1, keepdim=True) * rank * torch.finfo(magnitude.dtype).eps
    singular = (diagonal <= tolerance).any(dim=-1)  # (k,)
    if not bool(singular.any()):
        identity = torch.eye(rank, dtype=magnitude.dtype, device=magnitude.device).expand_as(magnitude)
        return torch.linalg.solve_triangular(magnitude, identity, upper=True)
    if bool(singular.all()):
        return torch.linalg.pinv(magnitude)
    inverse = torch.empty_like(magnitude)
    inverse[singular] = torch.linalg.pinv(magnitude[singular])
    inverse[~singular] = _inverse_magnitude(magnitude[~singular])
    return inverse


class LoRARite(torch.optim.Optimizer):
    """LoRA-RITE (arXiv 2410.20625, §4) for PEFT-layout LoRA pairs, with AdamW for any other parameters.

    Args:
        params: param groups. A group of ``kind="lora"`` (the default) holds pairs in order
            ``[lora_A_1, lora_B_1, lora_A_2, lora_B_2, ...]`` (lora_A: r×in, lora_B: out×r, ΔW = lora_B · lora_A);
            a group of ``kind="adamw"`` holds ordinary parameters trained by AdamW. A plain list is one LoRA group.
            Prefer ``LoRARite.from_model``, which pairs factors by name.
        lr: learning rate η.
        betas: (β₁, β₂) of the first moment and the r×r second moment (bias-corrected decays, see module docstring).
        eps: ε added to the square roots of the preconditioner's eigenvalues (paper's code: 1e-6).
        weight_decay: decoupled weight decay λ (update ``−η λ X``); 0 keeps the method invariant.
        clip_unmagnified_grad_norm: clip all unmagnified gradients together to this global norm (0: off; the value
            of the first LoRA group applies to all of them).
        skip_unmagnified_grad_rms: zero a factor's unmagnified gradient whose RMS exceeds this (0: off).
        escaped_mass: add the accumulated escaped mass ρ to the preconditioner (the paper's Algorithm 1; the authors'
            PyTorch code has it off by default).
        update_rms_cap: cap the RMS of M̄ before it is mapped back by R⁻ᵀ (0: off; the code's ``update_capping``).
        adamw_eps: ε of the AdamW groups.

    State per factor X (rows × r in the paper's notation; rows = out for lora_B, in for lora_A), stored transposed
    as the computation runs (see ``_prepare``): ``first_moment`` M̄ᵀ (q', rows), ``basis`` U_{t−1}ᵀ (q, rows),
    ``second_moment`` V̄ (q', q'), ``escaped_mass`` ρ and ``step`` (float64) — about Adam's memory plus two r×r
    matrices. q = min(r, rows) of X and q' the same of the other factor: both are r unless the rank exceeds a
    dimension (see the module docstring).
    Factors in bf16/fp16 keep this state in float32, also across ``load_state_dict`` (which torch would cast).

    Cost per step and pair (on CPU): two thin QRs of X (k, rows, r) — the largest part —, r×r eigendecompositions
    and triangular inverses, and six batched products with (k, r, rows) tensors; pairs of the same shapes are one
    batch (k pairs), so the Python overhead grows with the number of distinct shapes.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, clip_unmagnified_grad_norm: float = 1.0,
                 skip_unmagnified_grad_rms: float = 1.0, escaped_mass: bool = True, update_rms_cap: float = 0.0,
                 adamw_eps: float = 1e-8) -> None:
        if not lr >= 0.0:
            raise ValueError(f"LoRARite: lr must be ≥ 0, got {lr!r}.")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LoRARite: betas must be two numbers in [0, 1), got {betas!r}.")
        for name, value in (("eps", eps), ("weight_decay", weight_decay), ("adamw_eps", adamw_eps),
                            ("clip_unmagnified_grad_norm", clip_unmagnified_grad_norm),
                            ("skip_unmagnified_grad_rms", skip_unmagnified_grad_rms),
                            ("update_rms_cap", update_rms_cap)):
            if not value >= 0.0:
                raise ValueError(f"LoRARite: {name} must be ≥ 0 (0 turns it off where that applies), got {value!r}.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, kind="lora",
                        clip_unmagnified_grad_norm=clip_unmagnified_grad_norm,
                        skip_unmagnified_grad_rms=skip_unmagnified_grad_rms, escaped_mass=bool(escaped_mass),
                        update_rms_cap=update_rms_cap, adamw_eps=adamw_eps)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["kind"] not in ("lora", "adamw"):
            raise ValueError(f"LoRARite: param group kind must be 'lora' or 'adamw', got {group['kind']!r}.")
        if group["kind"] != "lora":
            return
        params, names = group["params"], group.get("names")
        label = (lambda i: names[i]) if names else (lambda i: f"parameter {i} of the group")
        if len(params) % 2:
            raise ValueError(f"LoRARite: a 'lora' param group holds pairs [lora_A, lora_B, ...], but it has "
                             f"{len(params)} parameters; pass both factors of every adapter (or use from_model).")
        for i in range(0, len(params), 2):
            a, b = params[i], params[i + 1]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"LoRARite: {label(i)} {tuple(a.shape)} and {label(i + 1)} {tuple(b.shape)} are not "
                                 "a LoRA pair: expected lora_A r×in then lora_B out×r with the same rank r.")
            rank, width = a.shape[0], a.shape[1]
            if not names and b.shape[0] == width < rank:  # named pairs (from_model) are ordered by their names
                raise ValueError(f"LoRARite: {label(i)} {tuple(a.shape)} and {label(i + 1)} {tuple(b.shape)} read as "
                                 f"lora_A then lora_B are a rank-{rank} adapter of a {width}×{width} layer, which is "
                                 "what a pair passed as [lora_B, lora_A] looks like. Pass each pair as [lora_A (r×in), "
                                 f"lora_B (out×r)] (or use LoRARite.from_model, which pairs by name); if the rank "
                                 f"really is {rank}, lower it to at most {width}: a higher rank adds nothing.")

    @classmethod
    def from_model(cls, model: nn.Module, lr: float = 1e-3, other: str = "adamw", other_lr: float | None = None,
                   other_weight_decay: float = 0.0, **options: Any) -> LoRARite:
        """LoRA-RITE over the LoRA pairs of ``model``, found by name (see ``find_lora_pairs``).

        Args:
            model: e.g. a PEFT ``PeftModel`` (``lora_A``/``lora_B`` adapters, any adapter name).
            lr: learning rate of the LoRA pairs.
            other: what to do with trainable parameters that are not LoRA factors (biases, heads): ``"adamw"``
                trains them with AdamW inside this optimizer, ``"error"`` refuses them.
            other_lr: AdamW learning rate for them (default: ``lr``).
            other_weight_decay: AdamW's decoupled weight decay for them.
            **options: the constructor's other arguments (betas, eps, weight_decay, ...).
        """
        if other not in ("adamw", "error"):
            raise ValueError(f"LoRARite.from_model: other must be 'adamw' or 'error', got {other!r}.")
        named = dict(model.named_parameters())
        pairs, others = find_lora_pairs(named.items())
        if not pairs:
            raise ValueError("LoRARite.from_model: the model has no trainable LoRA factors (no parameter named "
                             "…lora_A…/…lora_B…). Wrap it with peft.get_peft_model(model, LoraConfig(...)) first.")
        if others and other == "error":
            raise ValueError(f"LoRARite.from_model: trainable parameters that are not LoRA factors: "
                             f"{', '.join(others)}. Freeze them, or pass other='adamw' to train them with AdamW "
                             "inside this optimizer.")
        groups: list[dict[str, Any]] = [{"params": [named[n] for pair in pairs for n in pair],
                                         "names": [n for pair in pairs for n in pair], "kind": "lora"}]
        if others:
            groups.append({"params": [named[n] for n in others], "names": others, "kind": "adamw",
                           "lr": lr if other_lr is None else other_lr, "weight_decay": other_weight_decay})
        return cls(groups, lr=lr, **options)

    # -- the update ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every pair (and AdamW parameter). ``closure`` re-evaluates the loss with gradients.

        Pairs with the same shapes (in the same group) are processed together as one batch of small matrices, so the
        cost in kernel launches grows with the number of distinct adapter shapes, not with the number of adapters.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        lora_groups = [group for group in self.param_groups if group["kind"] == "lora"]
        for index, group in enumerate(lora_groups):
            params = group["params"]
            for a_param, b_param in zip(params[0::2], params[1::2], strict=True):
                if a_param.grad is None and b_param.grad is None:
                    continue
                key = (index, tuple(a_param.shape), tuple(b_param.shape), a_param.dtype, a_param.device)
                buckets.setdefault(key, []).append((a_param, b_param))
        prepared = []  # per bucket, everything taken at the current point before any factor moves
        squared_norm = None
        for (index, *_), pairs in buckets.items():
            sides = self._prepare(lora_groups[index], pairs)
            prepared.append((lora_groups[index], sides))
            for side in sides:
                total = side["squared_norm"].sum()
                squared_norm = total if squared_norm is None else squared_norm + total
        clip = None
        if prepared and lora_groups[0]["clip_unmagnified_grad_norm"] > 0:
            norm = squared_norm.sqrt()
            limit = lora_groups[0]["clip_unmagnified_grad_norm"]
            clip = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
        for group, sides in prepared:
            for side in sides:
                self._update(group, side, clip)
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw(group)
        return loss

    def _prepare(self, group: dict[str, Any], pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
        """Steps 1–3 for k pairs of equal shapes, both sides at once, taken before either factor moves.

        In the paper's notation the left factor is lora_B (out × r) and the right one lora_Aᵀ (in × r). Everything
        runs on the transposes, "wide" tensors (k, r, rows) — lora_A's own layout — because on CPU products that
        produce or reduce a (k, r, rows) tensor are several times faster than their (k, rows, r) counterparts. Per side
        this returns Xᵀ (k, r, rows), the unmagnified gradient Ḡᵀ = R⁻ᵀ Gᵀ (k, r, rows) with R the other factor's,
        R⁻¹ (k, r, r), Ḡᵀ Ḡ (k, r, r), ‖Ḡ‖² (k,) after the RMS skip, the basis change P (k, r, r) of the other
        factor and the batched state. The bases stored for the next step are overwritten here, after both P are taken.
        Where a factor has fewer rows than the rank, its Q has q = rows columns: the other side's r×r become q×q
        (Ḡᵀ (k, q, rows), R⁺ (k, r, q)).
        """
        layout = [([b for _, b in pairs], True), ([a for a, _ in pairs], False)]  # (params, stored as rows × r)
        matrices, grads = [], []
        for params, tall in layout:
            matrices.append(torch.stack([self._work(p).T if tall else self._work(p) for p in params]))
            grads.append(torch.stack([self._work_grad(p).T if tall else self._work_grad(p) for p in params]))
        widths = [min(matrix.shape[1:]) for matrix in matrices]  # q = min(r, rows): the columns of each thin Q
        states = [self._batched_state(params, matrices[index], widths[index], widths[1 - index])
                  for index, (params, _) in enumerate(layout)]
        # QR of X (k, rows, r); X's transpose view is column-major, as LAPACK wants it, and so is the Q it returns.
        bases, magnitudes = zip(*(torch.linalg.qr(matrix.transpose(1, 2)) for matrix in matrices), strict=True)
        bases = [basis.transpose(1, 2) for basis in bases]  # Uᵀ (k, r, rows)
        inverses = [_inverse_magnitude(magnitude) for magnitude in magnitudes]
        sides = []
        for index, (params, tall) in enumerate(layout):
            other = 1 - index
            inverse = inverses[other]
            # Ḡᵀ = R⁻ᵀ Gᵀ. (Forming Gᵀ G first and R⁻ᵀ (Gᵀ G) R⁻¹ from it would square R's condition number: in
            # float64 the invariance gap grows from ~1e-13 to ~6e-12 at cond(R) = 1e3.)
            unmagnified = inverse.transpose(1, 2) @ grads[index]
            gram = _symmetric(unmagnified @ unmagnified.transpose(1, 2))
            squared_norm = gram.diagonal(dim1=1, dim2=2).sum(dim=-1)
            keep = torch.ones_like(squared_norm)
            skip = group["skip_unmagnified_grad_rms"]
            if skip > 0:  # ‖Ḡ‖² / (rows · r) is Ḡ's mean square
                keep = (squared_norm / unmagnified[0].numel() <= skip * skip).to(keep.dtype)
            sides.append({"params": params, "tall": tall, "matrix": matrices[index], "unmagnified": unmagnified,
                          "gram": gram,
                          "keep": keep, "squared_norm": squared_norm * keep, "inverse_other": inverse,
                          "state": states[index],
                          # P = U_tᵀ U_{t−1} compares the *other* factor's basis now with the one of the previous step.
                          "projection": bases[other] @ states[other]["basis"].transpose(1, 2)})
        for side, basis in zip(sides, bases, strict=True):
            side["state"]["basis"].copy_(basis)
        return sides

    def _update(self, group: dict[str, Any], side: dict[str, Any], clip: torch.Tensor | None) -> None:
        """Steps 4–8 for one side (k factors of equal shape, all tensors batched along the first dimension).

        On the transposes (see ``_prepare``), with the per-factor scalings (clip, RMS skip, decays) folded into r×r
        matrices so that the (k, r, rows) tensors are read only by matrix products:
        M̄ᵀ ← (β̂₁ P) M̄ᵀ + ((1 − β̂₁) s W) Ḡᵀ, with W = (V̄ + ρI)^{−1/2} and s the scale of the clipped unmagnified
        gradient s·Ḡ; then Xᵀ ← Xᵀ − η (R⁻¹ M̄ᵀ + λ Xᵀ).
        """
        state = side["state"]
        state["step"].add_(1)
        beta1, beta2 = group["betas"]
        dtype = side["matrix"].dtype
        steps = state["step"]  # (k,) float64: pairs may have started apart

        def decay(beta: float) -> torch.Tensor:  # Adafactor's bias-corrected decay per pair, shaped (k, 1, 1)
            return (beta * (1.0 - beta ** (steps - 1)) / (1.0 - beta ** steps)).to(dtype)[:, None, None]

        decay1, decay2 = decay(beta1), decay(beta2)
        scale = (side["keep"] if clip is None else side["keep"] * clip)[:, None, None]  # (k, 1, 1)
        projection, inverse, unmagnified = side["projection"], side["inverse_other"], side["unmagnified"]
        old_second = state["second_moment"]
        transported = _symmetric(projection @ old_second @ projection.transpose(1, 2))
        rows = unmagnified.shape[2]
        second = _symmetric(decay2 * transported + (1.0 - decay2) * side["gram"] * (scale.square() / rows))
        if group["escaped_mass"]:
            eigen = torch.linalg.eigvalsh(torch.cat([old_second, transported]))
            eigen_drop = (eigen[:len(old_second)] - eigen[len(old_second):]).amax(dim=-1)
            trace_drop = (old_second.diagonal(dim1=1, dim2=2) - transported.diagonal(dim1=1, dim2=2)).sum(dim=-1)
            lost = torch.clamp(torch.minimum(eigen_drop, trace_drop), min=0.0)
            state["escaped_mass"].add_(lost).mul_(decay2[:, 0, 0])
        else:
            state["escaped_mass"].zero_()
        state["second_moment"].copy_(second)
        eigenvalues, eigenvectors = torch.linalg.eigh(second)
        eigenvalues = eigenvalues.clamp(min=0.0)  # V̄ is PSD; rounding can leave tiny negative eigenvalues
        root = 1.0 / ((eigenvalues + state["escaped_mass"][:, None]).sqrt() + group["eps"])
        inverse_root = _symmetric((eigenvectors * root[:, None, :]) @ eigenvectors.transpose(1, 2))
        first = state["first_moment"]  # M̄ᵀ (k, r, rows)
        carried = (decay1 * projection) @ first
        torch.baddbmm(carried, (1.0 - decay1) * scale * inverse_root, unmagnified, out=first)
        direction = first
        cap = group["update_rms_cap"]
        if cap > 0:
            rms = direction.square().mean(dim=(1, 2)).sqrt()
            direction = direction / torch.clamp(rms / cap, min=1.0)[:, None, None]
        if group["weight_decay"] > 0:
            update = torch.baddbmm(side["matrix"], inverse, direction, beta=group["weight_decay"])
        else:
            update = inverse @ direction
        if side["tall"]:  # lora_B is stored out × r
            update = update.transpose(1, 2)
        params = side["params"]
        updates = [u.to(p.dtype) for u, p in zip(update.unbind(), params, strict=True)]
        torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _batched_state(self, params: list[torch.Tensor], matrix: torch.Tensor, width: int,
                       other_width: int) -> dict[str, torch.Tensor]:
        """The state of k same-shaped factors Xᵀ ``matrix`` (k, r, rows) as batched tensors (k, ...), created at
        their first step; ``width`` q and ``other_width`` q' are min(r, rows) of these factors and of their partners.

        Each parameter's own state (what ``state_dict`` saves) holds views into these tensors, and the update writes
        them in place, so no step stacks or splits the state. After ``load_state_dict`` (or any other replacement of
        a parameter's state) the views no longer match and the batch is rebuilt from the per-parameter tensors.
        """
        cache = self.__dict__.setdefault("_batched", {})
        key = tuple(id(p) for p in params)
        batched = cache.get(key)
        if batched is not None and all(self.state[p].get(name) is view for name, views in batched["views"].items()
                                       for p, view in zip(params, views, strict=True)):
            return batched["tensors"]
        rows = matrix.shape[2]
        expected = {"step": (), "first_moment": (other_width, rows), "second_moment": (other_width, other_width),
                    "escaped_mass": (), "basis": (width, rows)}
        for param, item in zip(params, matrix, strict=True):
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64, device=item.device)
                state["escaped_mass"] = torch.zeros((), dtype=item.dtype, device=item.device)
                # M̄ᵀ, V̄ and Uᵀ of this factor at its previous step
                state.update({name: item.new_zeros(expected[name]) for name in ("first_moment", "second_moment",
                                                                                  "basis")})
        for param in params:
            found = {name: tuple(self.state[param][name].shape) if name in self.state[param] else None
                     for name in _STATE_NAMES}
            if found != expected:
                raise ValueError(f"LoRARite: the state of a factor of shape {tuple(param.shape)} does not fit it: "
                                 f"expected shapes {expected}, found {found}. It was probably loaded from another "
                                 "model or from a LoRARite version that stored the moments untransposed (before "
                                 "session 10); start the optimizer afresh or load a matching state_dict.")
        tensors = {name: torch.stack([self.state[p][name] for p in params]).to(
            dtype=torch.float64 if name == "step" else matrix.dtype) for name in _STATE_NAMES}
        views = {name: list(tensor.unbind()) for name, tensor in tensors.items()}
        for index, param in enumerate(params):
            self.state[param].update({name: views[name][index] for name in _STATE_NAMES})
        for stale in [other for other in cache if set(other) & set(key)]:  # e.g. a pair that skipped a step
            del cache[stale]
        cache[key] = {"tensors": tensors, "views": views}
        return tensors

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, with every state tensor copied out of the batched buffers, so the
        result owns compact tensors (safetensors refuses tensors that share memory) and later steps leave it alone."""
        state_dict = super().state_dict()
        state_dict["state"] = {index: {key: value.clone() if torch.is_tensor(value) else value
                                       for key, value in entries.items()}
                               for index, entries in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but the LoRA state keeps the precision it was saved in.

        torch casts every floating state tensor to its parameter's dtype; LoRA-RITE keeps the state of bf16/fp16
        factors in float32 (the precision its r×r algebra runs in), so that cast would make a resumed run differ
        from an uninterrupted one. The saved tensors are put back as saved (on the parameter's device).
        """
        saved = {index: dict(entries) for index, entries in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        lora = {param for group in self.param_groups if group["kind"] == "lora" for param in group["params"]}
        for index, param in zip(saved_ids, params, strict=True):
            if param in lora and index in saved:
                for key, value in saved[index].items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        self.state[param][key] = value.to(device=param.device).clone()

    @staticmethod
    def _work(param: torch.Tensor) -> torch.Tensor:
        """The factor in the precision the r×r algebra runs in (float64 stays float64, else float32)."""
        return param.detach() if param.dtype == torch.float64 else param.detach().float()

    def _work_grad(self, param: torch.Tensor) -> torch.Tensor:
        if param.grad is None:
            return torch.zeros_like(self._work(param))
        return param.grad if param.grad.dtype == torch.float64 else param.grad.float()

    def _adamw(self, group: dict[str, Any]) -> None:
        """AdamW (Loshchilov & Hutter, arXiv 1711.05101) with bias correction for the non-LoRA parameters."""
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
            step = int(state["step"].item())
            grad = param.grad
            if group["weight_decay"] > 0:
                param.mul_(1.0 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(grad, 1.0 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denominator = (state["exp_avg_sq"] / (1.0 - beta2 ** step)).sqrt_().add_(group["adamw_eps"])
            param.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1.0 - beta1 ** step))
