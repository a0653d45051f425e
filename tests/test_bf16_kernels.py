"""bench/bf16_kernels.py on tiny shapes: one row per op with the three timings, and a bad op kind refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bf16_kernels.py"


def test_each_op_is_timed_in_the_three_modes():
    proc = subprocess.run([sys.executable, str(SCRIPT), "bn:24:8", "dw:16:8:5:2", "--batch", "2", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["op"] for r in out["rows"]] == ["bn:24:8", "dw:16:8:5:2"]
    for row in out["rows"]:
        assert all(row[f"{mode}_ms"] > 0 for mode in ("bf16", "cast32", "fp32")), row


def test_an_unknown_op_kind_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "conv:8:8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown op kind 'conv'" in proc.stderr
