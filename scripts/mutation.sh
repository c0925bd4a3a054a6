#!/usr/bin/env bash
# Mutation testing of the pure trust-critical modules against their own unit tests
# (`make mutation`; not part of the per-commit CI). mutmut mutates a copy laid out as
# src/ under .cache/mutation, so the node's own tree is never touched.
#
#   bash scripts/mutation.sh            (VENV=.venv by default; MUTMUT_ARGS for extra flags)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
work="$repo/.cache/mutation"

# What is mutated, and the unit tests that must kill the mutants.
modules=(
    tessera/grants/_scope.py        # scope evaluation and its SQL rendering
    tessera/peering/_token.py       # enrolment token parsing and MAC
    tessera/audit/_chain.py         # audit chain hashing and verification
    tessera/ratelimit/_gcra.py      # GCRA arithmetic
    tessera/core/pagination.py      # page-token signing
)
tests=(
    tests/unit/grants/test_scope.py
    tests/unit/grants/test_scope_predicate.py
    tests/unit/grants/test_scope_write.py
    tests/unit/grants/test_scope_refusals.py
    tests/unit/grants/test_scope_pages.py
    tests/unit/peering/test_token.py
    tests/unit/peering/test_token_mac.py
    tests/unit/peering/test_token_parse.py
    tests/unit/audit/test_chain.py
    tests/unit/audit/test_chain_rows.py
    tests/unit/audit/test_chain_verifier.py
    tests/unit/audit/test_chain_encoding.py
    tests/unit/ratelimit/test_gcra.py
    tests/unit/core/test_pagination.py
)

"$venv/bin/python" -m pip install --quiet "mutmut==3.8.1"
rm -rf "$work"
mkdir -p "$work/src" "$work/tests"
cp -r "$repo/node/tessera" "$repo/clients/python/tessera_client" "$work/src/"
cp "$repo/tests/__init__.py" "$work/tests/"
for t in "${tests[@]}"; do
    d="$(dirname "$t")"
    mkdir -p "$work/$d"; cp "$repo/$t" "$work/$t"
    # The test directories are packages (tests.unit.<package>).
    while [ "$d" != tests ]; do cp "$repo/$d/__init__.py" "$work/$d/"; d="$(dirname "$d")"; done
done
{
    echo '[tool.mutmut]'
    printf 'paths_to_mutate = ['; printf '"src/%s", ' "${modules[@]}"; echo ']'
    echo 'tests_dir = ["tests/unit"]'
    # The rest of the tree, unmutated, so the copied packages import whole.
    echo 'also_copy = ["src/"]'
    echo 'process_isolation = "forkserver"'
    echo
    echo '[tool.pytest.ini_options]'
    echo 'asyncio_mode = "auto"'
    echo 'testpaths = ["tests/unit"]'
} > "$work/pyproject.toml"
cd "$work"
# The copy, not the editable install, must be what the tests import.
export PYTHONPATH="$work/src"
"$venv/bin/mutmut" run ${MUTMUT_ARGS:-}
"$venv/bin/mutmut" results --all true > "$work/results.txt"
# Kill rate per module: killed / all mutants ("no tests" and survivors count against it).
awk -F': ' '{n = split($1, a, "."); m = a[n - 1]; total[m]++; if ($2 == "killed") k[m]++}
    END {for (m in total) {printf "%-12s %4d/%4d killed (%.0f %%)\n", m, k[m], total[m],
                           100 * k[m] / total[m]; K += k[m]; T += total[m]}
         printf "%-12s %4d/%4d killed (%.0f %%)\n", "all", K, T, 100 * K / T}' \
    "$work/results.txt" | sort
echo "survivors: $work/results.txt"
