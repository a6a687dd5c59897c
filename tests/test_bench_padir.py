"""`effml bench padir` (quick shapes): every contender timed, the ratios formed from the stored numbers, the AR
contender decoding whole targets, and x-transformers' counterpart matching effml's model in size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from effml.benchmarks import run_benchmark
from effml.benchmarks.padir import EOS, PAD, QUICK, PeerSeq2Seq, effml_model

HAS_PEER = importlib.util.find_spec("x_transformers") is not None  # the `bench` extra (`make setup` installs it)


@pytest.fixture(scope="module")
def quick_padir(tmp_path_factory) -> Path:
    return run_benchmark("padir", quick=True, out=tmp_path_factory.mktemp("bench")).parent


def test_quick_padir_times_every_contender_and_forms_the_ratios_from_its_numbers(quick_padir: Path) -> None:
    result = json.loads((quick_padir / "result.json").read_text())
    assert (result["skipped"] == {}) == HAS_PEER
    expected = {"ar", *(f"{who}@{n}" for who in ("effml", "x-transformers")[:1 + HAS_PEER] for n in QUICK.passes)}
    keys = [f"T{length}_b{batch}" for length in QUICK.target_lengths for batch in QUICK.batch_sizes]
    assert list(result["decode"]) == keys
    for key in keys:
        times = result["decode"][key]
        assert set(times) == expected
        assert all(len(entry["samples_s"]) == QUICK.repeats and entry["median_s"] > 0 for entry in times.values())
        for n in QUICK.passes:
            speedup = result["ratios"][f"speedup@{n}_{key}"]
            assert speedup["value"] == times["ar"]["median_s"] / times[f"effml@{n}"]["median_s"]
            if HAS_PEER:
                peer = result["ratios"][f"effml_vs_xtransformers@{n}_{key}"]
                assert peer["value"] == times[f"effml@{n}"]["median_s"] / times[f"x-transformers@{n}"]["median_s"]
                assert peer["per_round"]["rounds"] == QUICK.repeats
    for length in QUICK.target_lengths if HAS_PEER else ():
        steps = result["train"][f"T{length}"]
        assert result["ratios"][f"train_vs_xtransformers_T{length}"]["value"] == (
            steps["effml"]["median_s"] / steps["x-transformers"]["median_s"])
    markdown = (quick_padir / "result.md").read_text()
    assert "speed-up over AR" in markdown and "effml ÷ x-transformers" in markdown


def test_the_ar_contender_decodes_every_target_to_its_full_length() -> None:
    """EOS's embedding row is zero, so its logit is 0 while the largest of the others is positive."""
    from effml.decode import decode_autoregressive

    model = effml_model(QUICK, 8, causal=True)
    assert torch.equal(model.lm_head.weight[EOS], torch.zeros(QUICK.d_model))
    source = torch.randint(5, QUICK.vocab_size, (16, 8), generator=torch.Generator().manual_seed(0))
    decoded = decode_autoregressive(model, source, source.eq(PAD), bos_id=1, eos_id=EOS, pad_id=PAD, max_len=8)
    assert decoded.lengths.tolist() == [8] * 16


def test_the_peer_model_has_effml_s_size_and_generates_whole_targets() -> None:
    """Same width, depth, heads, head size and feed-forward, one shared token embedding: parameter counts within 1 %
    (the models differ in position encodings and norms)."""
    pytest.importorskip("x_transformers")
    peer = PeerSeq2Seq(QUICK, 8)
    ours = effml_model(QUICK, 8, causal=False)
    count = sum(parameter.numel() for parameter in peer.parameters())
    assert count == pytest.approx(sum(parameter.numel() for parameter in ours.parameters()), rel=0.01)
    source = torch.randint(5, QUICK.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    assert peer.generate(source, passes=2).shape == (3, 8)
    assert torch.isfinite(peer(source, source))
