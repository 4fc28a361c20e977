#!/usr/bin/env bash
# Install (Debian packages) and run a ONE-NODE Slurm cluster on this machine, for tests in a container.
#
# Usage (as root):
#   bash tools/dev/slurm_local.sh            # install if needed, write config, start munged+slurmctld+slurmd,
#                                            # wait until the node is idle. If the cluster already runs healthy
#                                            # with the same config it does nothing; otherwise (some daemon down,
#                                            # config changed) it restarts all daemons cleanly.
#   bash tools/dev/slurm_local.sh start      # same as above
#   bash tools/dev/slurm_local.sh restart    # stop, then start (always restarts the daemons)
#   bash tools/dev/slurm_local.sh stop       # stop slurmd, slurmctld and munged
#   bash tools/dev/slurm_local.sh status     # show daemon pids and sinfo
#
# No systemd is needed: the daemons run as plain background daemons. No cgroup plugins are used
# (proctrack/linuxproc, task/none), so it works in containers without cgroup delegation.
# No accounting (no slurmdbd): sacct does not work; use squeue / scontrol show job.
#
# Environment overrides:
#   SLURM_LOCAL_TIMEOUT  seconds to wait for the node to become idle (default 60)
#   SLURM_LOCAL_SELECT   select plugin: cons_tres (default) or linear
#   SLURM_LOCAL_NO_INSTALL=1  never run apt-get (fail if Slurm is missing)
set -euo pipefail

ACTION="${1:-start}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
SELECT="${SLURM_LOCAL_SELECT:-cons_tres}"

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
RUN_DIR=/run/slurm
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
MUNGE_LOG=/var/log/munge/munged.log

log() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages, writes /etc/slurm and starts daemons)"
}

# True if any of the given pids is a live (non-zombie) process. In containers PID 1 may reap orphans
# late, so an exited daemon can linger as a zombie, for which kill -0 still succeeds.
alive() {
  local p st
  for p in "$@"; do
    st="$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || true)"
    if [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]; then return 0; fi
  done
  return 1
}

# pid of a daemon: from its pidfile if alive, else from pidof on the exact binary path.
daemon_pids() {
  local pidfile="$1" bin="$2" pids="" p
  if [ -f "$pidfile" ]; then
    p="$(cat "$pidfile" 2>/dev/null || true)"
    if [ -n "$p" ] && alive "$p"; then pids="$p"; fi
  fi
  if [ -z "$pids" ]; then
    for p in $(pidof "$bin" 2>/dev/null || true); do
      if alive "$p"; then pids="$pids${pids:+ }$p"; fi
    done
  fi
  echo "$pids"
}

stop_daemon() {
  local name="$1" pidfile="$2" bin="$3" pids i
  pids="$(daemon_pids "$pidfile" "$bin")"
  if [ -z "$pids" ]; then rm -f "$pidfile"; return 0; fi
  log "stopping $name (pid $pids)"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for i in $(seq 1 50); do
    # shellcheck disable=SC2086
    if ! alive $pids; then break; fi
    sleep 0.2
  done
  # shellcheck disable=SC2086
  if alive $pids; then
    log "$name did not stop after 10s, sending KILL"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$pidfile"
}

do_stop() {
  need_root
  stop_daemon slurmd "$SLURMD_PID" /usr/sbin/slurmd
  stop_daemon slurmctld "$CTLD_PID" /usr/sbin/slurmctld
  stop_daemon munged "$MUNGE_PID" /usr/sbin/munged
  log "stopped"
}

install_pkgs() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  [ "${SLURM_LOCAL_NO_INSTALL:-0}" = 1 ] && die "Slurm/munge not installed and SLURM_LOCAL_NO_INSTALL=1"
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
}

start_munge() {
  mkdir -p /etc/munge /var/lib/munge /var/log/munge "$MUNGE_RUN"
  if [ ! -s "$MUNGE_KEY" ]; then
    log "creating munge key $MUNGE_KEY"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$MUNGE_KEY" --force
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
  fi
  stop_daemon munged "$MUNGE_PID" /usr/sbin/munged
  if id munge >/dev/null 2>&1; then
    chown munge:munge /etc/munge "$MUNGE_KEY" /var/lib/munge /var/log/munge "$MUNGE_RUN"
    chmod 700 /etc/munge /var/log/munge
    chmod 400 "$MUNGE_KEY"
    chmod 755 "$MUNGE_RUN"
    log "starting munged (user munge)"
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" \
      || die "munged failed to start; log: $(tail -20 "$MUNGE_LOG" 2>/dev/null)"
  else
    chmod 400 "$MUNGE_KEY"
    log "starting munged (root, --force)"
    /usr/sbin/munged --force --pid-file="$MUNGE_PID" \
      || die "munged failed to start; log: $(tail -20 "$MUNGE_LOG" 2>/dev/null)"
  fi
  local i
  for i in $(seq 1 50); do
    if munge -n </dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "munge credential round trip fails; munged log:
$(tail -20 "$MUNGE_LOG" 2>/dev/null)"
}

