#!/usr/bin/env bash
# The last steps of every training recipe: tune the decision on Val, export the servables, evaluate them on Val and
# Test. Each step is skipped when its output exists, so a rerun resumes.
#   bash recipes/finish.sh RUN_DIR LUNG_MODEL INFECTION_MODEL MANUAL_DIR TFDS_DIR
# writes RUN_DIR/decision.json, RUN_DIR/export/{lung,infection,cascade}, RUN_DIR/eval, logs RUN_DIR/{tune,export,
# evaluate}.log. EXPORT_PRECISION (default bf16) is export's --precision.
set -euo pipefail
R=$1 LUNG=$2 INF=$3 M=$4 D=$5
EXPORT_PRECISION=${EXPORT_PRECISION:-bf16}
echo "$(date -u +%FT%TZ) tune, export, evaluate"
[[ -f $R/decision.json ]] || python -m covidseg_tf.tune --lung-model "$LUNG" --infection-model "$INF" \
    --dataset covid_qu_ex/infection --manual-dir "$M" --data-dir "$D" --hflip both --out "$R/decision.json" \
    >> "$R/tune.log" 2>&1
[[ -d $R/export ]] || python -m covidseg_tf.export --lung-model "$LUNG" --infection-model "$INF" \
    --decision "$R/decision.json" --precision "$EXPORT_PRECISION" --out "$R/export" >> "$R/export.log" 2>&1
[[ -f $R/eval/report.json ]] || python -m covidseg_tf.evaluate --lung-model "$R/export/lung" \
    --infection-model "$R/export/infection" --dataset covid_qu_ex/infection --manual-dir "$M" --data-dir "$D" \
    --split validation test --out "$R/eval" >> "$R/evaluate.log" 2>&1
