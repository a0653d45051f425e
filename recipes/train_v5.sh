#!/usr/bin/env bash
# Version 5 candidate: version 4's Stage 2 fine-tuned with half of its Dice weight on the per-image Dice
# ("image_dice", covidseg_tf/losses.py), so images with small findings count as much as those with large ones.
#   nohup nice -n 10 bash recipes/train_v5.sh RUN_DIR V4_RUN_DIR [MANUAL_DIR] [TFDS_DIR] >> RUN_DIR/recipe.log 2>&1 &
# V4_RUN_DIR is recipes/train_v4.sh's finished run folder (its lung256 and infection256 are reused as they are).
# Rerunning skips finished steps (NAME/DONE) and resumes an unfinished one from its backup.
#   1. infection256_idice  Stage 2 at 256 px, 2 epochs, lr 1e-4 cosine, every layer from V4's infection256, on
#                          lung256's masks, loss dice 0.25 + image_dice 0.25 + bce 0.3 + focal 0.2, head weight 0.2
#   2. tune (Val, hflip both) -> decision.json; export -> RUN_DIR/export; evaluate (Val + Test) -> RUN_DIR/eval
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?give a run folder outside the repository}
V4=${2:?give version 4s run folder (recipes/train_v4.sh)}
M=${3:-../shared/covidqu}
D=${4:-$HOME/tensorflow_datasets}
THREADS=${THREADS:-2}
mkdir -p "$R"
export TF_CPP_MIN_LOG_LEVEL=2
[[ -f $V4/infection256/DONE ]] || { echo "run recipes/train_v4.sh $V4 first" >&2; exit 2; }
LUNG=$V4/lung256/model.keras
NAME=infection256_idice
if [[ ! -f $R/$NAME/DONE ]]; then
  echo "$(date -u +%FT%TZ) step $NAME"
  mkdir -p "$R/$NAME"
  # the Stage-1 mask cache is keyed by the lung model's digest: version 4's is the same model's
  [[ -d $R/$NAME/stage1_masks ]] || cp -r "$V4/infection256/stage1_masks" "$R/$NAME/"
  TF_NUM_INTRAOP_THREADS=$THREADS TF_NUM_INTEROP_THREADS=1 \
    python -m covidseg_tf.train --stage infection --encoder efficientnetb0 --batch-size 16 --lr-schedule cosine \
      --seed 1 --no-export --manual-dir "$M" --data-dir "$D" --image-size 256 --epochs 2 --learning-rate 1e-4 \
      --loss-weights dice=0.25,image_dice=0.25,bce=0.3,focal=0.2 --image-head-weight 0.2 \
      --encoder-weights "$V4/infection256/model.keras" --lung-model "$LUNG" \
      --output "$R/$NAME" >> "$R/$NAME.log" 2>&1
fi
INF=$R/$NAME/model.keras

bash recipes/finish.sh "$R" "$LUNG" "$INF" "$M" "$D"
python bench/run_summary.py "$R/$NAME"
echo "$(date -u +%FT%TZ) done"
