"""Shared fixtures: real PostgreSQL + pgvector, Valkey, step-ca and node processes.

A skipped test fails the run: every test here is meant to exercise a real component, so
a skip would hide that the component did not run (set TESSERA_ALLOW_SKIPS=1 locally to
look past one).
"""

from __future__ import annotations

import os

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
