"""Fixtures of the interop tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop._support import GRPCURL_VERSION, describe, grpcurl_binary, run


@pytest.fixture(scope="session")
def grpcurl() -> Path:
    """Absolute path of the real grpcurl binary, checked to be the pinned version."""
    path = grpcurl_binary()
    proc = run([str(path), "-version"], timeout=30)
    assert proc.returncode == 0, describe(proc)
    # grpcurl 1.8.6 prints its version on stderr.
    assert f"grpcurl v{GRPCURL_VERSION}" in proc.stdout + proc.stderr, describe(proc)
    return path


