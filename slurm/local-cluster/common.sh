# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this
# Shared paths and helpers for start.sh and stop.sh; sourced, never run.
# Every daemon is started with SSL_BENCH_SLURM_STATE=<state dir> in its
# environment, so stop.sh can also find what the pid files miss (slurmstepd).

LC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${1:-${SSL_BENCH_SLURM_DIR:-/tmp/ssl-bench-slurm}}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
export SLURM_CONF=$STATE/etc/slurm.conf
NODES=(n1 n2)
MUNGE_SOCKET=$STATE/munge/munge.socket
MYSQL_SOCKET=$STATE/mysql/mysqld.sock

log() { printf 'local-cluster: %s\n' "$*"; }
die() { printf 'local-cluster: error: %s\n' "$*" >&2; exit 1; }

# has_marker PID: true when PID was started by these scripts for this state dir.
has_marker() {
  tr '\0' '\n' 2>/dev/null </proc/"$1"/environ | grep -qxF "SSL_BENCH_SLURM_STATE=$STATE"
}

# pid_alive FILE: true when FILE names a live daemon of this cluster (not a reused pid).
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc 0-9 <"$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && has_marker "$pid"
}

# wait_until SECONDS WHAT CMD...: poll CMD every 0.2 s; fail with WHAT after SECONDS.
wait_until() {
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "timed out after ${limit}s waiting for $what"; return 1; }
    sleep 0.2
  done
}

# elapsed T0: seconds since T0 (from date +%s.%N), one decimal.
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}'; }

# pid files of every daemon, in start order.
daemon_pidfiles() {
  printf '%s\n' "$STATE/munge/munged.pid" "$STATE/mysql/mysqld.pid" \
    "$STATE/run/slurmdbd.pid" "$STATE/run/slurmctld.pid"
  local n
  for n in "${NODES[@]}"; do printf '%s\n' "$STATE/run/slurmd-$n.pid"; done
}

# ancestors: this shell and the processes above it (e.g. pytest), never to be ended.
ancestors() {
  local pid=$$
  while [ "$pid" -gt 1 ] 2>/dev/null; do
    echo "$pid"
    pid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null) || break
  done
}

# marked_pids: live processes of this cluster: daemons and slurmstepd carry the
# marker; job processes carry SLURM_JOB_ID and this cluster's SLURM_CONF.
marked_pids() {
  local env pid vars skip
  skip=" $BASHPID $(ancestors) "
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [[ "$skip" != *" $pid "* ]] || continue
    vars=$(tr '\0' '\n' 2>/dev/null <"$env") || continue
    if grep -qxF "SSL_BENCH_SLURM_STATE=$STATE" <<<"$vars" ||
       { grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$vars" && grep -q '^SLURM_JOB_ID=' <<<"$vars"; }; then
      echo "$pid"
    fi
  done
  return 0
}

# launch CMD...: run a daemon with the marker in its environment.
launch() { env SSL_BENCH_SLURM_STATE="$STATE" "$@"; }
