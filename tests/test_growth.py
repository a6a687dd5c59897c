"""Gradual stacking / MIDAS growth: Prop-α stages, layer order, exact copies, optimizer state, HF Llama, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from effml.nn import TransformerConfig, TransformerLM
from effml.optim import WarmupCosine, build_adamw, decay_groups
from effml.train import Callback, TrainConfig, Trainer, TrainingInterrupted
from effml.train.growth import (GrowthCallback, Midas, Stacking, block_similarity, build_growth_operator,
                                core_similarity, grow_model, grown_optimizer, layer_similarity, layer_stack,
                                loop_similarity, prop_alpha_stages, rebuild_optimizer, stage_starts)
from effml.train.lm import causal_lm_loss

VOCAB, SEQ = 32, 16


def tiny_model(n_layers: int, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=2,
                                           max_seq_len=SEQ))


def tiny_llama(n_layers: int, seed: int = 0) -> nn.Module:
    """A Hugging Face LlamaForCausalLM of the same size, built from a config (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=2 * SEQ)
    return transformers.LlamaForCausalLM(config)


def llama_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int):
    """`causal_lm_loss` on a Hugging Face causal LM's logits."""
    return causal_lm_loss(lambda ids: model(ids, use_cache=False).logits, batch, step)


MODELS = {"effml": (tiny_model, causal_lm_loss), "llama": (tiny_llama, llama_lm_loss)}  # builder, loss function


# ------------------------------------------------------------------------------------------------ Prop-α


def test_prop_alpha_stage_lengths_follow_the_formula_and_sum_to_the_budget() -> None:
    assert prop_alpha_stages(100, 4, 1.0) == [10, 20, 30, 40]  # T·i/10 exactly
    assert prop_alpha_stages(30, 4, 2.0) == [1, 4, 9, 16]  # T·i²/30 exactly
    assert prop_alpha_stages(12, 3, 0.0) == [4, 4, 4]
    assert stage_starts([10, 20, 30, 40]) == [0, 10, 30, 60]
    assert prop_alpha_stages(100, 4, 600.0) == [1, 1, 1, 97]  # 4^600 overflows a float: the shares are scaled


