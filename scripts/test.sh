#!/usr/bin/env bash
# Install what the tests need, then run the whole suite against real PostgreSQL + pgvector,
# Valkey, step-ca and node processes. Extra arguments go to pytest.
#
#   bash scripts/test.sh [-k expr] [tests/path]
#
# Two pytest-xdist workers (TESSERA_TEST_WORKERS=N for another number, 0 for none): most
# tests wait on processes, so two halve the time on two cores. Each worker starts its own
# PostgreSQL, Valkey and step-ca; tests that start agents (host-wide uids and processes)
# run one at a time (the `agents` mark, tests/conftest.py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
bash "$repo/scripts/bootstrap.sh"
cd "$repo"
workers="${TESSERA_TEST_WORKERS:-2}"
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers")
exec "$venv/bin/python" -m pytest -ra "${parallel[@]}" "$@"
