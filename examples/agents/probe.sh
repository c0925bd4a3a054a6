#!/bin/sh
# Tessera's example agent: harmless. It greets, says who it runs as and what it can see,
# and can print lines or wait, so the docs and tests can show every part of an agent run.
#
#   probe.sh [--try-read FILE]... [--try-signal-parent] -- [NAME [LINES [SECONDS]]]
#
# Fixed options (from the allow-list) come before `--`; the caller's values after it.
# --try-read FILE   report "read FILE: allowed" or "read FILE: denied" (used to show that
#                   an agent cannot read the node's keys)
# --try-signal-parent  report whether it may signal its parent, the wrapper that cleans
#                   up after it (kill -0: a permission check, nothing is sent)
# NAME              who to greet
# LINES             print this many numbered lines (to show the output limit)
# SECONDS           then wait this long, with a child process (to show group kills)
set -u
tries=""
signal_parent=""
while [ $# -gt 0 ]; do
  case "$1" in
    --try-read) tries="$tries $2"; shift 2 ;;
    --try-signal-parent) signal_parent=1; shift ;;
    --) shift; break ;;
    *) echo "probe: unexpected argument $1" >&2; exit 2 ;;
  esac
done
name="${1:-world}"
lines="${2:-0}"
seconds="${3:-0}"
echo "hello $name"
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "env: $(env | cut -d= -f1 | sort | tr '\n' ' ')"
echo "fds: $(ls /proc/self/fd | sort -n | tr '\n' ' ')"
for f in $tries; do
  if cat "$f" >/dev/null 2>&1; then echo "read $f: allowed"; else echo "read $f: denied"; fi
done
if [ -n "$signal_parent" ]; then
  if kill -0 "$PPID" 2>/dev/null; then echo "signal parent: allowed"; else echo "signal parent: denied"; fi
fi
i=0
while [ "$i" -lt "$lines" ]; do
  echo "line $i of $lines: the quick brown fox jumps over the lazy dog"
  i=$((i + 1))
done
if [ "$seconds" -gt 0 ]; then
  echo "waiting $seconds s"
  sleep "$seconds" &
  wait
fi
echo "bye $name"
