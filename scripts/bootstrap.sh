#!/usr/bin/env bash
# Install everything the tests need, idempotently: a virtualenv with the project and its
# dev tools, and the step-ca binary built from Debian's packaged source.
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

say "building step-ca (skipped when up to date)"
bash "$repo/deploy/step-ca/build.sh"
say "done"
