#!/usr/bin/env bash
# Copied from the shared CI recipe (../shared/recipes/setup_slurm.sh); used by tests/test_slurm.py.
# Single-node SLURM "cluster" on loopback for CI (Debian 12 / slurm-wlm 22.05, no systemd needed).
#
#   setup_slurm.sh [start] [--with-dbd]   install (apt) + configure + start daemons + smoke test
#   setup_slurm.sh stop                   stop the daemons this script started (by recorded PID)
#   setup_slurm.sh status                 show daemons, sinfo, listening sockets
#
# Minimal mode (default): munged + slurmctld + slurmd, AccountingStorageType=none.
#   -> `sacct` does NOT work; the Snakemake plugin must use `slurm-status-command: squeue`.
# --with-dbd: additionally MariaDB (unix socket only, --skip-networking) + slurmdbd,
#   so `sacct` works and the plugin's default status command (sacct) can be used.
# Env: SKIP_APT=1 skips apt-get (packages already present); SLURM_STATE_DIR=dir for pid files.
set -euo pipefail

ACTION=start; WITH_DBD=0
for a in "$@"; do
  case "$a" in
    start|stop|status) ACTION=$a ;;
    --with-dbd) WITH_DBD=1 ;;
    *) echo "usage: $0 [start [--with-dbd]|stop|status]" >&2; exit 2 ;;
  esac
done

STATE=${SLURM_STATE_DIR:-/var/tmp/ci-slurm}
PIDS=$STATE/pids.txt
mkdir -p "$STATE"
log() { echo "[setup_slurm $(date +%T)] $*"; }
wait_for() {  # wait_for <seconds> <description> <command...>
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timeout waiting for: $what" >&2; return 1
}
record_pid() { echo "$1 $2" >> "$PIDS"; log "$1 pid $2"; }

stop_all() {
  [ -f "$PIDS" ] || { log "no $PIDS, nothing to stop"; return 0; }
  # reverse start order: slurmd, slurmctld, slurmdbd, mariadbd, munged
  tac "$PIDS" | while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping $name (pid $pid)"; kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then log "$name still alive, SIGKILL"; kill -9 "$pid"; fi
    fi
  done || true
  rm -f "$PIDS" /run/slurmctld.pid /run/slurmd.pid /run/slurmdbd.pid  # stale ctld pidfile breaks `apt-get remove slurmctld`
}

if [ "$ACTION" = stop ]; then stop_all; exit 0; fi
if [ "$ACTION" = status ]; then
  cat "$PIDS" 2>/dev/null || true; sinfo || true
  ss -Hltnp | grep -E 'slurm|munge|maria' || true
  exit 0
fi

# ---------------------------------------------------------------- 1. packages
PKGS="munge slurmctld slurmd slurm-client"
[ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
if [ "${SKIP_APT:-0}" != 1 ]; then
  log "apt-get install $PKGS"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
fi

# ------------------------------------------------- 2. loopback-only guarantee
# CommunicationParameters=NoInAddrAny/NoCtldInAddrAny make the daemons bind to the
# address that `hostname` resolves to (not INADDR_ANY). That must be loopback.
HN=$(hostname)
HIP=$(getent ahostsv4 "$HN" | awk 'NR==1{print $1}')
case "$HIP" in
  127.*) log "hostname $HN -> $HIP (loopback, ok)" ;;
  *) echo "hostname '$HN' resolves to '$HIP', not 127.x: daemons would listen there." \
          "Add '127.0.0.1 $HN' to /etc/hosts first." >&2; exit 1 ;;
esac

stop_all   # idempotent re-run: stop what a previous run of this script started

# ------------------------------------------------------------- 3. slurm.conf
# Hardware line from slurmd -C (CPUs, sockets, cores, threads, RealMemory), renamed to localhost.
HW=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
# bind to the resolved hostname (127.0.0.1 here) instead of 0.0.0.0
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
# keep finished jobs visible to squeue for 5 min (plugin's squeue status mode needs >= 3x its poll interval)
MinJobAge=300
EOF
if [ "$WITH_DBD" = 1 ]; then
  cat >> /etc/slurm/slurm.conf <<'EOF'
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
EOF
else
  cat >> /etc/slurm/slurm.conf <<'EOF'
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
EOF
fi
cat >> /etc/slurm/slurm.conf <<EOF
NodeName=localhost NodeAddr=127.0.0.1 $HW State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
log "slurm.conf node line: NodeName=localhost NodeAddr=127.0.0.1 $HW"

# ------------------------------------------------------------------ 4. munge
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged          # unix socket only, daemonizes
  wait_for 10 munged sh -c 'munge -n | unmunge'
  record_pid munged "$(cat /run/munge/munged.pid)"
else
  log "munged already running (not started by this script)"
fi

# --------------------------------------------------- 5. optional MariaDB + slurmdbd
if [ "$WITH_DBD" = 1 ]; then
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
      > "$STATE/mariadbd.out" 2>&1 < /dev/null &
    wait_for 60 mariadbd mariadb -e 'select 1'
    record_pid mariadbd "$(cat /run/mysqld/mysqld.pid)"
  fi
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdb';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<'EOF'
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
CommunicationParameters=NoInAddrAny
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
# "localhost" => MySQL client uses the unix socket; MariaDB has no TCP listener
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdb
StorageLoc=slurm_acct_db
EOF
  chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
  /usr/sbin/slurmdbd
  wait_for 60 "slurmdbd answers" sacctmgr -n show cluster
  record_pid slurmdbd "$(cat /run/slurmdbd.pid)"
fi

# -------------------------------------------------------- 6. slurmctld + slurmd
/usr/sbin/slurmctld
wait_for 30 "slurmctld up" sh -c 'scontrol ping | grep -q UP'
record_pid slurmctld "$(cat /run/slurmctld.pid)"
/usr/sbin/slurmd -N localhost           # -N: our NodeName is not the machine's hostname
wait_for 5 "slurmd pidfile" test -s /run/slurmd.pid
record_pid slurmd "$(cat /run/slurmd.pid)"
wait_for 30 "node idle" sh -c 'sinfo -h -n localhost -o %T | grep -qx idle'

# ------------------------------------------------------------- 7. smoke test
srun -n1 true                                   # interactive allocation + step launch
out=$(cd /tmp && sbatch --parsable -o /dev/null --wrap 'srun -n1 true')   # batch job + nested step
wait_for 60 "batch job $out COMPLETED" sh -c "squeue -h -j $out --states=all -o %T | grep -qx COMPLETED"
if [ "$WITH_DBD" = 1 ]; then
  wait_for 30 "sacct sees job $out" sh -c "sacct -n -X -j $out -o State | grep -q COMPLETED"
fi
log "smoke job $out completed"
bad=$(ss -Hltnp | grep -E 'slurm|munge|maria' | awk '{print $4}' | grep -vE '^(127\.|\[::1\])' || true)
[ -z "$bad" ] || { echo "non-loopback listener(s): $bad" >&2; exit 1; }
log "listeners: $(ss -Hltnp | grep -E 'slurm|maria' | awk '{print $4}' | tr '\n' ' ')"
sinfo
log "ready; pids in $PIDS"
