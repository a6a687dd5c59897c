"""Gradual stacking and MIDAS: train a deep model in stages, growing it by copying blocks of layers.

Saunshi, Karp, Krishnan, Miryoosefi, Reddi, Kumar, "On the Inductive Bias of Stacking Towards Improving Reasoning"
(MIDAS; NeurIPS 2024, arXiv 2409.19044), building on gradual stacking (Reddi et al., "Efficient Training of Language
Models using Few-Shot Learning", ICML 2023).

The target depth is ``L = k · b``: ``k`` blocks of ``b`` layers. Training runs in ``k`` stages; stage ``i`` (1-based)
trains a model of ``i`` blocks, and between stages one block is duplicated:

* gradual stacking — copy the **last** block and put the copy on top:
  ``[B_1 … B_i] → [B_1 … B_i, B_i']``;
* MIDAS — copy the **middle** block ``B_m``, ``m = ⌈i/2⌉``, and insert the copy right after it:
  ``[B_1 … B_m, B_m', B_{m+1} … B_i]``, so duplicated blocks sit next to each other, as in a looped model.

Stage lengths follow the **Prop-α** schedule: of a budget of ``T`` steps, stage ``i`` gets

    T_i = T · i^α / Σ_{j=1..k} j^α

rounded so that the stages sum to exactly ``T`` (largest-remainder rounding, every stage at least one step).

The copies are exact: new layers start as deep copies of their source layers. The optimizer is rebuilt over the
grown model as an optimizer of the same class with the same parameter groups (`grown_optimizer`: each new parameter
joins its source's group, so its hyper-parameters and learning-rate scale are its source's); existing parameters keep
their state, and new ones either get a copy of their source's state (e.g. AdamW's moments and step count,
``optimizer_state="copy"``) or start with none (``"reset"``). The learning-rate schedule is a function of the global
step applied to each group's ``base_lr``, which the rebuilt groups keep, so it simply continues. `GrowthCallback`
does all this inside `effml.train.Trainer`, records how many growths happened in the checkpoint and regrows a fresh
model to the checkpoint's shape on resume, so a resumed run continues bit for bit across stage boundaries.

Models: effml's ``TransformerLM`` (``blocks``) and Hugging Face decoders that keep their layers in
``model.model.layers`` (Llama family, Mistral, Qwen2, ...; ``self_attn.layer_idx`` and ``config.num_hidden_layers``
are kept consistent so the KV cache stays correct).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from effml.train.loop import Callback, Trainer

__all__ = ["GrowthOperator", "Stacking", "Midas", "GROWTH_OPERATORS", "build_growth_operator", "prop_alpha_stages",
           "stage_starts", "layer_stack", "insert_layer_copy", "grow_model", "grown_optimizer", "rebuild_optimizer",
           "GrowthCallback",
           "OPTIMIZER_STATE_MODES", "layer_similarity", "block_similarity", "loop_similarity",
           "core_similarity"]

OPTIMIZER_STATE_MODES = ("copy", "reset")


# --------------------------------------------------------------------------------------------- growth operators


class GrowthOperator:
    """Which block is copied and where the copy goes, as layer-level ``(insert_at, copy_from)`` moves."""

    name: ClassVar[str]

    def source_block(self, n_blocks: int) -> int:
        """0-based index of the block that is duplicated in a model of ``n_blocks`` blocks."""
        raise NotImplementedError

    def moves(self, n_layers: int, block_size: int) -> list[tuple[int, int]]:
        """The layer insertions that grow a stack of ``n_layers`` layers by one block of ``block_size`` layers.

        Returns ``[(insert_at, copy_from), ...]`` applied in order, each inserting a copy of layer ``copy_from``
        so that it sits at index ``insert_at`` (indices refer to the stack as it is when the move is applied).
        The copy of source block ``s`` always lands right after it, occupying layers ``[(s+1)·b, (s+2)·b)``.
        """
        if n_layers % block_size:
            raise ValueError(f"a stack of {n_layers} layers is not a whole number of blocks of {block_size} layers; "
                             "start from a model whose depth is a multiple of the block size.")
        source = self.source_block(n_layers // block_size)
        start = (source + 1) * block_size  # first layer after the source block
        return [(start + j, source * block_size + j) for j in range(block_size)]


class Stacking(GrowthOperator):
    """Gradual stacking: the copy of the last block goes on top."""

    name = "stacking"

    def source_block(self, n_blocks: int) -> int:
        return n_blocks - 1


class Midas(GrowthOperator):
    """MIDAS: the middle block ``⌈i/2⌉`` (1-based) of ``i`` blocks is duplicated in place."""

    name = "midas"

    def source_block(self, n_blocks: int) -> int:
        return math.ceil(n_blocks / 2) - 1


GROWTH_OPERATORS: dict[str, type[GrowthOperator]] = {cls.name: cls for cls in (Stacking, Midas)}


def build_growth_operator(name: str) -> GrowthOperator:
    """The growth operator called ``name`` ("stacking" or "midas")."""
    if name not in GROWTH_OPERATORS:
        raise ValueError(f"Unknown growth operator {name!r}; choose one of {sorted(GROWTH_OPERATORS)}.")
    return GROWTH_OPERATORS[name]()


# --------------------------------------------------------------------------------------------- Prop-α schedule


def _check_stage_options(n_stages: int, alpha: float) -> None:
    """Raise ValueError unless ``n_stages`` is a positive int and ``alpha`` a finite number ≥ 0."""
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages must be a positive int, got {n_stages!r}.")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number ≥ 0 (0: equal stages, 1: proportional to depth), got "
                         f"{alpha!r}.")


def _stage_weights(n_stages: int, alpha: float) -> list[float]:
    """``[i^α for i = 1..k]``, or the same scaled by ``k^-α`` (≤ 1) where ``i^α`` overflows a float (a huge α)."""
    try:
        return [i ** alpha for i in range(1, n_stages + 1)]
    except OverflowError:
        return [(i / n_stages) ** alpha for i in range(1, n_stages + 1)]


def _shares(total: int, weights: list[float]) -> list[float]:
    """``total`` split in proportion to ``weights``: ``total · w / Σ w`` for each weight (not rounded)."""
    weight_sum = math.fsum(weights)
    return [total * weight / weight_sum for weight in weights]


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integers in proportion to ``weights`` that sum to ``total``: floor every share, then give one more to each of
    the shares with the largest fractional parts (ties to the later one) until the sum is ``total``."""
    shares = _shares(total, weights)
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (shares[i] - counts[i], i), reverse=True)
    for index in by_remainder[:total - sum(counts)]:
        counts[index] += 1
    return counts


