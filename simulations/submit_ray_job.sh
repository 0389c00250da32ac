#!/usr/bin/env bash
# Submit medfed runs and sweeps to a running Ray cluster with `ray job submit`.
#
# `ray job submit` talks to the cluster's Jobs API (the dashboard, port 8265), which needs
# Ray's optional dashboard dependencies on the head node and here:
#     pip install "ray[default]==2.55.1"
# The job's driver gets RAY_ADDRESS from Ray, so `python -m medfed.sweep` runs its cells as Ray
# tasks across the cluster; `--working-dir .` ships this checkout (minus .gitignore'd files).
#
# Usage (from anywhere; the script works in the repository root):
#   simulations/submit_ray_job.sh start                   # a one-node cluster on 127.0.0.1
#   simulations/submit_ray_job.sh run   [SIMULATE ARGS]   # one federation
#   simulations/submit_ray_job.sh sweep [CONFIG] [SWEEP ARGS]
#   simulations/submit_ray_job.sh stop                    # `ray stop`: ALL Ray on this machine
#
# Environment:
#   RAY_API_SERVER_ADDRESS  Jobs API of the cluster (default http://127.0.0.1:8265)
#   OUT                     results folder, an ABSOLUTE path on the head node (default
#                           $PWD/runs/jobs): a job runs in a temporary copy of --working-dir
#                           that Ray deletes, so relative --out paths would vanish with it.
#
# What the script runs (copy these for your own cluster):
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python -m medfed.simulate --hospitals 5 --backend local --no-progress --out /abs/run
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python -m medfed.sweep configs/sweep_smoke.yaml --out /abs/smoke --no-progress
#
# Without the Jobs API, run the driver yourself on a cluster node (or any machine that reaches
# the head's GCS port); the same commands take the cluster's GCS address:
#   python -m medfed.sweep configs/sweep_smoke.yaml --out runs/sweeps/smoke --ray-address HEAD:6379
#   RAY_ADDRESS=HEAD:6379 python -m medfed.sweep configs/sweep_smoke.yaml --out runs/sweeps/smoke
#
# Notes:
#   - Rerunning a sweep job into the same --out skips finished cells (resume after a failure).
#   - `medfed.simulate --backend flower` (Flower's Ray engine) cannot join a running cluster
#     yet; submit single runs with `--backend local`. Sweep cells with backend flower run in a
#     child process with a private Ray on the node that runs the cell.
#   - Each node embeds a dataset once into its feature cache (~/.cache/medfed/features).
set -euo pipefail
cd "$(dirname "$0")/.."

export RAY_API_SERVER_ADDRESS="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}"
OUT="${OUT:-$PWD/runs/jobs}"
case "$OUT" in /*) ;; *) echo "OUT must be an absolute path, got '$OUT'" >&2; exit 2 ;; esac

submit() {
  ray job submit --address "$RAY_API_SERVER_ADDRESS" --working-dir . -- "$@"
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  start)
    # One node bound to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping
    # 127.0.0.1 for the machine's routable IP). Dashboard / Jobs API on 127.0.0.1:8265.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address 127.0.0.1 \
      --port "${RAY_PORT:-6379}" --dashboard-host 127.0.0.1 --dashboard-port 8265 \
      --include-dashboard true --disable-usage-stats "$@"
    ;;
  run)
    mkdir -p "$OUT"
    if [ "$#" -eq 0 ]; then set -- --hospitals 5; fi
    submit python -m medfed.simulate --backend local --no-progress --out "$OUT/run" "$@"
    ;;
  sweep)
    config="${1:-configs/sweep_smoke.yaml}"
    shift || true
    name="$(basename "$config" .yaml)"
    mkdir -p "$OUT"
    submit python -m medfed.sweep "$config" --out "$OUT/$name" --no-progress "$@"
    ;;
  stop)
    ray stop  # stops every Ray process on this machine, not only the cluster started above
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    ;;
esac
