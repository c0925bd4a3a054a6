#!/usr/bin/env bash
# Install everything the tests need, idempotently: a virtualenv with the project and its
# dev tools, promtool, and the step-ca binary built from Debian's packaged source.
#
#   scripts/bootstrap.sh        (VENV=.venv by default)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

say() { printf 'bootstrap: %s\n' "$*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
    say "creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
say "installing tessera with its dev tools into $venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e "$repo[dev]"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [[ "$(id -u)" -eq 0 ]]; then
        say "installing Node.js and npm for the interop client"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y nodejs npm >&2 || { apt-get update >&2 && apt-get install -y nodejs npm >&2; }
    fi
fi

# promtool checks deploy/prometheus/*.yml in the tests; Debian ships it in the prometheus
# package (about 23 MB to download). Without it the tests fall back to a schema check.
if ! command -v promtool >/dev/null 2>&1 && [[ "$(id -u)" -eq 0 ]] \
        && command -v apt-get >/dev/null 2>&1; then
    say "installing promtool (Debian's prometheus package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends prometheus >&2 \
        || { apt-get update >&2 && apt-get install -y --no-install-recommends prometheus >&2; } \
        || say "promtool not installed; the alert rules get the schema check only"
fi

say "building step-ca (skipped when up to date)"
bash "$repo/deploy/step-ca/build.sh"
say "done"
