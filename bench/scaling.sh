#!/usr/bin/env bash
# Cross-node fan-out: 1, 2 and 3 Rusty Socks nodes sharing one broker (Redis, NATS), measured
# with the load generator's broadcast scenario. Subscribers are spread over the nodes; the
# publisher is on the first node, so with 2 and 3 nodes most deliveries cross the broker.
# Nodes run pinned to CPU 1 (one worker thread each), the generator to CPU 0; the broker
# servers are the machine's own and are not pinned (OWN_BROKERS below pins its own). Loopback
# only; stops by itself.
#
# Usage: bench/scaling.sh [BROKER_URL...]
#   default: memory (1 node), redis://127.0.0.1:6379, nats://127.0.0.1:4222
#   NO_BUILD=1 uses target/release as it is; SERVER_BINARY=path runs another rusty_socks build.
#   PUBLISHERS=N (default 1) publishers on the first node, each sending MESSAGES.
#   MAX_NODES=N (default 3) stops at N nodes per broker (1: every broker with one node, the
#   comparison with the memory broker). MESSAGES (default 2000): on a fast machine 2,000 is a 0.3 s burst, a
#   few tens of the 10 ms ticks the server's CPU time is read in; MESSAGES=10000 reads closer.
#   RATE=N sends N messages/s per publisher instead of a burst (for latency at a steady load;
#   see bench/compare.sh).
#   WINDOW (default 256): messages the publisher may run ahead of the slowest subscriber. It
#   sends 32 at a time, so keep WINDOW + 32 within the nodes' RUSTY_SOCKS_BUFFER (1024), or
#   subscribers are closed as slow consumers (4001) and the run ends at its timeout.
#   OWN_BROKERS=1 starts a redis-server (port 6391) and a nats-server with JetStream (port
#   4231) of its own, pinned to BROKER_CPUS (default 0, the generator's CPU), and measures
#   those (memory, then both): the nodes' CPU then runs nothing but the
#   nodes, as with the broker on another host. Both are stopped at the end; the ports must be
#   free, and no URL may be given with it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --workspace --bins
BIN=target/release
SERVER_BINARY=${SERVER_BINARY:-$BIN/rusty_socks}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
MESSAGES=${MESSAGES:-2000}
PUBLISHERS=${PUBLISHERS:-1}
WINDOW=${WINDOW:-256}
if [ $# -gt 0 ]; then BROKERS=("$@"); else BROKERS=(memory redis://127.0.0.1:6379 nats://127.0.0.1:4222); fi

. bench/nats_clean.sh

PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
BROKER_PIDS=()
BROKER_DIR=""
stop_brokers() {
  for pid in "${BROKER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  BROKER_PIDS=()
  [ -z "$BROKER_DIR" ] || rm -rf "$BROKER_DIR"
}
trap 'stop_all; stop_brokers' EXIT

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name pid: fails if the process it started died instead
  for _ in $(seq 1 100); do
    if ! kill -0 "$3" 2>/dev/null; then echo "$2 on port $1 exited" >&2; exit 1; fi
    if port_open "$1"; then return; fi
    sleep 0.1
  done
  echo "$2 on port $1 did not start" >&2; exit 1
}

if [ "${OWN_BROKERS:-0}" = 1 ]; then
  if [ $# -gt 0 ]; then echo "OWN_BROKERS=1 measures its own brokers: give no URL" >&2; exit 2; fi
  for port in 6391 4231; do
    if port_open $port; then echo "port $port is taken: OWN_BROKERS=1 needs it free" >&2; exit 1; fi
  done
  BROKER_DIR=$(mktemp -d)
  taskset -c "${BROKER_CPUS:-0}" redis-server --port 6391 --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$BROKER_DIR" >/dev/null 2>&1 &
  BROKER_PIDS+=($!)
  wait_port 6391 redis-server $!
  taskset -c "${BROKER_CPUS:-0}" nats-server -js -a 127.0.0.1 -p 4231 -sd "$BROKER_DIR/js" >/dev/null 2>&1 &
  BROKER_PIDS+=($!)
  wait_port 4231 nats-server $!
  BROKERS=(memory redis://127.0.0.1:6391 nats://127.0.0.1:4231)
fi

start_node() { # broker port prefix
  RUSTY_SOCKS_HOST=127.0.0.1 RUSTY_SOCKS_PORT=$2 RUSTY_SOCKS_THREAD_POOL_SIZE=1 \
    RUSTY_SOCKS_MAX_CONN=20000 RUSTY_SOCKS_MAX_QUEUED_TASKS=20000 RUSTY_SOCKS_MAX_CONN_PER_IP=0 \
    RUSTY_SOCKS_BROKER="$1" RUSTY_SOCKS_BROKER_PREFIX="$3" RUST_LOG=warn \
    taskset -c 1 "$SERVER_BINARY" >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$2/health" >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  echo "node on port $2 did not start" >&2; exit 1
}

for broker in "${BROKERS[@]}"; do
  max=${MAX_NODES:-3}
  if [ "$broker" = memory ]; then max=1; fi
  for nodes in $(seq 1 $max); do
    prefix="scale$$n$nodes"
    urls=""
    for i in $(seq 1 "$nodes"); do
      port=$((9600 + i))
      start_node "$broker" "$port" "$prefix"
      urls="${urls:+$urls,}ws://127.0.0.1:$port/ws"
    done
    pids=$(IFS=,; echo "${PIDS[*]}")
    printf '%-24s nodes=%s %s' "$broker" "$nodes" "${RATE:+rate=$RATE }"
    taskset -c 0 "$BIN/loadgen" broadcast --url "$urls" --server-pid "$pids" \
      --subscribers "$SUBSCRIBERS" --publishers "$PUBLISHERS" --messages "$MESSAGES" --window "$WINDOW" ${RATE:+--rate "$RATE"} --timeout 120 | grep '^RESULT' \
      || echo "RESULT failed"
    stop_all
    nats_delete_prefix "$broker" "$prefix"
  done
done
