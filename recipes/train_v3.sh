#!/usr/bin/env bash
# How version 3 of the shipped models is trained (saved_models/MODEL_CARD.md, "Version 3"): the cascade at the
# images' native 256 px, long runs with one cosine schedule each, Stage 2 with an image-level head.
#   nohup nice -n 10 bash recipes/train_v3.sh RUN_DIR [MANUAL_DIR] [TFDS_DIR] >> RUN_DIR/recipe.log 2>&1 &
# RUN_DIR must lie outside the repository. Rerunning the same command skips finished steps (NAME/DONE) and
# resumes an unfinished training run from its backup (one epoch is the most a kill loses). Each step is a
# project CLI; its log is RUN_DIR/NAME.log. THREADS (default 2) sets TensorFlow's intra-op threads.
#   1. lung256       Stage 1, B0, 256 px, 8 epochs, lr 1e-3 cosine, bf16 mixed precision, random init (version 2's
#                    Stage-1 .keras was not on the machine; the shipped SavedModels hold frozen constants only)
#   2. infection256  Stage 2, B0, 256 px, 20 epochs, lr 1e-3 cosine, bf16, every layer from lung256, on lung256's
#                    masks, with the image-level head (loss weight 0.2); the seed's dropout, decay, clipping, loss
# Why these sizes and bf16: bench/RESULTS.md, "Training cost per epoch for version 3".
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?give a run folder outside the repository}
M=${2:-../shared/covidqu}
D=${3:-$HOME/tensorflow_datasets}
THREADS=${THREADS:-2}
mkdir -p "$R"
export TF_CPP_MIN_LOG_LEVEL=2
COMMON=(--encoder efficientnetb0 --batch-size 16 --lr-schedule cosine --seed 1 --no-export
        --mixed-precision bf16 --manual-dir "$M" --data-dir "$D")

train() {  # train NAME ARGS...: run folder RUN_DIR/NAME, log RUN_DIR/NAME.log
  local name=$1; shift
  [[ -f $R/$name/DONE ]] && return 0
  echo "$(date -u +%FT%TZ) step $name"
  TF_NUM_INTRAOP_THREADS=$THREADS TF_NUM_INTEROP_THREADS=1 \
    python -m covidseg_tf.train "${COMMON[@]}" "$@" --output "$R/$name" >> "$R/$name.log" 2>&1
}

train lung256 --stage lung --image-size 256 --epochs 8 --learning-rate 1e-3 --encoder-weights none

train infection256 --stage infection --image-size 256 --epochs 20 --learning-rate 1e-3 --image-head-weight 0.2 \
    --encoder-weights "$R/lung256/model.keras" --lung-model "$R/lung256/model.keras"
