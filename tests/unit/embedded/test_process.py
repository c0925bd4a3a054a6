"""Unit tests of tessera.embedded: process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tessera.embedded import pid_alive


def test_pid_alive_counts_a_zombie_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not reaped yet: a zombie once it has exited.
    deadline = time.monotonic() + 30
    while pid_alive(child.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.wait()
    assert pid_alive(os.getpid())