# write_conf [DEST]: render slurm.conf to DEST (default: install it as /etc/slurm/slurm.conf).
write_conf() {
  local dest="${1:-}" host cpus mem_mb real_mem
  host="$(hostname -s)"
  [ -n "$host" ] || die "hostname -s is empty"
  cpus="$(nproc)"
  mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
  real_mem=$(( mem_mb * 95 / 100 ))
  local params="SelectTypeParameters=CR_Core"
  [ "$SELECT" = linear ] && params="#SelectTypeParameters (none for select/linear)"
  mkdir -p "$CONF_DIR"
  local tmp
  tmp="$(mktemp)"
  cat >"$tmp" <<EOF
# Generated by tools/dev/slurm_local.sh: one-node test cluster on localhost. Do not edit by hand.
ClusterName=localtest
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/${SELECT}
${params}
ReturnToService=2
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${CTLD_LOG}
SlurmdLogFile=${SLURMD_LOG}
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -n "$dest" ]; then mv "$tmp" "$dest"; return 0; fi
  install -m 644 "$tmp" "$CONF"
  rm -f "$tmp"
  log "wrote $CONF (node $host, CPUs=$cpus, RealMemory=$real_mem MB, select/$SELECT)"
}

node_state() {
  sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -1 || true
}

# True when munged, slurmctld and slurmd run, the controller answers, the node is usable and
# /etc/slurm/slurm.conf is what this script would write now.
cluster_healthy() {
  [ -n "$(daemon_pids "$MUNGE_PID" /usr/sbin/munged)" ] || return 1
  [ -n "$(daemon_pids "$CTLD_PID" /usr/sbin/slurmctld)" ] || return 1
  [ -n "$(daemon_pids "$SLURMD_PID" /usr/sbin/slurmd)" ] || return 1
  [ -f "$CONF" ] || return 1
  local tmp rc=0
  tmp="$(mktemp)"
  write_conf "$tmp"
  cmp -s "$tmp" "$CONF" || rc=1
  rm -f "$tmp"
  [ "$rc" = 0 ] || return 1
  scontrol ping 2>/dev/null | grep -q UP || return 1
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; esac
  return 1
}

show_logs() {
  echo "----- sinfo -----" >&2; sinfo -N -l 2>&1 >&2 || true
  echo "----- scontrol show node -----" >&2; scontrol show node 2>&1 >&2 || true
  echo "----- $CTLD_LOG (tail) -----" >&2; tail -40 "$CTLD_LOG" >&2 2>/dev/null || true
  echo "----- $SLURMD_LOG (tail) -----" >&2; tail -40 "$SLURMD_LOG" >&2 2>/dev/null || true
}

# Start slurmctld and wait until it answers; return 1 if it does not.
start_ctld() {
  log "starting slurmctld"
  /usr/sbin/slurmctld || return 1
  local i
  for i in $(seq 1 $(( TIMEOUT * 2 ))); do
    if scontrol ping 2>/dev/null | grep -q UP; then return 0; fi
    sleep 0.5
  done
  return 1
}

do_start() {
  need_root
  install_pkgs
  # Already up with the same configuration: leave it alone, so that running jobs (and sruns that
  # talk to slurmctld) are not disturbed. 'restart' forces a clean restart.
  if [ "$ACTION" != restart ] && cluster_healthy; then
    log "already running with the same configuration: node $(hostname -s) is $(node_state); nothing to do (use 'restart' to force)"
    sinfo
    return 0
  fi
  # Stop the Slurm daemons first (restart cleanly when some are already running).
  stop_daemon slurmd "$SLURMD_PID" /usr/sbin/slurmd
  stop_daemon slurmctld "$CTLD_PID" /usr/sbin/slurmctld
  start_munge
  mkdir -p "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
  chmod 755 "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
  write_conf
  local host
  host="$(hostname -s)"

  if ! start_ctld; then
    if [ "$SELECT" = cons_tres ]; then
      log "slurmctld did not come up with select/cons_tres; retrying with select/linear"
      show_logs
      stop_daemon slurmctld "$CTLD_PID" /usr/sbin/slurmctld
      SELECT=linear
      write_conf
      start_ctld || { show_logs; die "slurmctld does not answer scontrol ping after ${TIMEOUT}s"; }
    else
      show_logs; die "slurmctld does not answer scontrol ping after ${TIMEOUT}s"
    fi
  fi

  log "starting slurmd"
  /usr/sbin/slurmd || { show_logs; die "slurmd failed to start"; }

  local state="" resumed=0 deadline=$(( SECONDS + TIMEOUT ))
  while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(node_state)"
    case "$state" in
      idle|mixed|allocated|completing) break ;;
      drain*|down*|fail*)
        if [ "$resumed" = 0 ]; then
          log "node state '$state', trying scontrol update state=resume"
          scontrol update nodename="$host" state=resume 2>/dev/null || true
          resumed=1
        fi ;;
    esac
    sleep 1
  done
  case "$state" in
    idle|mixed|allocated|completing) ;;
    *) show_logs; die "node $host is '${state:-unknown}', not idle, after ${TIMEOUT}s" ;;
  esac
  log "cluster up: node $host is $state (partition debug). Logs: $LOG_DIR"
  sinfo
}

do_status() {
  echo "munged:    $(daemon_pids "$MUNGE_PID" /usr/sbin/munged)"
  echo "slurmctld: $(daemon_pids "$CTLD_PID" /usr/sbin/slurmctld)"
  echo "slurmd:    $(daemon_pids "$SLURMD_PID" /usr/sbin/slurmd)"
  sinfo 2>&1 || true
}

case "$ACTION" in
  start|"") do_start ;;
  stop) do_stop ;;
  restart) do_stop; do_start ;;
  status) do_status ;;
  *) die "usage: $0 [start|stop|restart|status]" ;;
esac
