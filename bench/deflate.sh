#!/usr/bin/env bash
# permessage-deflate: fan-out of about 1 KiB of JSON-like text to 1,000 subscribers that offer
# the extension, and idle memory at 10,000 connections, with RUSTY_SOCKS_COMPRESSION off and
# on, alternating, in one run (server pinned to CPU 1 with one worker thread, the load
# generator to CPU 0; loopback only).
#
# - burst: as fast as the generator reads. Inflating 1,000 copies of every message would make
#   the generator, not the server, set the pace with compression on, so only every 10th
#   subscriber inflates and checks each message (--inflate-every 10); the others count the
#   compressed frames.
# - paced: --rate messages/s, the same for both, below what the generator can inflate: the
#   server does the same work per second either way, so per_cpu_sec (deliveries per server
#   CPU-second) compares the cost per delivery without one side idling more than the other.
# - idle: 10,000 connections that offer deflate and hold; rss_per_conn_bytes is the server's
#   RSS growth per connection, deflate=N says how many negotiated it.
#
# Usage: bench/deflate.sh [ROUNDS] [MESSAGES] [RATE] [CONNECTIONS]   (defaults 3, 5000, 100, 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin rusty_socks -p rusty-socks
cargo build --release --quiet --bin loadgen -p rusty-bench
BIN=target/release
ROUNDS=${1:-3}
MSGS=${2:-5000}
RATE=${3:-100}
CONNS=${4:-10000}
. bench/servers.sh

one() { # label compression loadgen-args...
  local label=$1 compression=$2
  shift 2
  RUSTY_SOCKS_COMPRESSION=$compression start rusty_socks
  local out
  out=$(taskset -c 0 "$BIN/loadgen" "$@" --url "ws://127.0.0.1:$PORT/ws" --server-pid "$SERVER_PID" \
    | grep '^RESULT' || echo "RESULT failed")
  echo "$label $out"
  stop
  sleep 1
}

echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); commit $(git rev-parse --short HEAD); load $(cut -d' ' -f1-3 /proc/loadavg)"
fanout=(broadcast --subscribers 1000 --size 1024 --deflate --inflate-every 10)
for round in $(seq 1 "$ROUNDS"); do
  for c in false true; do
    one "burst-deflate-$c-r$round" "$c" "${fanout[@]}" --messages "$MSGS" --window 256
  done
  for c in false true; do
    one "paced-${RATE}-deflate-$c-r$round" "$c" "${fanout[@]}" --messages "$((RATE * 20))" --rate "$RATE"
  done
  for c in false true; do
    one "idle-${CONNS}-deflate-$c-r$round" "$c" connect --connections "$CONNS" --hold 3 --deflate
  done
done
echo "# load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
