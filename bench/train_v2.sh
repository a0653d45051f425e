#!/usr/bin/env bash
# How version 2 of the shipped models was trained (saved_models/MODEL_CARD.md, "Version 2"): progressive resizing,
# Stage 2 initialised from Stage 1, Stage 2 on Stage-1 masks, then the decision tuned on Val and the export.
#   bash bench/train_v2.sh RUN_DIR [MANUAL_DIR] [TFDS_DIR]
# RUN_DIR must lie outside the repository. Rerunning the same command skips finished steps and resumes an
# unfinished training run from its backup. Steps, each a project CLI:
#   1. lung128       Stage 1, B0, 128 px, 3 epochs, lr 1e-3 cosine, random init            (both threads)
#   2. lung256       Stage 1 at 256 px, 1 epoch, lr 3e-4 cosine, every layer from lung128   (one thread) } at the
#      infection128  Stage 2 at 128 px, 3 epochs, lr 1e-3 cosine, from lung128, its masks   (one thread) } same time
#   3. infection256  Stage 2 at 256 px, 1 epoch, lr 3e-4 cosine, from infection128, lung256's masks (both threads)
#   4. tune (Val) -> decision.json; export (bf16, with the decision) -> RUN_DIR/saved_models
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?give a run folder outside the repository}
M=${2:-../shared/covidqu}
D=${3:-$HOME/tensorflow_datasets}
mkdir -p "$R"
export TF_CPP_MIN_LOG_LEVEL=2
COMMON=(--encoder efficientnetb0 --batch-size 16 --lr-schedule cosine --seed 1 --no-export
        --unet-layout segmentation_models_pytorch --manual-dir "$M" --data-dir "$D")

train() {  # train NAME THREADS ARGS...: run folder RUN_DIR/NAME (train writes NAME/DONE at the end), log RUN_DIR/NAME.log
  local name=$1 threads=$2; shift 2
  [[ -f $R/$name/DONE ]] && return 0
  TF_NUM_INTRAOP_THREADS=$threads TF_NUM_INTEROP_THREADS=1 \
    python -m covidseg_tf.train "${COMMON[@]}" "$@" --output "$R/$name" >> "$R/$name.log" 2>&1
}

train lung128 2 --stage lung --image-size 128 --epochs 3 --learning-rate 1e-3 --encoder-weights none

train lung256 1 --stage lung --image-size 256 --epochs 1 --learning-rate 3e-4 \
    --encoder-weights "$R/lung128/model.keras" & lung=$!
train infection128 1 --stage infection --image-size 128 --epochs 3 --learning-rate 1e-3 \
    --encoder-weights "$R/lung128/model.keras" --lung-model "$R/lung128/model.keras" & infection=$!
wait $lung && wait $infection

train infection256 2 --stage infection --image-size 256 --epochs 1 --learning-rate 3e-4 \
    --encoder-weights "$R/infection128/model.keras" --lung-model "$R/lung256/model.keras"

[[ -f $R/decision.json ]] || python -m covidseg_tf.tune --lung-model "$R/lung256/model.keras" \
    --infection-model "$R/infection256/model.keras" --dataset covid_qu_ex/infection --manual-dir "$M" \
    --data-dir "$D" --hflip both --out "$R/decision.json" >> "$R/tune.log" 2>&1
[[ -d $R/saved_models ]] || python -m covidseg_tf.export --lung-model "$R/lung256/model.keras" \
    --infection-model "$R/infection256/model.keras" --decision "$R/decision.json" --precision bf16 \
    --out "$R/saved_models" >> "$R/export.log" 2>&1
python bench/run_summary.py "$R"/lung128 "$R"/lung256 "$R"/infection128 "$R"/infection256
