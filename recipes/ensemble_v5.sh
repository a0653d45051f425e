#!/usr/bin/env bash
# Version 5 ensemble candidate: the mean of two Stage-2 models, version 3's 128-px infection128_ft and version 5's
# 256-px infection256_idice (covidseg_tf.ensemble: one flat .keras stage at 256 px), with version 4's lung256.
#   nohup nice -n 10 bash recipes/ensemble_v5.sh RUN_DIR V3_RUN_DIR V4_RUN_DIR V5_RUN_DIR [MANUAL_DIR] [TFDS_DIR] \
#       >> RUN_DIR/recipe.log 2>&1 &
# The run folders are those of recipes/train_v3.sh, train_v4.sh and train_v5.sh (finished). No training: build the
# ensemble (RUN_DIR/model.keras), then recipes/finish.sh (tune, export, evaluate). Rerunning skips finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?give a run folder outside the repository}
V3=${2:?give version 3s run folder} V4=${3:?give version 4s run folder} V5=${4:?give version 5s run folder}
M=${5:-../shared/covidqu}
D=${6:-$HOME/tensorflow_datasets}
mkdir -p "$R"
export TF_CPP_MIN_LOG_LEVEL=2
for f in "$V3/infection128_ft/DONE" "$V4/lung256/DONE" "$V5/infection256_idice/DONE"; do
  [[ -f $f ]] || { echo "missing $f: finish that recipe first" >&2; exit 2; }
done
echo "$(date -u +%FT%TZ) ensemble"
[[ -f $R/model.keras ]] || python -m covidseg_tf.ensemble \
    --members "$V3/infection128_ft/model.keras" "$V5/infection256_idice/model.keras" --out "$R/model.keras"
bash recipes/finish.sh "$R" "$V4/lung256/model.keras" "$R/model.keras" "$M" "$D"
echo "$(date -u +%FT%TZ) done"
