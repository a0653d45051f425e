#!/usr/bin/env bash
# Version 4 candidate: version 3's cascade continued at the images' own 256 px (saved_models/MODEL_CARD.md).
#   nohup nice -n 10 bash recipes/train_v4.sh RUN_DIR V3_RUN_DIR [MANUAL_DIR] [TFDS_DIR] >> RUN_DIR/recipe.log 2>&1 &
# V3_RUN_DIR is recipes/train_v3.sh's run folder; its finished steps are reused, missing ones are trained first
# (the same command rebuilds them). Rerunning skips finished steps (NAME/DONE) and resumes an unfinished one from
# its backup. THREADS, PRECISION, EXPORT_PRECISION as in train_v3.sh.
#   0. V3_RUN_DIR: train_v3.sh's steps, then infection128_ft (4 more Stage-2 epochs at 128 px, lr 3e-4 cosine)
#   1. lung256        Stage 1 at 256 px, 2 epochs, lr 3e-4 cosine, every layer from lung128_ft
#   2. infection256   Stage 2 at 256 px, 4 epochs, lr 3e-4 cosine, every layer from infection128_ft, on lung256's
#                     masks, image-level head (loss weight 0.2)
#   3. tune (Val, hflip both) -> decision.json; export -> RUN_DIR/export; evaluate (Val + Test) -> RUN_DIR/eval
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?give a run folder outside the repository}
V3=${2:?give version 3s run folder (recipes/train_v3.sh)}
M=${3:-../shared/covidqu}
D=${4:-$HOME/tensorflow_datasets}
THREADS=${THREADS:-2}
PRECISION=${PRECISION:-off}
mkdir -p "$R" "$V3"
export TF_CPP_MIN_LOG_LEVEL=2
[[ -f $V3/infection128/DONE ]] || bash recipes/train_v3.sh "$V3" "$M" "$D" >> "$V3/recipe.log" 2>&1

train() {  # train FOLDER NAME ARGS...: run folder FOLDER/NAME, log FOLDER/NAME.log
  local dir=$1 name=$2; shift 2
  [[ -f $dir/$name/DONE ]] && return 0
  echo "$(date -u +%FT%TZ) step $name"
  TF_NUM_INTRAOP_THREADS=$THREADS TF_NUM_INTEROP_THREADS=1 \
    python -m covidseg_tf.train --encoder efficientnetb0 --batch-size 16 --lr-schedule cosine --seed 1 \
      --no-export --mixed-precision "$PRECISION" --manual-dir "$M" --data-dir "$D" "$@" \
      --output "$dir/$name" >> "$dir/$name.log" 2>&1
}

train "$V3" infection128_ft --stage infection --image-size 128 --epochs 4 --learning-rate 3e-4 \
    --image-head-weight 0.2 --encoder-weights "$V3/infection128/model.keras" --lung-model "$V3/lung128_ft/model.keras"
train "$R" lung256 --stage lung --image-size 256 --epochs 2 --learning-rate 3e-4 \
    --encoder-weights "$V3/lung128_ft/model.keras"
LUNG=$R/lung256/model.keras
train "$R" infection256 --stage infection --image-size 256 --epochs 4 --learning-rate 3e-4 \
    --image-head-weight 0.2 --encoder-weights "$V3/infection128_ft/model.keras" --lung-model "$LUNG"
INF=$R/infection256/model.keras

bash recipes/finish.sh "$R" "$LUNG" "$INF" "$M" "$D"
python bench/run_summary.py "$R"/lung256 "$R"/infection256
echo "$(date -u +%FT%TZ) done"
