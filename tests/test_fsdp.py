"""Sharded data parallelism (train.data_parallel="fsdp"): under torchrun (2 CPU processes, gloo) each rank holds half
of the model, the optimisation is DDP's, a resumed run continues exactly, and checkpoints are the full model, which
one process can load; recipes that cannot train a sharded model refuse it before writing anything."""

from __future__ import annotations

import json

import pytest
import torch

from effml.cli import main
from effml.train import TrainConfig, load_checkpoint

SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from effml.nn import TransformerConfig, TransformerLM
from effml.train import Callback, TrainConfig, Trainer
from effml.train.distributed import init_distributed
from effml.train.growth import GrowthCallback
from effml.train.lm import causal_lm_loss

world = init_distributed("cpu")
out = sys.argv[1]


class CrashAfter(Callback):
    def on_step_end(self, trainer, step, metrics):
        if step == 4:  # both ranks stop together, after the checkpoint of step 3
            raise KeyboardInterrupt


def batch(index):
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(2 * index + world.rank))
    return tokens[:, :-1], tokens[:, 1:]


def run(name, data_parallel, resume=False, callbacks=(), compile=""):
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8))
    full = sum(p.numel() for p in model.parameters())
    config = TrainConfig(steps=6, lr=1e-2, warmup_steps=1, grad_accum=2, grad_clip=0.5, checkpoint_every=3,
                         log_every=1, data_parallel=data_parallel, compile=compile)
    trainer = Trainer(model, causal_lm_loss, batch, config, run_dir=f"{out}/{name}", resume=resume, quiet=True,
                      callbacks=callbacks)
    local = sum(getattr(p, "to_local", lambda: p)().numel() for p in trainer.model.parameters())
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        return None
    weights = {key: t.tolist() for key, t in trainer.model.state_dict().items()} if data_parallel == "ddp" else {}
    return {"losses": result.curves["train_loss"], "grad_norms": result.curves["grad_norm"], "local": local,
            "full": full, "weights": weights}


report = {"ddp": run("ddp", "ddp"), "fsdp": run("fsdp", "fsdp"),
          "fsdp_compiled": run("fsdp-compiled", "fsdp", compile="aot_eager")}
run("split", "fsdp", callbacks=[CrashAfter()])
report["resumed"] = run("split", "fsdp", resume=True)
report["ddp_from_fsdp"] = run("split", "ddp", resume=True)  # the finished run, loaded into a replicated model
try:
    run("grown", "fsdp", callbacks=[GrowthCallback("midas", n_stages=2, block_size=1, alpha=1.0, total_steps=6)])
except ValueError as error:
    report["growth_error"] = str(error)
try:
    model = TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8))
    foreign = torch.nn.Parameter(torch.zeros(3))
    Trainer(model, causal_lm_loss, batch, TrainConfig(steps=1, warmup_steps=0, data_parallel="fsdp"),
            optimizer=torch.optim.SGD([*model.parameters(), foreign], lr=0.1), quiet=True)
except RuntimeError as error:
    report["foreign_error"] = str(error)
with open(f"{out}/rank{world.rank}.json", "w") as handle:
    json.dump(report, handle)
