"""A crash- and race-safe on-disk cache of named 1-D arrays, loaded back as read-only memory maps.

One cache entry is a directory ``<root>/<name>-<key[:16]>/`` holding one ``.npy`` file per array and a
``manifest.json`` that records, for each array, its dtype, length and file size, plus free-form metadata.

Writing protocol (see :mod:`effml.io`): every array file is written to a temporary file, fsynced and renamed
into place; the manifest is written the same way, **last**. So a manifest on disk means every array it names
was completely written at least once. Reading validates the manifest (format version, full key) and compares
each file's size on disk with the recorded size; any mismatch (a truncated or missing file, a foreign manifest)
makes :func:`load_entry` return ``None`` and the caller rebuilds the entry.

Concurrency: several processes (e.g. DDP ranks) that miss the cache at once each build the entry and write it
with their own temporary files; renames are atomic and the contents are identical (the build is
deterministic), so whichever rename lands last leaves a valid entry, and a process that already mapped an older
file keeps reading that file's (identical) inode. No locks are needed; the cost is duplicated work on a cold
cache. Stray ``.*.tmp-*`` files can remain only if a process is killed mid-write; they are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from effml.io import atomic_save_numpy, atomic_write_json, check_directory_path

__all__ = ["default_cache_dir", "cache_key", "entry_dir", "load_entry", "write_entry", "CACHE_FORMAT"]

#: Bump when the on-disk layout changes; old entries then simply miss.
CACHE_FORMAT = 1
_MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$EFFML_CACHE`` if set, else ``~/.cache/effml``.

    Raises ValueError naming EFFML_CACHE when it points at a file (or below one), before any cache work is done.
    """
    configured = os.environ.get("EFFML_CACHE")
    if not configured:
        return Path.home() / ".cache" / "effml"
    directory = Path(configured).expanduser()
    check_directory_path(directory, f"EFFML_CACHE={configured}", "set EFFML_CACHE to a directory (it is created "
                         "if missing), or unset it to use ~/.cache/effml.")
    return directory


def cache_key(payload: Any) -> str:
    """SHA-256 hex digest of ``payload`` serialised as canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def entry_dir(root: str | os.PathLike[str], name: str, key: str) -> Path:
    """Directory of the entry ``name``/``key`` under ``root`` (``name`` made filesystem-safe)."""
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "entry"
    return Path(root) / f"{safe_name}-{key[:16]}"


def load_entry(directory: str | os.PathLike[str], key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Load a complete entry as ``({array name: read-only np.memmap of shape (length,)}, metadata)``.

    Returns ``None`` when the entry is absent, written for another key or format, or any array file's size
    differs from the manifest (a truncated or partial file): the caller should rebuild it.
    """
    directory = Path(directory)
    try:
        manifest = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
        return None
    arrays: dict[str, np.ndarray] = {}
    try:
        for array_name, record in manifest["arrays"].items():
            path = directory / record["file"]
            if path.stat().st_size != record["size"]:
                return None
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.dtype != np.dtype(record["dtype"]) or array.shape != (record["length"],):
                return None
            arrays[array_name] = array
        return arrays, manifest["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_entry(directory: str | os.PathLike[str], key: str, arrays: dict[str, np.ndarray],
                meta: dict[str, Any]) -> None:
    """Write 1-D ``arrays`` (one ``<name>.npy`` each) and then the manifest, each file atomically.

    ``meta`` must be JSON-serialisable; it comes back unchanged from :func:`load_entry`. Raises ValueError when a
    file stands where ``directory`` or one of its parents should be.
    """
    directory = Path(directory)
    check_directory_path(directory, "cache entry", "move that file away, or set EFFML_CACHE (or the cache_dir "
                         "argument) to another directory.")
    directory.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    for array_name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.ndim != 1:
            raise ValueError(f"Cache arrays must be 1-D; {array_name!r} has shape {array.shape}.")
        file_name = f"{array_name}.npy"
        atomic_save_numpy(directory / file_name, array)
        records[array_name] = {
            "file": file_name,
            "dtype": array.dtype.str,
            "length": int(array.shape[0]),
            "size": (directory / file_name).stat().st_size,
        }
    atomic_write_json(directory / _MANIFEST, {"format": CACHE_FORMAT, "key": key, "arrays": records, "meta": meta})
