"""Test-session set-up: token caches go to a fresh temporary directory (shared with subprocesses via the env)."""

from __future__ import annotations

import os
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_token_cache():
    previous = os.environ.get("EFFML_CACHE")
    with tempfile.TemporaryDirectory(prefix="effml-cache-") as cache:
        os.environ["EFFML_CACHE"] = cache
        yield cache
    if previous is None:
        os.environ.pop("EFFML_CACHE", None)
    else:
        os.environ["EFFML_CACHE"] = previous
