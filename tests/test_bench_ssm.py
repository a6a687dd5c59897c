"""`effml bench ssm --quick`: it runs effml's Mamba-1 and Mamba-2 next to mambapy and the transformer, and its numbers
agree with themselves (no timing assertions)."""

from __future__ import annotations

import json
import math

import torch

from effml.benchmarks import run_benchmark
from effml.benchmarks.common import get_path
from effml.benchmarks.ssm import MixerStack


def test_quick_ssm_bench_writes_consistent_results(tmp_path, monkeypatch) -> None:
    from matplotlib.axes import Axes

    plotted, real_plot = [], Axes.plot

    def recording_plot(self, *args, **kwargs):
        plotted.append(kwargs.get("label"))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
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
    models = {"effml-transformer", "effml-mamba1", "effml-mamba2"}    # step time vs context: both Mamba mixers
    assert set(result["scaling"]) == models and models <= set(plotted)
    for data in result["scaling"].values():
        assert len(data["local_slopes"]) == len(data["points"]) - 1
        assert [point["context"] for point in data["points"].values()] == result["config"]["scaling_contexts"]
    assert {"step_time_transformer_over_mamba1_longest_context",
            "step_time_transformer_over_mamba2_longest_context"} <= set(result["ratios"])
    (target,) = result["targets"]
    assert target["status"] in ("met", "not met", "inconclusive", "not measured")
    text = markdown.read_text()
    assert "tokens/s ÷ mambapy's" in text and "local slopes" in text and "Transformer ÷ Mamba-1 step time" in text
    assert sum(line.startswith("| effml-mamba1 ") for line in text.splitlines()) == 2   # throughput and scaling


def test_mixer_stack_is_residual() -> None:
    torch.manual_seed(0)
    stack = MixerStack("mamba1", 8, 2, d_state=4)
    for mixer in stack.mixers:
        torch.nn.init.zeros_(mixer.out_proj.weight)   # every branch outputs 0: the stack is the identity
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(stack(x), x)
