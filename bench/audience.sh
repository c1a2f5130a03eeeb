#!/usr/bin/env bash
# Issue 19, item 3: does the cost of a delivery grow with the audience? Burst broadcast at
# 1,000 and 10,000 subscribers, each with 1,000 and with 10,000 messages per subscriber, counted
# by bench/profile.sh syscalls (the server's task-clock between the first message and the last
# delivery, one worker on CPU 1, the generator on CPU 0), ROUNDS rounds, legacy and v1.
#
# Holding the messages per subscriber equal isolates the audience. The two other comparisons
# printed show what else moves the figure: the same deliveries (10,000 x 1,000 against
# 1,000 x 10,000) also changes how long each socket lives in the burst, and the marginal cost
# (the difference quotient between the two message counts at one audience) takes out what
# each subscriber costs once per burst. packets_per_1k is what the server's own context put on
# the loopback device per 1,000 deliveries (net:net_dev_xmit; on loopback that includes the
# acknowledgements the clients' kernels send from the server's context). WARMUP=N sends N
# messages to the same subscribers first, unmeasured, so the burst finds its sockets warm.
#
# Usage: [DIALECTS="legacy v1"] [WARMUP=0] bench/audience.sh [ROUNDS]   (default 2; ~2 min a round)
# Fixed port 9500 like the other bench scripts: run it under `flock /tmp/bench.lock`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --workspace --bins
export NO_BUILD=1 EVENTS=task-clock,net:net_dev_xmit,syscalls:sys_enter_writev
echo "# machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  for dialect in ${DIALECTS:-legacy v1}; do
    # Every other round runs the cells in the opposite order, so that no cell always follows
    # the same one (10,000 connections leave TIME_WAIT sockets and memory behind them).
    cells=("1000 1000" "10000 1000" "1000 10000" "10000 10000")
    [ $((round % 2)) = 0 ] && cells=("10000 10000" "1000 10000" "10000 1000" "1000 1000")
    for cell in "${cells[@]}"; do
      read -r subs msgs <<<"$cell"
      out=$(bench/profile.sh syscalls "$subs" "$msgs" "$dialect" 1)
      lost=$(sed -n 's/.* lost=\([0-9]*\).*/\1/p' <<<"$out")
      cpu=$(sed -n 's/^cpu_ns_per_delivery=\([0-9]*\).*/\1/p' <<<"$out")
      packets=$(sed -n 's/.*net_dev_xmit_per_1k=\([0-9.]*\).*/\1/p' <<<"$out")
      writev=$(sed -n 's/.*writev_per_1k=\([0-9.]*\).*/\1/p' <<<"$out")
      split=$(grep '^user_ns_per_delivery=' <<<"$out" || true)
      if [ -z "$cpu" ] || [ -z "$packets" ] || [ -z "$lost" ]; then
        echo "audience: no figures from bench/profile.sh syscalls $subs $msgs $dialect:" >&2
        echo "$out" >&2
        exit 1
      fi
      echo "RESULT audience round=$round dialect=$dialect subscribers=$subs messages=$msgs warmup=${WARMUP:-0} cpu_ns_per_delivery=$cpu packets_per_1k=$packets writev_per_1k=$writev $split lost=$lost"
    done
  done
done | tee /dev/stderr | awk '
  /^RESULT/ {
    for (i = 3; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    key = f["dialect"] " " f["subscribers"] " " f["messages"]
    sum[key] += f["cpu_ns_per_delivery"]; n[key]++
    one[key " " f["round"]] = f["cpu_ns_per_delivery"]; if (f["round"] > rounds) rounds = f["round"]
    if (f["lost"] != 0) lost = 1
    if (!(f["dialect"] in dialects)) nd++
    dialects[f["dialect"]] = 1
  }
  function m(d, s, k) { return n[d " " s " " k] ? sum[d " " s " " k] / n[d " " s " " k] : 0 }
  END {
    if (lost) print "# LOST deliveries in some run: the figures below do not count"
    if (!nd) { print "# no results"; exit 1 }
    for (d in dialects) {
      a = m(d, 1000, 1000); b = m(d, 10000, 1000); c = m(d, 1000, 10000); e = m(d, 10000, 10000)
      if (!a || !b || !c || !e) { print "# " d ": a cell has no result"; continue }
      # Marginal ns per delivery between 1,000 and 10,000 messages, at one audience; what a
      # burst of 1,000 costs beyond it, spread over a subscriber'"'"'s 1,000 deliveries, is (x - m) ns
      # per delivery, that is (x - m) microseconds per subscriber.
      m1 = (c * 10000 - a * 1000) / 9000; m10 = (e * 10000 - b * 1000) / 9000
      printf "# %s means, ns per delivery: 1,000 subs: %.0f (1k msgs) %.0f (10k msgs); 10,000 subs: %.0f / %.0f\n", d, a, c, b, e
      printf "# %s audience x10, same messages per subscriber: %.2fx (1,000 msgs), %.2fx (10,000 msgs) deliveries per CPU-second\n", d, a / b, c / e
      printf "# %s marginal: %.0f ns at 1,000 subs, %.0f at 10,000: %.2fx; once per subscriber per burst: %.0f / %.0f us\n", d, m1, m10, m1 / m10, a - m1, b - m10
      printf "# %s same deliveries (10,000 x 1,000 against 1,000 x 10,000): %.2fx\n", d, c / b
      # The same ratios round by round (both cells of a pair from one round).
      line = ""
      for (r = 1; r <= rounds; r++) {
        p = one[d " 1000 1000 " r]; q = one[d " 10000 1000 " r]; u = one[d " 1000 10000 " r]; v = one[d " 10000 10000 " r]
        if (p && q && u && v) line = line sprintf(" r%d: %.2f/%.2f/%.2f", r, p / q, u / v, u / q)
      }
      printf "# %s per round, audience x10 at 1,000 msgs / at 10,000 msgs / same deliveries:%s\n", d, line
    }
  }'
