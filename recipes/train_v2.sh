#!/usr/bin/env bash
# How version 2 of the shipped models was trained (saved_models/MODEL_CARD.md, "Version 2"): a 128-px cascade,
# Stage 2 initialised from Stage 1 and trained on its masks, the decision tuned on Val, the bf16 export.
#   bash bench/train_v2.sh RUN_DIR [MANUAL_DIR] [TFDS_DIR]
# RUN_DIR must lie outside the repository. Rerunning the same command skips finished steps and resumes an
# unfinished training run from its backup. Steps, each a project CLI; everything at 128 px, the size the cascade
# runs at (a 256-px epoch costs 4x a 128-px one on a 2-core CPU; predictions are resized back to the input's size):
#   1. lung128       Stage 1, B0, 3 epochs, lr 1e-3 cosine, random init                     (both threads)
#   2. lung128_ft    Stage 1, 3 more epochs, lr 3e-4 cosine, every layer from lung128       (one thread) } at the
#      infection128  Stage 2, 3 epochs, lr 1e-3 cosine, from lung128, on lung128's masks    (one thread) } same time
#   3. tune (Val) -> decision.json; export (bf16, with the decision) -> RUN_DIR/saved_models
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?give a run folder outside the repository}
M=${2:-../shared/covidqu}
D=${3:-$HOME/tensorflow_datasets}
mkdir -p "$R"
export TF_CPP_MIN_LOG_LEVEL=2
COMMON=(--encoder efficientnetb0 --batch-size 16 --lr-schedule cosine --seed 1 --no-export
        --unet-layout segmentation_models_pytorch --batch-norm keras --manual-dir "$M" --data-dir "$D")

train() {  # train NAME THREADS ARGS...: run folder RUN_DIR/NAME (train writes NAME/DONE at the end), log RUN_DIR/NAME.log
  local name=$1 threads=$2; shift 2
  [[ -f $R/$name/DONE ]] && return 0
  TF_NUM_INTRAOP_THREADS=$threads TF_NUM_INTEROP_THREADS=1 \
    python -m covidseg_tf.train "${COMMON[@]}" "$@" --output "$R/$name" >> "$R/$name.log" 2>&1
}

train lung128 2 --stage lung --image-size 128 --epochs 3 --learning-rate 1e-3 --encoder-weights none

train lung128_ft 1 --stage lung --image-size 128 --epochs 3 --learning-rate 3e-4 \
    --encoder-weights "$R/lung128/model.keras" & lung=$!
train infection128 1 --stage infection --image-size 128 --epochs 3 --learning-rate 1e-3 \
    --encoder-weights "$R/lung128/model.keras" --lung-model "$R/lung128/model.keras" & infection=$!
wait $lung && wait $infection

[[ -f $R/decision.json ]] || python -m covidseg_tf.tune --lung-model "$R/lung128_ft/model.keras" \
    --infection-model "$R/infection128/model.keras" --dataset covid_qu_ex/infection --manual-dir "$M" \
    --data-dir "$D" --hflip both --out "$R/decision.json" >> "$R/tune.log" 2>&1
[[ -d $R/saved_models ]] || python -m covidseg_tf.export --lung-model "$R/lung128_ft/model.keras" \
    --infection-model "$R/infection128/model.keras" --decision "$R/decision.json" --precision bf16 \
    --out "$R/saved_models" >> "$R/export.log" 2>&1
python bench/run_summary.py "$R"/lung128 "$R"/lung128_ft "$R"/infection128