def _proportional_stages(total_steps: int, weights: list[float]) -> list[int]:
    """The stages (0-based, ascending) that split the steps in proportion to their ``weights``, each share at least
    one step, once every other stage has taken exactly one step (those whose share would be under one).

    Never empty when ``total_steps ≥ len(weights)``: the shares sum to the steps left, at least one per stage, so
    the largest share is at least one step.
    """
    stages = list(range(len(weights)))
    while True:
        budget = total_steps - (len(weights) - len(stages))
        shares = _shares(budget, [weights[i] for i in stages])
        kept = [stage for stage, share in zip(stages, shares, strict=True) if share >= 1]
        if len(kept) == len(stages):
            return stages
        stages = kept


def prop_alpha_stages(total_steps: int, n_stages: int, alpha: float) -> list[int]:
    """Stage lengths ``T_i = T · i^α / Σ_j j^α`` (i = 1..k), rounded to integers that sum to ``total_steps``.

    Every stage gets at least one step: a stage whose share is under one step gets exactly one, and the other stages
    split the rest in proportion to their ``i^α`` (repeated until every share left is at least one step). Those
    shares are rounded by the largest remainder: floor every share, then give the leftover steps to the stages with
    the largest fractional parts (ties to the later stage). So the lengths are the formula's values wherever these
    are whole numbers, and for ``α ≥ 0`` they never decrease from one stage to the next.
    """
    _check_stage_options(n_stages, alpha)
    if not isinstance(total_steps, int) or total_steps < n_stages:
        raise ValueError(f"total_steps={total_steps!r} must be an int ≥ n_stages={n_stages}: every stage needs a "
                         "step.")
    weights = _stage_weights(n_stages, alpha)
    proportional = _proportional_stages(total_steps, weights)
    budget = total_steps - (n_stages - len(proportional))  # what the one-step stages leave
    lengths = [1] * n_stages
    for stage, length in zip(proportional, _largest_remainder(budget, [weights[i] for i in proportional]),
                             strict=True):
        lengths[stage] = length
    return lengths


