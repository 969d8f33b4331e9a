#!/usr/bin/env bash
# One node: torchrun with NPROC_PER_NODE processes (default `auto`: one per GPU, else one per
# CPU core; each rank then uses cores / local world size torch threads).
#   launch/local.sh --config configs/jaychou.yaml [key=value ...]
#   NPROC_PER_NODE=1 launch/local.sh --config configs/seed_concise.yaml
set -euo pipefail
NPROC="${NPROC_PER_NODE:-auto}"
if [ "$NPROC" = "auto" ] && ! python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  NPROC=$(python -c 'import os; print(min(os.cpu_count() or 1, int(os.environ.get("MAX_CPU_RANKS", 2))))')
fi
exec torchrun --standalone --nproc_per_node="$NPROC" -m pipeline train "$@"
