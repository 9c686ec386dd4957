#!/usr/bin/env bash
# Run a command with a broker: start one if none answers, and stop it afterwards only if this
# script started it (a broker that was already running is left alone), like `make demo`.
# Honours LLMPIPE_KAFKA_PORT / LLMPIPE_KAFKA_DATA (see kafka.sh). Exits with the command's code.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
started=0
if ! bash "$here/kafka.sh" status >/dev/null 2>&1; then
  bash "$here/kafka.sh" up || exit 1
  started=1
fi
stop() { if [ "$started" = 1 ]; then bash "$here/kafka.sh" down; fi; }
trap stop EXIT
trap 'exit 130' INT TERM
"$@"