def stage_starts(lengths: list[int]) -> list[int]:
    """The global step at which each stage starts: ``[0, T_1, T_1 + T_2, ...]``."""
    starts, total = [], 0
    for length in lengths:
        starts.append(total)
        total += length
    return starts


# --------------------------------------------------------------------------------------------- models


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's list of layers: ``model.blocks`` (effml ``TransformerLM``) or ``model.model.layers`` (Hugging Face
    decoders such as ``LlamaForCausalLM``); ``model.layers`` for a bare HF decoder body."""
    from effml.nn import TransformerLM

    if isinstance(model, TransformerLM):
        return model.blocks
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    raise TypeError(f"Cannot find the layer stack of a {type(model).__name__}: growth supports effml's TransformerLM "
                    "(model.blocks) and Hugging Face decoders with model.model.layers (Llama, Mistral, Qwen2, ...).")


def _hf_config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def insert_layer_copy(model: nn.Module, insert_at: int, copy_from: int) -> nn.Module:
    """Insert an exact deep copy of layer ``copy_from`` at index ``insert_at`` and return the copy.

    effml ``TransformerLM``: ``model.grow``. Hugging Face: the copy goes into ``model.model.layers``; then
    ``config.num_hidden_layers`` (and ``config.layer_types`` when present) and each layer's ``self_attn.layer_idx``
    are updated so that the KV cache addresses every layer by its new position.
    """
    from effml.nn import TransformerLM

    if isinstance(model, TransformerLM):
        return model.grow(insert_at, copy_from)
    layers = layer_stack(model)
    n_layers = len(layers)
    if not (0 <= copy_from < n_layers and 0 <= insert_at <= n_layers):
        raise ValueError(f"insert_layer_copy: copy_from must be in [0, {n_layers - 1}] and insert_at in "
                         f"[0, {n_layers}] for {n_layers} layers; got copy_from={copy_from}, insert_at={insert_at}.")
    new_layer = copy.deepcopy(layers[copy_from])
    layers.insert(insert_at, new_layer)
    config = _hf_config(model)
    if config is not None:
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == n_layers:
            config.layer_types = types[:insert_at] + [types[copy_from]] + types[insert_at:]
        config.num_hidden_layers = n_layers + 1
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index
    return new_layer


def grow_model(model: nn.Module, operator: GrowthOperator, block_size: int) -> dict[nn.Parameter, nn.Parameter]:
    """Grow ``model`` in place by one block with ``operator``; return ``{new parameter: source parameter}``."""
    sources: dict[nn.Parameter, nn.Parameter] = {}
    for insert_at, copy_from in operator.moves(len(layer_stack(model)), block_size):
        source_layer = layer_stack(model)[copy_from]
        new_layer = insert_layer_copy(model, insert_at, copy_from)
        for new, old in zip(new_layer.parameters(), source_layer.parameters(), strict=True):
            sources[new] = sources.get(old, old)  # a copy of a copy traces back to an existing parameter
    return sources


# --------------------------------------------------------------------------------------------- optimizer

# Param-group entries that list something per parameter, in the order of "params": effml's decay groups' "names"
# and torch's "param_names". They are rebuilt from the grown model's parameter names, not copied.
_PER_PARAMETER_KEYS = ("names", "param_names")


def _grown_groups(old: torch.optim.Optimizer, model: nn.Module,
                  sources: dict[nn.Parameter, nn.Parameter]) -> list[dict[str, Any]]:
    """``old``'s param groups with the same settings, each holding its parameters and the new parameters whose
    source is among them, in the model's parameter order (then any of its parameters that are not the model's)."""
    names = {param: name for name, param in model.named_parameters()}
    group_of = {param: index for index, group in enumerate(old.param_groups) for param in group["params"]}
    members: list[list[nn.Parameter]] = [[] for _ in old.param_groups]
    for param in names:
        index = group_of.get(param)
        if index is None and param in sources:
            index = group_of.get(sources[param])
        if index is not None:
            members[index].append(param)
    groups = []
    for group, params in zip(old.param_groups, members, strict=True):
        params += [param for param in group["params"] if param not in names]
        settings = {key: value for key, value in group.items() if key != "params"}
        for key in set(_PER_PARAMETER_KEYS) & set(settings):
            earlier = dict(zip(group["params"], group[key], strict=True))
            settings[key] = [names[param] if param in names else earlier[param] for param in params]
        groups.append({"params": params, **settings})
    return groups


def grown_optimizer(old: torch.optim.Optimizer, model: nn.Module,
                    sources: dict[nn.Parameter, nn.Parameter]) -> torch.optim.Optimizer:
    """A new optimizer of ``old``'s class over the grown ``model``, without state (see `rebuild_optimizer`).

    Every param group of ``old`` is kept with all its settings (learning rate and the trainer's ``base_lr``, weight
    decay, betas, momentum, ...); a new parameter joins the group of its source (``sources``: new → source parameter,
    from `grow_model`), and parameters ``old`` did not train (frozen ones, say) stay out, copies included. The
    constructor gets ``old.defaults`` (those it accepts), so groups added later get the same defaults.
    """
    cls = type(old)
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    defaults = {key: value for key, value in old.defaults.items() if takes_any or key in accepted}
    try:
        return cls(_grown_groups(old, model, sources), **defaults)
    except TypeError as error:
        raise TypeError(f"GrowthCallback cannot rebuild the {cls.__name__} optimizer over the grown model from its "
                        f"param groups and defaults ({error}); pass optimizer_factory=lambda model: ... to "
                        "GrowthCallback to build it yourself (its state is still carried over).") from error


def rebuild_optimizer(old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                      sources: dict[nn.Parameter, nn.Parameter], mode: str) -> torch.optim.Optimizer:
    """Move the state of ``old`` into ``new`` (an optimizer over the grown model) and return ``new``.

    Parameters present before growth keep their state (same tensor objects). A new parameter gets a clone of its
    source's state with ``mode="copy"`` and no state with ``mode="reset"`` (the optimizer then initialises it on
    its first step, like a freshly initialised weight's: AdamW from zero moments and step 0; SGD with momentum sets
    the momentum buffer to that step's gradient, weight decay included, with no dampening).
    """
    if mode not in OPTIMIZER_STATE_MODES:
        raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {mode!r}.")
    for group in new.param_groups:
        for param in group["params"]:
            if param in old.state:
                new.state[param] = old.state[param]
            elif mode == "copy" and param in sources and sources[param] in old.state:
                new.state[param] = {key: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
                                    for key, value in old.state[sources[param]].items()}
    return new


# --------------------------------------------------------------------------------------------- trainer callback


@dataclass
class GrowthCallback(Callback):
    """Grows the trainer's model at the Prop-α stage boundaries (a `effml.train.Trainer` callback).

    The trainer must start with a model of ``block_size`` layers (stage 1). Before the first step of stage ``i``
    (``i ≥ 2``) the model grows by one block with ``operator`` and the optimizer is rebuilt, with new parameters'
    state copied or reset: by default as the trainer's own optimizer, whatever its class (`grown_optimizer`: same
    param groups and settings, each new parameter in its source's group), or by ``optimizer_factory``.

    Attributes:
        operator: "stacking" or "midas" (or a `GrowthOperator`).
        n_stages: k, so the final depth is ``n_stages · block_size``.
        block_size: b, layers per block.
        alpha: Prop-α exponent of the stage schedule.
        total_steps: T, the training budget split into stages: the trainer's ``TrainConfig.steps``. None (the
            default) takes them from the trainer when training starts; a number is checked against them then
            (a different one would end training before the last stage, or stretch the last stage beyond its share).
        optimizer_state: "copy" or "reset" (see `rebuild_optimizer`).
        optimizer_factory: ``model -> optimizer`` over the grown model (for an optimizer `grown_optimizer` cannot
            rebuild); None rebuilds the trainer's optimizer with `grown_optimizer`.
    """

    replaces_model = True

    operator: str | GrowthOperator
    n_stages: int
    block_size: int
    alpha: float
    total_steps: int | None = None
    optimizer_state: str = "copy"
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.operator, str):
            self.operator = build_growth_operator(self.operator)
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}.")
        if self.optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {self.optimizer_state!r}.")
        _check_stage_options(self.n_stages, self.alpha)  # now, not when training starts
        self.stage_lengths: list[int] = []  # the Prop-α split of total_steps (set by _set_schedule)
        self.starts: list[int] = []
        if self.total_steps is not None:
            self._set_schedule(self.total_steps)
        self.growths = 0  # growth steps done so far: the model has (1 + growths) blocks

    def _set_schedule(self, total_steps: int) -> None:
        self.stage_lengths = prop_alpha_stages(total_steps, self.n_stages, self.alpha)
        self.starts = stage_starts(self.stage_lengths)

    def _fit_schedule_to(self, trainer: Trainer) -> None:
        """Split the trainer's steps into the stages (``total_steps=None``), or check that ``total_steps`` is them."""
        steps = trainer.config.steps
        if self.total_steps is None:
            if steps < self.n_stages:
                raise ValueError(f"GrowthCallback splits the trainer's TrainConfig.steps={steps} into n_stages="
                                 f"{self.n_stages} stages, but every stage needs at least one step; raise "
                                 f"TrainConfig.steps to at least {self.n_stages} or use fewer stages.")
            self._set_schedule(steps)
            return
        if self.total_steps == steps:
            return
        if self.total_steps > steps:
            outcome = (f"training would end in stage {self.stage_at(steps - 1) + 1} of {self.n_stages}, at "
                       f"{(self.stage_at(steps - 1) + 1) * self.block_size} of {self.n_stages * self.block_size} "
                       "layers")
        else:
            outcome = f"the last stage would get {steps - self.total_steps} steps beyond its Prop-α share"
        raise ValueError(f"GrowthCallback splits total_steps={self.total_steps} steps into {self.n_stages} stages "
                         f"{self.stage_lengths}, but the trainer trains {steps} (TrainConfig.steps), so {outcome}. "
                         f"Leave total_steps out (None: the trainer's steps) or set it to {steps}.")

    def stage_at(self, step: int) -> int:
        """0-based stage that global ``step`` belongs to."""
        if not self.starts:
            raise RuntimeError("GrowthCallback.stage_at: with total_steps=None the stages are known only once "
                               "training starts (they split the trainer's TrainConfig.steps); pass total_steps to "
                               "know them before.")
        return sum(1 for start in self.starts[1:] if step >= start)

    def _grow(self, trainer: Trainer, copy_state: bool) -> None:
        model = trainer.model
        sources = grow_model(model, self.operator, self.block_size)  # type: ignore[arg-type]
        if self.optimizer_factory is not None:
            new = self.optimizer_factory(model)
        else:
            new = grown_optimizer(trainer.optimizer, model, sources)
        mode = self.optimizer_state if copy_state else "reset"
        trainer.set_model(model, rebuild_optimizer(trainer.optimizer, new, sources, mode))
        self.growths += 1

    def on_train_start(self, trainer: Trainer) -> None:
        self._fit_schedule_to(trainer)
        depth = len(layer_stack(trainer.model))
        if depth != (1 + self.growths) * self.block_size:
            raise ValueError(f"GrowthCallback expects a model of {(1 + self.growths) * self.block_size} layers here "
                             f"(stage {1 + self.growths} of {self.n_stages}, blocks of {self.block_size}) but the "
                             f"model has {depth}; build the trainer's model with block_size layers.")

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        while self.growths < self.stage_at(step):
            self._grow(trainer, copy_state=True)

    def state_dict(self) -> dict[str, Any]:
        return {"growths": self.growths, "stage_lengths": self.stage_lengths, "operator": self.operator.name}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        """Regrow the freshly built model to the checkpoint's depth, before its weights and optimizer load."""
        self._fit_schedule_to(trainer)
        if state.get("operator") != self.operator.name or state.get("stage_lengths") != self.stage_lengths:
            raise ValueError(f"The checkpoint was written by a {state.get('operator')} run with stages "
                             f"{state.get('stage_lengths')}, not {self.operator.name} with {self.stage_lengths}; "
                             "resume with the settings it was started with.")
        while self.growths < state["growths"]:
            self._grow(trainer, copy_state=False)  # the checkpoint's optimizer state replaces it right after


