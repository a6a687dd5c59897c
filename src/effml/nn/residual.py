"""Pluggable residual connections: the module that combines the stream x_i with a sub-layer's output f(x_i).

A transformer block has two sub-layers (attention, MLP); each one's residual connection is a ``Residual`` built by
name from the registry ``RESIDUALS``, so variants such as LAuReL (arXiv 2411.07501) drop in with
``TransformerConfig(residual="<name>", residual_options={...})``.

Contract: ``forward(x, fx, history)`` with x, fx (B, T, D) returns x_{i+1} (B, T, D). ``history`` holds the inputs
of the previous sub-layers x_{i-1}, x_{i-2}, …, most recent first, and has ``min(history_size, i)`` entries (fewer
at the start of the stack, where fewer exist). A model whose residuals all have ``history_size == 0`` keeps no
history at all.

Registering a variant::

    @register_residual("scaled")
    class ScaledResidual(Residual):
        def __init__(self, d_model: int, layer_index: int, scale: float = 1.0): ...

The constructor receives ``d_model``, ``layer_index`` (the sub-layer's index: 2·block + 0 for attention,
2·block + 1 for the MLP) and the options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn

__all__ = ["Residual", "PlainResidual", "RESIDUALS", "register_residual", "build_residual", "check_residual_options",
           "StreamHistory"]


class Residual(nn.Module):
    """Combines the stream x_i with the branch output f(x_i) into x_{i+1}.

    Subclasses set ``history_size`` (class or instance attribute) to the number of previous stream states they
    need and implement ``forward(x, fx, history) -> Tensor`` with x, fx, every history entry and the output all
    (B, T, D).
    """

    history_size: int = 0

    def __init__(self, d_model: int, layer_index: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.layer_index = layer_index

    def forward(self, x: Tensor, fx: Tensor, history: Sequence[Tensor] = ()) -> Tensor:
        raise NotImplementedError


RESIDUALS: dict[str, type[Residual]] = {}

ResidualType = TypeVar("ResidualType", bound=type[Residual])


def register_residual(name: str) -> Callable[[ResidualType], ResidualType]:
    """Class decorator adding a ``Residual`` subclass to ``RESIDUALS`` under ``name``."""

    def decorator(cls: ResidualType) -> ResidualType:
        if not (isinstance(cls, type) and issubclass(cls, Residual)):
            raise TypeError(f"register_residual({name!r}) decorates Residual subclasses, got {cls!r}.")
        if name in RESIDUALS and RESIDUALS[name] is not cls:
            raise ValueError(f"a residual named {name!r} is already registered ({RESIDUALS[name].__qualname__}); "
                             "choose another name.")
        RESIDUALS[name] = cls
        return cls

    return decorator


def build_residual(name: str, d_model: int, layer_index: int, **options: Any) -> Residual:
    """Instantiate the residual registered as ``name`` for width ``d_model`` at sub-layer ``layer_index``.

    Raises ValueError for an unknown name (listing the registered ones) or options the residual does not accept.
    """
    check_residual_options(name, options)
    return RESIDUALS[name](d_model, layer_index, **options)


def check_residual_options(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError unless ``name`` is registered and its constructor accepts ``options`` as keywords."""
    if name not in RESIDUALS:
        raise ValueError(f"unknown residual {name!r}; registered residuals: {sorted(RESIDUALS)}. "
                         "Register new ones with @register_residual(name).")
    signature = inspect.signature(RESIDUALS[name])
    try:
        signature.bind(0, 0, **options)
    except TypeError as error:
        accepted = [p for p in signature.parameters if p not in ("d_model", "layer_index")]
        raise ValueError(f"residual {name!r} does not accept the options {sorted(options)} ({error}); "
                         f"its options are {accepted}.") from None


@register_residual("plain")
class PlainResidual(Residual):
    """The ordinary residual connection x_{i+1} = x_i + f(x_i); no parameters, no history."""

    def forward(self, x: Tensor, fx: Tensor, history: Sequence[Tensor] = ()) -> Tensor:
        return x + fx


class StreamHistory:
    """The last ``size`` residual-stream states seen by a forward pass (inputs of past sub-layers), newest first.

    The model creates one per forward only when some residual has ``history_size > 0``; each sub-layer reads
    ``recent(its history_size)`` and then ``push``es its own input.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.states: list[Tensor] = []

    def recent(self, count: int) -> list[Tensor]:
        """Up to ``count`` most recent states, most recent first."""
        return self.states[:count]

    def push(self, state: Tensor) -> None:
        """Record ``state`` (B, T, D) as the newest entry, dropping the oldest beyond ``size``."""
        self.states.insert(0, state)
        del self.states[self.size:]
