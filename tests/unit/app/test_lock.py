"""Unit tests of tessera.app: lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tessera.app import DataDirInUse, DataDirLock


def test_a_second_lock_on_the_data_directory_names_the_holder(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path / "node.lock"), DataDirLock(tmp_path / "node.lock")
    first.acquire()
    with pytest.raises(DataDirInUse) as exc:
        second.acquire()
    assert exc.value.holder == os.getpid()
    assert f"in use by node pid {exc.value.holder}" in exc.value.message
    first.release()
    second.acquire()  # free again once released
    second.release()
