#!/usr/bin/env bash
# Stop the test cluster started by slurm-up.sh: its slurmd's, slurmctld and munged (only when slurm-up
# started it). Safe to call twice or when nothing runs; leaves $SLURM_CI_DIR (logs) in place.
set -uo pipefail
DIR=${SLURM_CI_DIR:-${TMPDIR:-/tmp}/ci-slurm}

pids=()
for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  # only a live process that is what the pid file says (pids get reused)
  if kill -0 "$pid" 2>/dev/null && grep -qE 'slurmd|slurmctld|munged' "/proc/$pid/comm" 2>/dev/null; then
    kill "$pid" 2>/dev/null && pids+=("$pid")
  fi
  rm -f "$f"
done
for _ in $(seq 50); do
  left=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
  [ "$left" = 0 ] && break
  sleep 0.2
done
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null; done
[ ${#pids[@]} -gt 0 ] && echo "slurm-down: stopped ${#pids[@]} daemon(s) of $DIR" >&2
exit 0
