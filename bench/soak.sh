#!/usr/bin/env bash
# Soak: a fresh Rusty Socks server under minutes of churn (connections joining, publishing and
# leaving, some dropped without a close frame), one mass disconnect wave halfway, and steady
# subscribers that must lose nothing; then the server must be back to 0 connections and tasks,
# every presence empty and its RSS near its baseline. Loopback only; prints the RESULT line and
# fails if a check failed.
#
# Usage: bench/soak.sh [SECONDS]      (default 60)
# Environment: PROFILE=debug to use debug builds (CI); WAVE, STAYERS, CHURNERS, RATE to size it;
#              RUSTY_SOCKS_BROKER to soak a Redis or NATS broker instead of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-60}
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet --bin rusty_socks -p rusty-socks
  cargo build --release --quiet --bin soak -p rusty-bench
  BIN=target/release
else
  cargo build --quiet --bin rusty_socks -p rusty-socks
  cargo build --quiet --bin soak -p rusty-bench
  BIN=target/debug
fi
WAVE=${WAVE:-2000}
STAYERS=${STAYERS:-100}
CHURNERS=${CHURNERS:-100}
RATE=${RATE:-100}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
KEY=soak-key-for-this-run-$$
# Every connection is a file descriptor, in the server and in the generator.
ulimit -n "$(ulimit -Hn)"
MAX=$(( WAVE + STAYERS + CHURNERS + 200 ))
echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); ${SECONDS_TO_RUN}s, wave $WAVE, $STAYERS stayers, $CHURNERS churners, $RATE msg/s, $PROFILE"
RUSTY_SOCKS_HOST=127.0.0.1 RUSTY_SOCKS_PORT=$PORT RUSTY_SOCKS_API_KEY=$KEY \
  RUSTY_SOCKS_MAX_CONN=$MAX RUSTY_SOCKS_MAX_QUEUED_TASKS=$MAX RUSTY_SOCKS_MAX_CONN_PER_IP=0 \
  RUSTY_SOCKS_NAMESPACES='{"":{},"soak":{"history_size":100,"join_leave":true}}' \
  RUST_LOG=warn "$BIN/rusty_socks" &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then break; fi
  sleep 0.1
done
kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server did not start"; exit 1; }
status=0
"$BIN/soak" --url "ws://127.0.0.1:$PORT/ws" --server-pid "$SERVER_PID" --api-key "$KEY" \
  --duration "$SECONDS_TO_RUN" --wave "$WAVE" --stayers "$STAYERS" --churners "$CHURNERS" \
  --rate "$RATE" || status=$?
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || { echo "server exited with $?"; status=1; }
trap - EXIT
exit $status
