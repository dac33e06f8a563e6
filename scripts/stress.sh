#!/usr/bin/env bash
# Parallel stress of the test suite (not run by CI): every test binary but the systemd one,
# in two streams at once (one in order, one reversed), RUST_TEST_THREADS threads each, ROUNDS
# rounds. Finds tests that depend on timing or on having the machine to themselves.
#   scripts/stress.sh [ROUNDS]      (default 3; logs in target/stress/)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
export SOCKVISOR_REQUIRE_ALL=${SOCKVISOR_REQUIRE_ALL:-1} RUST_TEST_THREADS=${RUST_TEST_THREADS:-8}
cargo build --bins --examples
mapfile -t bins < <(cargo test --no-run --all-targets 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | grep -v systemd_e2e)
out=target/stress
rm -rf "$out" && mkdir -p "$out"
stream() { # NAME BINARY...
  local name=$1 round b
  shift
  for round in $(seq 1 "$rounds"); do
    for b in "$@"; do
      "$b" >"$out/$(basename "$b").$name.$round.log" 2>&1 || echo "FAIL $name round $round: $b" | tee -a "$out/failures"
    done
  done
}
mapfile -t reversed < <(printf '%s\n' "${bins[@]}" | tac)
stream fwd "${bins[@]}" &
stream rev "${reversed[@]}" &
wait
runs=$((2 * rounds * ${#bins[@]}))
if [[ -s $out/failures ]]; then
  echo "stress: $(wc -l <"$out/failures") of $runs binary runs failed (logs in $out)"
  exit 1
fi
echo "stress: $runs binary runs, 0 failed"
