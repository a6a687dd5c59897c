"""`effml bench salt` (quick shapes): its result document, its ratios and the FLOPs model's prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effml.benchmarks import run_benchmark
from effml.benchmarks.salt import QUICK, _model


@pytest.fixture(scope="module")
def quick_salt(tmp_path_factory) -> Path:
    return run_benchmark("salt", quick=True, out=tmp_path_factory.mktemp("bench")).parent


def test_quick_salt_times_every_contender_and_forms_the_ratios_from_its_numbers(quick_salt: Path) -> None:
    result = json.loads((quick_salt / "result.json").read_text())
    (key,) = result["pairs"]
    times = result["pairs"][key]["time"]
    assert set(times) == {"plain", "distill", "score"}
    for numbers in times.values():
        assert len(numbers["samples_s"]) == QUICK.repeats and numbers["median_s"] > 0
    for name in ("distill", "score"):
        entry = result["ratios"][f"{name}_vs_plain_{key}"]
        assert entry["value"] == times[name]["median_s"] / times["plain"]["median_s"]
        assert entry["per_round"]["rounds"] == QUICK.repeats
    assert "distill ÷ plain" in (quick_salt / "result.md").read_text()


def test_the_predicted_ratio_adds_the_teachers_forward_pass_to_the_students_step(quick_salt: Path) -> None:
    """1 + F_teacher / (3 F_student), from each model's training FLOPs per token at the benchmark's context."""
    result = json.loads((quick_salt / "result.json").read_text())
    (section,) = result["pairs"].values()
    teacher, student = (_model(QUICK, section[role], seed=0).flops_per_token(QUICK.context)
                        for role in ("teacher", "student"))
    assert section["predicted_distill_ratio"] == pytest.approx(1 + teacher / (3 * student), rel=1e-12)
    assert 1.0 < section["predicted_distill_ratio"] < 4.0 / 3.0  # a smaller teacher costs less than a student pass
