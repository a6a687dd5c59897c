"""Every registered recipe: each preset builds a valid config, and its arms, claims and plots are well formed."""

from __future__ import annotations

import dataclasses

import pytest

from effml.config import ConfigError

from effml.experiments import EXPERIMENTS, get_experiment
from effml.experiments.base import PRESETS, Arm, Experiment
from effml.report import check_claim_list

RECIPE_PRESETS = [(name, preset) for name, experiment in sorted(EXPERIMENTS.items())
                  for preset in experiment.presets]


def test_every_recipe_offers_the_three_presets() -> None:
    for name, experiment in EXPERIMENTS.items():
        assert tuple(experiment.presets) == PRESETS, name


@pytest.mark.parametrize(("name", "preset"), RECIPE_PRESETS)
def test_preset_config_is_valid_and_names_unique_arms(name: str, preset: str) -> None:
    experiment = get_experiment(name)
    try:
        config = experiment.preset(preset)
    except ConfigError as error:  # a full preset may need the user's own data, and must then say how to give it
        assert preset == "full" and "--set " in str(error), error
        return
    arms = experiment.arms(config)
    assert len(arms) >= 2 and len({arm.name for arm in arms}) == len(arms)
    assert len(experiment.seeds(config)) >= (1 if preset == "smoke" else 2)
    claim_names = [claim.name for claim in experiment.claims(config)]
    assert claim_names and len(set(claim_names)) == len(claim_names)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_preset_declares_a_valid_claim_list(name: str) -> None:
    """Unique claim names and premises declared first (checked again by the runner before it trains)."""
    experiment = EXPERIMENTS[name]
    for preset in experiment.presets:
        check_claim_list(experiment.claims(experiment.preset(preset)))


def test_lm_scaling_names_a_size_given_twice() -> None:
    """Two spellings of one size were refused only as 'not in increasing size', which hid the repeat."""
    config = get_experiment("lm-scaling").preset("smoke")
    with pytest.raises(ConfigError, match=r"sizes = .* lists '48x2' and '048x2', which are the same \(\(48, 2\)\)"):
        dataclasses.replace(config, sizes=("48x2", "048x2", "96x3"))


@dataclasses.dataclass(frozen=True)
class _TwinConfig:
    seed: int = 0
    seeds: int = 1


class _Twins(Experiment):
    """A recipe whose two arms share a name, as a config repeating a list entry could make."""

    name, description, presets = "twins", "two arms of one name", {"smoke": _TwinConfig}

    def arms(self, config: _TwinConfig) -> list[Arm]:
        return [Arm("same", "first"), Arm("same", "second")]

    def run_arm(self, config, arm, context):
        raise AssertionError("nothing may run")

    def claims(self, config: _TwinConfig) -> list:
        return []


def test_arms_sharing_a_name_are_refused_before_anything_is_written(tmp_path, monkeypatch) -> None:
    from effml.experiments.runner import RunError, run_experiment

    monkeypatch.setitem(EXPERIMENTS, "twins", _Twins())
    with pytest.raises(RunError, match="several arms the name\\(s\\) same"):
        run_experiment("twins", preset="smoke", out=tmp_path)
    assert not any(tmp_path.iterdir())