# --------------------------------------------------------------------------------------------- layer similarity


def _layer_vector(layer: nn.Module) -> torch.Tensor:
    """The layer's weight matrices (≥ 2-D parameters; norm gains left out) flattened into one vector."""
    return torch.cat([p.detach().float().flatten() for p in layer.parameters() if p.ndim >= 2])


def layer_similarity(model: nn.Module) -> torch.Tensor:
    """(L, L) cosine similarity between the flattened weight matrices of every pair of layers (1 on the diagonal)."""
    vectors = torch.stack([_layer_vector(layer) for layer in layer_stack(model)])
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    return unit @ unit.T


def block_similarity(model: nn.Module, block_size: int) -> torch.Tensor:
    """(k, k) cosine similarity between the model's ``k`` blocks, each block the concatenation of its
    ``block_size`` layers' weight matrices (so layer j of one block is compared with layer j of another)."""
    layers = list(layer_stack(model))
    if len(layers) % block_size or len(layers) // block_size < 2:
        raise ValueError(f"block similarity needs at least two whole blocks of {block_size} layers; the model has "
                         f"{len(layers)} layers.")
    blocks = torch.stack([torch.cat([_layer_vector(layer) for layer in layers[start:start + block_size]])
                          for start in range(0, len(layers), block_size)])
    unit = blocks / blocks.norm(dim=1, keepdim=True)
    return unit @ unit.T


