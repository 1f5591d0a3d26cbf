#!/usr/bin/env bash
# Train the default model on a GPU machine and leave its folder and figures in $OUT.
#
#   Needs, beside this checkout: the backbone folder ($BACKBONE, default ../shared/weights/resnet50-imagenet),
#   HAM10000 as a folder ($HAM10000_DIR) or a stored zip of it ($HAM10000_ZIP, made with
#   `cd ../shared/data && zip -0 -qr ham10000.zip ham10000`), and the packages of requirements.txt
#   (a wheel folder in $WHEELS is installed first when given).
#
#   bash scripts/gpu_default_model.sh
#
#   Leaves models/ham10000-resnet50 (bundled, fp16) and, in $OUT: throughput.json, train.log and the
#   bundled folder as tar parts. Back on the development machine:
#   cat bundle.tar.part-* | tar -xf - -C models   (then run make test, and commit the folder)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu-run}
BACKBONE=${BACKBONE:-../shared/weights/resnet50-imagenet}
HAM10000_DIR=${HAM10000_DIR:-../shared/data/ham10000}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # ham_hf without installing it
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ -n "${HAM10000_ZIP:-}" ]; then
  python3 -m zipfile -e "$HAM10000_ZIP" /tmp/ham-data && HAM10000_DIR=/tmp/ham-data/ham10000
fi
python3 -m ham_hf.cli prepare --data-dir "$HAM10000_DIR" --output /tmp/ham-prepared --overwrite
python3 benchmarks/train_throughput.py --data /tmp/ham-prepared --model "$BACKBONE" --batch-size 256 --steps 40 \
  --json "$OUT/throughput.json"
python3 -m ham_hf.cli train configs/resnet50.json --data /tmp/ham-prepared --model_name_or_path "$BACKBONE" \
  --output_dir /tmp/ham-run 2>&1 | tee "$OUT/train.log"
python3 -m ham_hf.cli bundle --model /tmp/ham-run --output models/ham10000-resnet50
# The device tool returns at most 8 files of 16 MiB: the bundled folder travels as tar parts.
tar -cf - -C models ham10000-resnet50 | split -b 15m - "$OUT/bundle.tar.part-"
