#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the batch scripts:
# one munged, one slurmctld and one `slurmd -N nK` per node, all on 127.0.0.1, with fake GPUs (/dev/fakegpu0-7).
#
#   tools/slurm_cluster.sh start     # idempotent; returns once `sinfo` shows every node idle
#   eval "$(tools/slurm_cluster.sh env)"   # point sbatch/srun/squeue/scontrol at it (exports SLURM_CONF)
#   tools/slurm_cluster.sh status    # daemons, nodes, jobs
#   tools/slurm_cluster.sh stop      # cancel jobs, stop daemons, delete state (logs are kept; `stop --purge` too)
#
# Everything lives in one scratch folder, HPC_RLHF_SLURM_DIR (default /tmp/hpc_rlhf_slurm):
#   etc/slurm.conf etc/gres.conf   the configuration (the generator is in tools/slurm/)
#   munge/                         munged's key, socket, pid and seed
#   state/ spool/ run/             slurmctld state, slurmd spool and pid files
#   log/                           slurmctld.log, slurmd-nK.log, munged.log, jobcomp.log (one line per finished job)
# Other knobs: HPC_RLHF_SLURM_NODES (3), HPC_RLHF_SLURM_CPUS per node (128), HPC_RLHF_SLURM_GPUS per node (8),
# HPC_RLHF_SLURM_MEM_MB per node (6000), HPC_RLHF_SLURM_PORT (17010: slurmctld; slurmd nK listens on PORT+K),
# HPC_RLHF_SLURM_CRED_EXPIRE (120 s, SLURM's default: how long a requeued job waits before it may start again),
# HPC_RLHF_SLURM_START_TIMEOUT (90 s). Needs root (slurmd runs jobs as their user); installs the Debian packages
# slurmctld slurmd slurm-client munge with apt-get when their programs are missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRATCH="${HPC_RLHF_SLURM_DIR:-/tmp/hpc_rlhf_slurm}"
NODES="${HPC_RLHF_SLURM_NODES:-3}"
GPUS="${HPC_RLHF_SLURM_GPUS:-8}"
START_TIMEOUT="${HPC_RLHF_SLURM_START_TIMEOUT:-90}"
CONF="$SCRATCH/etc/slurm.conf"
MUNGE_SOCKET="$SCRATCH/munge/munge.socket"
PROGRAMS=(munged slurmctld slurmd sbatch srun scontrol sinfo squeue scancel)
PACKAGES=(munge slurmctld slurmd slurm-client)

export SLURM_CONF="$CONF"

die() { echo "slurm_cluster: $*" >&2; exit 1; }
say() { echo "slurm_cluster: $*" >&2; }

node_names() { local k; for ((k = 1; k <= NODES; k++)); do echo "n$k"; done; }

process_alive() {  # process_alive PID: running (a zombie, whose parent has not reaped it, counts as dead)
  local state
  state="$(ps -o stat= -p "$1" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != Z* ]]
}

pid_alive() {  # pid_alive FILE: the process named in the pid file is running
  [[ -s "$1" ]] && process_alive "$(cat "$1")"
}

all_pid_files() {  # the daemons of this node count, and any slurmd left by a start with another node count
  {
    echo "$SCRATCH/munge/munged.pid"
    echo "$SCRATCH/run/slurmctld.pid"
    local node f
    for node in $(node_names); do echo "$SCRATCH/run/slurmd-$node.pid"; done
    for f in "$SCRATCH"/run/slurmd-*.pid; do if [[ -e "$f" ]]; then echo "$f"; fi; done
  } | awk '!seen[$0]++'
}

all_daemons_alive() {
  local f; for f in $(all_pid_files); do pid_alive "$f" || return 1; done
}

any_daemon_alive() {
  local f; for f in $(all_pid_files); do pid_alive "$f" && return 0; done; return 1
}

