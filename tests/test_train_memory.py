"""bench/train_memory.py: each phase's record holds the RSS and, once TensorFlow is loaded, its allocator's tensors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

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
