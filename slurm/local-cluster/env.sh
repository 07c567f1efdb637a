# shellcheck shell=bash
# Source me after start.sh: . slurm/local-cluster/env.sh [STATE_DIR]
# Points the Slurm commands (sbatch, srun, squeue, sacct, scancel, scontrol)
# at the local test cluster; submitit's subprocesses inherit it.
export SLURM_CONF="${1:-${SSL_BENCH_SLURM_DIR:-/tmp/ssl-bench-slurm}}/etc/slurm.conf"
[ -f "$SLURM_CONF" ] || echo "env.sh: $SLURM_CONF not found; run slurm/local-cluster/start.sh first" >&2
