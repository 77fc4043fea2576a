#!/usr/bin/env bash
# Run jdd on a SLURM GPU cluster: one process per GPU (default) or one process per host.
#
#   sbatch --nodes=4 launch/slurm.sh CONFIG WORKDIR [jdd.main flags...]                # 1 process / GPU
#   sbatch --nodes=4 --ntasks-per-node=1 launch/slurm.sh CONFIG WORKDIR [flags...]     # 1 process / host
#
# e.g. sbatch --nodes=2 launch/slurm.sh \
#        "configs/imagenet1k_lgm.py:data=/shared/imagenet,backbone=/shared/hf/dinov2-base" /shared/runs/in1k_lgm
#
# srun starts the tasks; JAX reads SLURM's variables (SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID) in jax.distributed.initialize(): the coordinator is the first node of the step,
# process i is task i. With one task per GPU, task SLURM_LOCALID drives GPU SLURM_LOCALID of its node,
# so every task must see all GPUs of its node (no --gpu-bind / per-task CUDA_VISIBLE_DEVICES). With
# one task per node, JDD_LOCAL_DEVICE_IDS gives that task all GPUs of its node.
#
# What it expects:
#   * a Python environment with jdd installed (pip install -e '.[cuda12]') at JDD_VENV (default:
#     .venv of this checkout), on storage every node sees, or the same path on every node;
#   * data: an ImageFolder root or a prepared TFDS data_dir, same path on every node (shared FS or a
#     node-local copy); WORKDIR on the shared filesystem (checkpoints are written by all tasks, logs,
#     exports and the feature cache WORKDIR/../feature_cache by process 0, read by all);
#   * the backbone as a local Hugging Face checkpoint dir (compute nodes often have no internet).
# Resuming: submit the same command again; the workdir's latest checkpoint is picked up.
#SBATCH --job-name=jdd
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
config=$1 workdir=$2
shift 2

# sbatch runs a copy of this script from the spool: find the checkout from where sbatch was called.
repo=${JDD_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
venv=${JDD_VENV:-$repo/.venv}
# shellcheck disable=SC1091
. "$venv/bin/activate"
cd "$repo"
mkdir -p "$workdir"

gpus_per_node=$(nvidia-smi --list-gpus | wc -l)
tasks_per_node=${SLURM_NTASKS_PER_NODE:-$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))}
if [ "$tasks_per_node" -eq 1 ] && [ "$gpus_per_node" -gt 1 ]; then
  # One process per host: it drives every GPU of its node (JAX would otherwise give it only GPU 0).
  export JDD_LOCAL_DEVICE_IDS=$(seq -s, 0 $(( gpus_per_node - 1 )))
elif [ "$tasks_per_node" -ne "$gpus_per_node" ]; then
  echo "launch/slurm.sh: $tasks_per_node tasks per node but $gpus_per_node GPUs; use --ntasks-per-node=$gpus_per_node (one per GPU) or 1 (one per host)" >&2
  exit 2
fi
# jax.distributed picks the port from the job id; JAX_COORDINATOR_PORT overrides it if that one is taken.
export JDD_MULTIHOST=1
# Each task gets its share of the node's CPUs for image decoding.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}

srun --kill-on-bad-exit=1 --cpu-bind=none \
  python -m jdd.main --config="$config" --workdir="$workdir" --config.data.workers="${SLURM_CPUS_PER_TASK:-0}" "$@"
