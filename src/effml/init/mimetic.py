"""Mimetic initialisation of selective SSM layers: start Mamba close to causal linear attention whose scores reflect
token similarity.

Paper: Trockman, Harutyunyan, Kolter, Kumar, Bhojanapalli, "Mimetic Initialization Helps State Space Models Learn to
Recall" (arXiv 2410.11135). A selective SSM layer applies y = M x with (``effml.nn.ssm``, ``implied_attention``)

    M[i, j] = C_i · (Π_{j<k≤i} exp(Δ_k A)) Δ_j B_j,   B_j = W_B u_j,  C_i = W_C u_i        (j ≤ i)

which is causal linear attention with queries C, keys B and a learned decay. Default Mamba initialisation makes the
decay fast (attention only on the last few tokens) and C·B unrelated to token similarity. The three parts here,
each switchable for ablations:

1. ``state``: the state transition near the identity, Ā = exp(ΔA) ≈ I: A_log = log(a) with a small
   (A = −a ≈ 0) and dt_bias = softplus⁻¹(Δ₀) so that Δ ≈ Δ₀ = 1 (the paper's "A → I, Δ → 1"). Then
   M[i, j] ≈ C_i · B_j for every j ≤ i: no decay, unit step.
2. ``bc``: W_C ≈ W_B, correlated but not equal: W_C ← W_B + σ · std(W_B) · G with G standard normal (σ = ``bc_noise``),
   so C_i · B_j ≈ (W_B u_i) · (W_B u_j) ∝ u_i · u_j: tokens attend to similar tokens. In Mamba-2, B and C also pass
   through their own conv channels, which are copied from B's to C's so that both see the same features.
3. ``conv_identity``: the short causal conv becomes the identity (kernel [0, …, 0, 1], no bias), so B, C and x at
   position t depend on token t only. Studied as an ablation in the paper; off by default.

The paper does not state its constants: a = e⁻⁸ (A ≈ −3·10⁻⁴, from a public port of the recipe to other linear
recurrences), Δ₀ = 1 and σ = 0.1 are this implementation's choices, exposed as arguments.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effml.nn.ssm import Mamba1Mixer, Mamba2Mixer

__all__ = ["apply_mimetic_init", "MIMETIC_PARTS"]

MIMETIC_PARTS = ("state", "bc", "conv_identity")


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


def _noisy_copy(source: torch.Tensor, noise: float, generator: torch.Generator | None) -> torch.Tensor:
    """source + noise · std(source) · standard normal (same shape)."""
    draw = torch.randn(source.shape, generator=generator, dtype=source.dtype).to(source.device)
    return source + noise * source.std() * draw


@torch.no_grad()
def apply_mimetic_init(model: nn.Module, state: bool = True, bc: bool = True, conv_identity: bool = False, *,
                       a_magnitude: float = math.exp(-8.0), dt_value: float = 1.0, bc_noise: float = 0.1,
                       generator: torch.Generator | None = None) -> dict[str, list[str]]:
    """Apply the mimetic initialisation (module docstring) to every Mamba-1/Mamba-2 mixer inside ``model``, in place.

    Args:
        model: any module containing ``Mamba1Mixer`` / ``Mamba2Mixer`` layers (e.g. a ``TransformerLM`` with
            ``mixer="mamba1"``), or such a layer itself.
        state, bc, conv_identity: which parts to apply (bools).
        a_magnitude: a in A = −a (> 0, small). dt_value: Δ₀ > 0 reached through dt_bias. bc_noise: σ ≥ 0.
        generator: torch generator for the noise of the ``bc`` part (default: the global RNG).

    Returns:
        {qualified layer name: [qualified names of the parameters changed]}.

    Raises:
        ValueError: no SSM layer in ``model``, a switch that is not a bool, no part selected, or a constant that is
            not a finite number in range.
    """
    for name, value in (("state", state), ("bc", bc), ("conv_identity", conv_identity)):
        if not isinstance(value, bool):  # a string such as "no" would read as on
            raise ValueError(f"apply_mimetic_init: {name} switches a part on or off and must be True or False, got "
                             f"{value!r}; pass a bool.")
    if not (state or bc or conv_identity):
        raise ValueError("apply_mimetic_init: every part is off (state, bc, conv_identity are all False); "
                         "turn on at least one, or do not call it.")
    for name, value, low_ok in (("a_magnitude", a_magnitude, False), ("dt_value", dt_value, False),
                                ("bc_noise", bc_noise, True)):
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)  # True would be taken as 1.0
        if not is_number or not math.isfinite(value) or value < 0 or (value == 0 and not low_ok):
            raise ValueError(f"apply_mimetic_init: {name} must be a finite number (int or float, not a bool) "
                             f"{'>= 0' if low_ok else '> 0'}, got {value!r}.")
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (Mamba1Mixer, Mamba2Mixer))]
    if not layers:
        raise ValueError(f"apply_mimetic_init found no SSM layer (Mamba1Mixer or Mamba2Mixer) in the "
                         f"{type(model).__name__} it was given; build the model with an SSM mixer "
                         "(e.g. TransformerConfig(mixer='mamba2')) before initialising it.")
    changed: dict[str, list[str]] = {}
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        names: list[str] = []
        if state:
            layer.A_log.fill_(math.log(a_magnitude))
            dt_bias = layer.dt_proj.bias if isinstance(layer, Mamba1Mixer) else layer.dt_bias
            dt_bias.fill_(_inverse_softplus(dt_value))
            names += ["A_log", "dt_proj.bias" if isinstance(layer, Mamba1Mixer) else "dt_bias"]
        if bc:
            if isinstance(layer, Mamba1Mixer):
                layer.W_C.copy_(_noisy_copy(layer.W_B, bc_noise, generator))
                names.append("x_proj.weight")
            else:
                layer.W_C.copy_(_noisy_copy(layer.W_B, bc_noise, generator))
                b_channels, c_channels = layer.conv_channels_of("B"), layer.conv_channels_of("C")
                layer.conv1d.weight[c_channels] = layer.conv1d.weight[b_channels]
                layer.conv1d.bias[c_channels] = layer.conv1d.bias[b_channels]
                names += ["in_proj.weight", "conv1d.weight", "conv1d.bias"]
        if conv_identity:
            layer.conv1d.weight.zero_()
            layer.conv1d.weight[:, 0, -1] = 1.0
            layer.conv1d.bias.zero_()
            names += [n for n in ("conv1d.weight", "conv1d.bias") if n not in names]
        changed[name] = [prefix + n for n in names]
    return changed
