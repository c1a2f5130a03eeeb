#!/usr/bin/env bash
# Burst broadcast only (1,000 subscribers, 64-byte messages, 256 in flight), several rounds,
# alternating the servers so that drift of the machine hits them alike: Rusty Socks as built
# here, the fastwebsockets peer, and optionally a second Rusty Socks binary to compare against
# (a build of an earlier commit). Server pinned to CPU 1, generator to CPU 0, loopback only.
#
# Usage: bench/compare.sh [ROUNDS] [BASELINE_BINARY]
#   e.g. git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release --bin rusty_socks)
#        bench/compare.sh 5 /tmp/base/target/release/rusty_socks
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BASELINE=${2:-}
cargo build --release --quiet --workspace --bins
BIN=target/release

. bench/servers.sh

SERVERS="rusty_socks fastwebsockets"
[ -n "$BASELINE" ] && SERVERS="baseline rusty_socks fastwebsockets"
echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); commit $(git rev-parse --short HEAD)"
for round in $(seq 1 "$ROUNDS"); do
  for s in $SERVERS; do
    start "$s"
    out=$(taskset -c 0 "$BIN/loadgen" broadcast --subscribers 1000 --messages 10000 --size 64 \
      --window 256 --url "ws://127.0.0.1:$PORT/ws" --server-pid "$SERVER_PID" | grep '^RESULT' || echo "RESULT failed")
    echo "burst-1000x64-r$round $s $out"
    stop
    sleep 1
  done
done
