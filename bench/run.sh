#!/usr/bin/env bash
# sockvisor benchmark suite: one command, results in bench/results/<timestamp>/.
#
#   bench/run.sh                 full profile (~40 min): 5 interleaved repetitions x 10 s,
#                                2 and 4 workers, close + keepalive, UDP, time to READY=1
#   bench/run.sh --quick         quick profile (~4 min): 2 repetitions x 3 s, 2 workers
#   bench/run.sh --long          add round-robin balance over 100k connections and the
#                                RSS-flatness run over ~1M connections (8 workers)
#   bench/run.sh --quick --stand-in /tmp/refserver/refserver
#                                validate the harness before sockvisor works: the research
#                                refserver plays sockvisor and the reuseport reference
#   bench/run.sh --no-build ...  skip cargo build
#
# Every other option is passed to bench/lib/suite.py (bench/run.sh --help lists them).
# Loopback only; ports picked free per run; every run bounded; servers run in their
# own session and are stopped by process group, never by name. See docs/benchmarks.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

build=1 standin= args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) args+=(--profile quick) ;;
    --full) args+=(--profile full) ;;
    --no-build) build=0 ;;
    -h|--help) build=0; args+=("$1") ;;
    --stand-in) standin="$2"; args+=(--stand-in "$2"); shift ;;
    --stand-in=*) standin="${1#*=}"; args+=("$1") ;;
    *) args+=("$1") ;;
  esac
  shift
done

missing=0
if ! command -v wrk >/dev/null; then
  echo "run.sh: wrk not found; install it with: apt-get update && apt-get install -y wrk" >&2
  missing=1
fi
if ! command -v node >/dev/null; then
  echo "run.sh: node not found (expected /usr/bin/node); install it with: apt-get install -y nodejs" >&2
  missing=1
fi
[ "$missing" = 0 ] || exit 2

if [ -n "$standin" ]; then
  [ -x "$standin" ] || { echo "run.sh: --stand-in $standin is not an executable" >&2; exit 2; }
  build=0  # the stand-in needs nothing from cargo
fi
if [ "$build" = 1 ]; then
  echo "# cargo build --release --bin sockvisor --examples" >&2
  (cd "$root" && cargo build --release --bin sockvisor --examples) || {
    echo "run.sh: build failed; fix it, or check the harness alone with --stand-in REFSERVER (docs/benchmarks.md)" >&2
    exit 2
  }
  for b in target/release/sockvisor target/release/examples/hello; do
    [ -x "$root/$b" ] || { echo "run.sh: $b missing after the build" >&2; exit 2; }
  done
fi

py=/usr/bin/python3
[ -x "$py" ] || py=python3
exec "$py" "$here/lib/suite.py" "${args[@]}"
