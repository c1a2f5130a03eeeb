#!/usr/bin/env bash
# Instructions per delivery of one node (user space, valgrind --tool=callgrind), memory broker
# vs Redis vs NATS: repeatable while other work loads the machine, unlike CPU seconds.
# One node (one worker thread) runs under callgrind; loadgen's broadcast scenario sends
# MESSAGES and then 2 x MESSAGES legacy chat messages to SUBSCRIBERS subscribers on it, and the
# difference of the two runs' instruction counts divided by the extra deliveries is the cost
# of one more delivery (connecting, startup and shutdown cancel out). Through Redis or NATS the
# node receives its own publications back from the broker, which is the path a node of a
# cluster takes for every publication. Kernel time (the syscalls themselves) is not counted.
#
# Usage: bench/broker_callgrind.sh [BROKER_URL...]
#   default: memory, redis://127.0.0.1:6379, nats://127.0.0.1:4222
#   SERVER_BINARY=path measures another build; SUBSCRIBERS (200), MESSAGES (300).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
SERVER_BINARY=${SERVER_BINARY:-$BIN/rusty_socks}
SUBSCRIBERS=${SUBSCRIBERS:-200}
MESSAGES=${MESSAGES:-300}
PORT=${PORT:-9580}
if [ $# -gt 0 ]; then BROKERS=("$@"); else BROKERS=(memory redis://127.0.0.1:6379 nats://127.0.0.1:4222); fi
. bench/nats_clean.sh
OUT=$(mktemp -d)
PID=
trap '[ -z "$PID" ] || kill "$PID" 2>/dev/null; rm -rf "$OUT"' EXIT

# Runs one node under callgrind with `messages` published; prints its instruction count.
measure() { # broker messages
  local log="$OUT/cg.$RANDOM" prefix="cg$$r$RANDOM"
  if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
    echo "port $PORT is taken" >&2; exit 1
  fi
  RUSTY_SOCKS_HOST=127.0.0.1 RUSTY_SOCKS_PORT=$PORT RUSTY_SOCKS_THREAD_POOL_SIZE=1 \
    RUSTY_SOCKS_MAX_CONN=20000 RUSTY_SOCKS_MAX_QUEUED_TASKS=20000 RUSTY_SOCKS_MAX_CONN_PER_IP=0 \
    RUSTY_SOCKS_BROKER="$1" \
    RUSTY_SOCKS_BROKER_PREFIX="$prefix" RUST_LOG=warn RUSTY_SOCKS_BROKER_TIMEOUT=30 \
    valgrind --tool=callgrind --callgrind-out-file="$log" "$SERVER_BINARY" >/dev/null 2>&1 &
  PID=$!
  for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
    sleep 0.2
  done
  "$BIN/loadgen" broadcast --url "ws://127.0.0.1:$PORT/ws" --subscribers "$SUBSCRIBERS" \
    --messages "$2" --timeout 600 | grep '^RESULT' | grep -q 'lost=0' \
    || echo "loadgen reported loss or failed ($1, $2 messages)" >&2
  kill -TERM "$PID"
  wait "$PID" || true
  PID=
  nats_delete_prefix "$1" "$prefix"
  grep '^summary:' "$log" | awk '{print $2}'
}

printf '%-24s %14s\n' broker 'Ir/delivery'
for broker in "${BROKERS[@]}"; do
  small=$(measure "$broker" "$MESSAGES")
  large=$(measure "$broker" $((2 * MESSAGES)))
  awk -v a="$small" -v b="$large" -v n=$((SUBSCRIBERS * MESSAGES)) -v name="$broker" \
    'BEGIN { printf "%-24s %14.0f\n", name, (b - a) / n }'
done
