#!/usr/bin/env bash
# Burst broadcast only (1,000 subscribers, 64-byte messages, 256 in flight), several rounds,
# alternating the servers so that drift of the machine hits them alike: Rusty Socks as built
# here (legacy chat, and v1 `publish` to a channel of 1,000 subscribers), the fastwebsockets
# peer in both modes (enveloping: the same `Chat` frame built per message; raw: the 64 bytes
# forwarded), and optionally a second Rusty Socks binary to compare against (a build of an
# earlier commit). Server pinned to CPU 1 (SERVER_CPUS), generator to CPU 0, loopback only.
# THREADS=2 runs every server with two worker threads; FEATURES=rusty-socks/mimalloc builds
# with those cargo features; NO_BUILD=1 uses target/release as it is. SUBSCRIBERS (1000), SIZE
# (64 bytes) and RATE (unset: burst; N: N messages/s, for latency) change the load.
#
# Usage: bench/compare.sh [ROUNDS] [BASELINE_BINARY]
#   e.g. git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release --bin rusty_socks)
#        bench/compare.sh 5 /tmp/base/target/release/rusty_socks
#   SCENARIOS="rusty_socks:legacy fastwebsockets-envelope:legacy" bench/compare.sh  (a subset)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BASELINE=${2:-}
MESSAGES=${MESSAGES:-10000}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
SIZE=${SIZE:-64}
if [ -n "${RATE:-}" ]; then LOAD="--rate $RATE"; NAME="rate$RATE"; else LOAD="--window 256"; NAME=burst; fi
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --workspace --bins ${FEATURES:+--features "$FEATURES"}
BIN=target/release

. bench/servers.sh

DEFAULT="rusty_socks:legacy rusty_socks:v1 fastwebsockets-envelope:legacy fastwebsockets:legacy"
[ -n "$BASELINE" ] && DEFAULT="baseline:legacy baseline:v1 $DEFAULT"
SCENARIOS=${SCENARIOS:-$DEFAULT}
echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); commit $(git rev-parse --short HEAD); threads $THREADS on CPUs $SERVER_CPUS; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    s=${scenario%%:*}
    dialect=${scenario##*:}
    start "$s"
    # shellcheck disable=SC2086 # LOAD is two words
    out=$(taskset -c 0 "$BIN/loadgen" broadcast --subscribers "$SUBSCRIBERS" --messages "$MESSAGES" --size "$SIZE" \
      $LOAD --dialect "$dialect" --url "ws://127.0.0.1:$PORT/ws" --server-pid "$SERVER_PID" | grep '^RESULT' || echo "RESULT failed")
    echo "$NAME-${SUBSCRIBERS}x$SIZE-r$round $s $dialect $out"
    stop
    sleep 1
  done
done
