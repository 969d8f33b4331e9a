#!/usr/bin/env bash
# The GPU recipes on one node under torchrun, then checkpoints/best.pt evaluated over the whole
# validation and test splits, and a one-line summary per recipe.
#
#   launch/gpu_recipes.sh                      # configs/songci.yaml
#   launch/gpu_recipes.sh songci poetry        # several, one after the other
#   OVERRIDES_poetry="train.epochs=1" launch/gpu_recipes.sh poetry
#
# Each recipe starts FRESH in $RUNS/<name> (train.resume=never, run.overwrite=true: an earlier
# run in that folder is replaced). Environment: PY (default .venv/bin/python, else python3),
# DEVICE (train.device and the eval device; default cuda, so a CPU-only torch fails at once
# instead of training on the CPU), NPROC (ranks; default the number of GPUs),
# PIPELINE_DATA_DIR (the dataset folders), RUNS (run folders; default runs/gpu_recipes),
# OUT (summaries, metrics.jsonl copies and the log; default runs/gpu_recipes),
# OVERRIDES_<name> (extra config overrides for that recipe, split on whitespace; other
# characters of the name than letters, digits and _ become _). Exit status: 0 when every
# recipe trained, was evaluated and summarised.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
fi
DEVICE=${DEVICE:-cuda}
TORCHRUN=$(dirname "$(command -v "$PY")")/torchrun
[ -x "$TORCHRUN" ] || TORCHRUN="$PY -m torch.distributed.run"
NPROC=${NPROC:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
RUNS=${RUNS:-runs/gpu_recipes}
OUT=${OUT:-runs/gpu_recipes}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_recipes.log") 2>&1
export PYTHONUNBUFFERED=1
[ $# -gt 0 ] || set -- songci
FAIL=0

for name in "$@"; do
  cfg=configs/$name.yaml
  [ -f "$cfg" ] || { echo "error: no recipe $cfg"; FAIL=1; continue; }
  extra_var=OVERRIDES_${name//[^A-Za-z0-9_]/_}
  read -r -a extra <<<"${!extra_var:-}"
  run_dir=$RUNS/$name
  echo "=== $name: $NPROC rank(s), $cfg ${extra[*]:-} ($(date +%T))"
  if ! $TORCHRUN --standalone --nproc_per_node="$NPROC" -m pipeline train --config "$cfg" \
    train.resume=never run.overwrite=true "run.dir=$run_dir" logging.progress=lines \
    "train.device=$DEVICE" "${extra[@]}"; then
    echo "FAIL: $name training"; FAIL=1; continue
  fi
  evaluated=1
  for split in validation test; do
    "$PY" -m pipeline eval --checkpoint "$run_dir/checkpoints/best.pt" --split "$split" \
      --device "$DEVICE" >"$OUT/${name}_$split.json" || { echo "FAIL: $name eval $split"; FAIL=1; evaluated=0; }
  done
  cp "$run_dir/metrics.jsonl" "$OUT/${name}_metrics.jsonl" || { echo "FAIL: $name metrics"; FAIL=1; }
  [ $evaluated = 1 ] || continue
  "$PY" - "$OUT" "$name" <<'EOF' || { echo "FAIL: $name summary"; FAIL=1; }
import json, statistics, sys
out, name = sys.argv[1:]
ev = [json.loads(line) for line in open(f"{out}/{name}_metrics.jsonl")]
tr = [e for e in ev if "perf/tokens_per_s" in e]
tps = statistics.median(e["perf/tokens_per_s"] for e in tr[1:] or tr)  # 1st holds warm-up
split = {s: json.loads(open(f"{out}/{name}_{s}.json").read().splitlines()[-1]) for s in
         ("validation", "test")}
last = tr[-1]
print(f"{name}: {last['train/chars']:,} characters in {last['time/elapsed_s']:.0f} s, "
      f"median {tps:,.0f} tokens/s, peak {last.get('perf/gpu_peak_gib', 0):.1f} GiB; best.pt "
      f"bits/char validation {split['validation']['bpc']:.3f}, test {split['test']['bpc']:.3f}")
EOF
done
echo "=== $([ $FAIL = 0 ] && echo ALL PASSED || echo SOME FAILED) ($(date +%T)); output in $OUT"
exit $FAIL
