#!/usr/bin/env python3
"""One training op, forward + backward, in bfloat16, in float32 on a bfloat16 tensor (cast in and out), and in
float32: the measurement behind the layers covidseg_tf trains in float32 under mixed_bfloat16 (BatchNorm whose
channels are not a multiple of `batchnorm.BF16_KERNEL_CHANNELS`, depthwise convolutions whose kernels are not in
`models.BF16_DEPTHWISE_KERNELS`). oneDNN kernels on (covidseg_tf), --threads intra-op threads, 1 inter-op thread,
the median of --repeats calls after two untimed ones. Prints ONE JSON line.

Shapes: `bn:C:H` (FusedBatchNorm over batch x H x H x C) and `dw:C:H:K:S` (K x K depthwise convolution, stride S).

  python bench/bf16_kernels.py bn:24:128 bn:32:128 bn:40:128 dw:816:16:5:1 dw:144:64:3:1
  python bench/bf16_kernels.py --batch 8 dw:192:64:5:2 --json-out bench/results/bf16_kernels.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (imports covidseg_tf before TensorFlow: oneDNN on)
import tensorflow as tf  # noqa: E402

MODES = ("bf16", "cast32", "fp32")


def op(kind: str, dims: list[int]):
    """(input shape without batch, fn(x, weight) computing the op in x's dtype, weight shape)."""
    if kind == "bn":
        channels, size = dims

        def bn(x, gamma):
            return tf.compat.v1.nn.fused_batch_norm(x, gamma, tf.zeros_like(gamma), epsilon=1e-3, is_training=True)[0]

        return (size, size, channels), bn, (channels,)
    if kind == "dw":
        channels, size, k, stride = dims

        def dw(x, w):
            return tf.nn.depthwise_conv2d(x, tf.cast(w, x.dtype), [1, stride, stride, 1], "SAME")

        return (size, size, channels), dw, (k, k, channels, 1)
    raise SystemExit(f"bf16_kernels: unknown op kind {kind!r} (bn or dw)")


def time_op(spec: str, mode: str, batch: int, repeats: int) -> float:
    kind, *dims = spec.split(":")
    shape, fn, wshape = op(kind, [int(d) for d in dims])
    w = tf.Variable(tf.random.normal(wshape) * 0.1 + (1.0 if kind == "bn" else 0.0))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            if mode == "cast32":
                y = tf.cast(fn(tf.cast(x, tf.float32), w), tf.bfloat16)
            else:
                y = fn(x, w)
            loss = tf.reduce_sum(tf.cast(y, tf.float32))
        return tape.gradient(loss, [x, w])

    x = tf.cast(tf.random.normal((batch, *shape)), tf.float32 if mode == "fp32" else tf.bfloat16)
    for _ in range(2):
        step(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(x)[0].numpy()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", nargs="+", metavar="OP", help="bn:C:H or dw:C:H:K:S")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path, default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rows = [{"op": spec, **{f"{mode}_ms": round(1e3 * time_op(spec, mode, args.batch, args.repeats), 2)
                            for mode in MODES}} for spec in args.ops]
    result = {"script": "bf16_kernels", "batch": args.batch, "threads": args.threads, "rows": rows,
              "machine": common.machine_info()}
    common.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
