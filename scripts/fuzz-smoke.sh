#!/usr/bin/env bash
# Fuzz smoke run (CI): every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 20) each.
# A crash fails the script; its input is left in fuzz/artifacts/<target>/ (turn it into a
# regression unit test next to the code it broke). Seeds: fuzz/seeds/<target>/ (committed),
# the working corpus fuzz/corpus/<target>/ is not.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). It drives nightly-only flags
# (-Zsanitizer=address); on the stable toolchain RUSTC_BOOTSTRAP=1 lets rustc accept them.
#
# Longer run (docs/reliability.md): FUZZ_SECONDS=1800 scripts/fuzz-smoke.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 1
fi
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build
mkdir -p artifacts
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "fuzz-smoke: $t for ${seconds}s"
  log="artifacts/$t.log"
  # -rss_limit_mb: well under the machine's memory; -timeout: one input may take 10 s.
  if ! cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz-smoke: $t FAILED; the crashing input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$log" || true
done
echo "fuzz-smoke: ${#targets[@]} targets, ${seconds}s each, no crash"
