#!/usr/bin/env bash
# Start a real single-host Slurm for the cluster tests: munged + slurmctld + 2 emulated nodes (n1, n2).
#
#   eval "$(bash tests/cluster/slurm-up.sh)"     # prints `export SLURM_CONF=...` and `export PATH=...`
#   bash tests/cluster/slurm-down.sh              # stops what this script started
#
# Runs as root (Debian/Ubuntu): installs slurm-wlm + munge with apt when missing. Idempotent: a running
# cluster in $SLURM_CI_DIR is reused, a stale one is torn down and started again. The nodes are two
# `slurmd -N nX` on 127.0.0.1 with their own ports, each with all CPUs of the host. AuthInfo=cred_expire=10
# makes a requeued job start again after ~12 s (default 120 s). No slurmdbd: $SLURM_CI_DIR/bin/sacct is a
# stand-in built on `squeue -t all` so submitit sees job states (PENDING, RUNNING, COMPLETED, CANCELLED).
# Everything (config, state, logs, pid files) lives in SLURM_CI_DIR (default ${TMPDIR:-/tmp}/ci-slurm);
# only the exports go to stdout, progress and errors to stderr.
set -euo pipefail
NODES=${SLURM_CI_NODES:-2}
DIR=${SLURM_CI_DIR:-${TMPDIR:-/tmp}/ci-slurm}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SLURM_CONF="$DIR/slurm.conf"

exports() {
  echo "export SLURM_CONF=$SLURM_CONF"
  echo "export PATH=$DIR/bin:\$PATH"
}

all_idle() { [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u)" = "idle" ]; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Already up (e.g. a second call): reuse it.
if [ -f "$SLURM_CONF" ] && alive "$DIR/slurmctld.pid" && command -v sinfo >/dev/null && all_idle; then
  echo "slurm-up: cluster in $DIR already running" >&2
  exports
  exit 0
fi
bash "$HERE/slurm-down.sh" >&2   # leftovers of an earlier run (no-op when nothing runs)

if [ "$(id -u)" != 0 ]; then echo "slurm-up: must run as root" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm-up: installing slurm-wlm and munge" >&2
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
fi

rm -rf "$DIR"
mkdir -p "$DIR"/{state,log,spool,bin}

# munge: key, runtime dir, daemon (only started, and later stopped, by us when none answers).
if [ ! -s /etc/munge/munge.key ]; then mungekey --create >&2; fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged   # daemonizes; pid in /run/munge/munged.pid
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n >/dev/null 2>&1 || { echo "slurm-up: munged did not start" >&2; exit 1; }
  cp /run/munge/munged.pid "$DIR/munged.pid"   # marks munged as ours for slurm-down.sh
fi

CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 8 / 10 ))   # MB; above the real one drains the node
cat > "$SLURM_CONF" <<CONF
ClusterName=ci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=5
MessageTimeout=30
CONF
NAMES=()
for i in $(seq 1 "$NODES"); do
  echo "NodeName=n$i NodeAddr=127.0.0.1 Port=$((6817 + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN" >> "$SLURM_CONF"
  NAMES+=("n$i")
done
echo "PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP" >> "$SLURM_CONF"

# sacct stand-in (no slurmdbd): "-j ID" (repeatable, comma lists too) -> JobID|State|NodeList
cat > "$DIR/bin/sacct" <<'SACCT'
#!/bin/bash
# CI stand-in for sacct (no slurmdbd): handles "-j ID" (repeatable) and prints JobID|State|NodeList
ids=()
while [ $# -gt 0 ]; do case "$1" in -j) ids+=("$2"); shift 2;; *) shift;; esac; done
echo "JobID|State|NodeList"
[ ${#ids[@]} -eq 0 ] && exit 0
IFS=,
exec squeue -h -t all -j "${ids[*]}" -o "%i|%T|%N"
SACCT
chmod +x "$DIR/bin/sacct"

/usr/sbin/slurmctld -i                       # daemonizes; -i ignores missing state files
for n in "${NAMES[@]}"; do /usr/sbin/slurmd -N "$n"; done
for _ in $(seq 60); do all_idle && break; sleep 0.5; done
sinfo >&2
if ! all_idle; then
  echo "slurm-up: nodes not idle; logs:" >&2
  tail -n 20 "$DIR"/log/*.log >&2
  exit 1
fi
exports
