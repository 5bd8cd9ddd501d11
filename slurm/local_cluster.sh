#!/usr/bin/env bash
# A real two-node Slurm cluster on one machine, for tests.
#
#   slurm/local_cluster.sh up      install slurm-wlm + munge if missing, build the
#                                  network, start the daemons, wait for both nodes
#   slurm/local_cluster.sh down    stop exactly what `up` started, remove the network
#   slurm/local_cluster.sh status  exit 0 if the cluster is up and both nodes respond
#
# Layout (see docs/slurm.md):
#   bridge br-ld 10.77.0.1/24 in the root namespace   slurmctld (+ munged)
#   namespace ldn1: ld-veth1p 10.77.0.11              slurmd -N n1
#   namespace ldn2: ld-veth2p 10.77.0.12              slurmd -N n2
# The namespaces have no default route, so nothing the cluster sends leaves
# 10.77.0.0/24. Both nodes share the machine's filesystem and hostname.
#
# Needs root. `up` is idempotent: a healthy cluster is left alone; anything
# else (half-built, left over from an unclean run) is torn down and rebuilt.
# Environment: LD_CLUSTER_UP_TIMEOUT (seconds to wait for the nodes, default 90).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
readonly STATE_DIR=/run/lora-dist-cluster          # pid files of what we started
readonly LOG_DIR=/var/log/lora-dist-cluster
readonly SPOOL_DIR=/var/spool/lora-dist-cluster
readonly SLURM_CONF=/etc/slurm/slurm.conf
readonly GRES_CONF=/etc/slurm/gres.conf
readonly MARKER="# Written by lora_dist slurm/local_cluster.sh"
readonly BRIDGE=br-ld
readonly BRIDGE_ADDR=10.77.0.1
readonly NODE_IDS=(1 2)                            # node K: nK, ldnK, 10.77.0.1K
readonly UP_TIMEOUT=${LD_CLUSTER_UP_TIMEOUT:-90}

log() { printf 'local_cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

node_name() { echo "n$1"; }
node_netns() { echo "ldn$1"; }
node_addr() { echo "10.77.0.1$1"; }
host_veth() { echo "ld-veth$1"; }     # bridge side, root namespace
node_veth() { echo "ld-veth$1p"; }    # inside the node's namespace

require_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (creates network namespaces and runs slurm daemons)"
}

# ---------------------------------------------------------------- packages

install_packages() {
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v nsenter >/dev/null || missing+=(util-linux)
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    missing+=(slurm-wlm)
  fi
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0

  command -v apt-get >/dev/null || die "missing ${missing[*]} and apt-get is not available"
  log "installing ${missing[*]} with apt-get"
  # Packages must not start their own daemons: on a machine without systemd the
  # init scripts would start slurmctld/slurmd/munged with the stock config.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  } >"$LOG_DIR/apt.log" 2>&1 || rc=$?
  [ "$own_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
  if [ "$rc" -ne 0 ]; then
    tail -n 20 "$LOG_DIR/apt.log" >&2
    die "apt-get install ${missing[*]} failed (full log: $LOG_DIR/apt.log)"
  fi
}

# ---------------------------------------------------------------- pid files
# One file per daemon we started: "PID COMM". `down` only signals a pid whose
# /proc/PID/comm still matches, so a recycled pid is never touched.

record_pid() {  # name pid comm
  echo "$2 $3" >"$STATE_DIR/$1.started"
}

recorded_alive() {  # name -> 0 if the recorded process is still running
  local file="$STATE_DIR/$1.started" pid comm
  [ -f "$file" ] || return 1
  read -r pid comm <"$file"
  comm_is "$pid" "$comm"
}

stop_recorded() {  # name
  local file="$STATE_DIR/$1.started" pid comm
  [ -f "$file" ] || return 0
  read -r pid comm <"$file"
  if recorded_alive "$1"; then
    log "stopping $1 (pid $pid)"
    stop_pids "$pid"
  fi
  rm -f "$file"
}

stop_pids() {  # pid... : SIGTERM, wait up to 10 s, then SIGKILL
  local pid i alive
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive=0
    for pid in "$@"; do running "$pid" && alive=1; done
    [ "$alive" -eq 0 ] && return 0
    sleep 0.2
  done
  kill -KILL "$@" 2>/dev/null || true
}

# ---------------------------------------------------------------- network

network_up() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local k ns
  for k in "${NODE_IDS[@]}"; do
    ns=$(node_netns "$k")
    ip netns add "$ns"
    ip link add "$(host_veth "$k")" type veth peer name "$(node_veth "$k")" netns "$ns"
    ip link set "$(host_veth "$k")" master "$BRIDGE"
    ip link set "$(host_veth "$k")" up
    ip -n "$ns" addr add "$(node_addr "$k")/24" dev "$(node_veth "$k")"
    ip -n "$ns" link set "$(node_veth "$k")" up
    ip -n "$ns" link set lo up
  done
}

