#!/usr/bin/env bash
# Run jdd on one multi-GPU host: one process driving every GPU (default), or one process per GPU.
#
#   launch/single_host.sh CONFIG WORKDIR [jdd.main flags...]                 # 1 process, all GPUs
#   JDD_PROCS=8 launch/single_host.sh CONFIG WORKDIR [jdd.main flags...]     # 8 processes, 1 GPU each
#
# e.g. launch/single_host.sh "configs/imagenet1k_clp.py:data=/data/imagenet,backbone=/data/hf/dinov2-base" runs/in1k_clp
#
# One process is the simple and fast choice on one host: jdd puts all local GPUs in its mesh and
# XLA moves data between them itself. JDD_PROCS=N starts N processes that meet through
# jax.distributed on 127.0.0.1:JDD_PORT (process i drives GPU i; JDD_PROCS must divide the GPUs):
# the multi-host code path, on one machine. Process 0 writes logs and exports; logs of the others
# go to WORKDIR/process<i>.log. On CPU (no GPU, or JAX_PLATFORMS=cpu) the same runs with JDD_DEVICES_PER_PROC forced
# host devices per process, which is how the multi-host test runs (tests/test_multihost.py).
#
# What it expects: jdd installed in the active Python environment (pip install -e '.[cuda12]');
# the data at a local path (ImageFolder root or TFDS data_dir); WORKDIR anywhere local (checkpoints,
# feature cache in WORKDIR/../feature_cache, distilled.npz/png, results). Ctrl-C stops all processes.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,7p' "$0" >&2; exit 2; }
config=$1 workdir=$2
shift 2
procs=${JDD_PROCS:-1}
mkdir -p "$workdir"

if [ "$procs" -eq 1 ]; then
  exec python -m jdd.main --config="$config" --workdir="$workdir" "$@"
fi

port=${JDD_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
gpus=0
if [ "${JAX_PLATFORMS:-}" != cpu ] && command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
fi
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < procs; i++)); do
  env=(JDD_COORDINATOR="127.0.0.1:$port" JDD_NUM_PROCESSES="$procs" JDD_PROCESS_ID="$i")
  if [ "$gpus" -gt 0 ]; then
    per=$(( gpus / procs ))
    [ $(( per * procs )) -eq "$gpus" ] || { echo "JDD_PROCS=$procs does not divide the $gpus GPUs" >&2; exit 2; }
    env+=(JDD_LOCAL_DEVICE_IDS="$(seq -s, $(( i * per )) $(( i * per + per - 1 )))")
  else
    env+=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${JDD_DEVICES_PER_PROC:-1}")
  fi
  log=/dev/stdout
  [ "$i" -gt 0 ] && log="$workdir/process$i.log"
  env "${env[@]}" python -m jdd.main --config="$config" --workdir="$workdir" "$@" > "$log" 2>&1 &
  pids+=($!)
done
# A process that fails leaves the others waiting in a collective: stop them all at the first failure.
status=0
for ((i = 0; i < procs; i++)); do
  wait -n || { status=$?; echo "a jdd process failed (exit $status); stopping the others" >&2; cleanup; break; }
done
wait || true
exit "$status"
