#!/usr/bin/env bash
# The sender-only ceiling of this machine (issue 19): one thread writes pre-encoded ~200-byte
# WebSocket frames to N loopback sockets whose readers drain them, 1, 32 and 256 frames per
# writev; the sender pinned to CPU 1 (where bench/run.sh pins the server), the readers to CPU 0
# (the load generator's). Prints the RESULT lines, with the machine and its load.
#
# WRITE=splice measures the zero-copy prototype instead (each batch encoded once into fresh
# pages and handed to every socket by reference with vmsplice + splice), WRITE="writev splice"
# both in turn. Run at 1000 and at 9900 connections to compare a bare sender's cost per frame
# at two audiences (each connection holds two descriptors here: 9900 fits a limit of 20,000).
#
# Usage: [WRITE=writev|splice|"writev splice"] bench/sender_ceiling.sh [SECONDS_PER_BATCH_SIZE] [CONNECTIONS]
#   (defaults: 5, 1000, writev)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p rusty-bench --bin sender-ceiling
ulimit -n "$(ulimit -Hn)"
echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); load average $(cut -d' ' -f1-3 /proc/loadavg)"
for write in ${WRITE:-writev}; do
  target/release/sender-ceiling --seconds "${1:-5}" --connections "${2:-1000}" --batches 1,32,256 \
    --sender-cpu 1 --reader-cpus 0 --write "$write" | grep '^RESULT'
done
echo "# after: load average $(cut -d' ' -f1-3 /proc/loadavg)"
