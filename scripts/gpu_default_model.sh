#!/usr/bin/env bash
# Measure training throughput and train the default model's recipe at full scale on a lent GPU machine.
#
# The device tool carries at most 64 MiB a call, so the work comes in two calls made back to back
# (the machine is kept ~30 s between them); everything is prepared on the development machine first:
#
#   bash scripts/gpu_default_model.sh pack          # here: .whl/ (py3.12 wheels), .device/backbone, .device/ham10000.zip
#   bash scripts/gpu_default_model.sh setup         # device, carry .whl .device/backbone: install, copy, GPU smoke test
#   bash scripts/gpu_default_model.sh train         # device, carry .device/ham10000.zip: prepare, throughput, sweep, bundle
#   bash scripts/gpu_default_model.sh distill       # device, same warm machine, if the budget allows: see below
#   bash scripts/gpu_default_model.sh full          # device, instead of train + distill: both in one call (DEADLINE s)
#
# A 15-minute lease holds two calls (setup, then full): `full` runs the sweep without the soup, fits as many
# distillation epochs as its DEADLINE leaves, and returns the one bundle (64 MiB a call) that scores higher on
# validation, the best single run or its student, with both runs' reports.
#
# `train` runs the recipe variations in parallel on the one GPU (each alone leaves it partly idle
# during evaluation and checkpointing), averages the finished runs into a greedy model soup chosen on
# *validation* balanced accuracy (`ham-hf soup`; SOUP=0 skips it), bundles (fp16) the best single
# run and the soup, and leaves in $OUT: sweep.tar (throughput.json, every run's reports and log, the
# soup's steps) and the two bundled folders as tar parts (8 files at most come back). Back here:
#   mkdir -p /tmp/gpu-bundles && cat bundle.tar.part-* | tar -xf - -C /tmp/gpu-bundles   (single/, soup/)
# The soup is bundled over the single run only if it scores higher on validation *and* holds up on
# `benchmarks/robustness.py --model /tmp/gpu-bundles/soup/ham10000-resnet50` as well as the single run
# (on the CPU study a soup gained balanced accuracy but lost colour robustness: README, "Model soups");
# the chosen folder then replaces models/ham10000-resnet50 (make test, commit the folder once) only if its
# validation balanced accuracy beats the bundled model's (0.784 since 2026-11-28: sweep 3's colour cast + defocus
# run; its all_results.json has eval_balanced_accuracy) and it holds up on robustness.py (balanced accuracy
# and accuracy under each change) as well.
# Training calibrates and fits the guard on the device, with tau chosen under the calibration condition.
# The int8 ranges and gate are measured back here on the chosen folder: on the device (which has onnxruntime
# since 2026-11-28) they took 2 to 3 minutes a run on the CPU cores the three runs share, 45% of the sweep's
# 380 s, and left no time for distillation. So the runs train with --calibrate_int8 false, then here:
#   .venv/bin/ham-hf calibrate --model models/ham10000-resnet50 --data data/ham10000 --int8_only true
# `distill` (a third call, right after `train` on the same warm machine, when the device time left allows
# about 6 minutes): the two sweep runs whose ensemble scores best on validation teach one ResNet-50 trained
# from ImageNet with the best run's recipe for $EPOCHS epochs (`--distill_from`, on the same augmented
# batches; sweep 3's best pair scored 0.789 against 0.784 for its best run alone). On this CPU the geometric mean of
# two models' answers scored 0.785 validation balanced accuracy against 0.750 and 0.762 alone, and 3
# epochs of distillation recovered only a fifth of that margin (README, "Distillation, measured on this
# CPU"): a GPU buys the long schedule distillation needs. It leaves distill.tar (reports and log) and the
# bundled student as distill-bundle.tar.part-* in $OUT; it replaces the default model only if its
# validation balanced accuracy beats the chosen one's, like any other candidate.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_default_model.sh pack|setup|train|distill|full}
OUT=${OUT:-outputs/gpu-run}
HOME_DIR=${GPU_HOME:-/root/ham}          # outside the checkout: survives between the two calls
PREPARED=${PREPARED:-/tmp/ham-gpu-prepared}   # not /tmp/ham-prepared: a dry run here would overwrite the README's data
EPOCHS=${EPOCHS:-25}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-380}      # seconds for the parallel sweep; the device call must leave room
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$PWD:$HOME_DIR/site${PYTHONPATH:+:$PYTHONPATH}   # ham_hf without installing it

