#!/usr/bin/env bash
# heartbeat.sh LABEL COMMAND [ARGS...]: run COMMAND; while it runs, print "LABEL: still running (N s)"
# every 30 s, so that a long step with no output of its own (mypy on an empty cache, a package install)
# never leaves `make test` silent for more than a minute. Exits with COMMAND's status.
set -u
label=$1
shift
start=$(date +%s)
(
  while sleep "${HEARTBEAT_S:-30}" && kill -0 "$$" 2>/dev/null; do
    echo "$label: still running ($(( $(date +%s) - start )) s)" >&2
  done
) &
ticker=$!
trap 'kill "$ticker" 2>/dev/null' EXIT
"$@"
