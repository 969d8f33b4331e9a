#!/usr/bin/env bash
# One prepared check for a lent GPU machine (one H100: about 3 minutes, limit 5).
#
#   launch/gpu_check.sh                 # writes under $OUT if set, else runs/gpu_check
#
# 1. environment: GPU, driver, torch, CUDA, cuDNN, bf16 support
# 2. throughput on CUDA, alternating rounds: the chapter's loop (bench/seed_reference.py) vs
#    the pipeline (rnn_scratch, rnn, gru, lstm) in fp32, bf16 and fp16; tokens/s and ratios
# 3. training under each AMP mode (the seed config, 50 epochs): losses finite and decreasing,
#    fp16 skipped at most 3 steps
# 4. torchrun --nproc_per_node=1: an nccl all-reduce, and the trainer under torchrun on CUDA
# (launch/gpu_recipes.sh trains the larger GPU recipes and reports their bits/char.)
# Exit status: 0 when every check passed. Needs the jaychou zip: $PIPELINE_DATA_DIR, else
# ../shared/data or ./shared/data (the machine has no network). $OUT keeps the log and the
# results (a handful of small files); run folders and checkpoints go to a scratch folder.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1

PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
TORCHRUN=$(dirname "$(command -v "$PY")")/torchrun
[ -x "$TORCHRUN" ] || TORCHRUN="$PY -m torch.distributed.run"
if [ -z "${PIPELINE_DATA_DIR:-}" ]; then
  for d in ../shared/data shared/data; do
    [ -f "$d/jaychou_lyrics.txt.zip" ] && PIPELINE_DATA_DIR=$(cd "$d" && pwd) && break
  done
fi
export PIPELINE_DATA_DIR=${PIPELINE_DATA_DIR:-$ROOT/../shared/data}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
FAIL=0
step() { echo; echo "=== $* ($(date +%T))"; }
check() { if "$@"; then echo "PASS: $*"; else echo "FAIL: $*"; FAIL=1; fi; }

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || FAIL=1
"$PY" - <<'EOF' || exit 1
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device", torch.cuda.get_device_name(), "| bf16", torch.cuda.is_bf16_supported(),
      "| nccl", torch.distributed.is_nccl_available())
EOF
ls "$PIPELINE_DATA_DIR/jaychou_lyrics.txt.zip" || { echo "FAIL: no corpus in $PIPELINE_DATA_DIR"; exit 1; }

step "2. throughput on CUDA (seed reference vs pipeline; fp32 / bf16 / fp16)"
check timeout 150 "$PY" -m bench.run --device cuda --no-ddp --rounds 5 --steps 20 --warmup 5 \
  --results "$OUT/results_cuda.json" --docs "$OUT/benchmarks_cuda.md"

step "3. training under each AMP mode: finite, decreasing, few fp16 skips"
for amp in off bf16 fp16; do
  check timeout 60 "$PY" -m pipeline train --config configs/seed_scratch_consecutive.yaml \
    train.device=cuda "train.amp=$amp" train.epochs=50 train.resume=never run.overwrite=true \
    "run.dir=$WORK/amp_$amp" generate.prefixes=[] logging.progress=off
  check "$PY" - "$WORK/amp_$amp/metrics.jsonl" "$amp" <<'EOF'
import json, math, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if '"train/loss"' in l]
loss = [e["train/loss"] for e in ev]
skipped = sum(e.get("amp/skipped_steps", 0) for e in ev)
print(f"amp={sys.argv[2]}: loss {loss[0]:.3f} -> {loss[-1]:.3f}, perplexity "
      f"{ev[-1]['train/perplexity']:.2f}, skipped {skipped:.0f}, "
      f"{ev[-1]['perf/tokens_per_s']:.0f} tokens/s")
assert all(math.isfinite(x) for x in loss), "non-finite loss"
assert loss[-1] < 0.8 * loss[0], "loss did not decrease"
assert skipped <= 3, f"{skipped} skipped steps"
EOF
done

step "4. torchrun --nproc_per_node=1 on nccl"
cat > "$WORK/nccl_probe.py" <<'EOF'
import torch, torch.distributed as dist
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
t = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
dist.all_reduce(t)
assert t.sum().item() == 4 * dist.get_world_size(), t
print("nccl all_reduce ok, world", dist.get_world_size(), "nccl", torch.cuda.nccl.version())
dist.destroy_process_group()
EOF
check timeout 60 $TORCHRUN --standalone --nproc_per_node=1 "$WORK/nccl_probe.py"
check timeout 90 $TORCHRUN --standalone --nproc_per_node=1 -m pipeline train \
  --config configs/seed_scratch_consecutive.yaml train.device=cuda train.amp=auto \
  train.epochs=5 train.resume=never run.overwrite=true "run.dir=$WORK/torchrun" \
  generate.prefixes=[] logging.progress=lines

step "done: $([ $FAIL = 0 ] && echo ALL PASSED || echo SOME FAILED); output in $OUT"
exit $FAIL
