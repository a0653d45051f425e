"""bench/swish_fusion.py on a small Stage 2: both swish forms and the faster layers time, and in float32 they give
the same output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a bench script's own check (~20-30 s); CI's budget (pytest -m slow runs it)
def test_all_three_forms_are_timed_and_equal_in_float32():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "swish_fusion.py"), "--size", "64", "--stages",
                           "infection", "--precision", "fp32", "--rounds", "1", "--calls", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert (row["stage"], row["precision"]) == ("infection", "fp32")
    assert row["keras_swish_ms"] > 0 and row["fusible_swish_ms"] > 0 and row["faster_layers_ms"] > 0
    assert row["ratio"] > 0 and row["faster_layers_ratio"] > 0
    assert row["max_abs_diff"] <= 1e-6 and row["max_abs_diff_faster_layers"] <= 1e-5  # AvgPool sums in another order
