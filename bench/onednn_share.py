#!/usr/bin/env python3
"""How much of one training step runs inside oneDNN primitives: one `train_step.py` worker run (one stage,
precision, BatchNorm, batch) with ONEDNN_VERBOSE=1, its primitive execution times summed per kind and divided by
the number of train_on_batch calls it made (tracing call + --warmup + --steps), against the median step time.
The rest of the step is TensorFlow's own kernels (element-wise ops, reductions, the optimizer) and overhead.
The first call also creates the primitives, so the share is a slight overestimate. Set TF_ENABLE_ONEDNN_OPTS
to compare TensorFlow's oneDNN kernels on and off (TF turns them on by default only on CPUs with AVX-512 VNNI /
BF16 or AMX: off on an AVX2-only Zen 3). Prints ONE JSON line.

  python bench/onednn_share.py --stage infection --size 256 --batch 8 --batch-norm fused
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["lung", "infection"], default="infection")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-norm", choices=["keras", "fused"], default="fused")
    p.add_argument("--layout", default="segmentation_models_pytorch")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    conf = {"stage": args.stage, "precision": args.precision, "batch": args.batch, "layout": args.layout,
            "batch_norm": args.batch_norm}
    cmd = [sys.executable, str(HERE / "train_step.py"), "--worker", json.dumps(conf), "--size", str(args.size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--inter-threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ONEDNN_VERBOSE": "1"})
    per_kind: dict[str, float] = collections.defaultdict(float)
    for line in proc.stdout.splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in fields:
            i = fields.index("exec")
            try:
                per_kind[fields[i + 2]] += float(fields[-1]) / 1e3
            except (IndexError, ValueError):
                continue
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not records:
        raise SystemExit(f"train_step.py failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    rec = records[-1]
    calls = 1 + args.warmup + args.steps
    onednn_s = sum(per_kind.values()) / calls
    result = {"script": "onednn_share", **conf, "size": args.size, "threads": args.threads,
              "median_step_s": rec["median_s"], "onednn_s_per_step": round(onednn_s, 3),
              "onednn_share": round(onednn_s / rec["median_s"], 3),
              "per_kind_s_per_step": {k: round(v / calls, 3)
                                      for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
              "foreign_cpu_frac": rec.get("foreign_cpu_frac"), "tf": rec.get("tf")}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
