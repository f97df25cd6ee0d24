#!/usr/bin/env bash
# stop-slurm.sh -- stop the cluster started by start-slurm.sh.
# Cancels all jobs, then stops each slurmd, slurmctld and (only
# if start-slurm.sh started it) munged -- each by the PID in its pid file,
# never by process name. Packages stay installed; state/logs stay in $SLURM_TEST_BASE.
set -uo pipefail
BASE=${SLURM_TEST_BASE:-/tmp/slurm-test/cluster}
export SLURM_CONF=$BASE/etc/slurm.conf
JOB_DRAIN_TIMEOUT=${JOB_DRAIN_TIMEOUT:-45}   # > KillWait (30 s default)

log() { echo "[stop-slurm] $*"; }

# stop_pid <name> <pidfile> <expected-comm>: SIGTERM, wait up to 30 s, then SIGKILL
stop_pid() {
  local name=$1 pidfile=$2 comm=$3 pid i
  [ -s "$pidfile" ] || { log "$name: no pid file"; return 0; }
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then log "$name: pid $pid not running"; rm -f "$pidfile"; return 0; fi
  if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" != "$comm" ]; then
    log "$name: pid $pid is '$(cat /proc/"$pid"/comm 2>/dev/null)', not $comm -- leaving it alone"; return 0
  fi
  kill -TERM "$pid"
  for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then log "$name: still alive, SIGKILL"; kill -KILL "$pid"; sleep 0.5; fi
  log "$name (pid $pid) stopped"
  rm -f "$pidfile"
}

# 1. cancel every job so no slurmstepd/job processes outlive slurmd
if [ -s "$BASE/run/slurmctld.pid" ] && kill -0 "$(cat "$BASE/run/slurmctld.pid")" 2>/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for i in $(seq 1 $((JOB_DRAIN_TIMEOUT * 5))); do
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2
    done
    [ -n "$(squeue -h -o %A 2>/dev/null)" ] && log "warning: jobs still listed: $(squeue -h -o '%A %T' | tr '\n' ' ')"
  fi
fi

# 2. daemons, reverse start order
for pidfile in "$BASE"/run/slurmd-*.pid; do   # one per node (slurmd -N NAME)
  [ -e "$pidfile" ] || continue
  node=${pidfile##*/slurmd-}
  stop_pid "slurmd ${node%.pid}" "$pidfile" slurmd
done
stop_pid slurmctld "$BASE/run/slurmctld.pid" slurmctld
if [ -s "$BASE/run/munged.ours" ]; then
  stop_pid munged "$BASE/run/munged.ours" munged
else
  log "munged: not started by start-slurm.sh, left alone"
fi

# 3. report leftovers (informational only)
left=$(ps -eo pid=,comm= | awk '$2 ~ /^slurmstepd$/ {print $1}' | tr '\n' ' ')
[ -n "${left// }" ] && log "warning: slurmstepd processes still present: $left"
log "done"
exit 0
