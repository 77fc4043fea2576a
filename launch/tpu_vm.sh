#!/usr/bin/env bash
# Run jdd on a Cloud TPU VM: a single host (v4-8, v5e-8, ...) or a pod slice (v4-32, v5e-64, ...).
#
#   launch/tpu_vm.sh setup TPU_NAME ZONE               # once: copy this checkout to every worker, install
#   launch/tpu_vm.sh run   TPU_NAME ZONE CONFIG WORKDIR [jdd.main flags...]
#   launch/tpu_vm.sh stop  TPU_NAME ZONE               # kill a run on every worker
#
# e.g. launch/tpu_vm.sh run my-v4-32 us-central2-b \
#        "configs/imagenet1k_lgm.py:data=/mnt/data/imagenet,backbone=/mnt/data/dinov2-base" /mnt/runs/in1k_lgm
#
# Every worker runs the same command (gcloud ... ssh --worker=all). On a slice of several workers
# jdd calls jax.distributed.initialize() (JDD_MULTIHOST=1; JAX reads the slice's topology from the
# TPU metadata), builds one mesh over all chips, and each worker reads its own share of every real
# batch. Process 0 writes the logs, distilled.npz/png and results; all workers write checkpoints.
#
# What it expects:
#   * data: an ImageFolder root (train/, val/) or a prepared TFDS data_dir, at the same POSIX path on
#     every worker (a persistent disk attached read-only to all workers, Filestore NFS, or a gcsfuse
#     mount); jdd does not read gs:// URLs itself.
#   * WORKDIR: on storage shared by all workers (Filestore / NFS / gcsfuse) for a pod slice, so that
#     orbax's checkpoint (every worker writes its part), the feature cache (WORKDIR/../feature_cache,
#     built by process 0) and resuming all see one directory. A local path is fine on a single host.
#   * the backbone: a local Hugging Face checkpoint dir on that storage, or a hub name (needs internet).
#   * env: JDD_REMOTE_DIR (default ~/jdd) where the code lives on the workers; PROJECT (gcloud
#     --project, optional); JDD_PIP_EXTRA (default "tpu": pip install -e ".[tpu]").
set -euo pipefail

usage() { sed -n '2,8p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
cmd=$1 tpu=$2 zone=$3
shift 3
remote_dir=${JDD_REMOTE_DIR:-jdd}
project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project "$PROJECT")

on_all_workers() {  # run a bash command on every worker of the TPU VM, in parallel
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all --command "$1"
}

num_workers() {
  gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" "${project_flag[@]}" --format=json |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin).get("networkEndpoints", [])) or 1)'
}

case "$cmd" in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tarball=$(mktemp -t jdd-src-XXXX.tar.gz)
    # The checkout without virtual environments, runs and caches.
    tar -C "$repo" --exclude=.git --exclude=.venv --exclude=build --exclude=runs --exclude=.cache -czf "$tarball" .
    gcloud compute tpus tpu-vm scp "$tarball" "$tpu:jdd-src.tar.gz" --zone "$zone" "${project_flag[@]}" --worker=all
    rm -f "$tarball"
    on_all_workers "mkdir -p $remote_dir && tar -xzf jdd-src.tar.gz -C $remote_dir && cd $remote_dir &&
      python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip &&
      pip install -q -e '.[${JDD_PIP_EXTRA:-tpu}]' && python -c 'import jax; print(jax.device_count(), \"devices\")'"
    ;;
  run)
    [ $# -ge 2 ] || usage
    config=$1 workdir=$2
    shift 2
    multihost=0
    [ "$(num_workers)" -gt 1 ] && multihost=1
    extra=$(printf ' %q' "$@")
    # nohup + a log per worker: the run survives a dropped ssh connection; resume = run again.
    on_all_workers "cd $remote_dir && . .venv/bin/activate && mkdir -p $(printf %q "$workdir") &&
      JDD_MULTIHOST=$multihost nohup python -m jdd.main --config=$(printf %q "$config") \
        --workdir=$(printf %q "$workdir")$extra > jdd-\$(hostname).log 2>&1 &
      echo \$! > jdd.pid; echo started on \$(hostname): log ~/$remote_dir/jdd-\$(hostname).log"
    ;;
  stop)
    # The process each worker started (its id was written by `run`).
    on_all_workers "cd $remote_dir && [ -f jdd.pid ] && kill \$(cat jdd.pid) && rm jdd.pid || true"
    ;;
  *) usage ;;
esac
