#!/usr/bin/env bash
# start-slurm.sh -- install (Debian 12 packages) and start a Slurm test cluster
# (slurmctld + one slurmd per node) without systemd, for the launcher's Slurm tests
# (tests/support/slurm_cluster.py). Adapted from the team's shared notes; no accounting
# daemon: the tests poll `scontrol show job`, they need no sacct.
# Must run as root. Idempotent enough to be re-run after stop-slurm.sh.
#
# Several nodes on this one machine: one slurmd per node, started with `slurmd -N NAME`
# (Debian's 22.05 build accepts several slurmd per host: each node has its own name,
# loopback address 127.0.0.N+1, port, spool folder, pid and log file). Every node
# declares all of this machine's CPUs and memory, so they oversubscribe it: fine for tests.
#
# Environment knobs:
#   SLURM_TEST_BASE  where config, state, logs, pid files live  [/tmp/slurm-test/cluster]
#   SLURM_AUTH       munge | none                              [munge]
#   SKIP_INSTALL     1 = do not run apt-get                    [0]
#   CLEAN_STATE      1 = wipe previous controller/node state (job ids restart at 1) [1]
#   READY_TIMEOUT    seconds to wait for each daemon / the node [120]
#   SLURMCTLD_PORT SLURMD_PORT                          [6817 6818]
#   SLURM_NODES      nodes (slurmd daemons) to start          [1]
#                    1: the node is this host's short name, at 127.0.0.1
#                    N > 1: nodes node1..nodeN at 127.0.0.2..N+1, slurmd ports
#                    SLURMD_PORT..SLURMD_PORT+N-1
#
# After it returns 0:   source "$SLURM_TEST_BASE/env.sh"   (exports SLURM_CONF)
set -euo pipefail

