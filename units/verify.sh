#!/usr/bin/env bash
# units/verify.sh: check every unit in units/ (and the example drop-ins) with
# `systemd-analyze verify`. Fails on ANY output on stderr: systemd-analyze exits 0 even for
# "Failed to parse service type, ignoring" and similar (shared/research/crates.md section 3).
#
# The units name /usr/bin/sockvisor, which is not installed on a build host, so they are
# verified with --root= against a scratch root (--man=no: the man page is not on the build
# host; the package build checks it exists): a copy of the host's systemd unit directory,
# the units where a user/the package puts them, and stub executables.
#   usage: units/verify.sh [SOCKVISOR_BINARY]   (default: a stub script)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-}
command -v systemd-analyze >/dev/null || { echo "verify.sh: systemd-analyze not found (apt-get install systemd)" >&2; exit 1; }

root=$(mktemp -d /tmp/sockvisor-unit-verify.XXXXXX)
trap 'rm -rf "$root"' EXIT
for d in /usr/lib/systemd/system /lib/systemd/system; do
  if [[ -d $d && ! -L $d ]]; then mkdir -p "$root$d"; cp -a "$d/." "$root$d/"; fi
done
mkdir -p "$root/usr/bin" "$root/bin" "$root/etc/systemd/system" "$root/etc/sockvisor" "$root/etc/myapp"
if [[ -n $bin ]]; then cp "$bin" "$root/usr/bin/sockvisor"; else printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/sockvisor"; fi
chmod 755 "$root/usr/bin/sockvisor"
printf '#!/bin/sh\nexit 0\n' >"$root/bin/kill"; chmod 755 "$root/bin/kill"
[[ -e $root/usr/bin/kill ]] || cp "$root/bin/kill" "$root/usr/bin/kill"
# the package's template goes to /usr/lib, the user's units to /etc
cp "$here/sockvisor@.service" "$root/usr/lib/systemd/system/"
cp "$here/myapp.socket" "$here/myapp-dns.socket" "$here/myapp.service" "$root/etc/systemd/system/"
# a user's socket for the template, as docs/systemd.md shows it
cat >"$root/etc/systemd/system/demo.socket" <<'UNIT'
[Unit]
Description=demo sockets for sockvisor@demo
[Socket]
ListenStream=127.0.0.1:8001
FileDescriptorName=web
Service=sockvisor@demo.service
[Install]
WantedBy=sockets.target
UNIT

fail=0
run() {  # run LABEL UNIT...: verify, fail on rc != 0 or any stderr
  local label=$1 err rc=0; shift
  err=$(systemd-analyze verify --man=no --root="$root" "$@" 2>&1 >/dev/null) || rc=$?
  if [[ $rc -ne 0 || -n $err ]]; then
    echo "FAIL $label (rc=$rc):"; printf '%s\n' "$err" | sed 's/^/    /'; fail=1
  else
    echo "ok   $label"
  fi
}
run "myapp.socket + myapp-dns.socket + myapp.service" \
  myapp.socket myapp-dns.socket myapp.service
run "sockvisor@.service (instance demo) + demo.socket" demo.socket sockvisor@demo.service
# the example drop-ins on top of myapp.service; notify-reload.conf only where systemd knows
# Type=notify-reload (>= 253): tests/systemd_e2e.rs runs this script under systemd 257 too
sdver=$(systemd-analyze --version | awk 'NR == 1 {print $2; exit}')
mkdir -p "$root/etc/systemd/system/myapp.service.d"
for f in "$here"/examples/*.conf; do
  [[ ${f##*/} == notify-reload.conf ]] || cp "$f" "$root/etc/systemd/system/myapp.service.d/"
done
run "myapp.service + examples/*.conf drop-ins" myapp.service
if ((sdver >= 253)); then
  cp "$here/examples/notify-reload.conf" "$root/etc/systemd/system/myapp.service.d/"
  run "myapp.service + examples/notify-reload.conf (systemd $sdver)" myapp.service
  mkdir -p "$root/etc/systemd/system/sockvisor@demo.service.d"
  cp "$here/examples/notify-reload.conf" "$root/etc/systemd/system/sockvisor@demo.service.d/"
  run "sockvisor@demo.service + examples/notify-reload.conf (systemd $sdver)" demo.socket sockvisor@demo.service
else
  echo "skip examples/notify-reload.conf: systemd $sdver < 253 has no Type=notify-reload"
fi
# a unit that is known to be wrong must be caught (guards this script itself)
printf '[Service]\nType=notfy\nExecStart=/usr/bin/sockvisor\n' >"$root/etc/systemd/system/selfcheck.service"
if systemd-analyze verify --man=no --root="$root" selfcheck.service 2>&1 >/dev/null | grep -q .; then
  echo "ok   self-check: a broken unit produces stderr"
else
  echo "FAIL self-check: a broken unit went unnoticed"; fail=1
fi
exit $fail
