#!/usr/bin/env bash
# The one GPU acceptance script: on one GPU, under 8 minutes, with only PyTorch and the
# project's packages installed (tests that need a missing package skip, naming it).
#
#   launch/gpu_check.sh              # log and results under $OUT (default runs/gpu_check)
#
# 1. environment: GPU, driver, torch, CUDA, cuDNN, bf16, NCCL, the project's packages
# 2. tests: `pytest -m gpu` (CUDA: each precision, exact resume, resume across devices,
#    format-1 resume, 2 ranks on one GPU over gloo, host reads, export), then the fast suite
# 3. throughput per model kind and precision at the chapter's size, what train.amp=auto
#    picks for each (its own probe), and MFU against the card's dense peak
# 4. training in each precision (the seed config): losses finite and falling, at most 3
#    non-finite (skipped) steps (opt/nonfinite_steps), perf/flops_per_token, perf/mfu
# 5. torchrun: an NCCL all-reduce, and the trainer under torchrun with train.amp=auto
# 6. the songci GPU recipe under train.time_budget=45: its validation bits/char
# $OUT holds gpu_check.log (everything printed) and gpu_check.json (every section's figures,
# problems and pass/fail); run folders go to a scratch folder. The checks are
# bench/gpu_check.py (tests/test_gpu_check.py shows each fails when what it checks is
# broken). Exit status: 0 when every check passed. Data: $PIPELINE_DATA_DIR, else
# ../shared/data or ./shared/data (jaychou_lyrics.txt.zip and the songci folder).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
RESULTS=$OUT/gpu_check.json
rm -f "$RESULTS"

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
export PIPELINE_CACHE_DIR=${PIPELINE_CACHE_DIR:-$WORK/cache}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
FAIL=0
STARTED=$(date +%s)
step() { echo; echo "=== $* ($(date +%T), $(( $(date +%s) - STARTED )) s in)"; }
check() { if "$@"; then echo "PASS: $*"; else echo "FAIL: $*"; FAIL=1; fi; }
checker() { "$PY" -m bench.gpu_check "$@" --results "$RESULTS"; }
COMMON=(train.resume=never run.overwrite=true generate.prefixes=[] logging.progress=off)

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || FAIL=1
check checker env
NEED_MFU=$("$PY" -c "import torch; from pipeline.tracking.flops import peak_tflops as p
print('--need-mfu' if torch.cuda.is_available() and p(torch.cuda.get_device_name(), 'off') else '')")
[ -n "$NEED_MFU" ] || echo "note: this card is not in pipeline/tracking/flops.py's table of peaks: no MFU"
ls "$PIPELINE_DATA_DIR/jaychou_lyrics.txt.zip" || { echo "FAIL: no corpus in $PIPELINE_DATA_DIR"; exit 1; }

step "2. tests: pytest -m gpu, then the fast suite"
if "$PY" -c "import pytest" 2>/dev/null; then
  check timeout 240 "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider
  check timeout 180 "$PY" -m pytest -q -ra -m "not slow and not slurm and not gpu" -p no:cacheprovider
else
  echo "FAIL: package 'pytest' is not installed (pip install pytest): no tests ran"; FAIL=1
fi

step "3. throughput per model and precision; what amp=auto picks; MFU"
check timeout 150 "$PY" -m bench.gpu_check throughput --device cuda --rounds 5 --steps 20 \
  --results "$RESULTS"

step "4. training in each precision: finite, falling, few skipped steps, FLOPs, MFU"
for amp in off bf16 fp16; do
  check timeout 60 "$PY" -m pipeline train --config configs/seed_scratch_consecutive.yaml \
    train.device=cuda "train.amp=$amp" train.epochs=50 "run.dir=$WORK/amp_$amp" "${COMMON[@]}"
  check checker run "$WORK/amp_$amp" --amp "$amp" $NEED_MFU
done

step "5. torchrun: an NCCL all-reduce; the trainer with train.amp=auto"
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
  train.epochs=20 "run.dir=$WORK/torchrun" "${COMMON[@]}"
head -n 2 "$WORK/torchrun/config.yaml"
AUTO=$("$PY" -c "import torch; print(torch.load('$WORK/torchrun/checkpoints/last.pt', weights_only=True, map_location='cpu')['precision'])")
check checker run "$WORK/torchrun" --amp "$AUTO" --key run_torchrun_auto $NEED_MFU

step "6. the songci GPU recipe under train.time_budget=45"
check timeout 120 "$PY" -m pipeline prepare --config configs/songci.yaml
check timeout 150 $TORCHRUN --standalone --nproc_per_node=1 -m pipeline train \
  --config configs/songci.yaml train.device=cuda train.time_budget=45 \
  "run.dir=$WORK/songci" train.resume=never run.overwrite=true logging.progress=lines
check checker songci "$WORK/songci" --budget 45

step "done in $(( $(date +%s) - STARTED )) s: $([ $FAIL = 0 ] && echo ALL PASSED || echo SOME FAILED); log and results in $OUT"
exit $FAIL