BASE=${SLURM_TEST_BASE:-/tmp/slurm-test/cluster}
AUTH=${SLURM_AUTH:-munge}
SKIP_INSTALL=${SKIP_INSTALL:-0}
CLEAN_STATE=${CLEAN_STATE:-1}
READY_TIMEOUT=${READY_TIMEOUT:-120}
SLURMCTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
NODES=${SLURM_NODES:-1}

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[start-slurm %3d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*"; }
die() { log "ERROR: $*"; exit 1; }
# wait_for <description> <command...>: retry the command every 0.2 s up to READY_TIMEOUT
wait_for() {
  local what=$1; shift
  local deadline=$(( $(date +%s) + READY_TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $what"
    sleep 0.2
  done
  log "$what: ok"
}
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$AUTH" in munge|none) ;; *) die "SLURM_AUTH must be munge or none";; esac

# ---------------------------------------------------------------- 1. packages
if [ "$SKIP_INSTALL" != 1 ]; then
  PKGS="slurmctld slurmd slurm-client"
  [ "$AUTH" = munge ] && PKGS="$PKGS munge"
  missing=""
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    # Keep package postinst scripts from starting services (munge has
    # init scripts); we start everything ourselves below.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    log "apt-get update"
    apt-get update -qq
    log "apt-get install$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    log "packages installed"
  else
    log "packages already installed"
  fi
fi
for b in slurmctld slurmd sbatch srun; do command -v $b >/dev/null || die "$b not found"; done

# ---------------------------------------------------------------- 2. layout
export SLURM_CONF=$BASE/etc/slurm.conf
for pidfile in "$BASE"/run/slurm*.pid; do
  if pid_alive "$pidfile"; then die "a cluster from $BASE is still running; run stop-slurm.sh first"; fi
done
mkdir -p "$BASE"/{etc,log,run,state/ctld,state/d}
if [ "$CLEAN_STATE" = 1 ]; then   # job ids restart at 1
  rm -rf "${BASE:?}"/state/ctld/* "${BASE:?}"/state/d/*
fi
chown slurm:slurm "$BASE"/log "$BASE"/run "$BASE"/state/ctld

HN=$(hostname -s)
if [ "$NODES" = 1 ]; then
  NODE_NAMES=("$HN"); NODE_ADDRS=(127.0.0.1)
else
  NODE_NAMES=(); NODE_ADDRS=()
  for i in $(seq 1 "$NODES"); do NODE_NAMES+=("node$i"); NODE_ADDRS+=("127.0.0.$((i + 1))"); done
fi
HW=$(slurmd -C | sed -n 1p)
hw() { echo "$HW" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
CPUS=$(hw CPUs); BOARDS=$(hw Boards); SPB=$(hw SocketsPerBoard)
CPS=$(hw CoresPerSocket); TPC=$(hw ThreadsPerCore); MEM_SLURMD=$(hw RealMemory)
MEM_FREE=$(free -m | awk '/^Mem:/{print $2}')
MEM=$(( MEM_FREE < MEM_SLURMD ? MEM_FREE : MEM_SLURMD ))
log "host $HN: CPUs=$CPUS Sockets=$SPB Cores/Socket=$CPS Threads/Core=$TPC RealMemory=$MEM; nodes: ${NODE_NAMES[*]}"

if [ "$AUTH" = munge ]; then
  AUTHTYPE=auth/munge; CREDTYPE=cred/munge
else
  AUTHTYPE=auth/none; CREDTYPE=cred/none
fi

cat > "$SLURM_CONF" <<EOF
# generated by start-slurm.sh
ClusterName=testcluster
SlurmctldHost=$HN(127.0.0.1)
SlurmUser=slurm
AuthType=$AUTHTYPE
CredType=$CREDTYPE
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
for i in "${!NODE_NAMES[@]}"; do
  echo "NodeName=${NODE_NAMES[$i]} NodeAddr=${NODE_ADDRS[$i]} NodeHostname=$HN Port=$((SLURMD_PORT + i))" \
       "CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SPB CoresPerSocket=$CPS ThreadsPerCore=$TPC RealMemory=$MEM" \
       "State=UNKNOWN" >> "$SLURM_CONF"
done
echo "export SLURM_CONF=$SLURM_CONF" > "$BASE/env.sh"

# ---------------------------------------------------------------- 3. munge
rm -f "$BASE/run/munged.ours"
if [ "$AUTH" = munge ]; then
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
  fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running, reusing it"
  else
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged          # forks; writes /run/munge/munged.pid
    wait_for "munged" sh -c 'munge -n | unmunge'
    cp /run/munge/munged.pid "$BASE/run/munged.ours"   # remember that we started it
  fi
fi

# ---------------------------------------------------------------- 4. slurmctld + slurmd
slurmctld                     # daemonizes, drops privileges to SlurmUser=slurm
wait_for "slurmctld" sh -c 'scontrol ping | grep -q "is UP"'
for node in "${NODE_NAMES[@]}"; do
  mkdir -p "$BASE/state/d/$node"
  slurmd -N "$node"           # daemonizes, runs as root
done
NODE_LIST=$(IFS=,; echo "${NODE_NAMES[*]}")
all_idle() { [ "$(sinfo -h -N -n "$NODE_LIST" -o %T 2>/dev/null | sort -u)" = idle ]; }
deadline=$(( $(date +%s) + READY_TIMEOUT ))
until all_idle; do
  for node in "${NODE_NAMES[@]}"; do
    st=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null || true)
    case "$st" in
      drain*|down*) log "node $node is $st ($(sinfo -h -N -n "$node" -o %E)); resuming"
                    scontrol update NodeName="$node" State=RESUME || true ;;
    esac
  done
  [ "$(date +%s)" -lt "$deadline" ] || die "nodes never all became idle: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')see $BASE/log/"
  sleep 0.2
done
log "nodes $NODE_LIST idle"

# ---------------------------------------------------------------- 5. smoke test
# (poll scontrol ourselves: `sbatch --wait` polls with growing sleeps, 2 s, 4 s, ...)
jid=$(cd "$BASE" && sbatch --parsable -N "$NODES" -n2 -t 1 -o /dev/null -J smoke --wrap 'srun -n2 true') \
  || die "sbatch of smoke-test job failed"
deadline=$(( $(date +%s) + READY_TIMEOUT ))
while :; do
  st=$(scontrol show job -o "$jid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
  case "$st" in
    COMPLETED) break ;;
    FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE) die "smoke job $jid ended $st" ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || die "smoke job $jid still $st after ${READY_TIMEOUT}s"
  sleep 0.2
done
log "smoke job $jid (sbatch -N $NODES -n2 + srun) completed"
log "READY. Use: source $BASE/env.sh   (SLURM_CONF=$SLURM_CONF)"
