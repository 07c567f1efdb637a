#!/usr/bin/env bash
# Stop the local test cluster started by start.sh: cancel jobs, stop every
# daemon by pid file (slurmd, slurmctld, slurmdbd, MariaDB, munged), then end
# any leftover process carrying this state dir's marker (slurmstepd).
# Usage: stop.sh [STATE_DIR]   (default /tmp/ssl-bench-slurm)
set -uo pipefail
# Run inside a Slurm job, our own environment would look like a job's; drop it.
[ -z "${SLURM_JOB_ID:-}" ] || exec env -u SLURM_JOB_ID "$0" "$@"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

# gone PID...: true once every PID has exited.
gone() {
  local p
  for p in "$@"; do ! kill -0 "$p" 2>/dev/null || return 1; done
}

# end_pids GRACE PID...: SIGTERM them together, wait up to GRACE s, then SIGKILL.
end_pids() {
  local grace=$1
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  wait_until "$grace" "pids $* to exit" gone "$@" >/dev/null && return 0
  kill -KILL "$@" 2>/dev/null
  wait_until 5 "pids $* after SIGKILL" gone "$@"
}

# live_pids FILE...: the live pids named by these pid files.
live_pids() {
  local f
  for f in "$@"; do pid_alive "$f" && tr -dc 0-9 <"$f" && echo; done
  return 0
}

no_active_jobs() { [ -z "$(squeue -h -t running,completing,configuring -o %A)" ]; }

cancel_jobs() {
  pid_alive "$STATE/run/slurmctld.pid" || return 0
  local jobs
  jobs=$(squeue -h -o %A 2>/dev/null) || return 0
  [ -n "$jobs" ] || return 0
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null
  wait_until 15 "cancelled jobs to end" no_active_jobs || true
}

STOPPED=0

# stop_group PIDFILE...: end these daemons together.
stop_group() {
  local pids
  pids=$(live_pids "$@")
  STOPPED=$((STOPPED + $(wc -w <<<"$pids")))
  # shellcheck disable=SC2086
  end_pids 20 $pids
}

main() {
  local t0 pids node slurmds=()
  t0=$(date +%s.%N)
  cancel_jobs
  for node in "${NODES[@]}"; do slurmds+=("$STATE/run/slurmd-$node.pid"); done
  # slurmctld flushes accounting to slurmdbd, which needs MariaDB and munged.
  stop_group "$STATE/run/slurmctld.pid" "${slurmds[@]}"
  stop_group "$STATE/run/slurmdbd.pid"
  stop_group "$STATE/mysql/mysqld.pid" "$STATE/munge/munged.pid"
  pids=$(marked_pids)
  [ -z "$pids" ] || log "ending leftover processes: $(ps -o pid=,args= -p "${pids//$'\n'/,}" | tr '\n' ';')"
  # slurmstepd ignores SIGTERM, so leftovers get a short grace.
  # shellcheck disable=SC2086
  end_pids 2 $pids
  rm -f "$STATE"/run/*.pid "$STATE/munge/munged.pid"
  if [ -n "$(marked_pids)" ]; then
    log "processes still alive after stop: $(marked_pids | tr '\n' ' ')"
    exit 1
  fi
  log "stopped $STOPPED daemons in $(elapsed "$t0") s ($STATE)"
}

main
