"""bench/train_memory.py: each phase's record holds the RSS and, once TensorFlow is loaded, its allocator's tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import train_memory  # noqa: E402


def test_phase_record_has_the_rss_and_the_tensors_tensorflow_holds():
    import tensorflow as tf

    held = tf.ones((64, 1024, 1024))  # 256 MiB from TensorFlow's CPU allocator, alive while `after` is read
    after = train_memory.rss_mib()
    assert set(after) == {"hwm", "rss", "tensors", "tensors_peak"}
    assert 0 < after["rss"] <= after["hwm"]
    # absolute, not a difference: tensors that earlier tests in this worker leave to be freed by other threads may
    # go at any moment
    assert after["tensors"] >= 256 and after["tensors_peak"] >= after["tensors"], after
    del held


@pytest.mark.slow  # a minute: a subprocess traces and runs a stage's training step
def test_trace_apart_measures_the_traced_graph_before_its_first_run():
    cmd = [sys.executable, str(BENCH / "train_memory.py"), "--size", "32", "--batch", "1", "--stages", "infection",
           "--precision", "bf16", "--steps", "1", "--warmup", "0", "--trace-apart"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert "error" not in rec, rec
    phases = rec["rss_phases_mib"]
    assert list(phases)[:4] == ["runtime", "model", "traced", "first_step"], list(phases)
    assert phases["traced"]["rss"] > phases["model"]["rss"]  # the traced graph is held before anything ran
    ops = rec["graph_ops"]
    assert ops["total"] == ops["model"] + ops["gradient"] + ops["optimizer"] + ops["other"], ops
    # the forward pass, its gradient and the optimizer's updates each have their own scope, found by name
    assert min(ops["model"], ops["gradient"], ops["optimizer"]) > 100, ops


def test_trace_apart_is_refused_where_fit_runs_the_step(capsys):
    with pytest.raises(SystemExit):
        train_memory.parse_args(["--trace-apart", "--input", "pipeline"])
    assert "--trace-apart traces train_on_batch's step; --input pipeline" in capsys.readouterr().err
    assert train_memory.parse_args(["--trace-apart"]).trace_apart
