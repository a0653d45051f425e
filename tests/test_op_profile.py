"""bench/op_profile.py's summary of a TensorFlow profiler trace (an XSpace written here with known kernel events),
through its --from-trace mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorflow.tsl.profiler.protobuf import xplane_pb2

REPO = Path(__file__).resolve().parents[1]
PS = 10**12  # picoseconds per second

EVENTS = [  # (event name, seconds): three kernels, one repeated, and two events that are not kernels
    ("unet/dec1_conv/Conv2D:_MklNativeConv2D", 0.30),
    ("unet/dec1_conv/Conv2D:_MklNativeConv2D", 0.10),
    ("unet/block1a_activation/mul:Mul", 0.20),
    ("unet/bn/FusedBatchNormV3:_MklNativeFusedBatchNormV3", 0.08),
    ("__inference_train_function_123", 5.0),
    ("ExecutorState::Process", 4.0),
]


def write_trace(folder: Path) -> None:
    space = xplane_pb2.XSpace()
    for plane_name, scale in (("/host:CPU", 1.0), ("/device:CUSTOM:x", 100.0)):  # the device plane is ignored
        plane = space.planes.add(name=plane_name)
        line = plane.lines.add(id=1, name="tf_executor")
        for i, (name, seconds) in enumerate(EVENTS, start=1):
            plane.event_metadata[i].id = i
            plane.event_metadata[i].name = name
            line.events.add(metadata_id=i, offset_ps=i, duration_ps=int(seconds * scale * PS))
    path = folder / "plugins" / "profile" / "run1" / "host.xplane.pb"
    path.parent.mkdir(parents=True)
    path.write_bytes(space.SerializeToString())


def test_kernel_events_are_summed_per_type_group_and_layer(tmp_path: Path):
    write_trace(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "op_profile.py"), "--from-trace", str(tmp_path),
                           "--calls", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kernel_s_per_step"] == 0.34  # (0.30 + 0.10 + 0.20 + 0.08) / 2 calls; the non-kernel events left out
    assert out["per_type_s_per_step"] == {"_MklNativeConv2D": 0.2, "Mul": 0.1, "_MklNativeFusedBatchNormV3": 0.04}
    assert out["per_group_s_per_step"] == {"convolution": 0.2, "element-wise and other": 0.1, "batch norm": 0.04}
    assert out["per_layer_s_per_step"]["_MklNativeConv2D @ unet/dec1_conv"] == 0.2


def test_a_trace_without_kernels_is_an_error(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "op_profile.py"), "--from-trace", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no kernel events" in proc.stderr


@pytest.mark.slow  # a bench script's own check (~20-30 s); CI's budget (pytest -m slow runs it)
def test_infer_mode_traces_the_frozen_stage():
    """--mode infer on a small Stage 2: the trace holds its convolutions."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "op_profile.py"), "--mode", "infer", "--stage",
                           "infection", "--size", "64", "--precision", "fp32", "--steps", "2", "--warmup", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = json.loads(proc.stdout.strip().splitlines()[-1])["runs"]
    assert (run["mode"], run["precision"], run["batch"]) == ("infer", "fp32", 1)
    assert run["per_group_s_per_step"]["convolution"] > 0 and run["kernel_s_per_step"] > 0
