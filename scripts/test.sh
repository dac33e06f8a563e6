#!/usr/bin/env bash
# The full test suite (the README's test command): formatting, lints, unit and integration
# tests against the real binary, fuzz smoke runs. A test whose prerequisite is missing (root,
# a program, a real systemd) prints `SKIP: <test>: <why>` and returns, unless
# SOCKVISOR_REQUIRE_ALL=1 (CI), where it fails instead (tests/common/prereq.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The API docs build without a broken or private link.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
# The integration tests run the example workers (target/debug/examples/hello, ...): build them
# as programs first (--all-targets alone builds examples only as test harnesses).
cargo build --bins --examples
mkdir -p target
# --no-fail-fast: one failing test binary does not hide the others' results; the exit
# status comes at the end, after the summary.
failed=0
cargo test --no-fail-fast --all-targets 2>&1 | tee target/test-output.log || failed=1
cargo test --doc 2>&1 | tee -a target/test-output.log || failed=1
# Fuzz smoke: every target in fuzz/ for 20 s (scripts/fuzz-smoke.sh). Required in CI
# (.ci/run installs cargo-fuzz); skipped with a message elsewhere when it is not installed.
if [[ -n ${CI:-} ]] || cargo fuzz --version >/dev/null 2>&1; then
  scripts/fuzz-smoke.sh || failed=1
else
  echo "fuzz smoke skipped: cargo-fuzz not installed (cargo install cargo-fuzz --locked)"
fi
# One closing line over every cargo test binary above. A test that skipped itself returned
# early, so cargo counts it as passed: its `SKIP:` line (at the start of a line, or after
# "test NAME ... " when tests run one at a time) moves it to skipped; #[ignore]d ones are
# skipped too.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     /^(test .* \.\.\. )?SKIP: / { k++ }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - k, f, s + k }' target/test-output.log
if ((failed)); then
  echo "FAILED: the failing tests are listed above (grep -n 'FAILED\|panicked' target/test-output.log)"
  exit 1
fi