network_down() {
  local k ns
  for k in "${NODE_IDS[@]}"; do
    ns=$(node_netns "$k")
    # Deleting the namespace also deletes the veth pair; a veth left in the
    # root namespace by a half-built run is removed explicitly.
    # The kernel removes a deleted namespace's devices asynchronously, so the
    # veth may vanish between `show` and `del`: only its absence is checked.
    if [ -e "/var/run/netns/$ns" ]; then ip netns del "$ns"; fi
    ip link del "$(host_veth "$k")" >/dev/null 2>&1 || true
  done
  ip link del "$BRIDGE" >/dev/null 2>&1 || true
  wait_until 10 network_gone ||
    die "network still present after removal: $(ip -br link | grep -E "^(ld-veth|$BRIDGE)" | tr '\n' ' ')$(ls /var/run/netns 2>/dev/null | grep -E '^ldn' | tr '\n' ' ')"
}

network_gone() {
  local k
  for k in "${NODE_IDS[@]}"; do
    ! ip link show "$(host_veth "$k")" >/dev/null 2>&1 || return 1
    [ ! -e "/var/run/netns/$(node_netns "$k")" ] || return 1
  done
  ! ip link show "$BRIDGE" >/dev/null 2>&1
}

# Everything running inside our namespaces was started by our slurmd (job
# steps, slurmstepd) or by tests; none of it may outlive the namespace.
stop_namespace_processes() {
  local k ns pids
  for k in "${NODE_IDS[@]}"; do
    ns=$(node_netns "$k")
    [ -e "/var/run/netns/$ns" ] || continue
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    if [ -n "${pids// /}" ]; then
      log "stopping processes in $ns: $pids"
      # shellcheck disable=SC2086
      stop_pids $pids
    fi
  done
}

# ---------------------------------------------------------------- config

