"""Data-parallel randomness: under torchrun each rank draws its own dropout masks, from the same initial weights, and
a resumed run continues every rank's random stream exactly."""

from __future__ import annotations

import json

DROPOUT_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from effml.train import Callback, TrainConfig, Trainer
from effml.train.distributed import init_distributed

world = init_distributed("cpu")
out = sys.argv[1]


class Masked(torch.nn.Module):
    \"\"\"x (batch, 8) -> (batch, 1) through a dropout mask (batch, 8) that it keeps for the test to read.\"\"\"

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 1)

    def forward(self, x):
        self.mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, self.training)
        return self.linear(x * self.mask)


class CrashAfter(Callback):
    def on_step_end(self, trainer, step, metrics):
        if step == 4:  # both ranks stop together, after the checkpoint of step 3
            raise KeyboardInterrupt


def run(name, resume=False, callbacks=()):
    torch.manual_seed(0)  # every rank alike, as the recipes seed them
    model = Masked()
    initial = [p.tolist() for p in model.parameters()]
    masks = {}

    def loss_fn(model, batch, step):
        output = model(batch)
        masks[step] = getattr(model, "module", model).mask.flatten().tolist()
        return output.square().mean(), {}

    trainer = Trainer(model, loss_fn, lambda index: torch.ones(2, 8), TrainConfig(steps=6, warmup_steps=1,
                      checkpoint_every=3), run_dir=f"{out}/{name}", resume=resume, quiet=True, callbacks=callbacks)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        pass
    return {"initial": initial, "masks": masks, "final": [p.tolist() for p in trainer.model.parameters()]}


straight = run("straight")
run("split", callbacks=[CrashAfter()])
resumed = run("split", resume=True)
with open(f"{out}/rank{world.rank}.json", "w") as handle:
    json.dump({"straight": straight, "resumed": resumed}, handle)
"""


def test_ranks_draw_their_own_dropout_masks_and_resume_continues_each_ranks_stream(tmp_path, torchrun) -> None:
    """Every rank seeds alike to build the same model; it used to keep that shared stream, so both ranks dropped
    the same units of their halves of the batch. Now the masks differ between ranks, the initial weights do not, and
    a run resumed from the step-3 checkpoint draws, on every rank, the masks of the uninterrupted run."""
    torchrun(str(tmp_path), script=DROPOUT_SCRIPT)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    first, second = (rank["straight"] for rank in ranks)
    assert first["initial"] == second["initial"]
    assert first["final"] == second["final"]  # DDP kept the replicas in step
    assert sorted(first["masks"]) == [str(step) for step in range(6)]
    for step, mask in first["masks"].items():
        assert mask != second["masks"][step], f"both ranks drew the same dropout mask at step {step}"

    for rank in ranks:
        assert sorted(rank["resumed"]["masks"]) == ["3", "4", "5"]
        for step, mask in rank["resumed"]["masks"].items():
            assert mask == rank["straight"]["masks"][step], step
        assert rank["resumed"]["final"] == rank["straight"]["final"]
