"""The `mimetic` recipe: the smoke preset end to end through the CLI (two vocabularies per task, more seeds for the
claim arms), the derived largest-solved length (for every init, over the lengths it trained at), the arms of the length
and vocabulary sweeps, the masked loss, the training batches under data parallelism, and config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effml.config import ConfigError
from effml.data.tasks import MQAR, Copying
from effml.experiments.mimetic import INITS, Mimetic, MimeticConfig, masked_token_loss


@pytest.fixture(scope="module")
def smoke_run(run_smoke) -> Path:
    return run_smoke("mimetic")


def test_smoke_run_completes_with_computed_verdicts(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["status"] == "complete"
    sweeps = {("copying", 6): (2, 4), ("copying", 3): (2, 4), ("mqar", 8): (2,), ("mqar", 4): (2,)}
    claim_arms = {"copying-v6-4-default", "copying-v6-4-mimetic", "mqar-v8-2-default", "mqar-v8-2-mimetic"}
    assert set(results["arms"]) == {Mimetic.arm_name(task, vocab, n, init) for (task, vocab), lengths in sweeps.items()
                                    for n in lengths for init in ("default", "mimetic")}
    for name, arm in results["arms"].items():
        seeds = {"0", "1", "2"} if name in claim_arms else {"0", "1"}    # claim_seeds = 3, seeds = 2
        assert set(arm["runs"]) == seeds and arm["seeds"] == sorted(map(int, seeds))
        for run in arm["runs"].values():
            assert 0.0 <= run["metrics"]["token_accuracy"] <= 1.0 and run["curves"]["train_loss"]
    # the vocabulary really changes the task: the copying model's embedding has n_symbols + 1 rows
    assert results["arms"]["copying-v3-4-mimetic"]["params"] < results["arms"]["copying-v6-4-mimetic"]["params"]
    assert set(results["derived"]) == {Mimetic.largest_solved_name(task, vocab, init) for task, vocab in sweeps
                                       for init in ("default", "mimetic")}
    for entry in results["derived"].values():
        assert set(entry["runs"]) == {"0", "1"}                        # the seeds every length has
    report = (smoke_run / "report.md").read_text()
    for claim in ("copying: mimetic solves 4", "copying: default fails 4", "mqar: mimetic solves longer"):
        assert claim in report
    assert "Missing measurements" not in report
    assert "largest length with accuracy ≥ 95%, mimetic init, over the lengths it trained at (2, 4)" in report
    assert "(95% CI, n=3)" in report                                  # the threshold claims use the claim seeds
    for plot in ("copying_2_accuracy_vs_vocabulary", "copying_4_accuracy_vs_vocabulary",
                 "mqar_2_accuracy_vs_vocabulary", "copying_accuracy_curve", "mqar_accuracy_vs_length"):
        assert (smoke_run / f"{plot}.png").is_file()


def test_arms_table_has_one_length_column_and_the_length_plots_read_it_from_the_arms(smoke_run: Path) -> None:
    """The length is the arm's, not a per-seed metric: one ``length`` column in the report's Arms table, and the
    accuracy-vs-length plots place every arm at its own length."""
    from effml.report import MetricPlot

    report = (smoke_run / "report.md").read_text()
    arms_section = report[report.index("## Arms"):]
    header = next(line for line in arms_section.splitlines() if line.startswith("| arm "))
    assert [cell.strip() for cell in header.split("|")].count("length") == 1
    results = json.loads((smoke_run / "results.json").read_text())
    length_plots = [MetricPlot.from_dict(spec) for spec in results["plots"]
                    if spec["kind"] == "metric" and spec["x"] == "length"]
    assert len(length_plots) == 2                                     # one per task
    for plot in length_plots:
        points, missing = plot.points(results)
        assert not missing and points
        assert all(x == results["arms"][arm]["info"]["length"] for arm, x, _, _ in points)


def test_largest_solved_is_the_longest_length_reaching_the_threshold() -> None:
    recipe = Mimetic()
    config = MimeticConfig(copy_lengths=(4, 8, 16), tasks=("copying",), inits=("default", "mimetic"), seeds=1)
    accuracy = {("default", 4): 0.99, ("default", 8): 0.5, ("default", 16): 0.97,   # not monotone on purpose
                ("mimetic", 4): 0.2, ("mimetic", 8): 0.3, ("mimetic", 16): 0.1}
    results = {"arms": {recipe.arm_name("copying", 16, n, init): {"runs": {"0": {"status": "complete", "metrics": {
        "token_accuracy": value}}}} for (init, n), value in accuracy.items()}}
    derived = recipe.derive(config, results)
    assert derived["copying-v16-largest-solved-default"]["runs"]["0"]["metrics"]["largest_solved"] == 16.0
    assert derived["copying-v16-largest-solved-mimetic"]["runs"]["0"]["metrics"]["largest_solved"] == 0.0
    del results["arms"]["copying-v16-8-mimetic"]                # an unmeasured length: no value for that seed
    assert recipe.derive(config, results)["copying-v16-largest-solved-mimetic"]["runs"] == {}


def test_solving_one_length_step_longer_on_every_seed_holds() -> None:
    """"Solves longer" is strict: with lengths (3, 4), mimetic solving 4 and default 3 on every seed holds (a margin of
    one length unit made this exact tie with the margin undecided)."""
    from effml.report import evaluate_claims

    recipe = Mimetic()
    config = MimeticConfig(copy_lengths=(3, 4), tasks=("copying",), inits=("default", "mimetic"), seeds=2)
    accuracy = {("default", 3): 0.99, ("default", 4): 0.2, ("mimetic", 3): 0.99, ("mimetic", 4): 0.99}
    results = {"arms": {recipe.arm_name("copying", 16, n, init): {"runs": {seed: {"status": "complete", "metrics": {
        "token_accuracy": value}} for seed in ("0", "1")}} for (init, n), value in accuracy.items()}}
    results["derived"] = recipe.derive(config, results)
    results["claims"] = [claim.to_dict() for claim in recipe.claims(config)]
    verdicts = {outcome.name: outcome.verdict for outcome in evaluate_claims(results)}
    assert verdicts["copying: mimetic solves longer"] == "holds"


@pytest.mark.parametrize("ablation_lengths", ["longest", "all"])
def test_ablations_train_at_the_claim_length_unless_asked_for_every_length(ablation_lengths) -> None:
    recipe = Mimetic()
    config = MimeticConfig(copy_lengths=(4, 8), mqar_pairs=(1, 2), mqar_keys=4, ablation_lengths=ablation_lengths)
    names = [arm.name for arm in recipe.arms(config)]
    assert len(names) == len(set(names))
    expected = set()
    for task, vocab, lengths in (("copying", 16, (4, 8)), ("mqar", 4, (1, 2))):
        ablated = lengths[-1:] if ablation_lengths == "longest" else lengths
        expected |= {recipe.arm_name(task, vocab, n, init) for n in lengths for init in ("default", "mimetic")}
        expected |= {recipe.arm_name(task, vocab, n, init) for n in ablated for init in ("state-only", "bc-only")}
    assert set(names) == expected
    # the claim length's main arms run first, then its ablations, before any shorter length
    assert names[:4] == ["copying-v16-8-default", "copying-v16-8-mimetic", "mqar-v4-2-default", "mqar-v4-2-mimetic"]
    assert set(names[4:8]) == {recipe.arm_name(task, vocab, n, init) for task, vocab, n in
                               (("copying", 16, 8), ("mqar", 4, 2)) for init in ("state-only", "bc-only")}
    # every init gets its largest length solved, over the lengths it trained at (an ablation: the claim length alone)
    results = {"arms": {name: {"runs": {"0": {"status": "complete", "metrics": {
        "token_accuracy": 0.5 if name == "copying-v16-8-bc-only" else 1.0}}}} for name in names}}
    derived = recipe.derive(config, results)
    assert set(derived) == {recipe.largest_solved_name(task, vocab, init) for task, vocab in
                            (("copying", 16), ("mqar", 4)) for init in INITS}
    largest = {name: entry["runs"]["0"]["metrics"]["largest_solved"] for name, entry in derived.items()}
    assert largest["copying-v16-largest-solved-mimetic"] == largest["copying-v16-largest-solved-state-only"] == 8.0
    assert largest["mqar-v4-largest-solved-bc-only"] == 2.0
    # bc-only fails at the claim length: 0 when it trained there alone, the shorter length when it swept them all
    assert largest["copying-v16-largest-solved-bc-only"] == (0.0 if ablation_lengths == "longest" else 4.0)
    ablated_lengths = "8" if ablation_lengths == "longest" else "4, 8"
    assert derived["copying-v16-largest-solved-bc-only"]["label"].endswith(
        f"bc-only init, over the lengths it trained at ({ablated_lengths})")
    assert derived["copying-v16-largest-solved-mimetic"]["label"].endswith("over the lengths it trained at (4, 8)")


@pytest.mark.parametrize("vocab_lengths", ["longest", "shortest", "all"])
def test_extra_vocabularies_train_the_main_inits_after_the_main_vocabulary(vocab_lengths) -> None:
    recipe = Mimetic()
    config = MimeticConfig(copy_lengths=(4, 8), copy_symbols=16, copy_vocab_sizes=(4, 64), mqar_pairs=(1, 2),
                           mqar_keys=8, mqar_values=32, mqar_vocab_sizes=(2,), vocab_lengths=vocab_lengths,
                           seeds=2, claim_seeds=4)
    arms = recipe.arms(config)
    names = [arm.name for arm in arms]
    extra_vocabularies = (("copying", 4, (4, 8)), ("copying", 64, (4, 8)), ("mqar", 2, (1, 2)))
    swept = {(task, vocab): {"all": lengths, "longest": lengths[-1:], "shortest": lengths[:1]}[vocab_lengths]
             for task, vocab, lengths in extra_vocabularies}
    for (task, vocab), lengths in swept.items():
        assert {name for name in names if name.startswith(f"{task}-v{vocab}-")} == \
            {recipe.arm_name(task, vocab, n, init) for n in lengths for init in ("default", "mimetic")}
    # the main vocabulary's arms (claim length first) before the extra vocabularies
    assert names[:4] == ["copying-v16-8-default", "copying-v16-8-mimetic", "mqar-v8-2-default", "mqar-v8-2-mimetic"]
    main = [name.startswith(("copying-v16-", "mqar-v8-")) for name in names]
    assert main == sorted(main, reverse=True)
    # more seeds for the threshold claims' arms only
    seeds = {arm.name: recipe.arm_seeds(config, arm) for arm in arms}
    assert seeds["copying-v16-8-mimetic"] == seeds["mqar-v8-2-default"] == [0, 1, 2, 3]
    assert seeds["copying-v16-4-mimetic"] == seeds["mqar-v8-2-bc-only"] == [0, 1]
    assert all(seeds[name] == [0, 1] for name in names if "-v64-" in name)
    # the task behind each arm: an extra MQAR vocabulary has as many values as keys, the main one mqar_values
    for arm in arms:
        task = config.build_task(arm.info["task"], arm.info["length"], arm.info["vocab"])
        length, vocab = arm.info["length"], arm.info["vocab"]
        if arm.info["task"] == "copying":
            assert task == Copying(length=length, n_symbols=vocab)
        else:
            assert task == MQAR(n_pairs=length, n_queries=length, n_keys=vocab, n_values=32 if vocab == 8 else vocab)
    results = {"arms": {name: {"runs": {"0": {"status": "complete", "metrics": {"token_accuracy": 0.96}}}}
                        for name in names}}
    derived = recipe.derive(config, results)
    extra = {recipe.largest_solved_name(task, vocab, init) for task, vocab in swept for init in ("default", "mimetic")}
    assert extra <= set(derived)        # the largest of the lengths each extra vocabulary trained at
    assert derived["copying-v64-largest-solved-mimetic"]["runs"]["0"]["metrics"]["largest_solved"] == \
        max(swept[("copying", 64)])
    plotted = {plot.name: plot.arms for plot in recipe.plots(config)}
    for (task, vocab), lengths in swept.items():
        for n in lengths:
            assert recipe.arm_name(task, vocab, n, "mimetic") in plotted[f"{task}_{n}_accuracy_vs_vocabulary"]
    assert set().union(*plotted.values()) <= set(names)                     # every plotted arm is trained
    claims = {claim.name: claim for claim in recipe.claims(config)}
    assert claims["mqar: default fails 2"].arm == "mqar-v8-2-default"       # claims stay at the main vocabulary


def test_every_full_preset_arm_builds_a_model_that_takes_its_tasks_batches() -> None:
    """The GPU preset (never run here): each (task, length, vocabulary, init) arm's model takes a batch of its task,
    whose vocabulary and length the model was sized for, and the loss is finite; no training."""
    recipe = Mimetic()
    config = recipe.preset("full")
    arms = recipe.arms(config)
    assert {(arm.info["task"], arm.info["vocab"]) for arm in arms} == {
        ("copying", 16), ("copying", 64), ("copying", 256), ("mqar", 256), ("mqar", 1024)}
    for arm in arms:
        if arm.info["init"] != "mimetic":   # one init per shape: the model's sizes do not depend on it
            continue
        task = config.build_task(arm.info["task"], arm.info["length"], arm.info["vocab"])
        torch.manual_seed(0)
        model = recipe.build_model(config, arm.info["task"], task.vocab_size, task.seq_len, arm.info["init"])
        batch = task.sample(2, seed=0)
        with torch.no_grad():
            loss, _ = masked_token_loss(model, batch, 0)
        assert batch.inputs.shape[1] <= task.seq_len and bool(torch.isfinite(loss)), arm.name


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


@pytest.mark.parametrize("task_name", ["copying", "mqar"])
def test_training_batches_are_sharded_across_ranks_and_unchanged_in_one_process(task_name,
                                                                                 check_recipe_sharding) -> None:
    """Under torchrun each rank trains on its half of the global batch (not on a copy of the whole of it); one
    process keeps training on exactly the sequences it drew before sharding existed."""
    recipe = Mimetic()
    config = recipe.preset("smoke")  # batch_size 8
    task = config.build_task(task_name, config.claim_length(task_name))
    check_recipe_sharding(lambda task, context: recipe.training_batches(config, task, context), task,
                          config.batch_size, 2, ("inputs", "targets", "loss_mask"))


@pytest.mark.parametrize("overrides, message", [
    ({"mixer": "mamba3"}, "mixer"), ({"tasks": ("copying", "sorting")}, "tasks"),
    ({"inits": ("mimetic", "bc-only")}, "including 'default'"), ({"copy_lengths": (16, 8)}, "increasing"),
    ({"mqar_pairs": (8, 128)}, "mqar_keys"), ({"headdim": 48}, "headdim"),
    ({"ablation_lengths": "some"}, "ablation_lengths"), ({"vocab_lengths": "some"}, "vocab_lengths"),
    ({"copy_vocab_sizes": (16,)}, "must differ from the main one"), ({"copy_vocab_sizes": (1,)}, "at least 2 symbols"),
    ({"inits": ("default", "mimetic", "mimetic")}, "'mimetic' twice"), ({"tasks": ("mqar", "mqar")}, "'mqar' twice"),
    ({"mqar_vocab_sizes": (32, 8)}, "increasing"), ({"mqar_pairs": (8, 16), "mqar_vocab_sizes": (8,)}, "mqar_pairs"),
])
def test_bad_configs_are_rejected_with_the_field_named(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MimeticConfig(**overrides)
