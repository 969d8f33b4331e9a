#!/usr/bin/env bash
# Several nodes: run this once on every node; the torchrun agents meet at a c10d rendezvous
# on MASTER_ADDR:MASTER_PORT (a host:port every node can reach, usually node 0's) and start
# NNODES x NPROC_PER_NODE ranks. The answer does not depend on how ranks are spread.
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config configs/X.yaml
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config configs/X.yaml
# Environment: NNODES, NODE_RANK, MASTER_ADDR (required); MASTER_PORT (29500), RDZV_ID
# (lyrics-rnn; must be the same on all nodes and new for every job), NPROC_PER_NODE (default:
# GPUs on this node, else 1), TORCHRUN (torchrun). With c10d the global rank order follows
# arrival, not NODE_RANK (torchrun says so in a warning); rank 0 writes the run directory,
# so run.dir should be on a shared filesystem.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR, the rendezvous host every node can reach}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-lyrics-rnn}"
TORCHRUN="${TORCHRUN:-torchrun}"
# Multi-node elastic restarts: a node whose worker survived restarts for a membership change
# with a different TORCHELASTIC_RESTART_COUNT than the failed one; a fresh rendezvous store per
# round keeps the new gloo mesh from reading stale peer addresses (docs/distributed.md, "Elastic restarts").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
NPROC="${NPROC_PER_NODE:-auto}"
if [ "$NPROC" = "auto" ]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
# torchrun gives every rank OMP_NUM_THREADS=1 when it starts several; give each its share of
# the cores instead (an OMP_NUM_THREADS set by the user wins).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( $(nproc) / NPROC )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi
exec "$TORCHRUN" --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
  -m pipeline train "$@"