"""


@pytest.mark.slow
def test_fsdp_shards_the_model_trains_as_ddp_compiled_or_not_and_resumes_exactly(tmp_path, torchrun) -> None:
    torchrun(str(tmp_path), script=SCRIPT)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    for rank in ranks:
        ddp, fsdp = rank["ddp"], rank["fsdp"]
        assert ddp["local"] == ddp["full"]  # DDP: every rank holds the whole model
        assert fsdp["local"] < 0.6 * fsdp["full"]  # FSDP: about half of it (dim-0 shards, padded)
        # Same data and the mean gradient over ranks: DDP's optimisation, up to the order of float sums.
        for (step_a, loss_a), (step_b, loss_b) in zip(ddp["losses"], fsdp["losses"], strict=True):
            assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-5)
        for (_, norm_a), (_, norm_b) in zip(ddp["grad_norms"], fsdp["grad_norms"], strict=True):
            assert norm_b == pytest.approx(norm_a, rel=1e-5)
        for (_, loss_a), (_, loss_b) in zip(fsdp["losses"], rank["fsdp_compiled"]["losses"], strict=True):
            assert loss_b == pytest.approx(loss_a, rel=1e-5)  # torch.compile of the sharded model
        assert [step for step, _ in rank["resumed"]["losses"]] == list(range(6))
        assert rank["resumed"]["losses"] == fsdp["losses"]  # steps 3-5 continued from the checkpoint exactly
        assert "GrowthCallback replaces it" in rank["growth_error"]
        assert "holds 1 tensor(s) that are not parameters of the model" in rank["foreign_error"]

    # Checkpoints hold the full model (names as in the plain module), so one process can load them; the resumed
    # run ends where the uninterrupted one does, to the bit.
    final = {name: load_checkpoint(tmp_path / name / "checkpoints") for name in ("ddp", "fsdp", "split")}
    assert final["split"].step == final["fsdp"].step == 6
    assert set(final["fsdp"].model) == set(final["ddp"].model)
    aliases = {name: json.loads((tmp_path / name / "checkpoints" / "step-00000006" / "state.json").read_text())
               ["aliases"] for name in ("ddp", "fsdp")}
    assert aliases["fsdp"] == aliases["ddp"] == {"lm_head.weight": "tok_emb.weight"}  # the tied head stored once
    for name, tensor in final["fsdp"].model.items():
        assert torch.equal(final["split"].model[name], tensor), name
        for rank in ranks:  # and DDP resumed it on every rank
            assert torch.equal(torch.tensor(rank["ddp_from_fsdp"]["weights"][name]), tensor), name
        assert torch.allclose(final["ddp"].model[name], tensor, rtol=1e-4, atol=1e-6), name
    assert final["fsdp"].optimizer["param_groups"] == final["ddp"].optimizer["param_groups"]
    for index, state in final["fsdp"].optimizer["state"].items():
        assert torch.allclose(final["ddp"].optimizer["state"][index]["exp_avg_sq"], state["exp_avg_sq"],
                              rtol=1e-3, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "settings", "counts"), [
    ("lm-scaling", ["sizes=32x1,64x1", "eval_windows=24"], ["non_embedding_params"]),  # 24 windows, 3 batches of 8:
    # rank 1 evaluates one batch fewer and runs a spare forward
    ("laurel", ["variants=rw,rw+lr,rw+lr+pa", "pa_map=low-rank"], ["extra_params"]),  # scalar α, β shards too
    ("salt", [], []),  # students load the sharded teacher's full checkpoint; SALT_DS gathers the teacher's scores
])
def test_a_recipe_trains_a_sharded_model_as_one_process_does(tmp_path, torchrun, recipe, settings, counts) -> None:
    args = ["run", recipe, "--preset", "smoke", "--quiet", "--seeds", "1"]
    for setting in settings:
        args += ["--set", setting]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun("-m", "effml", *args, "--set", "train.data_parallel=fsdp", "--out", str(tmp_path / "fsdp"))
    one, fsdp = (json.loads(next((tmp_path / out / recipe).iterdir()).joinpath("results.json").read_text())
                 for out in ("one", "fsdp"))
    assert fsdp["status"] == "complete" and fsdp["environment"]["world_size"] == 2
    for arm in one["arms"]:
        a, b = one["arms"][arm]["runs"]["0"], fsdp["arms"][arm]["runs"]["0"]
        for (step_a, loss_a), (step_b, loss_b) in zip(a["curves"]["train_loss"], b["curves"]["train_loss"],
                                                      strict=True):
            assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-4)
        for metric in ("valid_loss", "test_loss"):
            assert b["metrics"][metric] == pytest.approx(a["metrics"][metric], rel=1e-4)
        for count in counts:
            assert b["metrics"][count] == a["metrics"][count]


def test_recipes_that_cannot_shard_refuse_fsdp_before_writing(tmp_path, capsys) -> None:
    code = main(["run", "midas", "--preset", "smoke", "--quiet", "--set", "train.data_parallel=fsdp",
                 "--out", str(tmp_path)])
    assert code == 2
    message = capsys.readouterr().err
    assert "midas cannot train a sharded model" in message and "laurel, lm-scaling" in message
    assert not any(tmp_path.iterdir())


def test_an_unknown_data_parallel_strategy_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"train.data_parallel = 'zero' is not allowed: choose one of 'ddp', 'fsdp'"):
        TrainConfig(data_parallel="zero")


def test_shard_units_are_the_layer_stacks_elements_innermost_first_then_the_model() -> None:
    from effml.nn import TransformerConfig, TransformerLM
    from effml.train.parallelism import shard_units

    lm = TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, max_seq_len=8))
    assert shard_units(lm) == [*lm.blocks, lm]

    shared, inner = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    outer = torch.nn.Sequential(torch.nn.ModuleList([inner]), torch.nn.ReLU())
    model = torch.nn.Sequential(torch.nn.ModuleList([shared, shared, outer, torch.nn.ReLU()]))
    units = shard_units(model)
    assert units == [inner, shared, outer, model]  # a shared layer once; no unit without parameters
