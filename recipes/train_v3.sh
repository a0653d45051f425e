#!/usr/bin/env bash
# How version 3 of the shipped models is trained (saved_models/MODEL_CARD.md, "Version 3"): the cascade at 128 px
# (the masks come back at each image's native size), Stage 1 continued from its first run, Stage 2 longer than
# version 2's, with the image-level head, on the FINAL Stage-1 model's masks.
#   nohup nice -n 10 bash recipes/train_v3.sh RUN_DIR [MANUAL_DIR] [TFDS_DIR] >> RUN_DIR/recipe.log 2>&1 &
# RUN_DIR must lie outside the repository. Rerunning the same command skips finished steps (NAME/DONE) and
# resumes an unfinished training run from its backup (one epoch is the most a kill loses). Each step is a
# project CLI; its log is RUN_DIR/NAME.log. THREADS (default 2) sets TensorFlow's intra-op threads; PRECISION
# (default off = float32) the --mixed-precision of training: bf16 only where bench/train_step.py says it is
# faster on the CPU at hand (bench/RESULTS.md, "Training cost for version 3 on Intel Xeon with AMX").
#   1. lung128        Stage 1, B0, 128 px, 4 epochs, lr 1e-3 cosine, random init
#   2. lung128_ft     Stage 1, 2 more epochs, lr 3e-4 cosine, every layer from lung128
#   3. infection128   Stage 2, 7 epochs, lr 1e-3 cosine, every layer from lung128_ft (stem widened), on
#                     lung128_ft's masks, image-level head (loss weight 0.2); the seed's dropout, decay, clipping, loss
#   4. tune (Val) -> RUN_DIR/decision.json; export (EXPORT_PRECISION, default bf16: faster than float32 on CPUs
#      with AMX or AVX512_BF16 and half the size; bench/RESULTS.md) -> RUN_DIR/export; evaluate (Val + Test, the
#      exported servables at the images' native size) -> RUN_DIR/eval. Shipping copies RUN_DIR/export/*/1 to
#      saved_models/*/3 (saved_models/MODEL_CARD.md, "Version 3").
# Why 128 px: no run folder has survived from one session's machine to the next, so a version must be trained,
# tuned and shipped within one 3-hour session on 2 cores shared with other work; there a 256-px epoch took
# 20 min (the first plan, 128 -> 256 px per stage, is in git history and the card), a 128-px one about 5.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?give a run folder outside the repository}
M=${2:-../shared/covidqu}
D=${3:-$HOME/tensorflow_datasets}
THREADS=${THREADS:-2}
PRECISION=${PRECISION:-off}
mkdir -p "$R"
export TF_CPP_MIN_LOG_LEVEL=2
COMMON=(--encoder efficientnetb0 --batch-size 16 --lr-schedule cosine --seed 1 --no-export --image-size 128
        --mixed-precision "$PRECISION" --manual-dir "$M" --data-dir "$D")

train() {  # train NAME ARGS...: run folder RUN_DIR/NAME, log RUN_DIR/NAME.log
  local name=$1; shift
  [[ -f $R/$name/DONE ]] && return 0
  echo "$(date -u +%FT%TZ) step $name"
  TF_NUM_INTRAOP_THREADS=$THREADS TF_NUM_INTEROP_THREADS=1 \
    python -m covidseg_tf.train "${COMMON[@]}" "$@" --output "$R/$name" >> "$R/$name.log" 2>&1
}

train lung128 --stage lung --epochs 4 --learning-rate 1e-3 --encoder-weights none
train lung128_ft --stage lung --epochs 2 --learning-rate 3e-4 --encoder-weights "$R/lung128/model.keras"
LUNG=$R/lung128_ft/model.keras
train infection128 --stage infection --epochs 7 --learning-rate 1e-3 --image-head-weight 0.2 \
    --encoder-weights "$LUNG" --lung-model "$LUNG"
INF=$R/infection128/model.keras

bash recipes/finish.sh "$R" "$LUNG" "$INF" "$M" "$D"
python bench/run_summary.py "$R"/lung128 "$R"/lung128_ft "$R"/infection128
