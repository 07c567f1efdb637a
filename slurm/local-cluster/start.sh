#!/usr/bin/env bash
# Start a 2-node Slurm 22.05 test cluster on this host: munged, MariaDB,
# slurmdbd, slurmctld and two slurmd (n1, n2), all state under STATE_DIR.
# Usage: start.sh [STATE_DIR]   (default /tmp/ssl-bench-slurm)
# Env: SSL_BENCH_SLURM_PORT_BASE (default 17000; uses BASE..BASE+4),
#      SSL_BENCH_SLURM_TIMEOUT (seconds per wait, default 60).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

PORT_BASE=${SSL_BENCH_SLURM_PORT_BASE:-17000}
TIMEOUT=${SSL_BENCH_SLURM_TIMEOUT:-60}
CLUSTER=sslbench
PARTITION=debug
# AuthInfo cred_expire: also how long Slurm holds a requeued job (default 120 s).
CRED_EXPIRE=30

all_running() {
  local f
  for f in $(daemon_pidfiles); do pid_alive "$f" || return 1; done
}

check_prereqs() {
  [ "$(id -u)" = 0 ] || die "must run as root (the daemons run as SlurmUser=root)"
  local b
  for b in munged munge unmunge mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sacctmgr sinfo sacct; do
    command -v "$b" >/dev/null || die "$b not found; install: apt-get install slurm-wlm munge slurmdbd mariadb-server"
  done
}

# Node names must resolve (srun and torch DDP look up n1/n2), so map them to 127.0.0.1.
ensure_hosts() {
  local n
  for n in "${NODES[@]}"; do
    grep -qE "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $n" >>/etc/hosts
  done
}

# node_hw: "CPUs=.. Sockets=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=.." as slurmd -C sees it.
node_hw() {
  local c cpus sockets cores threads mem
  c=$(slurmd -C 2>/dev/null | head -n1 || true)
  field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$c"; }
  cpus=$(field CPUs); sockets=$(field SocketsPerBoard); cores=$(field CoresPerSocket)
  threads=$(field ThreadsPerCore); mem=$(field RealMemory)
  [ -n "$cpus" ] || { cpus=$(nproc); sockets=1; cores=$cpus; threads=1; }
  mem=${mem:-1000}; [ "$mem" -le 4000 ] || mem=4000
  echo "CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem"
}

render() {  # render TEMPLATE OUT
  sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$(hostname)|g" -e "s|@CLUSTER@|$CLUSTER|g" \
      -e "s|@PARTITION@|$PARTITION|g" -e "s|@CTLD_PORT@|$PORT_BASE|g" \
      -e "s|@N1_PORT@|$((PORT_BASE + 1))|g" -e "s|@N2_PORT@|$((PORT_BASE + 2))|g" \
      -e "s|@DBD_PORT@|$((PORT_BASE + 3))|g" -e "s|@MYSQL_PORT@|$((PORT_BASE + 4))|g" \
      -e "s|@NODE_HW@|$NODE_HW|g" -e "s|@DB_PASS@|$DB_PASS|g" -e "s|@CRED_EXPIRE@|$CRED_EXPIRE|g" \
      "$LC_DIR/templates/$1" >"$2"
}

# Config, key and directories are made once per state dir; a restart reuses them.
write_config() {
  mkdir -p "$STATE"/{etc,run,log,ctld,munge,mysql/tmp} "${NODES[@]/#/$STATE/spool/}"
  chmod 755 "$STATE" "$STATE/munge"
  [ -f "$STATE/munge/munge.key" ] || {
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$STATE/munge/munge.key"
  }
  [ -f "$SLURM_CONF" ] && return 0
  for p in $(seq "$PORT_BASE" $((PORT_BASE + 4))); do
    ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null ||
      die "port $p is in use (another cluster?); set SSL_BENCH_SLURM_PORT_BASE"
  done
  NODE_HW=$(node_hw)
  DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  render slurmdbd.conf.in "$STATE/etc/slurmdbd.conf"
  chmod 600 "$STATE/etc/slurmdbd.conf"
  render slurm.conf.in "$SLURM_CONF.tmp" && mv "$SLURM_CONF.tmp" "$SLURM_CONF"
}

munge_ok() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }

start_munged() {
  pid_alive "$STATE/munge/munged.pid" && return 0
  # --force: munged refuses root and world-writable parents (/tmp) without it.
  launch munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
  wait_until "$TIMEOUT" munged munge_ok
}

mysql_q() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot -e "$1"; }

start_mariadb() {
  pid_alive "$STATE/mysql/mysqld.pid" && return 0
  if [ ! -d "$STATE/mysql/data/mysql" ]; then
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql/data" \
      --auth-root-authentication-method=socket --skip-test-db --skip-name-resolve >"$STATE/log/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
  fi
  # TCP on 127.0.0.1 only: slurmdbd cannot be pointed at a private socket.
  setsid env SSL_BENCH_SLURM_STATE="$STATE" mariadbd --no-defaults --user=root \
    --datadir="$STATE/mysql/data" --socket="$MYSQL_SOCKET" --pid-file="$STATE/mysql/mysqld.pid" \
    --port=$((PORT_BASE + 4)) --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
    --tmpdir="$STATE/mysql/tmp" --log-error="$STATE/log/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=2 </dev/null >>"$STATE/log/mariadb.log" 2>&1 &
  wait_until "$TIMEOUT" MariaDB mysql_q "SELECT 1"
  local pass
  pass=$(sed -n 's/^StoragePass=//p' "$STATE/etc/slurmdbd.conf")
  mysql_q "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
  pid_alive "$STATE/run/slurmdbd.pid" && return 0
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF.
  launch slurmdbd
  wait_until "$TIMEOUT" slurmdbd sacctmgr -n list cluster
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" ||
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

ctld_up() { scontrol ping | grep -q 'is UP'; }
# Fresh clusters come up idle; a restarted one may already run recovered jobs.
nodes_up() {
  [ "$(sinfo -h -N -p "$PARTITION" -t idle,mixed,allocated -o %N | sort -u | wc -l)" -eq "${#NODES[@]}" ]
}

start_slurm() {
  pid_alive "$STATE/run/slurmctld.pid" || launch slurmctld -f "$SLURM_CONF"
  wait_until "$TIMEOUT" slurmctld ctld_up
  local n
  for n in "${NODES[@]}"; do
    pid_alive "$STATE/run/slurmd-$n.pid" || launch slurmd -f "$SLURM_CONF" -N "$n"
  done
  wait_until "$TIMEOUT" "both nodes up in sinfo" nodes_up
  wait_until "$TIMEOUT" sacct sacct -n -X -S now
}

main() {
  local t0
  trap '[ $? -eq 0 ] || log "start failed: logs in $STATE/log; clean up with $LC_DIR/stop.sh $STATE" >&2' EXIT
  t0=$(date +%s.%N)
  check_prereqs
  if [ -f "$SLURM_CONF" ] && all_running; then
    log "already running in $STATE"
  else
    ensure_hosts
    write_config
    start_munged
    start_mariadb
    start_slurmdbd
    start_slurm
    log "up in $(elapsed "$t0") s: partition $PARTITION, nodes ${NODES[*]}, state $STATE"
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
}

main
