"""Shared fixtures: real PostgreSQL + pgvector, Valkey, step-ca and node processes."""

pytest_plugins = [
    "tests.fixtures.pg",
    "tests.fixtures.valkey",
    "tests.fixtures.stepca",
    "tests.fixtures.nodes",
]
