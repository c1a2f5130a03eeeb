#!/usr/bin/env bash
# permessage-deflate fan-out: about 1 KiB of JSON-like text to 1,000 subscribers that offer the
# extension, with RUSTY_SOCKS_COMPRESSION off and on, alternating, in one run (server pinned to
# CPU 1 with one worker thread, the load generator to CPU 0; loopback only). Compare
# per_cpu_sec (deliveries per server CPU-second) and wire_bytes_per_delivery.
#
# Usage: bench/deflate.sh [ROUNDS] [MESSAGES]     (defaults 3 and 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin rusty_socks -p rusty-socks
cargo build --release --quiet --bin loadgen -p rusty-bench
BIN=target/release
ROUNDS=${1:-3}
MSGS=${2:-5000}
. bench/servers.sh

one() { # label compression
  RUSTY_SOCKS_COMPRESSION=$2 start rusty_socks
  local out
  out=$(taskset -c 0 "$BIN/loadgen" broadcast --subscribers 1000 --messages "$MSGS" --size 1024 \
    --window 256 --deflate --url "ws://127.0.0.1:$PORT/ws" --server-pid "$SERVER_PID" | grep '^RESULT' || echo "RESULT failed")
  echo "$1 $out"
  stop
  sleep 1
}

echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); commit $(git rev-parse --short HEAD)"
for round in $(seq 1 "$ROUNDS"); do
  one "deflate-off-r$round" false
  one "deflate-on-r$round" true
done