def test_a_stage_lifted_to_one_step_takes_no_leftover_step() -> None:
    # shares 0.8, 1.6, 2.4, 3.2: stage 1 gets its one step, and stages 2-4 split the other 7 (1.56, 2.33, 3.11)
    assert prop_alpha_stages(8, 4, 1.0) == [1, 2, 2, 3]
    assert prop_alpha_stages(10, 4, 3.0) == [1, 1, 2, 6]  # shares 0.1, 0.8, 2.7, 6.4; then 2.37, 5.63 of 8


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 8.0])
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5, 6])
def test_prop_alpha_stages_sum_to_the_budget_never_shrink_and_follow_the_formula(stages: int, alpha: float) -> None:
    for total in [*range(stages, 3 * stages + 40), 301, 997]:
        lengths = prop_alpha_stages(total, stages, alpha)
        case = f"T={total}, k={stages}, alpha={alpha}: {lengths}"
        assert sum(lengths) == total and min(lengths) >= 1, case
        assert lengths == sorted(lengths), case
        norm = sum(j ** alpha for j in range(1, stages + 1))
        shares = [total * i ** alpha / norm for i in range(1, stages + 1)]
        if min(shares) >= 1:
            assert all(abs(length - share) < 1 for length, share in zip(lengths, shares, strict=True)), case
        if alpha.is_integer():  # the formula in integers: where every share is whole, the lengths are the shares
            weights = [i ** int(alpha) for i in range(1, stages + 1)]
            if all(total * w % sum(weights) == 0 and total * w >= sum(weights) for w in weights):
                assert lengths == [total * w // sum(weights) for w in weights], case


@pytest.mark.parametrize("args", [(3, 4, 1.0), (100, 0, 1.0), (100, 4, -1.0), (100, 4, math.nan)])
def test_prop_alpha_rejects_bad_settings(args) -> None:
    with pytest.raises(ValueError):
        prop_alpha_stages(*args)


# ------------------------------------------------------------------------------------------------ layer order


def _tag_layers(model: TransformerLM, first_tag: int) -> None:
    """Give every layer a distinct tag (written into its final-MLP weight) standing for 'trained since'."""
    with torch.no_grad():
        for index, block in enumerate(model.blocks):
            block.mlp_norm.weight.fill_(first_tag + index)


def _tags(model: TransformerLM) -> list[int]:
    return [int(block.mlp_norm.weight[0]) for block in model.blocks]


@pytest.mark.parametrize("operator, expected", [
    # b = 2 layers per block; tags name the layers before each growth (the model is re-tagged in between).
    ("stacking", [[0, 1, 0, 1], [10, 11, 12, 13, 12, 13], [20, 21, 22, 23, 24, 25, 24, 25]]),
    ("midas", [[0, 1, 0, 1], [10, 11, 10, 11, 12, 13], [20, 21, 22, 23, 22, 23, 24, 25]]),
])
def test_growth_operators_put_the_copied_block_where_promised(operator: str, expected: list[list[int]]) -> None:
    model = tiny_model(2)
    for stage, order in enumerate(expected):
        _tag_layers(model, 10 * stage)
        grow_model(model, build_growth_operator(operator), block_size=2)
        assert _tags(model) == order
        assert model.config.n_layers == len(model.blocks) == 2 * (stage + 2)


def test_midas_duplicates_block_ceil_half_and_stacking_the_last() -> None:
    assert [Midas().source_block(i) for i in range(1, 8)] == [0, 0, 1, 1, 2, 2, 3]
    assert [Stacking().source_block(i) for i in range(1, 5)] == [0, 1, 2, 3]
    assert Midas().moves(6, 2) == [(4, 2), (5, 3)]  # block 1 (layers 2, 3) copied to layers 4, 5
    with pytest.raises(ValueError, match="whole number of blocks"):
        Midas().moves(5, 2)
    with pytest.raises(ValueError, match="Unknown growth operator"):
        build_growth_operator("middle")


def test_copied_layers_are_exact_and_independent() -> None:
    model = tiny_model(2)
    sources = grow_model(model, Midas(), block_size=1)  # layers [A, A', B]
    assert len(sources) == sum(1 for _ in model.blocks[1].parameters())
    for (name, copy), original in zip(model.blocks[1].named_parameters(), model.blocks[0].parameters(), strict=True):
        assert torch.equal(copy, original) and copy.data_ptr() != original.data_ptr(), name
        assert sources[copy] is original
    with torch.no_grad():
        model.blocks[1].attn.qkv_proj.weight.add_(1.0)
    assert not torch.equal(model.blocks[1].attn.qkv_proj.weight, model.blocks[0].attn.qkv_proj.weight)


# ------------------------------------------------------------------------------------------------ optimizer state


@pytest.mark.parametrize("mode", ["copy", "reset"])
def test_optimizer_state_of_new_layers_is_copied_or_reset(mode: str) -> None:
    model = tiny_model(1)
    optimizer = build_adamw(model, 1e-3, 0.1)
    inputs = torch.randint(0, VOCAB, (2, SEQ + 1))
    causal_lm_loss(model, (inputs[:, :-1], inputs[:, 1:]), 0)[0].backward()
    optimizer.step()
    old_params = list(model.parameters())
    sources = grow_model(model, Stacking(), block_size=1)
    new = rebuild_optimizer(optimizer, grown_optimizer(optimizer, model, sources), sources, mode)
    for param in old_params:  # untouched parameters keep their very state
        assert new.state[param] is optimizer.state[param]
    for copy, source in sources.items():
        if mode == "reset":
            assert copy not in new.state
        else:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(new.state[copy][key], optimizer.state[source][key])
                assert new.state[copy][key] is not optimizer.state[source][key]
    assert sum(len(g["params"]) for g in new.param_groups) == len(list(model.parameters()))


def test_the_grown_optimizer_has_the_groups_a_fresh_one_would_and_leaves_frozen_copies_out() -> None:
    model = tiny_model(1)
    model.blocks[0].mlp_norm.weight.requires_grad_(False)
    optimizer = build_adamw(model, 1e-3, 0.1)
    sources = grow_model(model, Midas(), block_size=1)
    grown = grown_optimizer(optimizer, model, sources)
    fresh = decay_groups(model, 0.1)  # names and parameters in the model's order, frozen ones left out
    assert [group["names"] for group in grown.param_groups] == [group["names"] for group in fresh]
    assert "blocks.1.mlp_norm.weight" not in {name for group in grown.param_groups for name in group["names"]}


# ------------------------------------------------------------------------------------------------ Hugging Face


def test_growth_works_on_a_hugging_face_llama_and_keeps_its_kv_cache_right() -> None:
    model = tiny_llama(2).eval()
    grow_model(model, Midas(), block_size=1)  # [L0, L0', L1]
    layers = model.model.layers
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    for copy, original in zip(layers[1].parameters(), layers[0].parameters(), strict=True):
        assert torch.equal(copy, original) and copy.data_ptr() != original.data_ptr()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ in the trainer


def batches(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(1000 + index))
    return tokens[:, :-1], tokens[:, 1:]


class DepthLog(Callback):
    def __init__(self) -> None:
        self.depths: list[int] = []

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.depths.append(len(trainer.model.blocks))


def growth_trainer(run_dir, seed: int = 0, extra=(), make_optimizer=None, optimizer_state: str = "copy",
                   model: str = "effml") -> Trainer:
    """MIDAS in 3 stages of 1 layer over the trainer's 12 steps, Prop-1: stage lengths 2, 4, 6 (growth before steps 2
    and 6), on one of `MODELS`; ``make_optimizer(model)`` gives the trainer its optimizer (None: the trainer's
    AdamW)."""
    config = TrainConfig(steps=12, lr=3e-3, warmup_steps=2, checkpoint_every=0, eval_every=0, log_every=1)
    growth = GrowthCallback("midas", n_stages=3, block_size=1, alpha=1.0, optimizer_state=optimizer_state)
    build, loss_fn = MODELS[model]
    network = build(1, seed)
    return Trainer(network, loss_fn, batches, config, callbacks=[growth, *extra], run_dir=run_dir, quiet=True,
                   optimizer=make_optimizer(network) if make_optimizer else None)


def test_the_trainer_grows_at_the_stage_boundaries_and_the_lr_schedule_continues() -> None:
    depth = DepthLog()
    trainer = growth_trainer(None, extra=[depth])
    result = trainer.fit()
    assert depth.depths == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    schedule = WarmupCosine(12, 2, 0.1)
    assert [lr for _, lr in result.curves["lr"]] == pytest.approx([3e-3 * schedule(s) for s in range(12)])
    assert all(math.isfinite(loss) for _, loss in result.curves["train_loss"])


def sgd_with_momentum(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)


def adamw_with_a_faster_stack(model: nn.Module) -> torch.optim.Optimizer:
    """Non-default lr, betas and weight decay, and the layer stack in a group of its own at twice the lr."""
    stack = list(layer_stack(model).parameters())
    rest = [param for param in model.parameters() if all(param is not p for p in stack)]
    return torch.optim.AdamW([{"params": rest}, {"params": stack, "lr": 2e-5}], lr=1e-5, betas=(0.8, 0.99),
                             weight_decay=0.0)


def adamw_over_named_parameters(model: nn.Module) -> torch.optim.Optimizer:
    """torch's named param groups: the group lists its parameters' names under "param_names", in their order."""
    return torch.optim.AdamW(model.named_parameters(), lr=1e-3)


def group_settings(group: dict) -> dict:
    """A param group's hyper-parameters, less its parameters and its scheduled lr (the trainer's base_lr stays)."""
    return {key: value for key, value in group.items() if key not in ("params", "names", "param_names", "lr")}


class OptimizerAtStep(Callback):
    """Placed after the growth callback: at the start of ``step`` (after any growth, before the step changes the
    state) records the optimizer and, for each parameter of the first two layers, its group's index and a clone of
    its state."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if step != self.step:
            return
        self.optimizer = optimizer = trainer.optimizer
        group_of = {param: index for index, group in enumerate(optimizer.param_groups) for param in group["params"]}
        self.groups, self.states = [], []
        for layer in layer_stack(trainer.model)[:2]:
            self.groups.append([group_of[param] for param in layer.parameters()])
            self.states.append([{key: value.clone() for key, value in optimizer.state.get(param, {}).items()}
                                for param in layer.parameters()])


@pytest.mark.parametrize("mode", ["copy", "reset"])
@pytest.mark.parametrize("make_optimizer", [sgd_with_momentum, adamw_with_a_faster_stack])
def test_growth_keeps_the_users_optimizer_its_settings_and_the_sources_state(make_optimizer, mode: str) -> None:
    at_growth = OptimizerAtStep(2)  # the first growth: [L0] → [L0, L0'] (MIDAS, b = 1)
    trainer = growth_trainer(None, extra=[at_growth], make_optimizer=make_optimizer, optimizer_state=mode)
    users = trainer.optimizer
    settings = [group_settings(group) for group in users.param_groups]
    result = trainer.fit()  # two growths, and every step after them
    assert at_growth.optimizer is not users and type(at_growth.optimizer) is type(trainer.optimizer) is type(users)
    assert [group_settings(group) for group in trainer.optimizer.param_groups] == settings
    (source_groups, copy_groups), (source_states, copy_states) = at_growth.groups, at_growth.states
    assert copy_groups == source_groups
    for source_state, copy_state in zip(source_states, copy_states, strict=True):
        assert source_state  # the source has stepped twice
        if mode == "reset":
            assert copy_state == {}
        else:
            assert copy_state.keys() == source_state.keys()
            assert all(torch.equal(copy_state[key], source_state[key]) for key in source_state)
    schedule = WarmupCosine(12, 2, 0.1)  # the trainer's lr per step, on each group's own base_lr
    assert [lr for _, lr in result.curves["lr"]] == pytest.approx([settings[0]["base_lr"] * schedule(s)
                                                                  for s in range(12)])
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["base_lr"] * schedule(11))


def test_an_optimizer_over_named_parameters_keeps_their_names_through_growth_and_a_state_dict_round_trip() -> None:
    trainer = growth_trainer(None, make_optimizer=adamw_over_named_parameters)
    trainer.fit()  # two growths: [L0] → [L0, L0'] → [L0, L0'', L0', ...] (MIDAS, b = 1)
    named = list(trainer.model.named_parameters())
    (group,) = trainer.optimizer.param_groups
    assert group["param_names"] == [name for name, _ in named]
    assert len(group["params"]) == len(named) and all(a is b for a, (_, b) in zip(group["params"], named, strict=True))
    saved = trainer.optimizer.state_dict()
    assert saved["param_groups"][0]["param_names"] == group["param_names"]
    reloaded = adamw_over_named_parameters(trainer.model)  # as a user rebuilds it over the grown model
    reloaded.load_state_dict(saved)
    for name, param in named:
        state = trainer.optimizer.state[param]
        assert state.keys() == reloaded.state[param].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        assert all(torch.equal(reloaded.state[param][key], value) for key, value in state.items()), name


@pytest.mark.parametrize("model, make_optimizer", [
    ("effml", None), ("llama", None),  # the trainer's AdamW
    ("effml", sgd_with_momentum), ("effml", adamw_over_named_parameters),  # a user's optimizer
], ids=["effml-adamw", "llama-adamw", "effml-sgd-momentum", "effml-named-adamw"])
@pytest.mark.parametrize("interrupt_after", [2, 4])  # checkpoints mid-stage (step 4) or at the boundary (step 6)
def test_resume_mid_stage_and_across_a_boundary_is_bit_identical(tmp_path, interrupt_after: int, model: str,
                                                                 make_optimizer, interrupt_at) -> None:
    straight = growth_trainer(tmp_path / "straight", model=model, make_optimizer=make_optimizer)
    reference = straight.fit()

    split = growth_trainer(tmp_path / "split", extra=[interrupt_at(interrupt_after)], model=model,
                           make_optimizer=make_optimizer)
    with pytest.raises(TrainingInterrupted) as stop:
        split.fit()
    assert stop.value.step == interrupt_after + 2  # the signal is honoured after the next step
    assert len(layer_stack(split.model)) == 2  # stage 2; at step 6 the checkpoint precedes the growth into stage 3

    resumed = growth_trainer(tmp_path / "split", seed=123, model=model, make_optimizer=make_optimizer)
    resumed.resume = True
    result = resumed.fit()
    assert result.curves["train_loss"] == reference.curves["train_loss"]
    assert len(layer_stack(resumed.model)) == 3
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved_a, saved_b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert saved_a["param_groups"] == saved_b["param_groups"]  # settings, parameter order and any param_names
    assert saved_a["state"].keys() == saved_b["state"].keys()
    for index, state in saved_a["state"].items():
        assert state.keys() == saved_b["state"][index].keys()  # e.g. SGD's momentum_buffer, AdamW's moments
        assert all(torch.equal(value, saved_b["state"][index][key]) for key, value in state.items()), index
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train_loss" in r] == list(range(12))


def test_resume_refuses_a_checkpoint_of_another_growth_schedule(tmp_path) -> None:
    growth_trainer(tmp_path).fit()
    other = Trainer(tiny_model(1), causal_lm_loss, batches, TrainConfig(steps=12, lr=3e-3, warmup_steps=2),
                    callbacks=[GrowthCallback("stacking", 3, 1, 1.0, 12)], run_dir=tmp_path, quiet=True, resume=True)
    with pytest.raises(ValueError, match="midas run"):
        other.fit()


def test_total_steps_defaults_to_the_trainers_steps() -> None:
    growth = GrowthCallback("midas", n_stages=3, block_size=1, alpha=1.0)
    with pytest.raises(RuntimeError, match="once training starts"):
        growth.stage_at(0)
    Trainer(tiny_model(1), causal_lm_loss, batches, TrainConfig(steps=12, lr=1e-3, warmup_steps=0),
            callbacks=[growth], quiet=True).fit()
    assert growth.stage_lengths == [2, 4, 6] and growth.growths == 2
    with pytest.raises(ValueError, match="alpha"):
        GrowthCallback("midas", n_stages=3, block_size=1, alpha=-1.0)  # checked at once, not at the first step
    with pytest.raises(ValueError, match="n_stages"):
        GrowthCallback("midas", n_stages=0, block_size=1, alpha=1.0)


def test_too_few_trainer_steps_for_the_stages_names_the_trainers_steps() -> None:
    trainer = Trainer(tiny_model(1), causal_lm_loss, batches, TrainConfig(steps=3, lr=1e-3, warmup_steps=0),
                      callbacks=[GrowthCallback("midas", n_stages=4, block_size=1, alpha=1.0)], quiet=True)
    with pytest.raises(ValueError, match=r"TrainConfig.steps=3 into n_stages=4 .* at least 4") as error:
        trainer.fit()
    assert "total_steps" not in str(error.value)  # the user never set it
    assert trainer.step == 0 and len(trainer.model.blocks) == 1


@pytest.mark.parametrize("total_steps, outcome", [
    (40, "would end in stage 2 of 4, at 2 of 4 layers"),  # stages 4, 8, 12, 16: 10 steps reach stage 2
    (6, "the last stage would get 4 steps beyond"),
])
def test_total_steps_other_than_the_trainers_steps_is_refused(total_steps: int, outcome: str) -> None:
    trainer = Trainer(tiny_model(1), causal_lm_loss, batches, TrainConfig(steps=10, lr=1e-3, warmup_steps=0),
                      callbacks=[GrowthCallback("midas", 4, 1, 1.0, total_steps=total_steps)], quiet=True)
    with pytest.raises(ValueError, match=f"{outcome}.*set it to 10"):
        trainer.fit()
    assert trainer.step == 0 and len(trainer.model.blocks) == 1


def test_growth_callback_rejects_a_model_of_the_wrong_depth(tmp_path) -> None:
    trainer = Trainer(tiny_model(2), causal_lm_loss, batches, TrainConfig(steps=4, lr=1e-3, warmup_steps=0),
                      callbacks=[GrowthCallback("midas", 2, 1, 1.0, 4)], quiet=True)
    with pytest.raises(ValueError, match="block_size layers"):
        trainer.fit()


# ------------------------------------------------------------------------------------------------ similarity


def test_layer_and_loop_similarity() -> None:
    model = tiny_model(1)
    grow_model(model, Midas(), 1)
    grow_model(model, Midas(), 1)
    assert loop_similarity(model, 1) == pytest.approx(1.0)  # three identical layers: a looped model
    independent = tiny_model(4, seed=1)
    similarity = layer_similarity(independent)
    assert similarity.shape == (4, 4)
    torch.testing.assert_close(similarity, similarity.T)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(4))
    a, b = ([p.detach().flatten() for p in block.parameters() if p.ndim >= 2] for block in independent.blocks[:2])
    a, b = torch.cat(a), torch.cat(b)
    assert similarity[0, 1].item() == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-6)
    blocks = [torch.cat([p.detach().flatten() for layer in independent.blocks[i:i + 2]
                         for p in layer.parameters() if p.ndim >= 2]) for i in (0, 2)]
    expected = float(blocks[0] @ blocks[1] / (blocks[0].norm() * blocks[1].norm()))
    assert loop_similarity(independent, 2) == pytest.approx(expected, abs=1e-6)
    assert abs(expected) < 0.2  # independently initialised blocks are far from looped


def test_core_similarity_is_the_mean_over_interior_block_pairs() -> None:
    model = tiny_model(6, seed=2)
    full = block_similarity(model, 1)
    interior = [(i, j) for i in range(1, 5) for j in range(1, 5) if i != j]
    assert core_similarity(model, 1) == pytest.approx(sum(float(full[i, j]) for i, j in interior) / 12, abs=1e-6)
    with torch.no_grad():  # make the interior a looped core: blocks 1..4 all copies of block 1
        for index in (2, 3, 4):
            for target, source in zip(model.blocks[index].parameters(), model.blocks[1].parameters(), strict=True):
                target.copy_(source)
    assert core_similarity(model, 1) == pytest.approx(1.0)
    assert loop_similarity(model, 1) < 0.8  # the first and last blocks still differ
    with pytest.raises(ValueError, match="at least 4 blocks"):
        core_similarity(tiny_model(3), 1)


def split_generations(operator, n_blocks: int) -> tuple[list[int], list[list[int]]]:
    """Grow 1 → n_blocks blocks (b = 1) and return the final order of the blocks (by creation) and, for every pair
    of positions, the growth at which their lines of copies split (their most recent common copy)."""
    order, split = [0], {}
    for growth in range(1, n_blocks):
        (insert_at, copy_from), = operator.moves(growth, 1)
        source = order[copy_from]
        for other in order:
            split[frozenset((other, growth))] = growth if other == source else split[frozenset((other, source))]
        order.insert(insert_at, growth)
    return order, [[split[frozenset((a, b))] if a != b else 0 for b in order] for a in order]


def test_stacking_and_midas_have_the_same_family_tree_up_to_positions() -> None:
    """Why the position-blind loop similarity cannot separate them structurally: the same multiset of split
    growths over all pairs (and over adjacent pairs); only which positions hold the recent copies differs."""
    for n_blocks in range(2, 9):
        (stack_order, stack), (midas_order, midas) = (split_generations(op, n_blocks) for op in (Stacking(), Midas()))
        pairs = [(i, j) for i in range(n_blocks) for j in range(i + 1, n_blocks)]
        assert sorted(stack[i][j] for i, j in pairs) == sorted(midas[i][j] for i, j in pairs)
        assert sorted(stack[i][i + 1] for i in range(n_blocks - 1)) == sorted(midas[i][i + 1]
                                                                             for i in range(n_blocks - 1))
        if n_blocks >= 4:  # the interior: MIDAS keeps the recent copies there, stacking piles them at the top
            interior = [(i, j) for i, j in pairs if 0 < i and j < n_blocks - 1]
            assert sum(midas[i][j] for i, j in interior) > sum(stack[i][j] for i, j in interior)
    assert stack_order == list(range(8)) and midas_order == [0, 2, 4, 6, 7, 5, 3, 1]