# The recipe variations (options after configs/resnet50.json): name -> overrides. A first sweep on an
# H200 (README, "Recipe study") found class-balanced cross-entropy at 0.737 validation balanced accuracy
# and logit adjustment at tau 1 over-correcting (nv recall 0.6); logit adjustment with tau chosen on
# validation and stronger augmentation did best (0.767), so this sweep varies around that. The second
# sweep's other two variations (0.752, 0.744) gave way to augmentations for images from other cameras
# (README, "Robustness": a cool cast costs the default model 0.10 of accuracy, a blur 0.20): a colour
# cast, and a colour cast plus defocus. Every run averages its weights (--ema_decay): on this CPU the
# average led the trained weights along one run by 0.015 to 0.17 of validation balanced accuracy while
# the learning rate was high (README, "Weight averaging, measured on this CPU"), and the GPU runs peaked
# mid-schedule, where that gap is widest. Each run goes through scripts/weight_average_study.py, so the
# trained weights are scored beside the average at every epoch (trainer_state.json): the comparison
# again, at full scale. The cast-only variation gave way to the backbone's stem and first two stages
# frozen (--frozen_stages 2): on this CPU, in paired 6-epoch 224 px runs, it lifted validation balanced
# accuracy from 0.708 to 0.761 and macro AUC from 0.956 to 0.964 (README, "Frozen early stages"); whether
# that holds at 25 epochs, where the unfrozen GPU run reached 0.767, is what this sweep measures. A greedy
# soup of frozen and unfrozen runs may keep only one kind (on the CPU, adding the default model to the
# frozen run dropped validation balanced accuracy to 0.718): the greedy step checks that itself.
# The third sweep (H200, 2026-11-28, README "Recipe study") answered both: at 25 epochs the colour cast plus
# defocus led on validation (0.784, against 0.772 for the recipe alone and 0.766 frozen), so frozen stages
# gave way. Its weak spot under robustness.py is zoom (a lesion filling the frame: 0.713 of accuracy at zoom
# 0.4, against 0.810 for the distilled default), which crops of 25% of the area and up never show; the
# fourth sweep keeps the winner and tries crops down to 8% (timm's and torchvision's default) and a
# stronger cast and defocus. A CPU pilot (README, "Crops down to 8% of the area": the bundled model's 2-epoch student
# rerun with crops from 8%) lifted the zoomed rows of robustness.py (zoom 0.6: +0.04 balanced accuracy) with clean
# validation inside the noise (0.774 against 0.769 to 0.784), so the crop-0.08 run stays in this sweep.
LA="--class_weighting none --logit_adjustment_tau 0.75 --tune_logit_adjustment true"
STRONG="--crop_scale_min 0.25 --brightness 0.3 --contrast 0.3 --saturation 0.3 --hue 0.05"
EMA="--ema_decay 0.998 --calibrate_int8 false"
CAST_BLUR="--channel_gain 0.15 --blur_sigma 2"
declare -A SWEEP=(
  [la-strong-aug-cast-blur-ema]="$LA $STRONG $CAST_BLUR $EMA"
  [la-strong-aug-cast-blur-ema-crop08]="$LA $STRONG $CAST_BLUR $EMA --crop_scale_min 0.08"
  [la-strong-aug-cast3-blur3-ema]="$LA $STRONG --channel_gain 0.25 --blur_sigma 3 $EMA"
)

