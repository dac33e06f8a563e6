#!/usr/bin/env bash
# Adapted for sockvisor from the team's research tool (shared/research/tools/systemd-sandbox.sh,
# notes in shared/research/systemd-sandbox.md). Used by tests/systemd_e2e.rs; changes:
#   - own cache and state dir (/var/tmp/sockvisor-sandbox), default instance name "sockvisor";
#   - flavours (SB_FLAVOUR=debian12|debian13: systemd 252 or 257), each with its cached base;
#   - a private network namespace on request (SB_NET=private), `reap` for killed runs;
#   - `install-deb DEB`: push a .deb into the container and dpkg -i it;
#   - `ensure-host-packages` can be skipped (SB_NO_APT=1) so a test never runs apt behind
#     the user's back unless asked (CI installs the packages itself).
# tests/systemd/sandbox.sh - boot a REAL systemd (PID 1 of its own pid namespace) in a
# systemd-nspawn container on a host whose PID 1 is not systemd, and drive it
# with systemctl.  Made for integration tests of socket-activated services.
#
# By default the container SHARES THE HOST'S NETWORK NAMESPACE: a unit inside with
# ListenStream=127.0.0.1:PORT is reachable from the host at 127.0.0.1:PORT
# (pick free ports: other processes on the host share the same port space).
# With SB_NET=private it has its own (only `lo`): any port is free there, and the host
# reaches it by entering /proc/$(sandbox.sh leader)/ns/net (tests/systemd_e2e.rs does).
#
# Usage (as root):
#   sandbox.sh setup            install host packages (systemd-container,
#                                       mmdebstrap) and build the cached base rootfs
#   sandbox.sh up               setup if needed, boot a FRESH instance
#                                       (tmpfs overlay over the cached base) and
#                                       wait until `systemctl is-system-running`
#   sandbox.sh exec CMD [ARG..] run CMD inside (all container namespaces),
#                                       e.g. exec systemctl start demo.socket;
#                                       exit status is CMD's
#   sandbox.sh sh 'SCRIPT'      = exec /bin/sh -c 'SCRIPT'
#   sandbox.sh root             print the host path of the container's /
#                                       (write units to "$(… root)/etc/systemd/system")
#   sandbox.sh push SRC DST     copy a host file to DST inside (mkdir -p)
#   sandbox.sh install-deb DEB  copy DEB into the container and dpkg -i it there
#   sandbox.sh leader           print the host PID of the container's PID 1
#   sandbox.sh status           is it up? (exit 0 if running)
#   sandbox.sh log              print the container console (boot/shutdown log)
#   sandbox.sh down             power off, kill leftovers (only ours), unmount,
#                                       remove our cgroups and state; idempotent
#   sandbox.sh reap             down every instance whose owner (SB_OWNER_PID at `up`)
#                                       is gone: what a killed test run left behind
#   sandbox.sh purge            down + delete the cached base rootfs
#
# Environment:
#   SB_NAME=sockvisor    instance name (several instances may run with distinct names)
#   SB_DIR=/var/tmp/sockvisor-sandbox   cache + state directory
#   SB_MODE=rootfs       rootfs: minimal Debian built once by mmdebstrap (~45-80 s,
#                                needs the host's Debian mirror), then cached
#                        host:   overlay of the host's own / (no download; units
#                                enabled on the host under *.target.wants are hidden)
#   SB_FLAVOUR=debian12  which Debian (and so which systemd) the base rootfs is built from:
#                          debian12: bookworm, systemd 252
#                          debian13: trixie, systemd 257 (+ lintian, to check the .deb
#                                    with the newer distribution's lintian inside)
#                        Each flavour has its own cached base rootfs.
#   SB_PACKAGES=...      comma list for the base rootfs (default: the flavour's,
#                        systemd,systemd-sysv,dbus,procps,iproute2,python3-minimal[,lintian])
#   SB_SUITE=<flavour's> Debian suite of the base rootfs (overrides the flavour's)
#   SB_NET=host          host:    the container shares the host's network namespace
#                        private: its own network namespace with only `lo` (nspawn
#                                 --private-network): a port inside cannot collide with
#                                 anything on the host; reach it from the host by entering
#                                 the namespace (/proc/$(sandbox.sh leader)/ns/net)
#   SB_MIRROR=<from the host's apt sources>   mirror for mmdebstrap (URL without /debian)
#   SB_CGROUP=unified    unified: container gets a pure cgroup2 /sys/fs/cgroup
#                                 (like a stock Debian 12 host)
#                        hybrid:  mirror the host's layout (v1 name=systemd + cgroup2)
#   SB_BIND="SRC[:DST] ..."        extra read-only bind mounts (nspawn --bind-ro=)
#   SB_BIND_RW="SRC[:DST] ..."     extra read-write bind mounts (nspawn --bind=)
#   SB_BPF=1             let the container's services use bpf(2), as on a host: nspawn
#                        --capability=CAP_BPF --system-call-filter=bpf. nspawn's default
#                        capability set lacks CAP_BPF, and its seccomp filter refuses bpf(2)
#                        with EPERM to every process the container's systemd starts, whatever
#                        its capabilities (commands entered with `exec` are not filtered).
#                        tests/systemd_e2e.rs sets it for all but one scenario
#   SB_BOOT_ARGS="..."   extra arguments for the container's systemd
#                        (e.g. systemd.log_level=debug systemd.mask=foo.service)
#   SB_BOOT_TIMEOUT=90   seconds to wait for boot in `up`
#   SB_STOP_TIMEOUT=30   seconds to wait for a clean poweroff in `down`
#   SB_OWNER_PID=PID     the process this instance belongs to (recorded at `up`, for `reap`)
#
# Everything lives in $SB_DIR/inst/$SB_NAME (tmpfs + overlay mounts), in cgroups
# /sys/fs/cgroup/<hier>/sbx-$SB_NAME and in the processes under the recorded
# systemd-nspawn PID.  `down` removes all of it.  Nothing under the host's
# /etc/systemd is touched.  The container's journal stays inside (journalctl via exec).
set -euo pipefail

