"""The `mimetic` recipe: the smoke preset end to end through the CLI, the derived largest-solved length, the masked
loss, and config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effml.cli import main
from effml.config import ConfigError
from effml.data.tasks import Copying
from effml.experiments.mimetic import INITS, Mimetic, MimeticConfig, masked_token_loss


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "mimetic", "--preset", "smoke", "--quiet", "--out", str(out)]) == 0
    (run_dir,) = (out / "mimetic").iterdir()
    return run_dir


def test_smoke_run_completes_with_computed_verdicts(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["status"] == "complete"
    assert set(results["arms"]) == {"copying-4-default", "copying-4-mimetic", "mqar-2-default", "mqar-2-mimetic"}
    for arm in results["arms"].values():
        assert set(arm["runs"]) == {"0", "1"}
        for run in arm["runs"].values():
            assert 0.0 <= run["metrics"]["token_accuracy"] <= 1.0 and run["curves"]["train_loss"]
    for task in ("copying", "mqar"):
        for init in ("default", "mimetic"):
            derived = results["derived"][f"{task}-largest-solved-{init}"]["runs"]
            assert set(derived) == {"0", "1"}
    report = (smoke_run / "report.md").read_text()
    for claim in ("copying: mimetic solves 4", "copying: default fails 4", "mqar: mimetic solves longer"):
        assert claim in report
    assert list(smoke_run.glob("*.png"))


def test_largest_solved_is_the_longest_length_reaching_the_threshold() -> None:
    recipe = Mimetic()
    config = MimeticConfig(copy_lengths=(4, 8, 16), tasks=("copying",), inits=("default", "mimetic"), seeds=1)
    accuracy = {("default", 4): 0.99, ("default", 8): 0.5, ("default", 16): 0.97,   # not monotone on purpose
                ("mimetic", 4): 0.2, ("mimetic", 8): 0.3, ("mimetic", 16): 0.1}
    results = {"arms": {recipe.arm_name("copying", n, init): {"runs": {"0": {"status": "complete", "metrics": {
        "token_accuracy": value}}}} for (init, n), value in accuracy.items()}}
    derived = recipe.derive(config, results)
    assert derived["copying-largest-solved-default"]["runs"]["0"]["metrics"]["largest_solved"] == 16.0
    assert derived["copying-largest-solved-mimetic"]["runs"]["0"]["metrics"]["largest_solved"] == 0.0
    del results["arms"]["copying-8-mimetic"]                    # an unmeasured length: no value for that seed
    assert recipe.derive(config, results)["copying-largest-solved-mimetic"]["runs"] == {}


@pytest.mark.parametrize("ablation_lengths", ["longest", "all"])
def test_ablations_train_at_the_claim_length_unless_asked_for_every_length(ablation_lengths) -> None:
    recipe = Mimetic()
    config = MimeticConfig(copy_lengths=(4, 8), mqar_pairs=(1, 2), mqar_keys=4, ablation_lengths=ablation_lengths)
    names = [arm.name for arm in recipe.arms(config)]
    assert len(names) == len(set(names))
    expected = set()
    for task, lengths in (("copying", (4, 8)), ("mqar", (1, 2))):
        ablated = lengths[-1:] if ablation_lengths == "longest" else lengths
        expected |= {recipe.arm_name(task, n, init) for n in lengths for init in ("default", "mimetic")}
        expected |= {recipe.arm_name(task, n, init) for n in ablated for init in ("state-only", "bc-only")}
    assert set(names) == expected
    # the claim length's main arms run first, then its ablations, before any shorter length
    assert names[:4] == ["copying-8-default", "copying-8-mimetic", "mqar-2-default", "mqar-2-mimetic"]
    assert set(names[4:8]) == {recipe.arm_name(task, n, init) for task, n in (("copying", 8), ("mqar", 2))
                               for init in ("state-only", "bc-only")}
    results = {"arms": {name: {"runs": {"0": {"status": "complete", "metrics": {"token_accuracy": 1.0}}}}
                        for name in names}}
    derived = recipe.derive(config, results)
    swept = INITS if ablation_lengths == "all" else ("default", "mimetic")
    assert set(derived) == {f"{task}-largest-solved-{init}" for task in ("copying", "mqar") for init in swept}
    assert derived["copying-largest-solved-mimetic"]["runs"]["0"]["metrics"]["largest_solved"] == 8.0


def test_masked_loss_counts_only_answer_positions() -> None:
    batch = Copying(length=3, n_symbols=4).sample(2, seed=0)

    class Oracle(torch.nn.Module):
        """Certain of the right answer on answer positions, uniform elsewhere."""

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*inputs.shape, 5)
            logits[batch.loss_mask] = 50.0 * torch.nn.functional.one_hot(batch.targets[batch.loss_mask], 5).float()
            return logits

    loss, metrics = masked_token_loss(Oracle(), batch, 0)
    assert float(loss) < 1e-6 and float(metrics["train_accuracy"]) == 1.0


@pytest.mark.parametrize("overrides, message", [
    ({"mixer": "mamba3"}, "mixer"), ({"tasks": ("copying", "sorting")}, "tasks"),
    ({"inits": ("mimetic", "bc-only")}, "including 'default'"), ({"copy_lengths": (16, 8)}, "increasing"),
    ({"mqar_pairs": (8, 128)}, "mqar_keys"), ({"headdim": 48}, "headdim"),
    ({"ablation_lengths": "some"}, "ablation_lengths"),
])
def test_bad_configs_are_rejected_with_the_field_named(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MimeticConfig(**overrides)