write_config() {
  local host
  host=$(hostname -s)
  [[ "$host" =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] || die "unexpected hostname '$host'"
  local f
  for f in "$SLURM_CONF" "$GRES_CONF"; do
    if [ -e "$f" ] && ! grep -qF "$MARKER" "$f"; then
      die "$f exists and was not written by this harness; move it away first"
    fi
  done
  mkdir -p "$(dirname "$SLURM_CONF")"
  fill_template "$HERE/local/slurm.conf.in" "$SLURM_CONF" "$host"
  fill_template "$HERE/local/gres.conf.in" "$GRES_CONF" "$host"
  touch "$STATE_DIR/fake-gpu0" "$STATE_DIR/fake-gpu1"
}

config_is_current() {  # the installed config is what the templates render to now
  local host tmp rc=0
  host=$(hostname -s)
  tmp=$(mktemp -d)
  fill_template "$HERE/local/slurm.conf.in" "$tmp/slurm.conf" "$host"
  fill_template "$HERE/local/gres.conf.in" "$tmp/gres.conf" "$host"
  cmp -s "$tmp/slurm.conf" "$SLURM_CONF" && cmp -s "$tmp/gres.conf" "$GRES_CONF" || rc=1
  rm -rf "$tmp"
  return "$rc"
}

fill_template() {  # template output hostname
  sed -e "s|@HOSTNAME@|$3|g" \
      -e "s|@BRIDGE_ADDR@|$BRIDGE_ADDR|g" \
      -e "s|@NODE1_ADDR@|$(node_addr 1)|g" \
      -e "s|@NODE2_ADDR@|$(node_addr 2)|g" \
      -e "s|@STATE_DIR@|$STATE_DIR|g" \
      -e "s|@LOG_DIR@|$LOG_DIR|g" \
      -e "s|@SPOOL_DIR@|$SPOOL_DIR|g" \
      "$1" >"$2.tmp"
  mv "$2.tmp" "$2"
}

remove_config() {
  local f
  for f in "$SLURM_CONF" "$GRES_CONF"; do
    if [ -e "$f" ] && grep -qF "$MARKER" "$f"; then rm -f "$f"; fi
  done
}

# ---------------------------------------------------------------- daemons

wait_until() {  # seconds command... : poll the command until it succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

# A killed daemon stays a zombie until its parent (init here) reaps it; its
# /proc/PID/comm still reads the same, so a zombie counts as not running.
running() {  # pid: exists and is not a zombie
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

comm_is() { [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] && running "$1"; }

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

# Start a daemon in the foreground of a new session, with all fds detached so
# a caller reading our stdout (pytest) does not wait for the daemon, and record
# its pid. setsid/nsenter exec in place, so $! is the daemon itself.
start_daemon() {  # name comm logfile command...
  local name=$1 comm=$2 logfile=$3
  shift 3
  setsid "$@" 9>&- </dev/null >>"$logfile" 2>&1 &
  local pid=$!
  record_pid "$name" "$pid" "$comm"
  wait_until 5 comm_is "$pid" "$comm" || true
  recorded_alive "$name" || { show_logs; die "$name exited right after starting (log: $logfile)"; }
}

start_munge() {
  if munge_works; then
    log "munged already running; using it"
    return 0
  fi
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
    create-munge-key -f || die "cannot create /etc/munge/munge.key"
  mkdir -p /run/munge
  chown munge:munge /run/munge
  # As the munge user, like the packaged service; --force: a stale socket from
  # an unclean run is replaced.
  start_daemon munged munged "$LOG_DIR/munged.out" \
    setpriv --reuid=munge --regid=munge --init-groups munged --force --foreground
  wait_until 15 munge_works || { show_logs; die "munged did not come up"; }
}

check_no_foreign_daemons() {
  local pid
  for pid in $(pidof slurmctld slurmd 2>/dev/null); do
    die "a slurm daemon not started by this harness is running (pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline")); stop it first"
  done
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')
  [ "$states" = "n1 idle n2 idle " ]
}

nodes_responding() {  # idle, or busy with jobs: not down/drained/unknown
  local _node state ok=0
  while read -r _node state; do
    case "$state" in idle | mix | alloc | comp) ok=$((ok + 1)) ;; *) return 1 ;; esac
  done < <(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
  [ "$ok" -eq ${#NODE_IDS[@]} ]
}

show_logs() {
  local f
  for f in "$LOG_DIR"/*.log "$LOG_DIR"/*.out; do
    [ -s "$f" ] || continue
    echo "---- tail $f" >&2
    tail -n 15 "$f" >&2
  done
  if command -v sinfo >/dev/null; then
    echo "---- sinfo -N" >&2
    sinfo -N 2>&1 | head -n 10 >&2 || true
  fi
}

healthy() {
  local name
  for name in slurmctld $(for k in "${NODE_IDS[@]}"; do echo "slurmd-$(node_name "$k")"; done); do
    recorded_alive "$name" || return 1
  done
  config_is_current && munge_works && nodes_responding
}

# ---------------------------------------------------------------- commands

cmd_up() {
  require_root
  mkdir -p "$STATE_DIR" "$LOG_DIR" "$SPOOL_DIR"
  if healthy; then
    log "already up"
    return 0
  fi
  cmd_down quiet
  mkdir -p "$STATE_DIR" "$LOG_DIR" "$SPOOL_DIR"
  rm -f "$LOG_DIR"/*.log "$LOG_DIR"/*.out
  install_packages
  check_no_foreign_daemons
  if ! ip netns list >/dev/null; then die "ip netns is not available"; fi

  network_up
  write_config
  start_munge

  mkdir -p "$SPOOL_DIR/slurmctld"
  # -c: start from an empty job state, whatever a previous run left behind.
  start_daemon slurmctld slurmctld "$LOG_DIR/slurmctld.out" slurmctld -D -c
  wait_until 20 scontrol ping || { show_logs; die "slurmctld does not answer 'scontrol ping'"; }

  local k name
  for k in "${NODE_IDS[@]}"; do
    name=$(node_name "$k")
    mkdir -p "$SPOOL_DIR/slurmd.$name"
    # nsenter --net, not `ip netns exec`: the latter remounts /sys, after which
    # slurmd fails on cgroups.
    start_daemon "slurmd-$name" slurmd "$LOG_DIR/slurmd.$name.out" \
      nsenter --net="/var/run/netns/$(node_netns "$k")" slurmd -D -N "$name"
  done

  if ! wait_until "$UP_TIMEOUT" nodes_idle; then
    show_logs
    die "nodes n1/n2 not idle after ${UP_TIMEOUT}s (logs: $LOG_DIR; clean up with: $0 down)"
  fi
  log "up: $(sinfo -h -N -o '%N=%t' | sort -u | tr '\n' ' ')(logs: $LOG_DIR)"
}

cmd_down() {
  require_root
  local k
  for k in "${NODE_IDS[@]}"; do stop_recorded "slurmd-$(node_name "$k")"; done
  stop_namespace_processes
  stop_recorded slurmctld
  stop_recorded munged
  network_down
  remove_config
  rm -rf "$SPOOL_DIR" "$STATE_DIR"
  [ "${1:-}" = quiet ] || log "down"
}

cmd_status() {
  local name k rc=0
  for name in munged slurmctld $(for k in "${NODE_IDS[@]}"; do echo "slurmd-$(node_name "$k")"; done); do
    if recorded_alive "$name"; then
      echo "$name: running (pid $(cut -d' ' -f1 "$STATE_DIR/$name.started"))"
    elif [ "$name" = munged ] && munge_works 2>/dev/null; then
      echo "munged: running (not started by this harness)"
    else
      echo "$name: not running"
      rc=1
    fi
  done
  for k in "${NODE_IDS[@]}"; do
    if [ -e "/var/run/netns/$(node_netns "$k")" ]; then
      echo "netns $(node_netns "$k"): present"
    else
      echo "netns $(node_netns "$k"): absent"
      rc=1
    fi
  done
  if [ "$rc" -eq 0 ]; then
    sinfo -N
    nodes_responding || rc=1
  fi
  return "$rc"
}

with_lock() {  # one up/down at a time
  require_root
  exec 9>/run/lora-dist-cluster.harness.lock
  flock -w 600 9 || die "another local_cluster.sh up/down is still running"
  "$@"
}

# Sourced (the tests check its process helpers): define the functions, run nothing.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "${1:-}" in
  up) with_lock cmd_up ;;
  down) with_lock cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
