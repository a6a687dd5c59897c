"""The residual-connection registry and the stream history the model hands to residuals that ask for it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import Tensor

import effml.nn.transformer as transformer_module
from effml.nn import (
    RESIDUALS,
    PlainResidual,
    Residual,
    TransformerConfig,
    TransformerLM,
    build_residual,
    register_residual,
)


@pytest.fixture
def scratch_registry() -> Iterator[None]:
    """Remove whatever a test registers, so other tests see the registry unchanged."""
    before = dict(RESIDUALS)
    yield
    RESIDUALS.clear()
    RESIDUALS.update(before)


class RecordingResidual(Residual):
    """x + fx, recording (layer_index, x, history) of every call in the class-level ``calls`` list. Its history
    size is ``deep`` on attention sub-layers (even layer_index) and ``shallow`` on MLP sub-layers."""

    calls: list[tuple[int, Tensor, list[Tensor]]] = []

    def __init__(self, d_model: int, layer_index: int, deep: int = 2, shallow: int = 2) -> None:
        super().__init__(d_model, layer_index)
        self.history_size = deep if layer_index % 2 == 0 else shallow

    def forward(self, x: Tensor, fx: Tensor, history: Sequence[Tensor] = ()) -> Tensor:
        RecordingResidual.calls.append((self.layer_index, x, list(history)))
        return x + fx


def test_plain_residual_is_exactly_x_plus_fx() -> None:
    x, fx = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    residual = build_residual("plain", 8, 0)
    assert isinstance(residual, PlainResidual) and residual.history_size == 0
    assert torch.equal(residual(x, fx), x + fx)
    assert list(residual.parameters()) == []


def test_unknown_residual_and_unknown_options_are_explained() -> None:
    with pytest.raises(ValueError, match=r"(?s)'laurel-xyz'.*'plain'"):
        build_residual("laurel-xyz", 8, 0)
    with pytest.raises(ValueError, match="alpha"):
        build_residual("plain", 8, 0, alpha=0.5)


def test_register_rejects_non_residuals_and_name_clashes(scratch_registry: None) -> None:
    with pytest.raises(TypeError, match="Residual subclasses"):
        register_residual("not-a-residual")(torch.nn.Linear)  # type: ignore[arg-type]

    class Other(PlainResidual):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_residual("plain")(Other)


def test_registered_residual_gets_options_and_sub_layer_indices(scratch_registry: None) -> None:
    register_residual("recording")(RecordingResidual)
    model = TransformerLM(TransformerConfig(vocab_size=11, d_model=8, n_layers=3, n_heads=2, max_seq_len=8,
                                            residual="recording", residual_options={"deep": 1, "shallow": 0}))
    indices = [(block.attn_residual.layer_index, block.mlp_residual.layer_index) for block in model.blocks]
    assert indices == [(0, 1), (2, 3), (4, 5)]
    assert [block.attn_residual.history_size for block in model.blocks] == [1, 1, 1]
    assert [block.mlp_residual.history_size for block in model.blocks] == [0, 0, 0]


@pytest.mark.parametrize(("deep", "shallow", "n_loops"), [(2, 2, 1), (2, 2, 2), (3, 1, 1)])
def test_history_holds_the_previous_stream_states_most_recent_first(scratch_registry: None, deep: int,
                                                                    shallow: int, n_loops: int) -> None:
    register_residual("recording")(RecordingResidual)
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, max_seq_len=8,
                                            n_loops=n_loops, residual="recording",
                                            residual_options={"deep": deep, "shallow": shallow}))
    idx = torch.randint(0, 11, (2, 5))
    RecordingResidual.calls = []
    model(idx)
    calls = RecordingResidual.calls
    assert len(calls) == 2 * 2 * n_loops
    inputs = [x for _, x, _ in calls]  # stream states x_0, x_1, ... in execution order
    assert torch.equal(inputs[0], model.tok_emb(idx))
    for i, (layer_index, _, history) in enumerate(calls):
        assert layer_index == i % 4
        wanted = deep if layer_index % 2 == 0 else shallow
        expected = [inputs[j] for j in range(i - 1, max(i - 1 - wanted, -1), -1)]
        assert len(history) == min(wanted, i)
        assert all(got is want for got, want in zip(history, expected, strict=True))


def test_plain_model_keeps_no_history(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(size: int) -> None:
        raise AssertionError(f"a history of {size} states was created for a plain-residual model")

    model = TransformerLM(TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, max_seq_len=8))
    monkeypatch.setattr(transformer_module, "StreamHistory", refuse)
    model(torch.randint(0, 11, (1, 4)))
