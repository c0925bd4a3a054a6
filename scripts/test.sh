#!/usr/bin/env bash
# Install what the tests need, then run the whole suite against real PostgreSQL + pgvector,
# Valkey, step-ca and node processes. Extra arguments go to pytest.
#
#   bash scripts/test.sh [-k expr] [tests/path]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
bash "$repo/scripts/bootstrap.sh"
cd "$repo"
exec "$venv/bin/python" -m pytest -ra "$@"