case $stage in
pack)
  # Wheels the device lacks (datasets, evaluate and theirs) and timm as tested here. Its own transformers
  # stays (this backbone + these wheels + the tree must fit in 64 MiB); the setup stage's smoke test checks it.
  mkdir -p .whl .device
  py=.venv/bin/python
  pins=$($py -m pip list --format=freeze | grep -iE '^(datasets|evaluate|dill|multiprocess|timm)==')
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
  rm -rf .device/backbone && cp -r "${BACKBONE:-../shared/weights/resnet50-imagenet}" .device/backbone
  (cd "$(dirname "${HAM10000_DIR:-../shared/data/ham10000}")" && rm -f "$OLDPWD/.device/ham10000.zip" &&
     zip -0 -qr "$OLDPWD/.device/ham10000.zip" "$(basename "${HAM10000_DIR:-../shared/data/ham10000}")")
  du -sh .whl .device/*
  ;;
setup)
  mkdir -p "$HOME_DIR"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME_DIR/site" .whl/*.whl
  rm -rf "$HOME_DIR/backbone" && cp -r .device/backbone "$HOME_DIR/backbone"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, timm, datasets, evaluate, pyarrow, accelerate, huggingface_hub as h
print("torch", torch.__version__, "transformers", transformers.__version__, "timm", timm.__version__, "datasets",
      datasets.__version__, "evaluate", evaluate.__version__, "pyarrow", pyarrow.__version__,
      "accelerate", accelerate.__version__, "hub", h.__version__)'
  # The whole GPU path on tiny synthetic data: prepare, train (bf16, workers, pinned non-blocking copies, weight
  # averaging), bundle, soup.
  python3 - <<'EOF'
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import make_ham_folder, make_tiny_backbone, train_argv
from ham_hf.cli import main
tmp = Path(tempfile.mkdtemp())
ham, bb = make_ham_folder(tmp / "ham"), make_tiny_backbone(tmp / "bb")
assert main(["prepare", "--data-dir", str(ham), "--output", str(tmp / "prep")]) == 0
assert main(train_argv(tmp / "prep", bb, tmp / "out", "--class_weighting", "none", "--logit_adjustment_tau", "1",
                       "--save_only_model", "true", "--ema_decay", "0.9")) == 0
assert main(["bundle", "--model", str(tmp / "out"), "--output", str(tmp / "bundle")]) == 0
import json, shutil; r = json.loads((tmp / "out" / "all_results.json").read_text())
shutil.copytree(tmp / "out", tmp / "copy")  # the soup's GPU scoring and CPU calibration, on a model and its copy
assert main(["soup", "--models", str(tmp / "out"), str(tmp / "copy"), "--data", str(tmp / "prep"),
             "--output_dir", str(tmp / "soup")]) == 0
assert main(train_argv(tmp / "prep", bb, tmp / "student", "--class_weighting", "none", "--save_only_model", "true",
                       "--distill_from", str(tmp / "out"), str(tmp / "copy"))) == 0
print("SMOKE OK", r["precision"], r["device"], "soup", json.loads((tmp / "soup" / "all_results.json").read_text())["soup_ingredients"])
EOF
  ;;
train)
  test -d "$HOME_DIR/backbone" || { echo "run the setup stage first (same warm machine)"; exit 2; }
  rm -rf /tmp/ham-data && python3 -m zipfile -e "${DATA_ZIP:-.device/ham10000.zip}" /tmp/ham-data
  python3 -m ham_hf.cli prepare --data-dir /tmp/ham-data/ham10000 --output "$PREPARED" --overwrite 2>&1 | tail -4
  mkdir -p /tmp/sweep
  python3 benchmarks/train_throughput.py --data "$PREPARED" --model "$HOME_DIR/backbone" --batch-size 256 \
    ${BENCH_ARGS:---steps 30 --warmup 5 --precisions bf16} --json /tmp/sweep/throughput.json 2>&1 | grep -v Warning | tail -4 || true
  start=$(date +%s)
  for name in "${!SWEEP[@]}"; do
    # shellcheck disable=SC2086
    timeout "$TRAIN_TIMEOUT" python3 scripts/weight_average_study.py configs/resnet50.json --data "$PREPARED" \
      --model_name_or_path "$HOME_DIR/backbone" --output_dir "/tmp/runs/$name" --num_train_epochs "$EPOCHS" \
      --save_only_model true --save_total_limit 1 --disable_tqdm true --decode_threads 5 ${SWEEP[$name]} ${TRAIN_EXTRA:-} \
      > "/tmp/train-$name.log" 2>&1 &
  done
  wait || true
  echo "sweep wall time: $(( $(date +%s) - start )) s" | tee /tmp/sweep/wall.txt
  echo $(( $(date +%s) - start )) > /tmp/runs/sweep-seconds
  best="" best_score=-1
  for name in "${!SWEEP[@]}"; do
    run=/tmp/runs/$name
    mkdir -p "/tmp/sweep/$name" && cp "/tmp/train-$name.log" "/tmp/sweep/$name/train.log"
    for f in all_results.json validation_metrics.json validation_predictions.csv README.md trainer_state.json; do
      [ -f "$run/$f" ] && cp "$run/$f" "/tmp/sweep/$name/"
    done
    [ -f "$run/all_results.json" ] || { echo "$name: no result (see its log)"; tail -5 "/tmp/train-$name.log"; continue; }
    score=$(python3 -c "import json; print(json.load(open('$run/all_results.json'))['eval_balanced_accuracy'])")
    echo "$name: validation balanced accuracy $score"
    if python3 -c "import sys; sys.exit(0 if $score > $best_score else 1)"; then best=$name best_score=$score; fi
  done
  [ -n "$best" ] || { tar -cf "$OUT/sweep.tar" -C /tmp sweep; echo "no run finished"; exit 1; }
  echo "best single run on validation: $best ($best_score)"
  echo "$best" > /tmp/runs/best-single
  rm -rf /tmp/bundle && mkdir -p /tmp/bundle/single /tmp/bundle/soup
  python3 -m ham_hf.cli bundle --model "/tmp/runs/$best" --output /tmp/bundle/single/ham10000-resnet50 2>&1 | tail -1
  finished=$(for name in "${!SWEEP[@]}"; do [ -f "/tmp/runs/$name/all_results.json" ] && echo "/tmp/runs/$name"; done)
  if [ "${SOUP:-1}" = 1 ] && [ "$(echo "$finished" | wc -w)" -ge 2 ]; then
    # Greedy model soup of the finished runs (same backbone, seed and split): never below the best run
    # on validation, one model's cost at inference. Its calibration runs on the CPU cores.
    # shellcheck disable=SC2086
    if timeout "${SOUP_TIMEOUT:-180}" python3 -m ham_hf.cli soup --models $finished --data "$PREPARED" \
         --output_dir /tmp/runs/soup --overwrite true > /tmp/soup.log 2>&1; then   # a rerun on the same machine replaces it
      mkdir -p /tmp/sweep/soup && cp /tmp/soup.log /tmp/runs/soup/{all_results.json,soup.csv,validation_metrics.json} /tmp/sweep/soup/
      echo "soup: $(python3 -c "import json; r = json.load(open('/tmp/runs/soup/all_results.json'))
print(len(r['soup_ingredients']), 'of', len(r['soup_offered']), 'runs, validation balanced accuracy', r['eval_balanced_accuracy'])")"
      python3 -m ham_hf.cli bundle --model /tmp/runs/soup --output /tmp/bundle/soup/ham10000-resnet50 2>&1 | tail -1
    else
      echo "soup failed or timed out:"; tail -5 /tmp/soup.log
    fi
  fi
  tar -cf "$OUT/sweep.tar" -C /tmp sweep
  # The device tool returns at most 8 files of 16 MiB: the bundled folders travel as tar parts.
  if [ "${PACK:-1}" = 1 ]; then tar -cf - -C /tmp/bundle . | split -b 15m - "$OUT/bundle.tar.part-"; fi
  ls -la "$OUT"
  ;;
distill)
  ls /tmp/runs/*/all_results.json > /dev/null 2>&1 || { echo "run the train stage first (same warm machine)"; exit 2; }
  # The teachers: of the finished sweep runs (not the soup: it is made of them), the pair whose geometric-mean
  # ensemble scores the best validation balanced accuracy on their saved validation answers
  # (scripts/ensemble_study.py): two runs that err apart teach more than the two best alone. The student
  # trains with the best single run's recipe.
  teachers=$(python3 - <<'PYEOF'
import itertools, logging, pathlib, sys
sys.path.insert(0, "scripts")
import ensemble_study
from ham_hf import metrics
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
runs = sorted(p.parent for p in pathlib.Path("/tmp/runs").glob("*/validation_predictions.csv")
              if p.parent.name not in ("soup", "distill"))
frames = {r: ensemble_study.read_predictions(r, "validation") for r in runs}
scores = {pair: metrics.compute(*ensemble_study.ensemble([frames[r] for r in pair]))["balanced_accuracy"]
          for pair in itertools.combinations(runs, 2)}
for pair, score in sorted(scores.items(), key=lambda kv: -kv[1]):
    logging.info("ensemble %s: validation balanced accuracy %.4f", " + ".join(r.name for r in pair), score)
print(" ".join(map(str, max(scores, key=scores.get))))
PYEOF
)
  best=$(cat /tmp/runs/best-single)
  echo "teachers: $teachers; the student's recipe: $best's"
  rm -rf /tmp/runs/distill && start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${DISTILL_TIMEOUT:-420}" python3 -m ham_hf.cli train configs/resnet50.json --data "$PREPARED" \
    --model_name_or_path "$HOME_DIR/backbone" --output_dir /tmp/runs/distill \
    --num_train_epochs "${DISTILL_EPOCHS:-$EPOCHS}" --save_only_model true --save_total_limit 1 --disable_tqdm true --decode_threads 12 \
    ${SWEEP[$best]} --distill_from $teachers ${TRAIN_EXTRA:-} > /tmp/distill.log 2>&1 || { tail -20 /tmp/distill.log; exit 1; }
  echo "distillation wall time: $(( $(date +%s) - start )) s"
  mkdir -p /tmp/distill-out && cp /tmp/distill.log /tmp/runs/distill/{all_results.json,validation_metrics.json,validation_predictions.csv,trainer_state.json,README.md} /tmp/distill-out/
  python3 -c "import json; r = json.load(open('/tmp/runs/distill/all_results.json'))
