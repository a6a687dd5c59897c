"""Data-parallel training under torchrun: 2 CPU processes (gloo) reproduce the single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effml.cli import main

ARGS = ["run", "lm-scaling", "--preset", "smoke", "--quiet", "--seeds", "1", "--set", "sizes=32x1,64x1"]


def single_and_two_process_results(args: list[str], tmp_path: Path, torchrun) -> tuple[dict, dict]:
    """``effml <args>`` in this process and under ``torchrun --nproc_per_node=2``: both runs' results.json, after
    checking that the two-process run completed and that rank 1 created no run directory of its own."""
    recipe = args[1]
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    assert main([*args, "--out", str(single_out)]) == 0
    stdout = torchrun("-m", "effml", *args, "--out", str(ddp_out))

    run_dirs = list((ddp_out / recipe).iterdir())
    assert len(run_dirs) == 1  # rank 1 created no directory of its own
    assert stdout.count("report: ") == 1  # and printed no second copy of the verdicts
    single = json.loads(next((single_out / recipe).iterdir()).joinpath("results.json").read_text())
    ddp = json.loads(run_dirs[0].joinpath("results.json").read_text())
    assert ddp["environment"]["world_size"] == 2 and ddp["status"] == "complete"
    return single, ddp


def assert_same_training_losses(one: dict, two: dict, rel: float) -> None:
    """Each rank takes half of the same global batch, and DDP averages gradients: the same optimisation as one
    process, up to floating-point summation order."""
    for (step_a, loss_a), (step_b, loss_b) in zip(one["curves"]["train_loss"], two["curves"]["train_loss"],
                                                  strict=True):
        assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=rel)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_and_only_rank_0_writes(tmp_path, torchrun) -> None:
    single, ddp = single_and_two_process_results(ARGS, tmp_path, torchrun)
    for arm in single["arms"]:
        one, two = single["arms"][arm]["runs"]["0"], ddp["arms"][arm]["runs"]["0"]
        assert_same_training_losses(one, two, rel=1e-4)
        assert two["metrics"]["test_bpb"] == pytest.approx(one["metrics"]["test_bpb"], rel=1e-4)


@pytest.mark.slow
def test_a_generated_task_recipe_trains_the_same_on_two_processes(tmp_path, torchrun) -> None:
    """looped-gd draws its prompts itself (not through WindowBatches): under torchrun each rank trains on its half
    of the one-process batch, so the two runs follow the same losses and learn the same preconditioner, and each
    evaluates half of the held-out prompts, giving the one-process errors."""
    args = ["run", "looped-gd", "--preset", "smoke", "--quiet", "--seeds", "1", "--set", "attentions=restricted"]
    single, ddp = single_and_two_process_results(args, tmp_path, torchrun)
    assert set(ddp["arms"]) == set(single["arms"]) == {"n8", "n32"}
    for arm in single["arms"]:
        one, two = single["arms"][arm]["runs"]["0"], ddp["arms"][arm]["runs"]["0"]
        assert_same_training_losses(one, two, rel=1e-4)
        assert two["metrics"]["precond_error"] == pytest.approx(one["metrics"]["precond_error"], rel=1e-3)
        # Held-out prompts are split between the ranks (evaluate_sharded) and their sums combined.
        for metric in ("valid_nmse", "nmse", "rotated_nmse", "gd_mismatch"):
            assert two["metrics"][metric] == pytest.approx(one["metrics"][metric], rel=1e-3), metric


RANK_METRIC_SCRIPT = """
import json, sys, torch
from effml.train import TrainConfig, Trainer
from effml.train.distributed import init_distributed
world = init_distributed("cpu")
model = torch.nn.Linear(2, 1)
def loss_fn(model, batch, step):
    return model(batch).square().mean(), {"rank_metric": float(world.rank)}
result = Trainer(model, loss_fn, lambda index: torch.ones(4, 2), TrainConfig(steps=3, warmup_steps=1, log_every=1),
                 quiet=True).fit()
if world.rank == 0:
    print(json.dumps(result.curves["rank_metric"]))
"""


@pytest.mark.slow
def test_logged_training_metrics_are_means_over_ranks(torchrun) -> None:
    """Each rank's loss function sees its share of the batch; the logged metric is the mean over ranks (it was rank
    0's alone), as the loss is."""
    curve = json.loads(torchrun(script=RANK_METRIC_SCRIPT).strip().splitlines()[-1])
    assert [value for _, value in curve] == [0.5, 0.5, 0.5]


MASKED_LOSS_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from effml.data.batches import shard_batches
from effml.data.tasks.base import TaskBatch
from effml.experiments.midas import answer_loss
from effml.experiments.mimetic import masked_token_loss
from effml.train import TrainConfig, Trainer
from effml.train.distributed import init_distributed

