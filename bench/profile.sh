#!/usr/bin/env bash
# What one delivery of burst broadcast costs the release server, counted rather than timed, so
# that A/B comparisons hold on a busy machine (where CPU-second figures do not):
#
#   callgrind  instructions per delivery (`valgrind --tool=callgrind`; it runs the server's
#              threads one at a time, so it shows work, not contention), and the profile in
#              target/profile/ for `callgrind_annotate`.
#   cachesim   the same with callgrind's cache simulation: first-level and last-level data
#              cache misses per delivery (a model of a cache, not this CPU's; for A/B and for
#              how cost grows with the number of subscribers).
#   perf       where the CPU time goes, user and kernel (`perf record -e cpu-clock`, sampled at
#              4 kHz on the server running at full speed; `perf report -i OUT.data` for more):
#              the top symbols with their share and nanoseconds per delivery.
#   syscalls   system calls and context switches per delivery, and CPU time, on the server
#              running at full speed (`perf stat` software events and syscall tracepoints,
#              which work without hardware counters): where two workers contend it shows up
#              here as futex calls, wake-ups and smaller writes.
#
# The subscribers connect first; loadgen's --before-burst starts counting right before the
# first message and --after-burst stops right after the last delivery, so connecting and
# closing are not counted.
#
# WARMUP=N sends N messages to the same subscribers first, unmeasured (sockets warm).
#
# Usage: [SIZE=64] [WARMUP=0] bench/profile.sh MODE [SUBSCRIBERS] [MESSAGES] [DIALECT] [THREADS] [BINARY]
#   e.g. bench/profile.sh callgrind 1000 2000 legacy 1
#        bench/profile.sh syscalls 10000 200 v1 2 /tmp/base/target/release/rusty_socks
# Fixed port 9500 like the other bench scripts: run it under `flock /tmp/bench.lock`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: bench/profile.sh callgrind|cachesim|perf|syscalls [SUBSCRIBERS] [MESSAGES] [DIALECT] [THREADS] [BINARY]}
SUBSCRIBERS=${2:-1000}
MESSAGES=${3:-2000}
DIALECT=${4:-legacy}
THREADS=${5:-1}
BINARY=${6:-target/release/rusty_socks}
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --workspace --bins
PORT=9500
mkdir -p target/profile
OUT=target/profile/$MODE-$SUBSCRIBERS-$MESSAGES-$DIALECT-t$THREADS-$(date +%H%M%S)

export RUSTY_SOCKS_HOST=127.0.0.1 RUSTY_SOCKS_PORT=$PORT RUSTY_SOCKS_THREAD_POOL_SIZE=$THREADS \
  RUSTY_SOCKS_MAX_CONN=20000 RUSTY_SOCKS_MAX_QUEUED_TASKS=20000 RUSTY_SOCKS_MAX_CONN_PER_IP=0 RUST_LOG=warn
case "$MODE" in
  callgrind | cachesim)
    SIM=no; [ "$MODE" = cachesim ] && SIM=yes
    valgrind --tool=callgrind --cache-sim=$SIM --instr-atstart=no --fair-sched=yes --callgrind-out-file="$OUT" \
      "$BINARY" >/dev/null 2>"$OUT.log" &
    SERVER_PID=$!
    BEFORE="callgrind_control -i on $SERVER_PID >/dev/null"
    AFTER="callgrind_control -d $SERVER_PID >/dev/null"
    ;;
  perf)
    taskset -c "$([ "$THREADS" -gt 1 ] && echo 0,1 || echo 1)" "$BINARY" >/dev/null 2>"$OUT.log" &
    SERVER_PID=$!
    BEFORE="perf record -q -e cpu-clock -F 4000 ${PERF_RECORD_ARGS:-} -p $SERVER_PID -o $OUT.data >/dev/null 2>&1 & echo \$! > $OUT.perfpid; sleep 0.5; cat /proc/$SERVER_PID/stat > $OUT.stat0"
    AFTER="cat /proc/$SERVER_PID/stat > $OUT.stat1; kill -INT \$(cat $OUT.perfpid); while kill -0 \$(cat $OUT.perfpid) 2>/dev/null; do sleep 0.1; done"
    ;;
  syscalls)
    # One worker on CPU 1 (the generator has CPU 0); more share both CPUs with the generator.
    taskset -c "$([ "$THREADS" -gt 1 ] && echo 0,1 || echo 1)" "$BINARY" >/dev/null 2>"$OUT.log" &
    SERVER_PID=$!
    EVENTS=${EVENTS:-task-clock,context-switches,syscalls:sys_enter_futex,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read}
    # /proc/PID/stat before and after splits the CPU time into user and system (kernel) time.
    BEFORE="perf stat -x, -e $EVENTS -p $SERVER_PID -o $OUT.perf & echo \$! > $OUT.perfpid; sleep 0.5; cat /proc/$SERVER_PID/stat > $OUT.stat0"
    AFTER="cat /proc/$SERVER_PID/stat > $OUT.stat1; kill -INT \$(cat $OUT.perfpid); while kill -0 \$(cat $OUT.perfpid) 2>/dev/null; do sleep 0.1; done"
    ;;
  *) echo "MODE must be callgrind, cachesim, perf or syscalls, got $MODE" >&2; exit 2 ;;