print('student: validation balanced accuracy', r['eval_balanced_accuracy'], 'test', r['test_balanced_accuracy'])"
  rm -rf /tmp/bundle-distill && python3 -m ham_hf.cli bundle --model /tmp/runs/distill \
    --output /tmp/bundle-distill/ham10000-resnet50 2>&1 | tail -1
  tar -cf "$OUT/distill.tar" -C /tmp distill-out
  if [ "${PACK:-1}" = 1 ]; then tar -cf - -C /tmp/bundle-distill . | split -b 15m - "$OUT/distill-bundle.tar.part-"; fi
  ls -la "$OUT"
  ;;
full)
  # train and distill in one call (a 15-minute lease holds two calls: setup, then this), within $DEADLINE seconds.
  # The call returns 64 MiB, one bundle: the candidate with the better validation balanced accuracy comes back
  # as bundle.tar.part-* (picked.txt says which); both runs' reports come back in sweep.tar and distill.tar.
  t0=$(date +%s) deadline=${DEADLINE:-540}
  SOUP=${SOUP:-0} PACK=0 bash scripts/gpu_default_model.sh train
  left=$(( deadline - ($(date +%s) - t0) - ${PACK_S:-40} ))   # bundling and packing the pick take ~40 s
  # As many student epochs as fit (cosine schedules are set up front), up to $DISTILL_EPOCHS_MAX: the sweep's
  # runs shared the GPU three ways, the student has it alone but runs its two teachers too (about 5/3 of a
  # training step), so an epoch of it costs about 0.56 of a sweep epoch's wall time; 0.75 and 60 s of loading,
  # calibration and scoring leave a margin.
  epochs=$(python3 -c "print(min(${DISTILL_EPOCHS_MAX:-30}, int(($left - 60) / (0.75 * $(cat /tmp/runs/sweep-seconds) / $EPOCHS))))")
  picked=single
  if [ "$epochs" -ge "${DISTILL_MIN_EPOCHS:-10}" ]; then
    echo "distillation: $epochs epochs in at most $left s"
    if DISTILL_EPOCHS=$epochs DISTILL_TIMEOUT=$left PACK=0 bash scripts/gpu_default_model.sh distill; then
      picked=$(python3 -c "import json
s = json.load(open('/tmp/runs/$(cat /tmp/runs/best-single)/all_results.json'))['eval_balanced_accuracy']
d = json.load(open('/tmp/runs/distill/all_results.json'))['eval_balanced_accuracy']
print('distill' if d > s else 'single')")
    else
      echo "distillation failed or ran out of time (its log: distill.log)"; cp /tmp/distill.log "$OUT/" || true
    fi
  else
    echo "no time left for distillation ($left s: $epochs epochs)"
  fi
  folder=/tmp/bundle/single; [ "$picked" = distill ] && folder=/tmp/bundle-distill
  echo "$picked: $(cat /tmp/runs/best-single) and its distilled student compared on validation" | tee "$OUT/picked.txt"
  tar -cf - -C "$folder" . | split -b 15m - "$OUT/bundle.tar.part-"
  ls -la "$OUT"; echo "full stage: $(( $(date +%s) - t0 )) s"
  ;;
*) echo "unknown stage $stage: pack | setup | train | distill | full"; exit 2 ;;
esac
