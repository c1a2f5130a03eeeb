# Sourced by bench/run.sh and bench/compare.sh: start and stop one server under test, pinned to
# CPU 1. Expects BIN (the release directory); `baseline` runs $BASELINE, another rusty_socks.
# `*-envelope` peers build the legacy `Chat` frame per message (parse, id, timestamp) instead of
# forwarding the client's bytes. THREADS (default 1) sets every server's worker threads and
# SERVER_CPUS (default 1) the CPUs they are pinned to. `rusty_socks-wdN` is this build with
# RUSTY_SOCKS_WRITE_DELAY_MS=N (N milliseconds of write delay, always, and no other);
# `rusty_socks-nobusy` with RUSTY_SOCKS_BUSY_WRITE_DELAY_MS=0 (no delay while saturated either).
SERVER_PID=""
THREADS=${THREADS:-1}
SERVER_CPUS=${SERVER_CPUS:-1}
stop() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; fi; }
trap stop EXIT

start() { # name -> sets SERVER_PID and PORT
  local name=$1 binary="$BIN/rusty_socks" delay=0 busy=10
  case "$name" in
    rusty_socks | baseline | rusty_socks-wd* | rusty_socks-nobusy)
      [ "$name" = baseline ] && binary=$BASELINE
      case "$name" in rusty_socks-wd*) delay=${name#rusty_socks-wd} busy=0 ;; rusty_socks-nobusy) busy=0 ;; esac
      PORT=9500
      RUSTY_SOCKS_WRITE_DELAY_MS=$delay RUSTY_SOCKS_BUSY_WRITE_DELAY_MS=$busy RUSTY_SOCKS_HOST=127.0.0.1 RUSTY_SOCKS_PORT=$PORT RUSTY_SOCKS_THREAD_POOL_SIZE=$THREADS \
        RUSTY_SOCKS_MAX_CONN=20000 RUSTY_SOCKS_MAX_QUEUED_TASKS=20000 RUSTY_SOCKS_MAX_CONN_PER_IP=0 RUSTY_SOCKS_ECHO_ENDPOINT=true \
        RUST_LOG=warn taskset -c "$SERVER_CPUS" "$binary" >/dev/null 2>&1 &
      ;;
    tungstenite) PORT=9501; taskset -c "$SERVER_CPUS" "$BIN/peer-tungstenite" --port $PORT --threads "$THREADS" >/dev/null 2>&1 & ;;
    fastwebsockets) PORT=9502; taskset -c "$SERVER_CPUS" "$BIN/peer-fastwebsockets" --port $PORT --threads "$THREADS" >/dev/null 2>&1 & ;;
    tungstenite-envelope) PORT=9503; taskset -c "$SERVER_CPUS" "$BIN/peer-tungstenite" --port $PORT --threads "$THREADS" --envelope true >/dev/null 2>&1 & ;;
    fastwebsockets-envelope) PORT=9504; taskset -c "$SERVER_CPUS" "$BIN/peer-fastwebsockets" --port $PORT --threads "$THREADS" --envelope true >/dev/null 2>&1 & ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 1 50); do
    if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then return; fi
    sleep 0.1
  done
  echo "server $name did not start" >&2; exit 1
}
