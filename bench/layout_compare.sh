#!/usr/bin/env bash
# Both U-Net layouts trained with the same budget, at the same time, one intra-op thread each (so both see the
# same machine load): Stage 1, EfficientNet-B0, 128 px, 3 epochs, batch 16, lr 1e-3 cosine, random init, seed 1.
# Prints one JSON line per layout (validation Dice per epoch, minutes per epoch) when both have finished.
#   bash bench/layout_compare.sh RUN_DIR [MANUAL_DIR] [TFDS_DIR]
# RUN_DIR must lie outside the repository; rerunning the same command resumes unfinished runs from their backup.
set -uo pipefail
cd "$(dirname "$0")/.."
R=${1:?give a run folder outside the repository}
M=${2:-../shared/covidqu}
D=${3:-$HOME/tensorflow_datasets}
mkdir -p "$R"
export TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 TF_CPP_MIN_LOG_LEVEL=2
COMMON=(--stage lung --encoder efficientnetb0 --image-size 128 --batch-size 16 --epochs 3 --learning-rate 1e-3
        --lr-schedule cosine --encoder-weights none --seed 1 --no-export --batch-norm keras --manual-dir "$M" --data-dir "$D")
python -c "from covidseg_tf.data import load_builder; load_builder('covid_qu_ex/infection', '$D', '$M')" >/dev/null 2>&1
for layout in segmentation_models segmentation_models_pytorch; do
  [[ -f $R/$layout/DONE ]] || python -m covidseg_tf.train "${COMMON[@]}" --unet-layout "$layout" \
      --output "$R/$layout" >> "$R/$layout.log" 2>&1 &
done
wait
python bench/run_summary.py "$R/segmentation_models" "$R/segmentation_models_pytorch"
