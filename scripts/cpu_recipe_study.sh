#!/usr/bin/env bash
# The recipe study on this CPU, in bf16, at a budget that fits a session (about an hour on 2 cores).
#
#   bash scripts/cpu_recipe_study.sh [DATA] [OUT]      # DATA: a prepared dataset (default data/ham10000)
#   ONLY="160-la-strong-aug 160-la-strong-aug-blur" bash scripts/cpu_recipe_study.sh DATA OUT   # some runs
#
# Every run starts from configs/resnet50.json and the shared ImageNet ResNet-50 and trains on the same
# seeded sample of the training split (TRAIN_SAMPLES, default 2,500 images) for EPOCHS epochs (the
# first head-only), scored on the whole validation split. The table it prints (validation only) goes
# into the README's "Recipe study"; the full-scale runs, 224 px included, are in scripts/gpu_default_model.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/ham10000}
OUT=${2:-outputs/cpu-study}
EPOCHS=${EPOCHS:-3}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-2500}
BACKBONE=${BACKBONE:-../shared/weights/resnet50-imagenet}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LA="--class_weighting none --logit_adjustment_tau 0.75 --tune_logit_adjustment true"
STRONG="--crop_scale_min 0.25 --brightness 0.3 --contrast 0.3 --saturation 0.3 --hue 0.05"
# name|options over the config; the order is the order they run in.
RUNS=(
  "160-balanced-ce|--image_size 160"
  "160-balanced-sampler|--image_size 160 --class_weighting none --balanced_sampling true"
  "160-la-strong-aug|--image_size 160 $LA $STRONG"
  "192-la-strong-aug|--image_size 192 $LA $STRONG"
  "160-la-strong-aug-cast|--image_size 160 $LA $STRONG --channel_gain 0.15"
  "160-la-strong-aug-blur|--image_size 160 $LA $STRONG --blur_sigma 2"
)
mkdir -p "$OUT"
for run in "${RUNS[@]}"; do
  name=${run%%|*}; opts=${run#*|}
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && continue   # ONLY="a b": just these runs
  [ -f "$OUT/$name/all_results.json" ] && continue   # resumable: a finished run is kept
  echo "== $name: ham-hf train configs/resnet50.json $opts"
  start=$(date +%s)
  # shellcheck disable=SC2086
  .venv/bin/ham-hf train configs/resnet50.json --data "$DATA" --model_name_or_path "$BACKBONE" \
      --output_dir "$OUT/$name" --num_train_epochs "$EPOCHS" --max_train_samples "$TRAIN_SAMPLES" \
      --per_device_train_batch_size 32 --per_device_eval_batch_size 64 --save_only_model true \
      --save_total_limit 1 --calibrate false $opts > "$OUT/$name.log" 2>&1
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
times = dict(line.split(": ") for line in (out / "times.txt").read_text().splitlines())
print("| run | wall | train img/s | bal. acc. | accuracy | macro F1 | macro AUC | ECE |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for f in sorted(out.glob("*/all_results.json")):
    r = json.loads(f.read_text())
    print(f"| {f.parent.name} | {times.get(f.parent.name, '?')} | {r.get('train_samples_per_second', 0):.1f} "
          f"| {r['eval_balanced_accuracy']:.3f} | {r['eval_accuracy']:.3f} | {r['eval_macro_f1']:.3f} "
          f"| {r['eval_roc_auc_macro']:.3f} | {r['eval_ece']:.3f} |")
PY
