#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on the stable toolchain and runs each one for a bounded
# time: fuzz/run.sh [SECONDS_PER_TARGET (default 60)] [TARGET...] (default: every target).
#
# cargo-fuzz needs nightly for its sanitizers; libFuzzer itself only needs the coverage
# instrumentation below, which stable rustc has (-C passes=sancov-module and LLVM options),
# so this script passes those flags itself and needs no extra tool: the libfuzzer-sys crate
# builds libFuzzer with the C++ compiler. Without AddressSanitizer the findings are panics
# (overflow and debug assertions are on), timeouts and memory blowups, which is what safe Rust
# code can get wrong.
#
# Each target starts from its committed seeds (corpus/TARGET) and regressions
# (regressions/TARGET); inputs it finds go to a temporary directory, so the committed corpus
# only changes on purpose: FUZZ_MERGE=1 merges the new inputs that add coverage into
# corpus/TARGET. A crashing input is saved as artifacts/TARGET/crash-...; copy it into
# regressions/TARGET/ (cargo test replays that directory) and fix the parser.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
case "$seconds" in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;; esac
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^rusty-socks-fuzz$')
fi

host=$(rustc -vV | sed -n 's/^host: //p')
# The flags cargo-fuzz passes, minus the nightly-only sanitizer. An explicit --target keeps them
# off build scripts and proc macros, which must not be instrumented.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth"
# Not --locked: fuzz/Cargo.lock pins what it has, and a dependency the server gains is added.
cargo build --release --quiet --target "$host" --target-dir target --bins

failed=()
for target in "${targets[@]}"; do
  bin="target/$host/release/$target"
  [ -x "$bin" ] || { echo "no fuzz target named $target" >&2; exit 2; }
  found=$(mktemp -d)
  dirs=("$found" "corpus/$target")
  [ -d "regressions/$target" ] && dirs+=("regressions/$target")
  mkdir -p "artifacts/$target"
  echo "== $target: ${seconds}s"
  # -timeout: one input running for seconds is a hang; -rss_limit_mb/-malloc_limit_mb: an input
  # that makes a parser allocate without bound is a finding too.
  if "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
    -max_len=16384 -print_final_stats=1 -artifact_prefix="artifacts/$target/" "${dirs[@]}" \
    >"$found.log" 2>&1; then
    grep -E '^(stat::number_of_executed_units|stat::new_units_added)' "$found.log" || true
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
      "$bin" -merge=1 "corpus/$target" "$found" >/dev/null 2>&1
    fi
  else
    # The panic message (the backtrace between is long), then where libFuzzer saved the input.
    grep -m1 -A2 'panicked at' "$found.log" >&2 || true
    tail -n 12 "$found.log" >&2
    failed+=("$target")
  fi
  rm -rf "$found" "$found.log"
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing found failures in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzzing: no failures in ${#targets[@]} targets (${seconds}s each)"
