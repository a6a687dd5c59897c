"""`effml bench`: the registry and its output files, the `lm` benchmark's --quick run, and the timing helpers."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

import effml.benchmarks as benchmarks
from effml.benchmarks import BENCHMARKS, Benchmark, run_benchmark
from effml.benchmarks.common import format_ratio, get_path, ratio_entry, verdict
from effml.metrics.timing import paired_rate_ratios, paired_time_ratios, round_order, time_interleaved


@pytest.fixture(scope="module")
def quick_lm(tmp_path_factory) -> Path:
    """One `lm --quick` run shared by the tests below (it takes seconds, not minutes)."""
    return run_benchmark("lm", quick=True, out=tmp_path_factory.mktemp("bench"))


def test_quick_lm_writes_json_and_markdown(quick_lm: Path) -> None:
    directory = quick_lm.parent
    assert quick_lm.name == "result.md" and directory.parent.name == "bench-lm"
    result = json.loads((directory / "result.json").read_text())
    assert result["benchmark"] == "lm" and result["quick"] is True
    for contender, numbers in result["train"].items():
        assert numbers["tokens_per_s"] > 0 and numbers["params"] > 0, contender
        assert result["memory"][contender]["peak_bytes"] >= 0
    assert "effml" in result["train"] and result["mfu"]["matmul_peak_flops_per_s"] > 0
    for target in result["targets"]:
        assert target["status"] in ("met", "not met", "inconclusive", "not measured", "n/a (stated for CPU)")
        if target["status"] in ("met", "not met"):
            assert (target["status"] == "met") == (target["value"] >= target["threshold"])
    markdown = quick_lm.read_text()
    machine_at, config_at = markdown.index("## Machine"), markdown.index("## Config")
    assert machine_at < config_at < markdown.index("## Training step")
    for fact in (result["machine"]["cpu"], "torch threads", result["machine"]["torch"], "device"):
        assert fact in markdown


def test_the_contender_table_states_the_head_size_of_the_config_it_ran(quick_lm: Path) -> None:
    from effml.benchmarks.lm import DEFAULT, QUICK, LMBenchConfig, differences

    assert QUICK.head_dim == 16 and DEFAULT.head_dim == 64
    result = json.loads((quick_lm.parent / "result.json").read_text())
    for name in ("effml", "x-transformers"):
        assert "rotary on all 16 head dims" in result["contenders"][name]["differences"].replace("(rotate-half) ", "")
    markdown = quick_lm.read_text()
    assert "all 16 head dims" in markdown and "64 head dims" not in markdown
    assert "rotary on all 64 head dims" in differences(DEFAULT)["x-transformers"]
    with pytest.raises(ValueError, match="n_heads 3 equal heads"):
        LMBenchConfig(d_model=32, n_heads=3)


def test_every_ratio_is_the_quotient_of_the_numbers_it_names(quick_lm: Path) -> None:
    result = json.loads((quick_lm.parent / "result.json").read_text())
    ratios = result["ratios"]
    assert "mfu" in ratios
    if "x-transformers" in result["train"]:
        assert "train_ratio_vs_xtransformers" in ratios and "memory_ratio_vs_xtransformers" in ratios
    if "hf-gpt2" in result["train"]:
        assert "train_ratio_vs_hf_gpt2" in ratios
    for name, entry in ratios.items():
        quotient = get_path(result, entry["numerator"]) / get_path(result, entry["denominator"])
        assert math.isclose(entry["value"], quotient, rel_tol=1e-12), name
    train = result["train"]
    for name, numbers in train.items():  # the absolute numbers themselves are consistent too
        assert math.isclose(numbers["tokens_per_s"], numbers["work_tokens"] / numbers["median_s"]), name
    mfu = result["mfu"]
    assert math.isclose(mfu["achieved_flops_per_s"], mfu["flops_per_token"] * train["effml"]["tokens_per_s"])
    for target in result["targets"]:
        if target["value"] is not None:
            assert target["value"] == ratios[target["ratio"]]["value"]
    for peer, label in (("x-transformers", "xtransformers"), ("hf-gpt2", "hf_gpt2")):
        if peer in train:  # the round-by-round ratios pair the samples of the same round
            rounds = ratios[f"train_ratio_vs_{label}"]["per_round"]
            paired = [p / e for e, p in zip(train["effml"]["samples_s"], train[peer]["samples_s"], strict=True)]
            assert math.isclose(rounds["median"], statistics.median(paired)) and rounds["rounds"] == len(paired)


def _fake_benchmark(calls: list[int]) -> Benchmark:
    def run(quick: bool = False, device: str = "cpu") -> dict:
        calls.append(1)
        result = {"machine": {"cpu": "test-cpu", "device": device}, "config": {"quick": quick},
                  "numbers": {"a": 6.0, "b": 3.0}}
        result["ratios"] = {"a_over_b": ratio_entry(result, ("numbers", "a"), ("numbers", "b"), better="higher")}
        return result

    return Benchmark("fake", "a fake benchmark for tests", run)


def test_a_second_run_makes_a_new_directory_and_never_overwrites(tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setitem(BENCHMARKS, "fake", _fake_benchmark(calls))
    first = run_benchmark("fake", out=tmp_path)
    before = {p: p.read_bytes() for p in first.parent.iterdir()}
    second = run_benchmark("fake", out=tmp_path)
    third = run_benchmark("fake", out=tmp_path)
    assert len({first.parent, second.parent, third.parent}) == 3 and len(calls) == 3
    assert {p: p.read_bytes() for p in first.parent.iterdir()} == before
    for path in (first, second, third):
        assert (path.parent / "result.json").is_file() and path.read_text().startswith("# Benchmark `fake`")
        assert json.loads((path.parent / "result.json").read_text())["ratios"]["a_over_b"]["value"] == 2.0
    assert not list(tmp_path.rglob(".*.tmp-*"))  # atomic writes leave no temporaries


def test_an_existing_timestamp_directory_is_skipped(tmp_path, monkeypatch) -> None:
    import datetime as dt

    fixed = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)

    class FrozenDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return fixed

    monkeypatch.setattr(benchmarks._dt, "datetime", FrozenDatetime)
    monkeypatch.setitem(BENCHMARKS, "fake", _fake_benchmark([]))
    occupied = tmp_path / "bench-fake" / "20300102T030405Z"
    occupied.mkdir(parents=True)
    (occupied / "result.json").write_text("precious")
    path = run_benchmark("fake", out=tmp_path)
    assert path.parent.name == "20300102T030405Z-2"
    assert (occupied / "result.json").read_text() == "precious" and not (occupied / "result.md").exists()


@pytest.mark.parametrize("below", ["", "sub/dir"])
def test_out_naming_a_file_is_refused_before_measuring(below, tmp_path, monkeypatch, capsys) -> None:
    from effml.cli import EXIT_USER_ERROR, main

    calls: list[int] = []
    monkeypatch.setitem(BENCHMARKS, "fake", _fake_benchmark(calls))
    (tmp_path / "file").write_text("keep")
    out = tmp_path / "file" / below
    with pytest.raises(ValueError, match=rf"--out {out}: {tmp_path / 'file'} is a file, not a directory"):
        run_benchmark("fake", out=out)
    assert main(["bench", "fake", "--out", str(out)]) == EXIT_USER_ERROR
    assert "pass a directory as --out (nothing was measured)" in capsys.readouterr().err
    assert calls == [] and (tmp_path / "file").read_text() == "keep"


def test_unknown_benchmark_raises_value_error_naming_the_available_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no-such.*lm"):
        run_benchmark("no-such", out=tmp_path)
    assert not any(tmp_path.iterdir())


def test_registry_entries_are_described() -> None:
    assert "lm" in BENCHMARKS
    for name, benchmark in BENCHMARKS.items():
        assert benchmark.name == name and benchmark.description and "\n" not in benchmark.description


# ------------------------------------------------------------------------------------------------ timing helpers


class FakeClock:
    """A clock that only moves when a fake workload says so: timing logic tested without wall time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleaving_varies_the_order_and_takes_the_median_per_contender() -> None:
    clock, log = FakeClock(), []
    # Per-call durations: "a" has one huge outlier, "b" is steady, "c" alternates; the medians are known exactly.
    durations = {"a": iter([9.0, 1.0, 100.0, 1.0, 1.0, 1.0]), "b": iter([9.0, 2.0, 2.0, 2.0, 2.0, 2.0]),
                 "c": iter([9.0, 3.0, 5.0, 3.0, 5.0, 3.0])}

    def workload(name: str):
        def call() -> None:
            log.append(name)
            clock.now += next(durations[name])
        return call

    results = time_interleaved({name: workload(name) for name in "abc"}, repeats=5, warmup=1, clock=clock)
    assert log[:3] == ["a", "b", "c"]  # the warm-up round, untimed
    rounds = [log[3 + 3 * r: 6 + 3 * r] for r in range(5)]
    assert rounds == [list("abc"), list("cba"), list("bca"), list("acb"), list("cab")]
    assert results["a"].samples == (1.0, 100.0, 1.0, 1.0, 1.0) and results["a"].median == 1.0
    assert results["b"].median == 2.0 and results["c"].median == 3.0 and results["c"].maximum == 5.0
    assert results["a"].positions == (0, 2, 2, 0, 1)
    assert set(results["b"].as_dict()) >= {"median_s", "samples_s"}


