#!/usr/bin/env python3
"""How much of one training step runs inside oneDNN primitives, and which: one training run with ONEDNN_VERBOSE=1
per side, its primitive execution times summed per kind and per (kind, propagation, implementation) and divided
by the number of steps the run made, against the median step time. The rest of the step is the framework's own
kernels (element-wise ops, reductions, the optimizer) and overhead.

Sides: `ours` is one `train_step.py` worker (train_on_batch: tracing call + --warmup + --steps calls); `peer` is the
PyTorch peer's smp_bench.py training run (--warmup + --steps calls) in channels_last, fp32 or (--precision bf16)
bf16 autocast, the same as compare_peer.py runs it. Both link oneDNN, so the breakdowns show whether the two sides
run the same convolution primitives and where the time outside them goes. The first call also creates the
primitives, so the shares are slight overestimates. Set TF_ENABLE_ONEDNN_OPTS=0 to see TensorFlow without its oneDNN
kernels (the package turns them on; TF alone does so only on CPUs with AVX-512 VNNI / BF16 or AMX). Prints ONE JSON
line.

  python bench/onednn_share.py --stage infection --size 256 --batch 8 --batch-norm fused
  python bench/onednn_share.py --stage infection --size 256 --batch 8 --side ours peer
  # the breakdown of a saved ONEDNN_VERBOSE=1 log of N primitive-running calls (e.g. N training steps)
  python bench/onednn_share.py --from-log verbose.log --calls N
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import compare_peer  # noqa: E402
import train_step  # noqa: E402


def onednn_times(stdout: str) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of primitive execution in ONEDNN_VERBOSE output: per kind, and per kind/propagation/implementation."""
    per_kind: dict[str, float] = collections.defaultdict(float)
    per_impl: dict[str, float] = collections.defaultdict(float)
    for line in stdout.splitlines():
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "exec" not in fields:
            continue
        i = fields.index("exec")
        try:
            seconds = float(fields[-1]) / 1e3
            kind, impl, prop = fields[i + 2], fields[i + 3], fields[i + 4]
        except (IndexError, ValueError):
            continue
        per_kind[kind] += seconds
        per_impl[f"{kind}/{prop}/{impl}"] += seconds
    return per_kind, per_impl


def breakdown(stdout: str, calls: int, top: int, digits: int = 3) -> dict:
    """`onednn_times` of ONEDNN_VERBOSE output per call: the total, per kind, and the `top` largest
    kind/propagation/implementation rows, in seconds rounded to `digits`."""
    per_kind, per_impl = onednn_times(stdout)
    return {"onednn_s_per_step": round(sum(per_kind.values()) / calls, digits),
            "per_kind_s_per_step": {k: round(v / calls, digits)
                                    for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
            "per_impl_s_per_step": {k: round(v / calls, digits)
                                    for k, v in sorted(per_impl.items(), key=lambda kv: -kv[1])[:top]}}


def run_side(side: str, args) -> dict:
    """One verbose training run of `side`; its step time and oneDNN breakdown per step."""
    if side == "ours":
        conf = {"stage": args.stage, "precision": args.precision, "batch": args.batch, "layout": args.layout,
                "batch_norm": args.batch_norm}
        cmd = train_step.worker_cmd(conf, args.size, args.threads, 1, args.steps, args.warmup)
        calls = 1 + args.warmup + args.steps
    else:
        layout = f"{args.precision}-cl"  # channels_last, fp32 or bf16 autocast: as compare_peer.py runs it
        conf = {"stage": args.stage, "layout": layout, "batch": args.batch}
        cmd = compare_peer.peer_train_cmd(args, args.stage, layout, args.size, args.batch, args.steps,
                                          args.warmup, "onednn_share")
        calls = args.warmup + args.steps
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ONEDNN_VERBOSE": "1"})
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not records:
        raise SystemExit(f"onednn_share: the {side} run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    rec = records[-1]
    onednn_s = sum(onednn_times(proc.stdout)[0].values()) / calls
    parts = breakdown(proc.stdout, calls, args.top)
    return {**conf, "median_step_s": round(rec["median_s"], 3), "onednn_s_per_step": parts["onednn_s_per_step"],
            "onednn_share": round(onednn_s / rec["median_s"], 3),
            "outside_onednn_s_per_step": round(rec["median_s"] - onednn_s, 3),
            "per_kind_s_per_step": parts["per_kind_s_per_step"], "per_impl_s_per_step": parts["per_impl_s_per_step"],
            "foreign_cpu_frac": rec.get("foreign_cpu_frac"), "tf": rec.get("tf")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", nargs="+", choices=["ours", "peer"], default=["ours"])
    p.add_argument("--stage", choices=["lung", "infection"], default="infection")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-norm", choices=["keras", "fused"], default="fused")
    p.add_argument("--layout", default="segmentation_models_pytorch")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12, help="how many kind/propagation/implementation rows to keep")
    p.add_argument("--peer-python", default=compare_peer.DEFAULT_PEER_PYTHON)
    p.add_argument("--peer-script", default=str(compare_peer.PEER_DIR / "smp_bench.py"))
    p.add_argument("--json-out", default=None, help="append the JSON line to this file")
    p.add_argument("--from-log", type=Path, default=None,
                   help="summarize this saved ONEDNN_VERBOSE=1 output instead of running a side (to the microsecond)")
    p.add_argument("--calls", type=int, default=1, help="with --from-log: the calls the log covers (per-call figures)")
    args = p.parse_args(argv)
    if args.from_log:
        result = {"script": "onednn_share", "log": str(args.from_log), "calls": args.calls,
                  **breakdown(args.from_log.read_text(), args.calls, args.top, digits=6)}
    else:
        result = {"script": "onednn_share", "size": args.size, "threads": args.threads,
                  "sides": {side: run_side(side, args) for side in args.side}}
    common.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
