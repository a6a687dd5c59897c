"""Every registered recipe: each preset builds a valid config, and its arms, claims and plots are well formed."""

from __future__ import annotations

import dataclasses

import pytest

from effml.config import ConfigError

from effml.experiments import EXPERIMENTS, get_experiment
from effml.experiments.base import PRESETS
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