show_log_tails() {
  local f
  for f in "$SCRATCH"/log/munged.log "$SCRATCH"/log/slurmctld.log "$SCRATCH"/log/slurmd-*.log; do
    [[ -f "$f" ]] || continue
    echo "----- last lines of $f" >&2
    tail -n 25 "$f" >&2
  done
}

ensure_packages() {
  local missing=() p
  for p in "${PROGRAMS[@]}"; do command -v "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]} == 0)) && return 0
  [[ $EUID -eq 0 ]] || die "programs missing (${missing[*]}) and not root: cannot apt-get install ${PACKAGES[*]}"
  command -v apt-get >/dev/null 2>&1 || die "programs missing (${missing[*]}) and no apt-get on this machine"
  say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
  for p in "${PROGRAMS[@]}"; do
    command -v "$p" >/dev/null 2>&1 || die "apt-get installed ${PACKAGES[*]} but $p is still missing"
  done
}

ensure_hosts() {  # node names resolve to this machine (code that turns SLURM_JOB_NODELIST into addresses needs it)
  local node missing=()
  for node in $(node_names); do getent hosts "$node" >/dev/null 2>&1 || missing+=("$node"); done
  ((${#missing[@]} == 0)) && return 0
  # /etc/hosts may lack a final newline; add one so the new line is not glued to the last entry
  local newline=""
  [[ -s /etc/hosts && -n "$(tail -c 1 /etc/hosts)" ]] && newline=$'\n'
  printf '%s127.0.0.1 %s  # hpc_rlhf local SLURM test cluster\n' "$newline" "${missing[*]}" >>/etc/hosts 2>/dev/null ||
    say "warning: cannot add ${missing[*]} to /etc/hosts; SLURM still works (NodeAddr=127.0.0.1), name lookups will not"
}

ensure_fake_gpus() {  # gres.conf needs device files; character device 1:3 behaves like /dev/null
  local k
  for ((k = 0; k < GPUS; k++)); do
    [[ -e /dev/fakegpu$k ]] || mknod -m 666 "/dev/fakegpu$k" c 1 3
  done
}

start_munge() {
  pid_alive "$SCRATCH/munge/munged.pid" && return 0
  install -d -o munge -g munge -m 0755 "$SCRATCH/munge"
  if [[ ! -s "$SCRATCH/munge/munge.key" ]]; then
    head -c 1024 /dev/urandom >"$SCRATCH/munge/munge.key"
  fi
  chown munge:munge "$SCRATCH/munge/munge.key"
  chmod 0400 "$SCRATCH/munge/munge.key"
  touch "$SCRATCH/log/munged.log" && chown munge:munge "$SCRATCH/log/munged.log"
  runuser -u munge -- munged --force \
    --socket="$MUNGE_SOCKET" --key-file="$SCRATCH/munge/munge.key" --pid-file="$SCRATCH/munge/munged.pid" \
    --seed-file="$SCRATCH/munge/munged.seed" --log-file="$SCRATCH/log/munged.log"
}

write_config() {
  python3 "$HERE/slurm/write_slurm_conf.py" --scratch "$SCRATCH" --hostname "$(hostname -s)" \
    --nodes "$NODES" --gpus "$GPUS" --cpus "${HPC_RLHF_SLURM_CPUS:-128}" --mem-mb "${HPC_RLHF_SLURM_MEM_MB:-6000}" \
    --port "${HPC_RLHF_SLURM_PORT:-17010}" --cred-expire "${HPC_RLHF_SLURM_CRED_EXPIRE:-120}" \
    --munge-socket "$MUNGE_SOCKET"
}

wait_until_idle() {
  local deadline=$((SECONDS + START_TIMEOUT)) idle
  while ((SECONDS < deadline)); do
    idle="$(sinfo --Node --noheader --responding --states=idle --format='%N' 2>/dev/null | sort -u | grep -c . || true)"
    ((idle >= NODES)) && return 0
    all_daemons_alive || break
    sleep 1
  done
  sinfo --Node --long >&2 || true
  show_log_tails
  if all_daemons_alive; then
    die "the $NODES nodes were not all idle after ${START_TIMEOUT}s (logs above, full logs in $SCRATCH/log)"
  fi
  die "a daemon died while starting (logs above, full logs in $SCRATCH/log)"
}

cmd_start() {
  if all_daemons_alive && sinfo --noheader >/dev/null 2>&1; then
    wait_until_idle_or_busy
    say "already running ($SCRATCH)"
    return 0
  fi
  [[ $EUID -eq 0 ]] || die "must run as root: slurmd starts job processes as their owner"
  any_daemon_alive && { say "a previous start is half-alive; stopping it first"; cmd_stop; }
  ensure_packages
  ensure_hosts
  ensure_fake_gpus
  rm -rf "$SCRATCH"/{etc,state,spool,run}  # a fresh cluster: no jobs or node states from a run that crashed
  mkdir -p "$SCRATCH"/{etc,state,run,log}
  local node
  for node in $(node_names); do mkdir -p "$SCRATCH/spool/$node"; done
  start_munge
  write_config
  slurmctld -f "$CONF" -i
  for node in $(node_names); do slurmd -f "$CONF" -N "$node"; done
  wait_until_idle
  say "up: $NODES nodes x $GPUS fake GPUs ($SCRATCH); run: eval \"\$($0 env)\""
}

wait_until_idle_or_busy() {  # a running cluster may have jobs on its nodes; just check the nodes respond
  local responding
  responding="$(sinfo --Node --noheader --responding --format='%N' 2>/dev/null | sort -u | grep -c . || true)"
  ((responding >= NODES)) || { show_log_tails; die "cluster running but only $responding of $NODES nodes respond"; }
}

stop_pid_files() {  # stop_pid_files FILE...: TERM every process named in the files at once, wait, KILL stragglers
  local f pid k pids=()
  for f in "$@"; do
    pid_alive "$f" && pids+=("$(cat "$f")")
  done
  ((${#pids[@]} == 0)) || kill -TERM "${pids[@]}" 2>/dev/null || true
  for ((k = 0; k < 100; k++)); do
    local alive=()
    for pid in "${pids[@]}"; do process_alive "$pid" && alive+=("$pid"); done
    ((${#alive[@]} == 0)) && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if process_alive "$pid"; then
      say "process $pid ignored TERM for 10s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$@"
}

cmd_stop() {
  local purge="${1:-}" k slurm_pid_files=()
  if pid_alive "$SCRATCH/run/slurmctld.pid"; then  # cancel jobs so that no job step outlives its slurmd
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for ((k = 0; k < 30; k++)); do
      [[ -z "$(squeue --noheader --format=%i 2>/dev/null)" ]] && break
      sleep 0.5
    done
  fi
  mapfile -t slurm_pid_files < <(all_pid_files | grep -v munged.pid)
  stop_pid_files "${slurm_pid_files[@]}"
  stop_pid_files "$SCRATCH/munge/munged.pid"  # last: the SLURM daemons authenticate through it while stopping
  rm -rf "$SCRATCH"/{etc,state,spool,run,munge}
  [[ "$purge" == "--purge" ]] && rm -rf "$SCRATCH"
  say "stopped ($SCRATCH)"
}

cmd_status() {
  local f state
  for f in $(all_pid_files); do
    if pid_alive "$f"; then state="running (pid $(cat "$f"))"; else state="not running"; fi
    printf '%-28s %s\n' "$(basename "$f" .pid)" "$state"
  done
  if all_daemons_alive; then
    sinfo --Node --format='%N %T %G %c %m' || true
    squeue --format='%i %j %T %M %l %R' || true
    return 0
  fi
  return 3
}

cmd_env() {
  echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop "${2:-}" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 start|stop [--purge]|status|env" >&2; exit 2 ;;
esac
