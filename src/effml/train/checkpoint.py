"""Atomic, verifiable training checkpoints: safetensors for tensors, JSON for everything else.

Layout under a checkpoint directory::

    checkpoints/
      LATEST                 the name of the newest complete checkpoint (written last, atomically)
      step-00000120/
        model.safetensors    model weights (tied tensors stored once, aliases recorded in state.json)
        optimizer.safetensors  every tensor of the optimizer's state_dict, keyed "state/<param>/<key>"
        rng.safetensors      torch (and CUDA) generator states, so dropout continues bit for bit: rank 0's as
                             "torch"/"cuda", rank r's of a data-parallel run as "torch.rank<r>"/"cuda.rank<r>"
        state.json           step, the optimizer's non-tensor state, caller extras, and a manifest of every file's
                             size and SHA-256

A checkpoint is built in a temporary sibling directory, every file fsync'ed, then renamed into place; LATEST moves
only after that. A reader therefore sees either the previous checkpoint or the new one, never half of one, and
`load_checkpoint` re-verifies the manifest so that a file damaged later is reported instead of silently loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from effml.io import atomic_write_text, fsync_directory

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]

_LATEST = "LATEST"
_STATE = "state.json"
_TUPLE = "__tuple__"  # JSON has no tuples: a param-group setting such as Adam's betas is saved as {_TUPLE: [...]}
_STATE_KEYS = ("step", "aliases", "optimizer", "extra", "manifest")  # what load_checkpoint reads from state.json


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file and what to do."""


@dataclass
class Checkpoint:
    """Everything needed to continue a training run exactly."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied weights); return the unique tensors and alias → source names."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().to("cpu").contiguous()
    return unique, aliases


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate an optimizer state_dict into flat tensors and a JSON-serialisable remainder."""
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for param_id, entries in state_dict["state"].items():
        plain_entries = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param_id}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                plain_entries[key] = value
        plain_state[str(param_id)] = plain_entries
    groups = [{key: {_TUPLE: list(value)} if isinstance(value, tuple) else value for key, value in group.items()}
              for group in state_dict["param_groups"]]
    return tensors, {"state": plain_state, "param_groups": groups}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(entries) for pid, entries in plain["state"].items()}
    for name, tensor in tensors.items():
        _, param_id, key = name.split("/", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    groups = [{key: tuple(value[_TUPLE]) if isinstance(value, dict) and set(value) == {_TUPLE} else value
               for key, value in group.items()} for group in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint, keep_last: int = 1) -> Path:
    """Write ``checkpoint`` as ``directory/step-XXXXXXXX`` atomically, point LATEST at it, prune older ones.

    Returns the new checkpoint's path. ``keep_last`` ≥ 1 complete checkpoints are kept.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{checkpoint.step:08d}"
    final = directory / name
    staging = directory / f".tmp-{name}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()

    model_tensors, aliases = _dedupe_shared(checkpoint.model)
    _save_tensors(model_tensors, staging / "model.safetensors")
    files = ["model.safetensors"]
    optimizer_plain = None
    if checkpoint.optimizer is not None:
        optimizer_tensors, optimizer_plain = _split_optimizer_state(checkpoint.optimizer)
        _save_tensors(optimizer_tensors, staging / "optimizer.safetensors")
        files.append("optimizer.safetensors")
    _save_tensors({k: v.contiguous() for k, v in checkpoint.rng.items()}, staging / "rng.safetensors")
    files.append("rng.safetensors")

    state = {
        "format": 1,
        "step": checkpoint.step,
        "aliases": aliases,
        "optimizer": optimizer_plain,
        "extra": checkpoint.extra,
        "manifest": {f: {"bytes": (staging / f).stat().st_size, "sha256": _sha256(staging / f)} for f in files},
    }
    atomic_write_text(staging / _STATE, json.dumps(state, indent=1))
    fsync_directory(staging)
    if final.exists():  # a checkpoint of the same step from an interrupted save: replace it
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_directory(directory)
    atomic_write_text(directory / _LATEST, name + "\n")

    complete = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in complete[: max(0, len(complete) - max(1, keep_last))]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint LATEST points to, or None when the directory holds no checkpoint at all."""
    directory = Path(directory)
    pointer = directory / _LATEST
    if not pointer.exists():
        return None
    target = directory / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(
            f"{pointer} names {target.name}, which does not exist: the checkpoint directory was altered by hand. "
            f"Restore the missing directory or start a new run without --resume."
        )
    return target


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint directory (a ``step-*`` folder, or a folder with LATEST in it).

    Raises CheckpointError, changing nothing on disk, when a file is missing, truncated or fails its checksum.
    """
    path = Path(path)
    if (path / _LATEST).exists():
        path = latest_checkpoint(path)  # type: ignore[assignment]
    state_file = path / _STATE
    if not state_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint: {_STATE} is missing. The save was interrupted or the directory is "
            f"not a checkpoint; point --resume at a run directory whose checkpoints/LATEST exists."
        )
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{state_file} is corrupted ({error}); this checkpoint cannot be resumed.") from error
    missing = [key for key in _STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{state_file} lacks {', '.join(missing)}: it was not written by effml's "
                              "save_checkpoint (or was edited by hand); this checkpoint cannot be resumed.")
    for name, expected in state["manifest"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(
                f"{file} is missing or corrupted (its size or SHA-256 does not match the checkpoint's manifest); "
                f"this checkpoint cannot be resumed. Nothing was changed."
            )
    model = load_file(str(path / "model.safetensors"), device=str(map_location))
    for alias, source in state["aliases"].items():
        model[alias] = model[source]
    optimizer = None
    if state["optimizer"] is not None:
        optimizer = _join_optimizer_state(load_file(str(path / "optimizer.safetensors"), device=str(map_location)),
                                          state["optimizer"])
    rng = load_file(str(path / "rng.safetensors"))
    return Checkpoint(step=state["step"], model=model, optimizer=optimizer, rng=rng, extra=state["extra"])