SB_NAME=${SB_NAME:-sockvisor}
SB_DIR=${SB_DIR:-/var/tmp/sockvisor-sandbox}
SB_MODE=${SB_MODE:-rootfs}
SB_FLAVOUR=${SB_FLAVOUR:-debian12}
SB_BASE_PACKAGES=systemd,systemd-sysv,dbus,procps,iproute2,python3-minimal
case $SB_FLAVOUR in
  debian12) flavour_suite=bookworm; flavour_packages=$SB_BASE_PACKAGES ;;
  debian13) flavour_suite=trixie;   flavour_packages=$SB_BASE_PACKAGES,lintian ;;
  *) echo "SB_FLAVOUR must be debian12 or debian13" >&2; exit 2 ;;
esac
SB_PACKAGES=${SB_PACKAGES:-$flavour_packages}
SB_SUITE=${SB_SUITE:-$flavour_suite}
SB_NET=${SB_NET:-host}
host_mirror() { # the first Debian archive URI in the host's apt sources, without its /debian suffix
  local u
  u=$(grep -hoE '^URIs:[[:space:]]*[^[:space:]]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
  [ -n "$u" ] || u=$(grep -hoE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+/debian/?[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -1 | awk '{print $NF}')
  u=${u%/}; printf '%s\n' "${u%/debian}"
}
SB_MIRROR=${SB_MIRROR:-$(host_mirror)}
SB_CGROUP=${SB_CGROUP:-unified}
SB_BIND=${SB_BIND:-}
SB_BIND_RW=${SB_BIND_RW:-}
SB_BOOT_ARGS=${SB_BOOT_ARGS:-}
SB_BOOT_TIMEOUT=${SB_BOOT_TIMEOUT:-90}
SB_STOP_TIMEOUT=${SB_STOP_TIMEOUT:-30}

[[ $SB_NAME =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,30}$ ]] || { echo "bad SB_NAME" >&2; exit 2; }
INST=$SB_DIR/inst/$SB_NAME
CG_NAME=sbx-$SB_NAME
IN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[sandbox %s] %s\n' "$SB_NAME" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root"; }

# ---------------------------------------------------------------- host packages
ensure_host_packages() {
  local missing=()
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v nsenter >/dev/null || missing+=(util-linux)
  if [[ $SB_MODE == rootfs ]] && ! command -v mmdebstrap >/dev/null; then missing+=(mmdebstrap); fi
  ((${#missing[@]})) || return 0
  [[ -z ${SB_NO_APT:-} ]] || die "missing host tools for packages: ${missing[*]} (SB_NO_APT is set)"
  log "installing host packages: ${missing[*]}"
  local apt=(apt-get -y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
  export DEBIAN_FRONTEND=noninteractive
  apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null || log "apt-get update failed (continuing)"
  local pkgs=() p v
  v=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
  for p in "${missing[@]}"; do
    # systemd-container must match the installed systemd exactly; pin it so that
    # the host's systemd packages are not upgraded as a side effect when possible.
    if [[ $p == systemd-container && -n $v ]] &&
       apt-cache madison systemd-container | awk '{print $3}' | grep -qxF "$v"; then
      pkgs+=("systemd-container=$v")
    else
      pkgs+=("$p")
    fi
  done
  "${apt[@]}" install "${pkgs[@]}" >/dev/null || die "apt-get install ${pkgs[*]} failed"
}

# ---------------------------------------------------------------- base rootfs
base_dir() {
  local key
  key=$(printf '%s|%s|%s|v1' "$SB_SUITE" "$SB_PACKAGES" "$SB_MIRROR" | md5sum | cut -c1-10)
  echo "$SB_DIR/base-$SB_SUITE-$key"
}

build_base() {
  local base tmp t0
  base=$(base_dir)
  [[ -f $base/.sb-complete ]] && return 0
  mkdir -p "$SB_DIR"
  exec 8>"$SB_DIR/.build.lock"
  flock 8
  if [[ -f $base/.sb-complete ]]; then exec 8>&-; return 0; fi
  t0=$(now)
  tmp=$base.tmp.$$
  rm -rf "$tmp"
  log "building base rootfs $base (mmdebstrap $SB_SUITE: $SB_PACKAGES)"
  local comps="main"
  local srcs=("deb $SB_MIRROR/debian $SB_SUITE $comps")
  case $SB_SUITE in
    sid|unstable) ;;
    *) srcs+=("deb $SB_MIRROR/debian $SB_SUITE-updates $comps"
              "deb $SB_MIRROR/debian-security $SB_SUITE-security $comps") ;;
  esac
  if ! mmdebstrap --variant=minbase --include="$SB_PACKAGES" \
        "$SB_SUITE" "$tmp" "${srcs[@]}" >"$SB_DIR/mmdebstrap-$SB_SUITE.log" 2>&1; then
    tail -20 "$SB_DIR/mmdebstrap-$SB_SUITE.log" >&2
    rm -rf "$tmp"
    exec 8>&-
    die "mmdebstrap $SB_SUITE from $SB_MIRROR failed (log: $SB_DIR/mmdebstrap-$SB_SUITE.log)"
  fi
  # Container-friendly defaults: no getty on the nspawn console, no apt timers.
  local u
  for u in console-getty.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
           systemd-timesyncd.service e2scrub_all.timer e2scrub_reap.service; do
    ln -sfn /dev/null "$tmp/etc/systemd/system/$u"
  done
  echo sandbox >"$tmp/etc/hostname"
  : >"$tmp/etc/machine-id"           # nspawn derives a fresh one from the container UUID
  rm -f "$tmp/var/lib/dbus/machine-id"
  date -u +%FT%TZ >"$tmp/.sb-complete"
  mv "$tmp" "$base"
  exec 8>&-
  log "base rootfs built in $(elapsed "$t0") s"
}

# ---------------------------------------------------------------- cgroups
cg_hiers() {
  if [[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]]; then
    echo /sys/fs/cgroup
  else
    [[ -d /sys/fs/cgroup/systemd ]] && echo /sys/fs/cgroup/systemd
    [[ -d /sys/fs/cgroup/unified ]] && echo /sys/fs/cgroup/unified
  fi
  return 0
}

cg_procs() {  # all PIDs in our cgroup trees
  local h
  for h in $(cg_hiers); do
    if [[ -d $h/$CG_NAME ]]; then find "$h/$CG_NAME" -name cgroup.procs -exec cat {} + 2>/dev/null || true; fi
  done | sort -un
}

cg_remove() {  # (retries: zombies not yet reaped by the host's PID 1 keep a cgroup busy)
  local h i
  for h in $(cg_hiers); do
    for ((i = 0; i < 50; i++)); do
      [[ -d $h/$CG_NAME ]] || break
      find "$h/$CG_NAME" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [[ -d $h/$CG_NAME ]] && sleep 0.1
    done
    if [[ -d $h/$CG_NAME ]]; then log "warning: could not remove cgroup $h/$CG_NAME"; fi
  done
  return 0
}

# ---------------------------------------------------------------- process helpers
starttime() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }

alive() {  # alive PID [STARTTIME]: exists, is not a zombie, and (if given) started at STARTTIME
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }                       # fields after "(comm) "
  [[ ${stat%% *} != Z ]] || return 1
  [[ -z ${2:-} || "$(starttime "$1")" == "$2" ]]
}

recorded_pid() {  # recorded_pid FILE: the PID in FILE if that very process is still alive
  [[ -f $1 ]] || return 1
  local pid st
  read -r pid st <"$1" || return 1
  [[ -n $pid ]] && alive "$pid" "$st" || return 1
  echo "$pid"
}

nspawn_pid() { recorded_pid "$INST/nspawn.pid"; }

find_leader() {  # child of nspawn that is PID 1 of a new pid namespace
  local np=$1 c
  for c in $(pgrep -P "$np" 2>/dev/null || true); do
    if awk '/^NSpid:/{exit !($NF==1 && NF>2)}' "/proc/$c/status" 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

leader_pid() { recorded_pid "$INST/leader.pid"; }

in_container() {  # run a command inside the container, clean environment
  local l=$1; shift
  nsenter --target "$l" --mount --uts --ipc --net --pid --cgroup --root --wd -- \
    /usr/bin/env -i PATH="$IN_PATH" HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    SYSTEMD_PAGER= SYSTEMD_COLORS=0 SYSTEMD_LESS= "$@"
}

# ---------------------------------------------------------------- up / down
cmd_up() {
  need_root
  local t0 base lower np l st i state
  t0=$(now)
  if nspawn_pid >/dev/null; then die "instance $SB_NAME is already up (run down first)"; fi
  [[ -e $INST ]] && { log "stale state found, cleaning"; cmd_down >/dev/null 2>&1 || true; }
  ensure_host_packages
  case $SB_MODE in
    rootfs) build_base; lower=$(base_dir) ;;
    host)   lower=$INST/hostroot ;;
    *) die "SB_MODE must be rootfs or host" ;;
  esac
  mkdir -p "$INST/rw"
  mount -t tmpfs -o mode=0755 "sbx-$SB_NAME" "$INST/rw"
  mkdir -p "$INST/rw/upper" "$INST/rw/work" "$INST/root"
  if [[ $SB_MODE == host ]]; then
    mkdir -p "$INST/hostroot"
    mount --bind / "$INST/hostroot"          # non-recursive: only the root filesystem
    mount -o remount,bind,ro "$INST/hostroot"
    # hide the host's enabled services (postgresql, ...) from the container's boot
    local d f
    for d in /etc/systemd/system/*.target.wants; do
      [[ -d $d ]] || continue
      case ${d##*/} in sysinit.target.wants|sockets.target.wants) continue ;; esac
      mkdir -p "$INST/rw/upper$d"
      for f in "$d"/*; do [[ -e $f || -L $f ]] && mknod "$INST/rw/upper$f" c 0 0; done
    done
    mkdir -p "$INST/rw/upper/etc/systemd/system"
    for f in console-getty.service getty@tty1.service systemd-timesyncd.service; do
      ln -sfn /dev/null "$INST/rw/upper/etc/systemd/system/$f"
    done
    : >"$INST/rw/upper/etc/machine-id"     # not the host's id: nspawn makes a transient one
    if [[ -e /var/lib/dbus/machine-id || -L /var/lib/dbus/machine-id ]]; then
      mkdir -p "$INST/rw/upper/var/lib/dbus"; mknod "$INST/rw/upper/var/lib/dbus/machine-id" c 0 0
    fi
    echo sandbox >"$INST/rw/upper/etc/hostname"
  fi
  mount -t overlay "sbx-$SB_NAME" \
    -o "lowerdir=$lower,upperdir=$INST/rw/upper,workdir=$INST/rw/work" "$INST/root"

  # per-instance cgroup, so that several instances can coexist and `down` can
  # verify that nothing of ours is left running
  local h
  for h in $(cg_hiers); do mkdir -p "$h/$CG_NAME"; done

  local args=(--quiet --boot --directory="$INST/root" --machine="$SB_NAME"
              --register=no --keep-unit --link-journal=no --console=read-only
              --resolv-conf=copy-host --timezone=off)
  case $SB_NET in
    host) ;;
    private) args+=(--private-network) ;;
    *) die "SB_NET must be host or private" ;;
  esac
  [[ -z ${SB_BPF:-} ]] || args+=(--capability=CAP_BPF --system-call-filter=bpf)
  local b
  for b in $SB_BIND; do args+=(--bind-ro="$b"); done
  for b in $SB_BIND_RW; do args+=(--bind="$b"); done
  local envs=()
  case $SB_CGROUP in
    unified) envs+=(SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1) ;;
    hybrid)  envs+=(-u SYSTEMD_NSPAWN_UNIFIED_HIERARCHY) ;;   # nspawn mirrors the host layout
    *) die "SB_CGROUP must be unified or hybrid" ;;
  esac
  # shellcheck disable=SC2086
  # Not setsid'ed on purpose: nspawn stays in the caller's process group, so a
  # harness that signals its group (timeout(1), Ctrl-C) also powers the container off.
  CG_HIERS="$(cg_hiers)" CG_NAME="$CG_NAME" INST="$INST" \
  bash -c '
      for h in $CG_HIERS; do echo $$ > "$h/$CG_NAME/cgroup.procs"; done
      echo "$$ $(awk "{print \$22}" /proc/$$/stat)" > "$INST/nspawn.pid"
      exec env "$@"' sbx-launch "${envs[@]}" systemd-nspawn "${args[@]}" $SB_BOOT_ARGS \
      >"$INST/console.log" 2>&1 </dev/null &
  for ((i = 0; i < 50; i++)); do [[ -s $INST/nspawn.pid ]] && break; sleep 0.1; done
  np=$(nspawn_pid) || { cat "$INST/console.log" >&2; cmd_down; die "systemd-nspawn did not start"; }

  # wait for boot to finish
  local deadline
  deadline=$(( $(date +%s) + SB_BOOT_TIMEOUT ))
  while :; do
    if ! alive "$np"; then
      tail -30 "$INST/console.log" >&2; cmd_down; die "container exited during boot"
    fi
    if l=$(find_leader "$np") && [[ -S /proc/$l/root/run/systemd/private ]]; then
      state=$(in_container "$l" systemctl is-system-running --wait 2>/dev/null) && break
      case $state in degraded) break ;; esac
    fi
    (( $(date +%s) < deadline )) || {
      tail -30 "$INST/console.log" >&2; cmd_down; die "boot timed out after ${SB_BOOT_TIMEOUT}s"; }
    sleep 0.2
  done
  echo "$l $(starttime "$l")" >"$INST/leader.pid"
  if [[ -n ${SB_OWNER_PID:-} ]]; then echo "$SB_OWNER_PID $(starttime "$SB_OWNER_PID")" >"$INST/owner.pid"; fi
  if [[ $state == degraded ]]; then
    log "warning: system is degraded:"; in_container "$l" systemctl --failed --no-legend >&2 || true
  fi
  log "up in $(elapsed "$t0") s (nspawn pid $np, container init pid $l, state ${state:-running}, root $INST/root)"
}

cmd_down() {
  need_root
  local np l i pids p
  l=$(leader_pid) || l=
  if np=$(nspawn_pid); then
    kill -TERM "$np" 2>/dev/null || true       # nspawn -> SIGRTMIN+4 to init: clean poweroff
    for ((i = 0; i < SB_STOP_TIMEOUT * 10; i++)); do alive "$np" || break; sleep 0.1; done
    if alive "$np"; then
      log "clean shutdown timed out after ${SB_STOP_TIMEOUT}s; killing"
      [[ -n $l ]] && { kill -KILL "$l" 2>/dev/null || true; }   # init dies -> kernel kills its whole pid ns
      sleep 0.5
      kill -KILL "$np" 2>/dev/null || true
    fi
  elif [[ -n $l ]]; then                       # nspawn died but the container lives on
    log "systemd-nspawn is gone; powering off the orphaned container (init pid $l)"
    kill -s RTMIN+4 "$l" 2>/dev/null || true   # systemd: SIGRTMIN+4 = poweroff
    for ((i = 0; i < SB_STOP_TIMEOUT * 10; i++)); do alive "$l" || break; sleep 0.1; done
    alive "$l" && { log "poweroff timed out; killing"; kill -KILL "$l" 2>/dev/null || true; }
  fi
  # anything still in OUR cgroups is ours: kill by PID, wait until all are gone
  for ((i = 0; i < 100; i++)); do
    pids=()
    for p in $(cg_procs); do alive "$p" && pids+=("$p"); done
    ((${#pids[@]})) || break
    ((i % 10)) || kill -KILL "${pids[@]}" 2>/dev/null || true
    sleep 0.1
  done
  ((${#pids[@]} == 0)) || log "warning: processes still in our cgroups: ${pids[*]}"
  cg_remove
  local m
  for m in "$INST/root" "$INST/hostroot" "$INST/rw"; do
    if mountpoint -q "$m" 2>/dev/null; then umount "$m" 2>/dev/null || umount -l "$m"; fi
  done
  rm -rf --one-file-system "$INST"
  if rmdir "$SB_DIR/inst" 2>/dev/null; then   # no other instance of ours: drop nspawn's empty dirs
    rmdir /run/systemd/nspawn/locks /run/systemd/nspawn/propagate /run/systemd/nspawn 2>/dev/null || true
  fi
  # nspawn leaves this behind when /run is not a tmpfs (it is not on this host)
  if [[ -d /run/systemd/nspawn/propagate/$SB_NAME ]] && ! mountpoint -q "/run/systemd/nspawn/propagate/$SB_NAME"; then
    rm -rf --one-file-system "/run/systemd/nspawn/propagate/$SB_NAME"
  fi
  log "down"
}

cmd_reap() {  # instances whose recorded owner is gone (a test run killed before its cleanup)
  need_root
  local d n
  for d in "$SB_DIR"/inst/*/; do
    [[ -f $d/owner.pid ]] || continue
    n=$(basename "$d")
    if ! recorded_pid "$d/owner.pid" >/dev/null; then
      log "reaping $n (its owner $(cut -d' ' -f1 "$d/owner.pid") is gone)"
      SB_NAME=$n bash "$0" down || true
    fi
  done
}

