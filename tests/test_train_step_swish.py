"""bench/train_step.py --swish: each swish runs in its own worker, and each record says which one its model had."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_swish_variants_run_in_turn_and_say_which(tmp_path: Path):
    out = tmp_path / "train.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), "--size", "64", "--batch", "2", "--stages",
           "infection", "--precision", "fp32", "--swish", "keras", "xla", "--steps", "1", "--warmup", "0",
           "--json-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(out.read_text().splitlines()[-1])["results"]
    assert [r["swish"] for r in records] == ["keras", "xla"]
    assert records[0]["xla_swish_layers"] == 0 and records[1]["xla_swish_layers"] > 30  # EfficientNet-B0's swishes
    assert all(r["images_per_s"] > 0 and not r["nan_or_inf"] for r in records)
    assert not any(r["keras_steps"] for r in records)  # train's step functions (covidseg_tf.steps) by default
