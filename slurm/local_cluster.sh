#!/usr/bin/env bash
# A real two-node Slurm cluster on one machine, for tests and for trying the
# sbatch scripts without a cluster.
#
#   slurm/local_cluster.sh start    # install (apt) if needed, configure, start, wait for idle
#   slurm/local_cluster.sh status   # sinfo + daemon pids; exit 1 if not running
#   slurm/local_cluster.sh stop     # stop slurmd x2, slurmctld, munged (only ours)
#   slurm/local_cluster.sh env      # prints `export SLURM_CONF=...` for eval
#
# Needs root (it installs packages and edits /etc/hosts). Debian 12's Slurm is
# built with MULTIPLE_SLURMD, so two slurmd daemons (node1, node2) share this host
# on ports 17001/17002. State, logs and slurm.conf live under $CHEXNET_SLURM_DIR.
# Clients find the config through SLURM_CONF (use `eval "$(... env)"`); it is
# also linked to /etc/slurm/slurm.conf when that file is absent, so a bare
# `sinfo` works too.
set -euo pipefail

STATE_DIR="${CHEXNET_SLURM_DIR:-/tmp/chexnet-slurm}"
CONF="$STATE_DIR/slurm.conf"
CTLD_PORT="${CHEXNET_SLURMCTLD_PORT:-16817}"
NODES=(node1 node2)
NODE_PORTS=(17001 17002)
CPUS_PER_NODE=2
START_TIMEOUT_S=60
MUNGE_SOCKET=/run/munge/munge.socket.2
export SLURM_CONF="$CONF"

log() { echo "local_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

require_root() {
  [[ "$(id -u)" == 0 ]] || die "must run as root (installs packages, edits /etc/hosts, runs slurmd); run: sudo $0 $*"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sinfo >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # The package scripts try to start services; there is no init system in
  # containers/CI, and we start the daemons ourselves below.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
  fi
  local rc=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge; } >"$STATE_DIR/apt.log" 2>&1 || rc=$?
  ((added_policy)) && rm -f "$policy"
  ((rc == 0)) || { tail -20 "$STATE_DIR/apt.log" >&2; die "apt-get install failed (rc=$rc), log: $STATE_DIR/apt.log"; }
}

add_hosts_entries() {
  # JAX's Slurm detection resolves the first node name (node1) to reach the
  # coordinator, and slurmd -N looks its own name up.
  local node
  for node in "${NODES[@]}"; do
    grep -Eq "^[^#]*[[:space:]]$node([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $node" >>/etc/hosts
  done
}

munge_ok() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
  munge_ok && return 0
  local key=/etc/munge/munge.key
  if [[ ! -s "$key" ]]; then
    mungekey -c -f -k "$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
  fi
  chown munge:munge "$key" && chmod 0400 "$key"
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  # --force: a stale socket left by a killed munged must not stop a restart.
  runuser -u munge -- munged --force
  local i
  for i in $(seq 50); do munge_ok && return 0; sleep 0.2; done
  die "munged did not come up; see /var/log/munge/munged.log"
}

write_conf() {
  mkdir -p "$STATE_DIR"/{ctld,spool,log,run}
  local host; host="$(hostname -s)"
  {
    cat <<EOF
# Written by slurm/local_cluster.sh; rewritten on every start.
ClusterName=chexnet
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# Requeue: preemption tests requeue jobs with scontrol requeue / --requeue.
JobRequeue=1
# Finished jobs stay visible to squeue/scontrol for 5 min (no accounting db here).
MinJobAge=300
# Seconds between SIGTERM and SIGKILL when a job is cancelled or hits its limit.
KillWait=30
# A requeued job may start only after its old credential expires (default
# 120 s); the credential only has to outlive a step's launch on this machine.
# Once it has expired the requeued job waits for a scheduling pass: the main
# loop's (sched_interval, default 60 s) or backfill's. With 10 s and passes every
# 2 s the preemption test's requeue waits ~12 s (it waited 40-80 s before).
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=2,sched_interval=2
SlurmdParameters=config_overrides
EOF
    local i
    for i in "${!NODES[@]}"; do
      echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=$CPUS_PER_NODE State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } >"$CONF"
  # A bare `sinfo` reads /etc/slurm/slurm.conf; link ours unless a real one is there.
  mkdir -p /etc/slurm
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  fi
}

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_daemons() {
  pid_alive "$STATE_DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
  local node
  for node in "${NODES[@]}"; do
    pid_alive "$STATE_DIR/run/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node"
  done
}

nodes_idle() {
  local states
  states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)" || return 1
  local node
  for node in "${NODES[@]}"; do
    grep -Eq "^$node (idle|mix|alloc)" <<<"$states" || return 1
  done
}

wait_idle() {
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until nodes_idle; do
    if ((SECONDS > deadline)); then
      sinfo -N >&2 || true
      tail -5 "$STATE_DIR"/log/*.log >&2 || true
      die "nodes not idle after ${START_TIMEOUT_S}s; logs in $STATE_DIR/log"
    fi
    # A node that registered before the controller was ready can stay down.
    scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
}

start() {
  require_root start
  mkdir -p "$STATE_DIR"
  install_packages
  add_hosts_entries
  start_munge
  # Rewriting the config under running daemons would desynchronise them.
  pid_alive "$STATE_DIR/run/slurmctld.pid" || write_conf
  start_daemons
  wait_idle
  log "up: $(sinfo -h -o '%P %D nodes %t' | tr '\n' ' ')(SLURM_CONF=$CONF)"
}

stop_pidfile() {
  local pidfile="$1" pid i
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid="$(cat "$pidfile")"
  kill -TERM "$pid"
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$pidfile"
}

stop() {
  require_root stop
  [[ -d "$STATE_DIR" ]] || return 0
  # Cancel our jobs first so slurmstepd children do not outlive their slurmd.
  if pid_alive "$STATE_DIR/run/slurmctld.pid"; then
    scancel --full --quiet --partition=debug 2>/dev/null || true
    sleep 1
  fi
  local node
  for node in "${NODES[@]}"; do stop_pidfile "$STATE_DIR/run/slurmd-$node.pid"; done
  stop_pidfile "$STATE_DIR/run/slurmctld.pid"
  # munged is shared with anything else using munge on this host: leave it.
  log "stopped (state kept in $STATE_DIR)"
}

status() {
  local ok=0 f
  for f in "$STATE_DIR"/run/*.pid; do
    [[ -e "$f" ]] || { ok=1; break; }
    if pid_alive "$f"; then echo "$(basename "$f" .pid): pid $(cat "$f")"; else echo "$(basename "$f" .pid): dead"; ok=1; fi
  done
  sinfo -N 2>/dev/null || ok=1
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: $0 start|stop|status|env (got '${1:-}')" ;;
esac
