"""AdamW with weight-decay parameter groups (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 1711.05101).

Matrices (2-D and higher weights of linear and convolution layers) are decayed; vectors and scalars (norm gains, biases,
learned residual scalars), embedding tables and the parameters a module names in its class attribute
``no_weight_decay`` (an SSM mixer's A_log and D, as in the Mamba reference: decaying A_log pulls every state's decay
rate towards A = −1) are not, since decaying them
shrinks quantities that carry no notion of capacity. Tied weights appear once, because ``named_parameters``
de-duplicates shared tensors.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["decay_groups", "build_adamw"]


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed AdamW group.

    Each group carries ``names`` (parameter names, same order as ``params``) so that optimizers and checkpoints can
    address parameters by name rather than by position.
    """
    exempt = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    exempt |= {id(getattr(module, name)) for module in model.modules()
               for name in getattr(type(module), "no_weight_decay", ())}
    decay, no_decay = ([], []), ([], [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        target = decay if param.ndim >= 2 and id(param) not in exempt else no_decay
        target[0].append(name)
        target[1].append(param)
    groups = []
    for (names, params), wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "names": names, "weight_decay": wd})
    if not groups:
        raise ValueError("The model has no trainable parameters: nothing for the optimizer to update.")
    return groups


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``decay_groups(model, weight_decay)`` (uses the fused/foreach kernels torch picks by default)."""
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
