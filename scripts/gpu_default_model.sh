#!/usr/bin/env bash
# Train the default model on a GPU machine and leave its folder and figures in $OUT.
#
#   Needs, beside this checkout: the backbone folder ($BACKBONE, default ../shared/weights/resnet50-imagenet),
#   HAM10000 as a folder ($HAM10000_DIR) or a stored zip of it ($HAM10000_ZIP, made with
#   `cd ../shared/data && zip -0 -qr ham10000.zip ham10000`), and the packages of requirements.txt
#   (a wheel folder in $WHEELS is installed first when given).
#
#   bash scripts/gpu_default_model.sh            # then: models/ham10000-resnet50 and $OUT/*.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu-run}
BACKBONE=${BACKBONE:-../shared/weights/resnet50-imagenet}
HAM10000_DIR=${HAM10000_DIR:-../shared/data/ham10000}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -n "${HAM10000_ZIP:-}" ]; then
  python3 -m zipfile -e "$HAM10000_ZIP" /tmp/ham-data && HAM10000_DIR=/tmp/ham-data/ham10000
fi
python3 -m ham_hf.cli prepare --data-dir "$HAM10000_DIR" --output /tmp/ham-prepared --overwrite
python3 benchmarks/train_throughput.py --data /tmp/ham-prepared --model "$BACKBONE" --batch-size 256 --steps 40 \
  --json "$OUT/throughput.json"
python3 -m ham_hf.cli train configs/resnet50.json --data /tmp/ham-prepared --model_name_or_path "$BACKBONE" \
  --output_dir /tmp/ham-run 2>&1 | tee "$OUT/train.log"
cp /tmp/ham-run/all_results.json /tmp/ham-run/*_metrics.json "$OUT/"
