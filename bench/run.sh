#!/usr/bin/env bash
# Measures Rusty Socks against its peers (tokio-tungstenite and fastwebsockets broadcast servers
# built from bench/) in one run: each scenario on a fresh server process pinned to CPU 1, the
# load generator pinned to CPU 0, loopback only. Prints every RESULT line, labelled.
#
# Usage: bench/run.sh [quick]      (quick: fewer messages and connections, for a smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace --bins
BIN=target/release
QUICK=${1:-}
scale() { if [ "$QUICK" = quick ]; then echo $(( $1 / 10 )); else echo "$1"; fi; }

. bench/servers.sh

gen() { taskset -c 0 "$BIN/loadgen" "$@" | grep '^RESULT' || echo "RESULT failed"; }

run() { # label server scenario args...
  local label=$1 server=$2; shift 2
  start "$server"
  local url_path=/ws
  [ "$1" = echo ] && url_path=/echo
  local out
  out=$(gen "$@" --url "ws://127.0.0.1:$PORT$url_path" --server-pid "$SERVER_PID")
  echo "$label $server $out"
  stop
  sleep 1
}

SERVERS="rusty_socks fastwebsockets tungstenite"
# Broadcast also against the peers' envelope mode: the same `Chat` frame built per message.
BROADCASTERS="rusty_socks fastwebsockets-envelope fastwebsockets tungstenite-envelope tungstenite"
MSGS=$(scale 10000)
echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); load average $(cut -d' ' -f1-3 /proc/loadavg)"
for s in $BROADCASTERS; do run burst-1000x64 "$s" broadcast --subscribers 1000 --messages "$MSGS" --size 64 --window 256; done
run burst-1000x64-v1 rusty_socks broadcast --subscribers 1000 --messages "$MSGS" --size 64 --window 256 --dialect v1
for s in $BROADCASTERS; do run rate-1000x64-1k/s "$s" broadcast --subscribers 1000 --messages "$(scale 3000)" --size 64 --rate 1000; done
# The same with 10 subscribers that never read: what they cost the others.
for s in $SERVERS; do run rate-1000x64-1k/s-stalled10 "$s" broadcast --subscribers 1000 --stalled 10 --messages "$(scale 3000)" --size 64 --rate 1000; done
for round in 1 2; do
  for s in $SERVERS; do run "echo-100xw1-r$round" "$s" echo --connections 100 --window 1 --duration "$(scale 30)"; done
done
# Connect rates are noisy (the generator and the kernel, not the servers, set the pace; see the
# per-CPU-second figure): three alternating rounds.
for round in 1 2 3; do
  for s in $SERVERS; do run "connect-10k-r$round" "$s" connect --connections "$(scale 10000)" --hold 3; done
done
run connect-19k rusty_socks connect --connections "$(scale 19000)" --hold 3
run connect-19k fastwebsockets connect --connections "$(scale 19000)" --hold 3
# How cost grows with subscribers and with message size (Rusty Socks only).
run subs-100 rusty_socks broadcast --subscribers 100 --messages "$(scale 50000)" --size 64 --window 256
run subs-10000 rusty_socks broadcast --subscribers "$(scale 10000)" --messages "$(scale 1000)" --size 64 --window 256
run size-1024 rusty_socks broadcast --subscribers 1000 --messages "$(scale 5000)" --size 1024 --window 256
run size-4096 rusty_socks broadcast --subscribers 1000 --messages "$(scale 2000)" --size 4096 --window 256
# permessage-deflate: 1 KiB to 1,000 subscribers offering it, compression off and on.
for round in 1 2; do
  run "deflate-off-1000x1k-r$round" rusty_socks broadcast --subscribers 1000 --messages "$(scale 5000)" --size 1024 --window 256 --deflate
  RUSTY_SOCKS_COMPRESSION=true run "deflate-on-1000x1k-r$round" rusty_socks broadcast --subscribers 1000 --messages "$(scale 5000)" --size 1024 --window 256 --deflate
done
# The sender-only ceiling of this machine, in the same run (docs/BENCHMARKS.md, "Sender ceiling").
NO_BUILD=1 bench/sender_ceiling.sh "$( [ "$QUICK" = quick ] && echo 1 || echo 5 )" 1000 | sed 's/^RESULT/sender-ceiling RESULT/'
