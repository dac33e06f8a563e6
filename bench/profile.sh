#!/usr/bin/env bash
# Instructions per dispatched connection of sockvisor's master, reproducibly:
# callgrind on sockvisor serving exactly BASE and BASE+20000 connections from a
# bounded client; Ir/conn = difference / 20000. See docs/benchmarks.md, "Profiling".
#
#   bench/profile.sh                          callgrind, 2 workers, round-robin, 20k connections
#   bench/profile.sh --dispatch ip-hash --conns 50000
#   bench/profile.sh --tool perf              perf stat instead (needs hardware counters)
#   bench/profile.sh --stand-in /tmp/refserver/refserver   the research ref-a master instead
#
# Builds with symbols into target/profile/ (release profile, not stripped, line tables).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
build=1 tool=callgrind
for arg in "$@"; do
  case "$arg" in
    --stand-in|--stand-in=*|-h|--help|--no-build) build=0 ;;
    perf) tool=perf ;;
  esac
done
args=()
for arg in "$@"; do [ "$arg" = --no-build ] || args+=("$arg"); done

if [ "$tool" = callgrind ] && ! command -v valgrind >/dev/null; then
  echo "profile.sh: valgrind not found; install it with: apt-get update && apt-get install -y valgrind" >&2
  exit 2
fi
if [ "$tool" = perf ] && ! command -v perf >/dev/null; then
  echo "profile.sh: perf not found; install it with: apt-get update && apt-get install -y linux-perf" >&2
  exit 2
fi
if [ "$build" = 1 ]; then
  echo "# cargo build --release --bin sockvisor --examples (with symbols, into target/profile)" >&2
  (cd "$root" && CARGO_TARGET_DIR="$root/target/profile" CARGO_PROFILE_RELEASE_STRIP=false \
     CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --bin sockvisor --examples) || {
    echo "profile.sh: build failed" >&2; exit 2; }
fi
py=/usr/bin/python3
[ -x "$py" ] || py=python3
exec "$py" "$here/lib/profile.py" "${args[@]}"