def _mean_off_diagonal(similarity: torch.Tensor) -> float:
    n = similarity.shape[0]
    return float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))


def loop_similarity(model: nn.Module, block_size: int) -> float:
    """How close the model is to a looped one: the mean cosine similarity over all pairs of distinct blocks
    (`block_similarity`). 1 for a looped model (every block the same weights); near 0 for independently
    initialised blocks.

    Note: grown from one block, stacking and MIDAS models have the same family tree of copies up to relabelling
    (each growth duplicates the newest block or its twin), so this position-blind mean differs between them only
    through training dynamics; `core_similarity` measures where the recent copies sit."""
    return _mean_off_diagonal(block_similarity(model, block_size))


def core_similarity(model: nn.Module, block_size: int) -> float:
    """The mean cosine similarity over pairs of distinct *interior* blocks (all but the first and the last; needs
    ≥ 4 blocks): high when the middle of the model is a looped core between distinct first and last blocks, the
    structure MIDAS's middle duplication builds (gradual stacking piles its recent copies at the top instead)."""
    similarity = block_similarity(model, block_size)
    if similarity.shape[0] < 4:
        raise ValueError(f"core_similarity needs at least 4 blocks (2 interior ones) of {block_size} layers; the "
                         f"model has {similarity.shape[0]}.")
    return _mean_off_diagonal(similarity[1:-1, 1:-1])
