#!/usr/bin/env bash
# Build step-ca 0.19 from Debian's packaged library source in GOPATH mode.
#
#   deploy/step-ca/build.sh [OUTPUT]      (default: <repo>/.cache/bin/step-ca)
#
# Debian's golang-github-smallstep-certificates-dev ships the library but not
# cmd/step-ca, so deploy/step-ca/main.go supplies the main package. The build
# is skipped when OUTPUT already exists and is newer than main.go.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/.cache/bin/step-ca}"
system_gopath=/usr/share/gocode
src_pkg="$system_gopath/src/github.com/smallstep/certificates/commands"
apt_packages=(golang-go golang-github-smallstep-certificates-dev)

say() { printf 'build-step-ca: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

if [[ -x "$out" && "$out" -nt "$here/main.go" ]]; then
    say "up to date: $out"
    exit 0
fi

# A fresh machine may lack the toolchain or the packaged source; install them
# only when we can (root), otherwise say exactly what is missing.
if ! command -v go >/dev/null 2>&1 || [[ ! -d "$src_pkg" ]]; then
    if [[ "$(id -u)" -eq 0 ]]; then
        say "installing ${apt_packages[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y "${apt_packages[@]}" >&2 \
            || { apt-get update >&2 && apt-get install -y "${apt_packages[@]}" >&2; } \
            || die "apt-get install ${apt_packages[*]} failed"
    else
        die "need 'go' and $src_pkg: run as root or 'apt-get install ${apt_packages[*]}'"
    fi
fi
command -v go >/dev/null 2>&1 || die "'go' is still not on PATH after installing golang-go"
[[ -d "$src_pkg" ]] || die "$src_pkg is missing after installing golang-github-smallstep-certificates-dev"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# The main package lives in the scratch GOPATH so imports resolve from the
# system GOPATH exactly as Debian packaged them, without network access.
mkdir -p "$scratch/src/tessera/step-ca" "$(dirname "$out")"
cp "$here/main.go" "$scratch/src/tessera/step-ca/main.go"

say "$(go version)"
say "building step-ca into $out (GOPATH mode, takes a while on a cold cache)"
start=$SECONDS
(
    cd "$scratch/src/tessera/step-ca"
    # CGO off: the pure-Go PKCS#11/YubiKey stubs avoid needing C headers.
    GO111MODULE=off GOPATH="$scratch:$system_gopath" GOFLAGS= CGO_ENABLED=0 \
        go build -o "$out.tmp.$$" .
) || { rm -f "$out.tmp.$$"; die "go build failed (see the messages above)"; }
mv -f "$out.tmp.$$" "$out"

"$out" --version >/dev/null 2>&1 || die "built binary $out does not run"
say "built $out in $((SECONDS - start)) s"
