"""The README's Python examples run as written (a user copies them first), with the two models they assume the user
already has (``hf_model``, ``peft_model``) built offline from tiny configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def user_models() -> dict[str, torch.nn.Module]:
    """What the README's snippets take as given: a Hugging Face Llama and a PEFT-wrapped model."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf_model = transformers.LlamaForCausalLM(config)
    base = transformers.LlamaForCausalLM(config)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return {"hf_model": hf_model, "peft_model": peft_model}


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2, "the README's ```python blocks were not found; did the fence style change?"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(block: str) -> None:
    names = user_models() if re.search(r"\b(hf_model|peft_model)\b", block) else {}
    namespace: dict[str, object] = {"__name__": "readme_example", **names}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own examples