world = init_distributed("cpu")


def global_batch(index):
    tokens = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(index))
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:2, :7] = True  # rank 0's half of the batch has 14 answer tokens, rank 1's half 2
    mask[2:, 7] = True
    return TaskBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask)


report = {}
for name, loss_fn in (("midas", answer_loss), ("mimetic", masked_token_loss)):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    result = Trainer(model, loss_fn, shard_batches(global_batch, world),
                     TrainConfig(steps=4, lr=1e-2, warmup_steps=1, log_every=1), quiet=True).fit()
    report[name] = {"losses": result.curves["train_loss"], "weights": [p.tolist() for p in model.parameters()]}
if world.rank == 0:
    print(json.dumps(report))
"""


@pytest.mark.slow
def test_masked_losses_average_over_every_ranks_answer_tokens(torchrun) -> None:
    """The answer masks leave rank 0 seven times as many tokens as rank 1. DDP averages the ranks' gradients, so
    without weighting each rank's mean by its share of the tokens (`token_share`) rank 1's two tokens counted as
    much as rank 0's fourteen; with it, two processes follow the one-process run on the whole batch."""
    one, two = (json.loads(torchrun(script=MASKED_LOSS_SCRIPT, ranks=ranks).strip().splitlines()[-1])
                for ranks in (1, 2))
    for loss in ("midas", "mimetic"):
        for (step_a, loss_a), (step_b, loss_b) in zip(one[loss]["losses"], two[loss]["losses"], strict=True):
            assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-5)
        for weight_a, weight_b in zip(one[loss]["weights"], two[loss]["weights"], strict=True):
            assert torch.allclose(torch.tensor(weight_b), torch.tensor(weight_a), rtol=1e-5, atol=1e-6)


CLASSIFICATION_SCRIPT = """
import json, numpy as np, torch
from effml.data.images import eval_image_batches
from effml.train.classify import classification_metrics
from effml.train.distributed import init_distributed

world = init_distributed("cpu")
rng = np.random.default_rng(0)
images, labels = rng.integers(0, 256, (37, 28, 28), dtype=np.uint8), rng.integers(0, 10, 37)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
shares = classification_metrics(model, eval_image_batches(images, labels, 8, world.rank, world.world_size), "cpu",
                                world)
whole = classification_metrics(model, eval_image_batches(images, labels, 8), "cpu")
if world.rank == 0:
    print(json.dumps({"shares": shares, "whole": whole}))
"""


@pytest.mark.slow
def test_image_classification_is_evaluated_in_shares_that_add_up_to_the_whole_split(torchrun) -> None:
    """laurel-vision's ranks each score every other evaluation batch (rank 0 three of five, rank 1 two) and add
    their sums: the metrics of the whole split, which every rank used to score in full."""
    result = json.loads(torchrun(script=CLASSIFICATION_SCRIPT).strip().splitlines()[-1])
    assert result["shares"]["accuracy"] == result["whole"]["accuracy"]
    assert result["shares"]["loss"] == pytest.approx(result["whole"]["loss"], rel=1e-12)


@pytest.mark.parametrize(("device", "backend", "cuda_device"), [("cpu", "gloo", None),
                                                                 ("cuda", "cpu:gloo,cuda:nccl", 1)])
def test_ranks_join_a_group_with_a_backend_for_cpu_tensors_on_gpus_too(monkeypatch, device, backend,
                                                                        cuda_device) -> None:
    """On GPUs the trainer still reduces CPU tensors (the per-step loss and stop flag, held-out sums), which a
    NCCL-only group refuses; the group pairs NCCL with gloo. The calls are checked against stand-ins (no GPUs here),
    and torch parses the composite backend into one backend per device type."""
    import atexit

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import BackendConfig

    from effml.train.distributed import init_distributed

    calls: dict = {}
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.update(backend=backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.update(cuda_device=index))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(atexit, "register", lambda function: None)
    world = init_distributed(device)
    assert (world.rank, world.world_size, world.local_rank) == (1, 2, 1)
    assert calls == {"backend": backend, **({"cuda_device": cuda_device} if cuda_device is not None else {})}
    assert set(BackendConfig(backend).get_device_backend_map()) >= {"cpu"}


def test_more_gpu_ranks_than_gpus_is_a_clear_error_before_joining(monkeypatch) -> None:
    import torch.distributed as dist

    from effml.train.distributed import init_distributed

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: pytest.fail("joined a group it cannot use"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"local rank 1 .* 1 GPU\(s\).*--nproc_per_node=1"):
        init_distributed("cuda")
