#!/usr/bin/env python3
"""Where one of our training steps spends its time, per TensorFlow op type: `train_step.py`'s step (train_on_batch:
forward, loss, backward, optimizer, metrics) with its timed calls traced by TensorFlow's profiler, the kernel events
of the trace summed per op type (and per layer for the top ones) and divided by the traced calls. `--mode infer`
traces batch-1 inference of the frozen stage `export` serves instead. Kernels of the two intra-op threads overlap,
so the sum can exceed the step, and the profiler slows the step: read shares, not times. Complements
bench/onednn_share.py (which oneDNN primitives run, ours and the peer's). Prints ONE JSON line.

  python bench/op_profile.py --stage infection --size 256 --batch 8 --precision bf16
  python bench/op_profile.py --stage lung --size 256 --batch 8 --precision fp32 bf16 \
      --json-out bench/results/op_profile.jsonl
  python bench/op_profile.py --mode infer --stage infection --size 256 --precision fp32 bf16 --steps 20
  python bench/op_profile.py --from-trace /tmp/trace --calls 3     # summarize a saved trace folder
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import infer  # noqa: E402
import train_step  # noqa: E402

# A kernel event of the host trace is named "<op name>:<op type>", e.g. "model/dec1_conv/Conv2D:Conv2D".
_KERNEL = re.compile(r"^(?P<name>[^:\s]+):(?P<type>_?[A-Z][A-Za-z0-9_]*)$")
# Op types grouped into what they do in a training step (the rest is "other").
GROUPS = {
    "convolution": ("Conv2D", "DepthwiseConv", "_MklNativeConv", "_MklNativeFusedConv", "_MklNativeDepthwise",
                    "_FusedConv2D", "_MklFusedConv", "_MklConv", "_MklDepthwise", "BiasAddGrad"),
    "batch norm": ("FusedBatchNorm", "_MklNativeFusedBatchNorm", "_MklFusedBatchNorm"),
    "cast": ("Cast",),
    "optimizer": ("ResourceApply", "AssignSub", "AssignAdd", "AssignVariable", "ReadVariable"),
    "resize / concat / pad": ("ResizeNearest", "ResizeBilinear", "ConcatV2", "Pad", "Slice", "Tile",
                              "UpSampl", "StridedSlice"),
    "reductions": ("Mean", "Sum", "Max", "Prod", "_MklNativeMean"),
}


def group_of(op_type: str) -> str:
    for group, prefixes in GROUPS.items():
        if any(op_type.startswith(p) for p in prefixes):
            return group
    return "element-wise and other"


def trace_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).rglob("*.xplane.pb"))


def kernel_events(folder: Path) -> Iterator[tuple[int, float, str, str]]:
    """(start in ns on the profiler's clock, seconds, op type, layer) of every kernel event of the host planes of
    every `*.xplane.pb` under `folder`; the layer is the op name's first two scopes."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    for path in trace_files(folder):
        for plane in xplane_pb2.XSpace.FromString(path.read_bytes()).planes:
            if not plane.name.startswith("/host:"):
                continue
            names = {i: m.name for i, m in plane.event_metadata.items()}
            for line in plane.lines:
                for event in line.events:
                    if m := _KERNEL.match(names.get(event.metadata_id, "")):
                        yield (line.timestamp_ns + event.offset_ps // 1000, event.duration_ps / 1e12, m["type"],
                               "/".join(m["name"].split("/")[:2]))


def kernel_seconds(folder: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per op type and per (op type, layer) over `kernel_events`."""
    per_type: dict[str, float] = collections.defaultdict(float)
    per_layer: dict[str, float] = collections.defaultdict(float)
    for _, seconds, op_type, layer in kernel_events(folder):
        per_type[op_type] += seconds
        per_layer[f"{op_type} @ {layer}"] += seconds
    return per_type, per_layer


def summary(folder: Path, calls: int, top: int) -> dict:
    """Per-call seconds: total kernel time, per group, per op type (the `top` largest) and per (type, layer)."""
    per_type, per_layer = kernel_seconds(folder)
    if not per_type:
        raise SystemExit(f"op_profile: no kernel events in the traces under {folder}")
    groups: dict[str, float] = collections.defaultdict(float)
    for op_type, s in per_type.items():
        groups[group_of(op_type)] += s

    def per_call(d: dict[str, float], n: int | None = None) -> dict[str, float]:
        items = sorted(d.items(), key=lambda kv: -kv[1])[:n]
        return {k: round(v / calls, 4) for k, v in items}

    return {"kernel_s_per_step": round(sum(per_type.values()) / calls, 3), "per_group_s_per_step": per_call(groups),
            "per_type_s_per_step": per_call(per_type, top), "per_layer_s_per_step": per_call(per_layer, top)}


def run(args, precision: str) -> dict:
    """One traced train_step.py worker at `precision`; its step time and kernel breakdown."""
    with tempfile.TemporaryDirectory(prefix="op_profile_") as tmp:
        conf = {"stage": args.stage, "precision": precision, "batch": args.batch, "layout": args.layout,
                "batch_norm": args.batch_norm, "trace_dir": tmp}
        cmd = train_step.worker_cmd(conf, args.size, args.threads, 1, args.steps, args.warmup)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not records:
            raise SystemExit(f"op_profile: the traced run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        rec = records[-1]
        conf.pop("trace_dir")
        out = summary(Path(tmp), args.steps, args.top)
    return {**conf, "traced_median_step_s": round(rec["median_s"], 3), **out,
            "kernel_share": round(out["kernel_s_per_step"] / rec["median_s"], 3),
            "foreign_cpu_frac": rec.get("foreign_cpu_frac"), "tf": rec.get("tf")}


def run_infer(args, precision: str) -> dict:
    """Inference at batch 1 of the stage as `export` serves it (`optimize.frozen_stage`: BatchNorm folded, frozen,
    in `precision`), its --steps timed calls traced in this process; step time and kernel breakdown."""
    import time

    import tensorflow as tf

    from covidseg_tf.optimize import frozen_stage

    model, x = infer.trained_like_stage(args.stage, args.size, args.seed, args.layout)
    stage = frozen_stage(model, precision, args.size)
    for _ in range(args.warmup + 1):
        stage(x)[0].numpy()
    times = []
    with tempfile.TemporaryDirectory(prefix="op_profile_") as tmp:
        tf.profiler.experimental.start(tmp)
        for _ in range(args.steps):
            t = time.perf_counter()
            stage(x)[0].numpy()
            times.append(time.perf_counter() - t)
        tf.profiler.experimental.stop()
        out = summary(Path(tmp), args.steps, args.top)
    median = sorted(times)[len(times) // 2]
    return {"stage": args.stage, "mode": "infer", "precision": precision, "batch": 1, "bn_statistics": "random",
            "traced_median_step_s": round(median, 4), **out,
            "kernel_share": round(out["kernel_s_per_step"] / median, 3)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["lung", "infection"], default="infection")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["bf16"])
    p.add_argument("--batch-norm", choices=["keras", "fused"], default="fused")
    p.add_argument("--layout", default="segmentation_models_pytorch")
    p.add_argument("--mode", choices=["train", "infer"], default="train",
                   help="train: train_step.py's training step (a subprocess); infer: batch-1 inference of the frozen "
                   "stage export serves, in this process")
    p.add_argument("--steps", type=int, default=3, help="traced calls")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="--mode infer: the seed of the weights and BatchNorm statistics")
    p.add_argument("--top", type=int, default=25, help="how many op types and (type, layer) rows to keep")
    p.add_argument("--json-out", type=Path, default=None, help="append the JSON line to this file")
    p.add_argument("--from-trace", type=Path, default=None, help="summarize this saved trace folder instead")
    p.add_argument("--calls", type=int, default=1, help="with --from-trace: the calls the trace covers")
    args = p.parse_args(argv)
    if args.from_trace is not None:
        result = {"script": "op_profile", "trace": str(args.from_trace), **summary(args.from_trace, args.calls,
                                                                                    args.top)}
    else:
        if args.mode == "infer":
            common.configure_tf(args.threads, 1)
        result = {"script": "op_profile", "mode": args.mode, "size": args.size, "threads": args.threads,
                  "runs": [(run_infer if args.mode == "infer" else run)(args, precision)
                           for precision in args.precision]}
    common.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