esac
stop() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 1 300); do
  if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then break; fi
  sleep 0.1
done

result=$(taskset -c 0 target/release/loadgen broadcast --subscribers "$SUBSCRIBERS" \
  --messages "$MESSAGES" --size "${SIZE:-64}" --window 256 --warmup "${WARMUP:-0}" --dialect "$DIALECT" \
  --url "ws://127.0.0.1:$PORT/ws" --server-pid "$SERVER_PID" --timeout 900 \
  --before-burst "$BEFORE" --after-burst "$AFTER" 2>/dev/null | grep '^RESULT')
stop
trap - EXIT
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$result"; }
delivered=$(field delivered)
echo "# $(basename "$BINARY") $MODE subscribers=$SUBSCRIBERS messages=$MESSAGES dialect=$DIALECT threads=$THREADS delivered=$delivered lost=$(field lost) server_busy_pct=$(field server_busy_pct) load=$(cut -d' ' -f1 /proc/loadavg)"
case "$MODE" in
  callgrind | cachesim)
    # summary: Ir [Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw] (the cache events with --cache-sim).
    read -r ir _ _ _ d1r d1w _ dlr dlw < <(sed -n 's/^summary: //p' "$OUT".1)
    printf 'instructions_per_delivery=%d' $((ir / delivered))
    [ "$MODE" = cachesim ] && awk -v d="$delivered" -v d1=$((d1r + d1w)) -v ll=$((dlr + dlw)) \
      'BEGIN { printf " d1_misses_per_delivery=%.2f ll_misses_per_delivery=%.2f", d1 / d, ll / d }'
    echo " profile=$OUT.1"
    ;;
  perf)
    read -r u0 s0 < <(awk '{print $14, $15}' "$OUT.stat0")
    read -r u1 s1 < <(awk '{print $14, $15}' "$OUT.stat1")
    cpu_ns=$(awk -v d="$delivered" -v t=$((u1 - u0 + s1 - s0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.0f", t * 1e9 / hz / d }')
    echo "cpu_ns_per_delivery=$cpu_ns profile=$OUT.data"
    # Share of samples per symbol ([k] kernel, [.] user), and what that is per delivery.
    perf report -i "$OUT.data" --no-children --sort dso,sym --percent-limit 0.7 --stdio 2>/dev/null |
      awk -v ns="$cpu_ns" '$1 ~ /%$/ { p = $1; sub(/%/, "", p); $1 = ""; printf "%6.2f%% %6.1f ns %s\n", p, p * ns / 100, $0 }'
    ;;
  syscalls)
    # perf -x, lines: value,unit,event,...; task-clock is in milliseconds.
    awk -F, -v d="$delivered" '$1 ~ /^[0-9.]+$/ {
        name = $3; sub(/^syscalls:sys_enter_/, "", name)
        if (name == "task-clock") printf "cpu_ns_per_delivery=%.0f ", $1 * 1e6 / d
        else printf "%s_per_1k=%.2f ", name, $1 * 1000 / d
      } END { print "" }' "$OUT.perf"
    # Fields 14 and 15 of /proc/PID/stat: user and system time in clock ticks.
    read -r u0 s0 < <(awk '{print $14, $15}' "$OUT.stat0")
    read -r u1 s1 < <(awk '{print $14, $15}' "$OUT.stat1")
    awk -v d="$delivered" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" \
      'BEGIN { printf "user_ns_per_delivery=%.0f system_ns_per_delivery=%.0f\n", u * 1e9 / hz / d, s * 1e9 / hz / d }'
    ;;
esac
