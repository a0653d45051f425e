#!/usr/bin/env bash
# The full measurement behind bench/RESULTS.md (~35 min on the 2-core box; run it when the box is quiet).
#   bash bench/run_all.sh [--peer-python PY] [results_dir]
# PY: the Python of the peer's venv (default /tmp/peer/venv/bin/python), made with
#   bash ../shared/bench/peer/setup_cpu_venv.sh /tmp/peer/venv      (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
PEER_PY=/tmp/peer/venv/bin/python
if [[ ${1:-} == --peer-python ]]; then PEER_PY=${2:?--peer-python needs a path}; shift 2; fi
PEER_DIR=../shared/bench/peer  # the peer benchmark, next to the repository
R=${1:-bench/results}
for f in "$PEER_PY" "$PEER_DIR/smp_bench.py"; do
  [[ -f $f ]] || { echo "run_all.sh: $f not found (bash $PEER_DIR/setup_cpu_venv.sh /tmp/peer/venv)" >&2; exit 2; }
done
mkdir -p "$R"
export TF_CPP_MIN_LOG_LEVEL=2
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
log "machine ceilings"
"$PEER_PY" "$PEER_DIR/machine_peak.py" --threads 2 | tee -a "$R/peak.jsonl"
log "compare_peer (alternating ours/peer)"
python bench/compare_peer.py --rounds 2 --our-train-precision bf16 --peer-python "$PEER_PY" \
    --peer-script "$PEER_DIR/smp_bench.py" --json-out "$R/compare.jsonl" --raw-out "$R/compare_raw.jsonl" > /dev/null
log "inference: batch 1 and 8, fp32/bf16, plain/fast, SavedModels"
python bench/infer.py --size 448 --batch 1 8 --precision fp32 bf16 --variants plain fast --steps 5 --warmup 2 --json-out "$R/infer.jsonl" > /dev/null
log "training: fp32 batch 4; bf16 batch 4 and the largest batch"
python bench/train_step.py --size 448 --batch 4 --precision fp32 --json-out "$R/train.jsonl" > /dev/null
# bf16 batch 4 comes from compare_peer; the doubling starts at 8 (one timed step per doubled batch)
python bench/train_step.py --size 448 --stages lung infection --batch 8 --precision bf16 --max-batch \
    --max-batch-steps 1 --steps 2 --warmup 1 --json-out "$R/train.jsonl" > /dev/null
log "input pipeline"
python bench/pipeline.py --size 448 --batch 32 --train-json "$R/compare_raw.jsonl" "$R/train.jsonl" \
    --json-out "$R/pipeline.jsonl" > /dev/null
L=${LUNG_MODEL:-/tmp/bench_models/lung.keras}; I=${INFECTION_MODEL:-/tmp/bench_models/infection.keras}
if [[ -f $L && -f $I ]]; then
  log "agreement of bf16 / folded variants on trained weights ($L, $I)"
  python bench/infer.py --size 448 --batch 1 --targets --precision fp32 bf16 --variants plain fast --no-savedmodel \
      --no-flops --lung-model "$L" --infection-model "$I" --label "trained weights" --json-out "$R/infer.jsonl" > /dev/null
fi
log "done"
