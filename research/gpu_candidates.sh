#!/usr/bin/env bash
# Train recipe files at full scale on a lent GPU machine, and measure training throughput there.
#
# Every run is `ham-hf train CONFIG` with a config under configs/: the default model's recipe
# (configs/default-model.json) and the candidates beside it (configs/candidates/*.json), all at once on the
# one GPU. The device tool carries at most 64 MiB a call, so the work comes in two calls, prepared here:
#
#   bash research/gpu_candidates.sh pack     # here: .whl/ (py3.12 wheels), .device/backbone, .device/ham10000.zip
#   bash research/gpu_candidates.sh setup    # device, carry .whl .device/backbone: install, GPU smoke test
#   bash research/gpu_candidates.sh train    # device, carry .device/ham10000.zip: throughput, the runs, bundle
#
# `train` leaves in $OUT runs.tar (throughput.json, each run's reports and log) and the run that scores best on
# validation balanced accuracy, bundled (fp16) as bundle.tar.part-*. Back here:
#   cat bundle.tar.part-* | tar -xf - -C /tmp/gpu-bundle
#   .venv/bin/ham-hf calibrate --model /tmp/gpu-bundle/ham10000-resnet50 --data data/ham10000 --int8_only true
# It replaces models/ham10000-resnet50 only if it beats the bundled model on validation balanced accuracy and
# holds up on benchmarks/robustness.py, ood-dev and dermoscopy-external (research/README.md, "Choosing").
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_candidates.sh pack|setup|train}
OUT=${OUT:-outputs/gpu-run}
HOME_DIR=${GPU_HOME:-/root/ham}                 # outside the checkout: survives between the two calls
PREPARED=${PREPARED:-/tmp/ham-gpu-prepared}
CONFIGS=${CONFIGS:-configs/default-model.json configs/candidates/*.json}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-420}             # seconds for all runs together; the device call must leave room
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$PWD:$HOME_DIR/site${PYTHONPATH:+:$PYTHONPATH}   # ham_hf without installing it
# Where each run reads and writes; int8 is measured back here (on the device it took the CPU cores the runs share).
RUN_OPTIONS="--save_only_model true --save_total_limit 1 --disable_tqdm true --decode_threads 5 --calibrate_int8 false"

case $stage in
pack)
  mkdir -p .whl .device
  pins=$(.venv/bin/python -m pip list --format=freeze | grep -iE '^(datasets|evaluate|dill|multiprocess|timm)==')
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl $pins
  rm -rf .device/backbone && cp -r "${BACKBONE:?BACKBONE=a local timm ResNet-50 folder}" .device/backbone
  data=${HAM10000_DIR:?HAM10000_DIR=the HAM10000 folder}
  (cd "$(dirname "$data")" && rm -f "$OLDPWD/.device/ham10000.zip" && zip -0 -qr "$OLDPWD/.device/ham10000.zip" "$(basename "$data")")
  du -sh .whl .device/*
  ;;
setup)
  mkdir -p "$HOME_DIR"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$HOME_DIR/site" .whl/*.whl
  rm -rf "$HOME_DIR/backbone" && cp -r .device/backbone "$HOME_DIR/backbone"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # The whole GPU path on tiny synthetic data: prepare, the default recipe (bf16, workers, averaging), bundle.
  python3 - <<'PY'
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import make_ham_folder, make_tiny_backbone
from ham_hf.cli import main
tmp = Path(tempfile.mkdtemp())
ham, bb = make_ham_folder(tmp / "ham"), make_tiny_backbone(tmp / "bb")
assert main(["prepare", "--data", str(ham), "--output_dir", str(tmp / "prep")]) == 0
assert main(["train", "configs/default-model.json", "--data", str(tmp / "prep"), "--model_name_or_path", str(bb),
             "--output_dir", str(tmp / "out"), "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
             "--save_only_model", "true"]) == 0
assert main(["bundle", "--model", str(tmp / "out"), "--output_dir", str(tmp / "bundle")]) == 0
print("SMOKE OK")
PY
  ;;
train)
  test -d "$HOME_DIR/backbone" || { echo "run the setup stage first (same warm machine)"; exit 2; }
  rm -rf /tmp/ham-data && python3 -m zipfile -e "${DATA_ZIP:-.device/ham10000.zip}" /tmp/ham-data
  python3 -m ham_hf.cli prepare --data /tmp/ham-data/* --output_dir "$PREPARED" --overwrite true 2>&1 | tail -2
  mkdir -p /tmp/runs-report
  python3 benchmarks/train_throughput.py --data "$PREPARED" --model "$HOME_DIR/backbone" --random-init \
    --batch-size 256 --steps 30 --warmup 5 --precisions bf16 --json /tmp/runs-report/throughput.json 2>&1 | tail -3 || true
  start=$(date +%s)
  for config in $CONFIGS; do
    name=$(basename "$config" .json)
    # shellcheck disable=SC2086
    timeout "$TRAIN_TIMEOUT" python3 -m ham_hf.cli train "$config" --data "$PREPARED" \
      --model_name_or_path "$HOME_DIR/backbone" --output_dir "/tmp/runs/$name" $RUN_OPTIONS > "/tmp/train-$name.log" 2>&1 &
  done
  wait || true
  echo "wall time of the runs: $(( $(date +%s) - start )) s" | tee /tmp/runs-report/wall.txt
  best="" best_score=-1
  for config in $CONFIGS; do
    name=$(basename "$config" .json) run=/tmp/runs/$(basename "$config" .json)
    mkdir -p "/tmp/runs-report/$name" && cp "/tmp/train-$name.log" "/tmp/runs-report/$name/train.log"
    for f in results.json recipe.json validation_metrics.json README.md trainer_state.json; do
      [ -f "$run/$f" ] && cp "$run/$f" "/tmp/runs-report/$name/"
    done
    [ -f "$run/results.json" ] || { echo "$name: no result (see its log)"; continue; }
    score=$(python3 -c "import json; print(json.load(open('$run/results.json'))['splits']['validation']['balanced_accuracy'])")
    echo "$name: validation balanced accuracy $score"
    if python3 -c "import sys; sys.exit(0 if $score > $best_score else 1)"; then best=$name best_score=$score; fi
  done
  tar -cf "$OUT/runs.tar" -C /tmp runs-report
  [ -n "$best" ] || { echo "no run finished"; exit 1; }
  echo "best on validation: $best ($best_score)"
  rm -rf /tmp/bundle && python3 -m ham_hf.cli bundle --model "/tmp/runs/$best" --output_dir /tmp/bundle/ham10000-resnet50
  tar -cf - -C /tmp/bundle . | split -b 15m - "$OUT/bundle.tar.part-"   # in parts, for runners that cap a file's size
  ls -la "$OUT"
  ;;
*) echo "unknown stage $stage: pack|setup|train"; exit 2 ;;
esac
