#!/usr/bin/env python3
"""Keras' swish against `optimize.fusible_swish` in the inference copy, and then the faster layers (optimize's
`NearestUpSampling2D`, `WindowAveragePooling2D`, `MatMulConv2D`), one alternating run in one process: each stage
(random init, trained-like BatchNorm statistics as bench/infer.py gives them) folded and frozen three times: with
Keras' swish kept (its custom gradient's IdentityN blocks oneDNN's conv + bias + swish fusion), with the fusible
swish, and as `export` now builds it (fusible swish and the faster layers); then --rounds rounds of --calls batch-1
calls of each in turn. Prints ONE JSON line: per stage and precision the median call time of each, the ratios
fusible / Keras' swish (`ratio`) and export / fusible swish (`faster_layers_ratio`), and the largest output
differences.

  python bench/swish_fusion.py --size 256 --precision bf16 fp32
  python bench/swish_fusion.py --size 448 --stages infection --json-out bench/results/swish_fusion.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402  (covidseg_tf before TensorFlow: oneDNN on)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--stages", nargs="+", choices=["lung", "infection"], default=["lung", "infection"])
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["bf16", "fp32"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=10, help="timed calls per round and variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)
    tfinfo = common.configure_tf(args.threads, 1)
    import infer
    import numpy as np

    from covidseg_tf import optimize
    from covidseg_tf.activations import KERAS_SWISH, use_swish

    rows = []
    for stage in args.stages:
        model, x = infer.trained_like_stage(stage, args.size, args.seed)
        use_swish(model, KERAS_SWISH)  # built models train with xla_swish; this compares Keras' own
        for precision in args.precision:
            variants = {"keras_swish": optimize.frozen_stage(model, precision, args.size, fuse_swish=False,
                                                             faster_layers=False),
                        "fusible_swish": optimize.frozen_stage(model, precision, args.size, faster_layers=False),
                        "faster_layers": optimize.frozen_stage(model, precision, args.size)}
            times: dict[str, list[float]] = {k: [] for k in variants}
            for fn in variants.values():
                for _ in range(3):
                    fn(x)[0].numpy()
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    for _ in range(args.calls):
                        t = time.perf_counter()
                        fn(x)[0].numpy()
                        times[name].append(time.perf_counter() - t)
            med = {k: float(np.median(v)) for k, v in times.items()}
            outputs = [fn(x)[0].numpy() for fn in variants.values()]
            rows.append({"stage": stage, "precision": precision,
                         **{f"{k}_ms": round(1e3 * v, 2) for k, v in med.items()},
                         "ratio": round(med["fusible_swish"] / med["keras_swish"], 3),
                         "faster_layers_ratio": round(med["faster_layers"] / med["fusible_swish"], 3),
                         "max_abs_diff": float(np.abs(outputs[0] - outputs[1]).max()),
                         "max_abs_diff_faster_layers": float(np.abs(outputs[1] - outputs[2]).max())})
    result = {"script": "swish_fusion", "size": args.size, "threads": args.threads, "rows": rows,
              "tf": tfinfo, "machine": common.machine_info()}
    common.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