def neighbour_counts(orders) -> Counter:
    """How often each (earlier, next) pair of contenders ran back to back within a round, over ``orders``."""
    return Counter(pair for order in orders for pair in pairwise(order))


@pytest.mark.parametrize("count", range(1, 8))
def test_round_orders_balance_positions_and_neighbours(count) -> None:
    """Over a cycle of rounds (count rounds, or 2·count for an odd count) every contender takes every position equally
    often and runs right after every other contender equally often; the cycle then repeats."""
    cycle = count if count % 2 == 0 else 2 * count
    orders = [round_order(count, r) for r in range(cycle)]
    assert all(sorted(order) == list(range(count)) for order in orders)
    positions = Counter((position, index) for order in orders for position, index in enumerate(order))
    assert len(positions) == count * count and set(positions.values()) == {cycle // count}
    neighbours = neighbour_counts(orders)
    assert len(neighbours) == count * (count - 1)
    assert set(neighbours.values()) <= {cycle // count}
    assert [round_order(count, r) for r in range(cycle, 2 * cycle)] == orders


def test_no_contender_always_follows_the_same_neighbour_and_two_alternate() -> None:
    """A rotation (abc, bca, cab) kept "b" right after "a" in every round; with balanced rounds each of three
    contenders follows each other one in 2 of 6 rounds. Two contenders still take turns going first."""
    log: list[str] = []
    time_interleaved({name: (lambda name=name: log.append(name)) for name in "abc"}, repeats=6, warmup=0,
                     clock=FakeClock())
    rounds = [log[3 * r: 3 * r + 3] for r in range(6)]
    assert neighbour_counts(rounds) == {(x, y): 2 for x in "abc" for y in "abc" if x != y}
    pair: list[str] = []
    time_interleaved({"x": lambda: pair.append("x"), "y": lambda: pair.append("y")}, repeats=4, warmup=0,
                     clock=FakeClock())
    assert pair == list("xyyxxyyx")


def test_sleeping_callables_are_ranked_with_a_plausible_ratio() -> None:
    results = time_interleaved({"short": lambda: time.sleep(0.01), "long": lambda: time.sleep(0.04)},
                               repeats=5, warmup=1)
    short, long = results["short"].median, results["long"].median
    assert short >= 0.009 and long >= 0.039  # sleep never returns early
    assert 1.5 < long / short < 8  # generous: a loaded machine stretches both


@pytest.mark.parametrize(("kwargs", "message"), [({"repeats": 0}, "repeats"), ({"repeats": 2, "warmup": -1}, "warmup")])
def test_time_interleaved_rejects_bad_counts(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        time_interleaved({"x": lambda: None}, **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        time_interleaved({}, repeats=1)


def test_ratio_entry_refuses_a_zero_denominator_and_names_missing_paths() -> None:
    result = {"x": {"a": 1.0, "zero": 0.0}}
    with pytest.raises(ValueError, match="x/zero"):
        ratio_entry(result, ("x", "a"), ("x", "zero"), better="higher")
    with pytest.raises(KeyError, match="x/missing"):
        ratio_entry(result, ("x", "a"), ("x", "missing"), better="higher")


def test_a_ratio_of_a_zero_reading_marked_unmeasured_is_null_and_reads_not_measured() -> None:
    result = {"x": {"a": 1.0, "zero": 0}}
    for top, bottom in (("a", "zero"), ("zero", "a")):
        entry = ratio_entry(result, ("x", top), ("x", bottom), better="lower", zero_is_unmeasured=True)
        assert entry["value"] is None and entry["not_measured"] == "x/zero read 0"
        assert format_ratio(entry) == "not measured" and verdict(entry, 1.0) == "not measured"


def _refuse_nan(constant: str) -> None:
    raise AssertionError(f"result.json holds {constant}, which strict JSON readers reject")


def test_a_zero_cpu_peak_memory_reading_leaves_the_benchmark_finished(monkeypatch, tmp_path) -> None:
    """Where /proc/self/clear_refs is unavailable the step's peak can read 0 bytes: the memory ratios of the finished
    `lm` run are then null (strict JSON: a bare NaN was written before) and the markdown says "not measured"
    (dividing by the 0 used to abort the run)."""
    from effml.benchmarks import lm

    def zero_readings(factories, *, device="cpu", steps=2):
        return {name: {"peak_bytes": 0, "method": "getrusage-maxrss", "steps": steps} for name in factories}

    monkeypatch.setattr(lm, "peak_memory", zero_readings)
    path = run_benchmark("lm", quick=True, out=tmp_path)
    result = json.loads((path.parent / "result.json").read_text(), parse_constant=_refuse_nan)
    ratios = [name for name in result["ratios"] if name.startswith("memory_ratio_vs_")]
    assert ratios and all(result["ratios"][name]["value"] is None for name in ratios)
    rows = [line for line in path.read_text().splitlines() if line.startswith(f"| {lm.XT} |")]
    assert rows and rows[0].endswith("| not measured |")


def test_paired_rate_ratios_pair_rounds_and_scale_by_work() -> None:
    assert paired_rate_ratios([1.0, 2.0], [2.0, 2.0]) == [2.0, 1.0]
    assert paired_rate_ratios([1.0], [3.0], work_ratio=0.5) == [1.5]
    with pytest.raises(ValueError, match="equally many"):
        paired_rate_ratios([1.0], [1.0, 2.0])


def test_paired_time_ratios_divide_round_by_round_and_invert_rate_ratios() -> None:
    assert paired_time_ratios([1.0, 3.0], [2.0, 2.0]) == [0.5, 1.5]
    times_a, times_b = [0.3, 0.7, 1.1], [0.2, 0.9, 0.4]
    for time_ratio, rate_ratio in zip(paired_time_ratios(times_a, times_b), paired_rate_ratios(times_a, times_b),
                                      strict=True):
        assert time_ratio * rate_ratio == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equally many rounds"):
        paired_time_ratios([1.0, 2.0], [1.0])


@pytest.mark.parametrize(("value", "rounds", "better", "expected"), [
    (1.2, [1.1, 1.3, 1.2], "higher", "met"),
    (0.8, [0.7, 0.9, 0.8], "higher", "not met"),
    (0.95, [1.02, 1.05, 0.9], "higher", "inconclusive"),  # a load shift moved the medians, the rounds disagree
    (1.05, [0.9, 0.95, 1.2], "higher", "inconclusive"),
    (0.7, None, "lower", "met"),
    (1.3, None, "lower", "not met"),
])
def test_verdict_needs_both_estimates_on_the_same_side(value, rounds, better, expected) -> None:
    result = {"n": {"top": value, "bottom": 1.0}}
    entry = ratio_entry(result, ("n", "top"), ("n", "bottom"), better=better, per_round=rounds)
    assert verdict(entry, 1.0) == expected


def test_a_missing_peer_is_skipped_with_an_install_note_but_effml_errors_propagate() -> None:
    from effml.benchmarks import lm

    def builder(name: str) -> str:
        if name != lm.EFFML:
            raise ImportError(f"No module named {name!r}")
        return "built"

    skipped: dict[str, str] = {}
    built = lm._available((lm.EFFML, lm.XT, lm.HF), builder, skipped, lm.PEER_PACKAGES)
    assert built == {lm.EFFML: "built"} and set(skipped) == {lm.XT, lm.HF}
    assert "pip install effml[bench]" in skipped[lm.XT] and "x-transformers" in skipped[lm.XT]

    def broken_effml(name: str) -> str:
        raise ImportError("effml itself is broken")

    with pytest.raises(ImportError, match="effml itself"):
        lm._available((lm.EFFML,), broken_effml, {}, lm.PEER_PACKAGES)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux resident-set counters needed")
def test_cpu_peak_memory_reads_the_heap_a_step_holds_not_the_code_it_loads(monkeypatch) -> None:
    """A step holding 64 MiB reads about 64 MiB; one that first runs many kernels on tiny tensors reads about nothing
    (the resident-set high-water mark alone also counted the kernel code those calls read in: ~8-15 MiB)."""
    from effml.benchmarks.common import peak_memory

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    readings = peak_memory({"64 MiB": ("memory_steps:allocate", {"mib": 64}),
                            "kernels": ("memory_steps:first_use_of_many_kernels", {})}, steps=1)
    assert readings["64 MiB"]["method"] == "linux-vmhwm-anonymous"
    assert 60 * 2**20 <= readings["64 MiB"]["peak_bytes"] <= 72 * 2**20
    assert readings["kernels"]["peak_bytes"] <= 3 * 2**20
