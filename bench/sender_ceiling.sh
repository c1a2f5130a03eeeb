#!/usr/bin/env bash
# The sender-only ceiling of this machine (issue 19): one thread writes pre-encoded ~200-byte
# WebSocket frames to 1,000 loopback sockets whose readers drain them, 1, 32 and 256 frames per
# writev; the sender pinned to CPU 1 (where bench/run.sh pins the server), the readers to CPU 0
# (the load generator's). Prints the RESULT lines, with the machine and its load.
#
# Usage: bench/sender_ceiling.sh [SECONDS_PER_BATCH_SIZE] [CONNECTIONS]   (defaults: 5, 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p rusty-bench --bin sender-ceiling
echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); load average $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/sender-ceiling --seconds "${1:-5}" --connections "${2:-1000}" --batches 1,32,256 \
  --sender-cpu 1 --reader-cpus 0 | grep '^RESULT'
echo "# after: load average $(cut -d' ' -f1-3 /proc/loadavg)"
