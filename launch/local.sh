#!/usr/bin/env bash
# One node: torchrun with NPROC_PER_NODE processes (default `auto`: one per GPU, else one per
# CPU core, at most MAX_CPU_RANKS=2), each rank with cores / ranks torch threads.
#   launch/local.sh --config configs/jaychou.yaml [key=value ...]
#   NPROC_PER_NODE=1 launch/local.sh --config configs/seed_concise.yaml
set -euo pipefail
NPROC="${NPROC_PER_NODE:-auto}"
if [ "$NPROC" = "auto" ]; then
  NPROC=$(python -c 'import os, torch
print(torch.cuda.device_count() or min(os.cpu_count() or 1, int(os.environ.get("MAX_CPU_RANKS", 2))))')
fi
# torchrun gives every rank OMP_NUM_THREADS=1 when it starts several; give each its share of
# the cores instead (an OMP_NUM_THREADS set by the user wins).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( $(nproc) / NPROC )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi
exec torchrun --standalone --nproc_per_node="$NPROC" -m pipeline train "$@"
