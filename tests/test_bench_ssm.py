"""`effml bench ssm --quick`: it runs effml's Mamba next to mambapy and the transformer, and its numbers agree with
themselves (no timing assertions)."""

from __future__ import annotations

import json
import math

import torch

from effml.benchmarks import run_benchmark
from effml.benchmarks.common import get_path
from effml.benchmarks.ssm import MixerStack


def test_quick_ssm_bench_writes_consistent_results(tmp_path) -> None:
    markdown = run_benchmark("ssm", quick=True, out=tmp_path)
    directory = markdown.parent
    result = json.loads((directory / "result.json").read_text())
    assert result["benchmark"] == "ssm" and result["quick"] is True
    assert (directory / "scaling.png").stat().st_size > 0
    train = result["train"]
    assert {"effml-mamba1", "effml-mamba2"} <= set(train)
    for name, numbers in train.items():
        assert math.isclose(numbers["tokens_per_s"], numbers["work_tokens"] / numbers["median_s"]), name
    if "mambapy" in train:  # same config: the two Mamba-1 stacks have comparable parameter counts
        assert abs(train["effml-mamba1"]["params"] / train["mambapy"]["params"] - 1) < 0.1
        assert "train_ratio_mamba1_vs_mambapy" in result["ratios"]
    for name, entry in result["ratios"].items():
        quotient = get_path(result, entry["numerator"]) / get_path(result, entry["denominator"])
        assert math.isclose(entry["value"], quotient, rel_tol=1e-12), name
    for data in result["scaling"].values():
        assert len(data["local_slopes"]) == len(data["points"]) - 1
    (target,) = result["targets"]
    assert target["status"] in ("met", "not met", "inconclusive", "not measured")
    text = markdown.read_text()
    assert "tokens/s ÷ mambapy's" in text and "local slopes" in text


def test_mixer_stack_is_residual() -> None:
    torch.manual_seed(0)
    stack = MixerStack("mamba1", 8, 2, d_state=4)
    for mixer in stack.mixers:
        torch.nn.init.zeros_(mixer.out_proj.weight)   # every branch outputs 0: the stack is the identity
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(stack(x), x)