cmd_exec() {
  (($#)) || die "exec needs a command"
  local l
  l=$(leader_pid) || die "instance $SB_NAME is not up"
  in_container "$l" "$@"
}

case ${1:-} in
  setup)  need_root; ensure_host_packages; [[ $SB_MODE == rootfs ]] && build_base; log "setup done" ;;
  up)     cmd_up ;;
  down)   cmd_down ;;
  reap)   cmd_reap ;;
  exec)   shift; cmd_exec "$@" ;;
  sh)     shift; cmd_exec /bin/sh -c "$*" ;;
  root)   [[ -d $INST/root ]] || die "not up"; echo "$INST/root" ;;
  leader) leader_pid || die "not up" ;;
  install-deb) (($# == 2)) || die "usage: install-deb FILE.deb"
          [[ -d $INST/root ]] || die "not up"
          cp "$2" "$INST/root/var/cache/sandbox-pkg.deb"   # not /tmp: a tmpfs inside hides it
          cmd_exec env DEBIAN_FRONTEND=noninteractive dpkg -i /var/cache/sandbox-pkg.deb
          rm -f "$INST/root/var/cache/sandbox-pkg.deb" ;;
  push)   (($# == 3)) || die "usage: push SRC DST"
          [[ -d $INST/root ]] || die "not up"
          mkdir -p "$(dirname "$INST/root/$3")"; cp -a "$2" "$INST/root/$3" ;;
  status) if l=$(leader_pid); then
            echo "up: nspawn $(nspawn_pid) init $l state $(in_container "$l" systemctl is-system-running 2>/dev/null || true)"
          else echo "down"; exit 1; fi ;;
  log)    cat "$INST/console.log" ;;
  purge)  cmd_down; rm -rf --one-file-system "$SB_DIR"/base-* "$SB_DIR"/*.log "$SB_DIR/.build.lock"; log "purged" ;;
  *)      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
