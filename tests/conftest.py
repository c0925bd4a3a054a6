"""Shared fixtures: real PostgreSQL + pgvector, Valkey, step-ca and node processes.

A skipped test fails the run: every test here is meant to exercise a real component, so
a skip would hide that the component did not run (set TESSERA_ALLOW_SKIPS=1 locally to
look past one).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.pg",
    "tests.fixtures.valkey",
    "tests.fixtures.stepca",
    "tests.fixtures.nodes",
    "tests.fixtures.peers",
    "tests.fixtures.plugins",
    "tests.fixtures.otlp",
    "tests.fixtures.external",
]

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember skipped tests."""
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when anything was skipped, unless explicitly allowed."""
    if _skipped and not os.environ.get("TESSERA_ALLOW_SKIPS") and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nFAILED: {len(_skipped)} test(s) skipped; skips are not allowed here "
              f"(set TESSERA_ALLOW_SKIPS=1 to allow): {_skipped[:5]}")


@pytest.fixture(autouse=True)
def _agent_tests_one_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked `agents` hold a host-wide lock from before their node starts until after
    it stops: agent runs take uids and processes of the whole host, and these tests check
    that none is left, which another worker's agents would break. (pytest-xdist's
    xdist_group cannot do it here: with pytest 9.2 it no longer renames the tests it
    groups, so grouped tests were spread over the workers anyway.)"""
    if request.node.get_closest_marker("agents") is None:
        yield
        return
    lock = Path(tempfile.gettempdir()) / f"tessera-tests-agents-{os.getuid()}.lock"
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield
