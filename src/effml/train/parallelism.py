"""How a model is spread over the ranks of a ``torchrun`` world: replicated (DDP) or sharded (FSDP).

Chosen by name with ``TrainConfig.data_parallel``:

- ``"ddp"`` (:class:`Replicated`): every rank holds the whole model and optimizer state; gradients are averaged with
  an all-reduce (``torch.nn.parallel.DistributedDataParallel``).
- ``"fsdp"`` (:class:`Sharded`): each rank holds 1/N of every parameter, gradient and optimizer state (PyTorch's
  FSDP2, ``torch.distributed.fsdp.fully_shard``); a layer's weights are all-gathered just before its forward and
  backward and freed after, and gradients are reduce-scattered. For models too large to replicate. The units
  gathered at once are :func:`shard_units`: each element of the model's ``nn.ModuleList`` stacks (a transformer's
  blocks), then the rest of the model as one unit.

Both give the same optimisation: each rank computes its share of the global batch, and the update is that of the
mean gradient. In a world of one, both leave the model as it is, so one process trains identically under either.
Checkpoints hold the full (unsharded) model and optimizer state in the one format both read, so a run checkpointed
under one can be resumed under the other, or evaluated in one process.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from effml.train.distributed import World

__all__ = ["DataParallel", "Replicated", "Sharded", "DATA_PARALLEL", "data_parallel", "shard_units"]


class DataParallel(ABC):
    """A way of training one model on every rank of the world. ``wrap`` is called once per model; the other methods
    are collectives where the docstring says so (every rank must call them, in the same order)."""

    name: ClassVar[str]
    #: Whether a callback may replace the model mid-run (growth): ``wrap`` then runs again on the new model.
    allows_model_replacement: ClassVar[bool] = True

    @abstractmethod
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> nn.Module:
        """Prepare ``model`` (already on its device) and ``optimizer`` (built over ``model``'s parameters, not yet
        stepped) for training on ``world``; return the module the loss function is to call."""

    @abstractmethod
    def no_sync(self, train_model: nn.Module, world: World) -> contextlib.AbstractContextManager:
        """Context for a micro-batch whose gradients are only accumulated locally (not the last of a step)."""

    @abstractmethod
    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   world: World) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Collective. The full model state_dict and optimizer state_dict (``torch.optim`` format: state keyed by the
        parameter's index in the optimizer's groups), complete on rank 0; other ranks may get empty ones."""

    @abstractmethod
    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                        optimizer_state: dict[str, Any] | None, world: World) -> None:
        """Collective. Load what :meth:`full_state` returned (read by every rank from a checkpoint) into this rank's
        model and optimizer."""

    def checkpoint_device(self, device: torch.device) -> torch.device:
        """Where a checkpoint's full tensors are loaded before :meth:`load_full_state`."""
        return device


class Replicated(DataParallel):
    """DDP: the whole model on every rank, gradients all-reduced."""

    name = "ddp"

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> nn.Module:
        if not world.distributed:
            return model
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, train_model: nn.Module, world: World) -> contextlib.AbstractContextManager:
        return train_model.no_sync() if world.distributed else contextlib.nullcontext()  # type: ignore[operator]

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   world: World) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return model.state_dict(), optimizer.state_dict()

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                        optimizer_state: dict[str, Any] | None, world: World) -> None:
        model.load_state_dict(model_state)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP gathers one at a time, innermost first: every element (with parameters) of every
    ``nn.ModuleList`` in ``model`` — a transformer's blocks, a ResNet stage's blocks — and then ``model`` itself, which
    keeps what is left (embeddings, final norm, a tied head). A module listed twice (weights shared across layers)
    is one unit."""
    units = {id(element): (name.count("."), element) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) for element in module if any(True for _ in element.parameters())}
    return [element for _, element in sorted(units.values(), key=lambda unit: -unit[0])] + [model]


class Sharded(DataParallel):
    """FSDP2: parameters, gradients and optimizer state sharded over the ranks (see the module docstring)."""

    name = "fsdp"
    allows_model_replacement = False  # the model is sharded once, at the start of training

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> nn.Module:
        if not world.distributed:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if any(isinstance(module, FSDPModule) for module in model.modules()):
            raise RuntimeError(
                "train.data_parallel='fsdp' shards a model once, at the start of training; this model is already "
                "sharded, which happens when a callback replaces it mid-run (MIDAS or stacking growth). Train with "
                "train.data_parallel='ddp', which supports growth.")
        if optimizer.state:
            raise RuntimeError("train.data_parallel='fsdp' replaces the model's parameters by their shards, so the "
                               "optimizer must not have stepped yet; pass a fresh optimizer to the Trainer.")
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        foreign = sum(id(parameter) not in names for group in optimizer.param_groups for parameter in group["params"])
        if foreign:
            raise RuntimeError(f"train.data_parallel='fsdp' shards the model's own parameters, but the optimizer also "
                               f"holds {foreign} tensor(s) that are not parameters of the model; give the optimizer "
                               "only model.parameters() (register extra tensors as parameters of a submodule).")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (world.world_size,))
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh)
        # fully_shard registers new (sharded) Parameter objects: point the optimizer at them, by name.
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(parameter)]] for parameter in group["params"]]
        return model

    @contextlib.contextmanager
    def no_sync(self, train_model: nn.Module, world: World) -> Iterator[None]:
        if not world.distributed:
            yield
            return
        train_model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   world: World) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not world.distributed:
            return Replicated().full_state(model, optimizer, world)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, in CPU memory
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if not world.is_main:
            return {}, {}
        return _tied(model_state, model), _keyed_by_index(optimizer_state, _parameter_names(model, optimizer))

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                        optimizer_state: dict[str, Any] | None, world: World) -> None:
        if not world.distributed:
            Replicated().load_full_state(model, optimizer, model_state, optimizer_state, world)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        if optimizer_state is not None:
            set_optimizer_state_dict(model, optimizer, _keyed_by_name(optimizer_state,
                                                                      _parameter_names(model, optimizer)),
                                     options=options)

    def checkpoint_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")  # every rank reads the full tensors: keep them off the accelerator


def _tied(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with every name of a shared parameter (a tied LM head) pointing at one tensor, as in the plain
    module's state_dict: gathered, they arrive as separate copies, which a checkpoint would store twice."""
    first: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(parameter), name)
        if source != name and source in state and name in state:
            state[name] = state[source]
    return state


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order of its groups (torch.optim's state index)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def _keyed_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) → keyed by index (torch.optim's)."""
    index = {name: position for position, name in enumerate(names)}
    return {"state": {index[name]: entries for name, entries in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def _keyed_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`_keyed_by_index`."""
    return {"state": {names[int(position)]: entries for position, entries in state["state"].items()},
            "param_groups": [{**group, "params": [names[int(position)] for position in group["params"]]}
                             for group in state["param_groups"]]}


#: Strategies by ``TrainConfig.data_parallel`` name.
DATA_PARALLEL: dict[str, type[DataParallel]] = {cls.name: cls for cls in (Replicated, Sharded)}


def data_parallel(name: str) -> DataParallel:
    """The strategy called ``name`` ("ddp" or "fsdp")."""
    if name not in DATA_PARALLEL:
        raise ValueError(f"Unknown data-parallel strategy {name!r}; choose one of {', '.join(DATA_PARALLEL)}.")
    return DATA_PARALLEL[name]()
