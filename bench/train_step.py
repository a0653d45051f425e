#!/usr/bin/env python3
"""Training throughput per stage: the full Keras train step (forward, the stage's loss, backward, train's
optimizer (covidseg_tf.optimizers.make_optimizer: AdamW fused per variable) with the stage's weight decay /
clipnorm, the Dice/IoU metrics) on synthetic in-memory tensors, via model.train_on_batch (the same compiled
train_function model.fit runs). The first call (tracing) and --warmup calls are excluded; the median of --steps
timed calls gives images/s.

Every (stage, precision, batch) runs in its own subprocess, so peak RSS (resource.getrusage ru_maxrss) belongs
to that configuration alone, and a watchdog kills a child whose RSS passes the memory limit. `rss_phases_mib` says
where it was reached: the peak after TensorFlow and Keras are loaded (runtime), after the model is built and compiled
(model) and after the first, tracing step (first_step).

--max-batch: per stage and precision, double the batch from the largest --batch while the batch is predicted
(linear fit of peak RSS vs batch from the runs so far) to fit under --mem-limit-gib AND the memory available
right now (minus --mem-margin-gib: the box is shared), and report the largest batch that ran plus the
extrapolated largest batch for --mem-limit-gib.

--batch-norm: the BatchNorm implementation(s) of the models (StageConfig.batch_norm: keras, fused); given several,
each is run in turn for every stage and precision, and every record says which it used. --swish the same for the
encoder's swish (xla: `covidseg_tf.activations.xla_swish`, what models are built with; keras: Keras' own).

Prints ONE JSON line; --json-out appends it to a file.

Examples:
  python bench/train_step.py --size 448 --batch 4 --precision fp32 bf16 --json-out bench/results/train.jsonl
  python bench/train_step.py --size 448 --batch 4 --precision bf16 --max-batch --max-batch-steps 2
  python bench/train_step.py --size 128 --batch 2 --steps 2 --warmup 1            # quick smoke test
  python bench/train_step.py --size 256 --batch 16 --precision fp32 bf16 --batch-norm keras fused
  python bench/train_step.py --size 256 --batch 8 --precision bf16 fp32 --swish keras xla
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import models_util as mu  # noqa: E402

from covidseg_tf.config import BATCH_NORMS  # noqa: E402

SWISHES = ("xla", "keras")  # --swish: covidseg_tf.activations.xla_swish or Keras' own

log = logging.getLogger("bench.train_step")
GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--stages", nargs="+", choices=["lung", "infection"], default=["lung", "infection"])
    p.add_argument("--batch", type=int, nargs="+", default=[4])
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    p.add_argument("--jit", choices=["off", "on"], default="off", help="model.compile(jit_compile=...)")
    p.add_argument("--no-metrics", action="store_true", help="compile without the Dice/IoU metrics")
    p.add_argument("--keras-steps", action="store_true",
                   help="Keras' own train function, which keeps its traced graph (default: train's, "
                        "covidseg_tf.steps.release_traced_steps)")
    p.add_argument("--max-batch", action="store_true", help="find the largest batch by doubling (see above)")
    p.add_argument("--max-batch-steps", type=int, default=2, help="timed steps of the doubling runs")
    p.add_argument("--mem-limit-gib", type=float, default=24.0)
    p.add_argument("--mem-margin-gib", type=float, default=1.5,
                   help="keep this much of the currently available memory free for the other processes")
    p.add_argument("--seed", type=int, default=0)
    mu.add_layout_arg(p)
    p.add_argument("--batch-norm", nargs="+", choices=BATCH_NORMS, default=None,
                   help="BatchNorm implementation(s) (StageConfig.batch_norm); several are run in turn "
                        "(default: the stage config's)")
    p.add_argument("--swish", nargs="+", choices=SWISHES, default=None,
                   help="the encoder's swish: xla (covidseg_tf.activations.xla_swish, what build_unet gives) or "
                        "keras (Keras' own); several are run in turn for every stage and precision (default: xla)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON config of one run
    common.add_common_args(p)
    p.set_defaults(steps=5, warmup=2)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- worker
def worker(args, conf: dict) -> dict:
    """One (stage, precision, batch) run in this process."""
    tfinfo = common.configure_tf(args.threads, args.inter_threads, training=True)  # imported as train does
    import keras
    import numpy as np
    import tensorflow as tf

    from covidseg_tf.activations import KERAS_SWISH, use_swish, xla_swish
    from covidseg_tf.batchnorm import with_batch_norm
    from covidseg_tf.losses import make_loss
    from covidseg_tf.metrics import make_metrics
    from covidseg_tf.optimizers import make_optimizer
    from covidseg_tf.steps import release_traced_steps

    rss_phases = {"runtime": common.peak_rss_mib()}  # peak RSS so far after each phase: where the memory goes

    stage, prec, B, S = conf["stage"], conf["precision"], conf["batch"], args.size
    cfg = mu.stage_cfg(stage, S, conf.get("layout"))
    t = time.perf_counter()
    model = mu.build_stage(stage, S, prec, seed=args.seed, layout=cfg.unet_layout)
    model = with_batch_norm(model, conf.get("batch_norm") or cfg.batch_norm)  # keeps each layer's dtype policy
    if conf.get("swish") == "keras":
        use_swish(model, KERAS_SWISH)
    xla_swishes = sum(getattr(layer, "activation", None) is xla_swish for layer in model.layers)
    opt = make_optimizer(cfg)  # train's: FusedAdamW with the stage's weight decay and clipnorm
    if prec == "fp16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    model.compile(optimizer=opt, loss=make_loss(cfg), metrics=None if args.no_metrics else
                  make_metrics(cfg.threshold), jit_compile=args.jit == "on")
    if not args.keras_steps:
        release_traced_steps(model)  # as train does
    build_s = time.perf_counter() - t
    rss_phases["model"] = common.peak_rss_mib()
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(0, 255, (B, S, S, cfg.in_channels)).astype("float32")
    if cfg.in_channels == 4:
        x[..., 3] = rng.random((B, S, S)) > 0.5
    y = (rng.random((B, S, S, 1)) > 0.7).astype("float32")  # sparse-ish mask (as the peer)
    x, y = tf.constant(x), tf.constant(y)
    losses = []

    def step():
        out = model.train_on_batch(x, y)
        losses.append(float(out[0] if isinstance(out, (list, tuple)) else out))

    t = time.perf_counter()
    step()  # tracing + first step
    trace_s = time.perf_counter() - t
    rss_phases["first_step"] = common.peak_rss_mib()
    if args.wait_quiet > 0:
        common.wait_quiet(args.wait_quiet)
    if conf.get("trace_dir"):  # bench/op_profile.py: the timed calls under TensorFlow's profiler
        tf.profiler.experimental.start(conf["trace_dir"])
    tm = common.time_steps(step, conf.get("steps", args.steps), args.warmup, args.clean_stall,
                           args.clean_target, args.max_time)
    if conf.get("trace_dir"):
        tf.profiler.experimental.stop()
    rec = dict(conf, jit=args.jit, metrics=not args.no_metrics, keras_steps=args.keras_steps, build_s=round(build_s, 2),
               trace_s=round(trace_s, 2), **tm.summary(B))
    rec["loss_first"], rec["loss_last"] = losses[0], losses[-1]
    rec["nan_or_inf"] = any(v != v or abs(v) == float("inf") for v in losses)
    rec["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    rec["rss_phases_mib"] = {k: round(v, 1) for k, v in rss_phases.items()}
    rec["params"] = mu.param_count(model)
    rec["xla_swish_layers"] = xla_swishes
    rec["tf"] = tfinfo
    return rec


# ----------------------------------------------------------------------------------------------- parent
def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def worker_cmd(conf: dict, size: int, threads: int, inter_threads: int, steps: int, warmup: int,
               *extra: str) -> list[str]:
    """The command that runs one configuration `conf` (stage, precision, batch, ...) as a worker process."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(conf), "--size", str(size),
            "--threads", str(threads), "--inter-threads", str(inter_threads), "--steps", str(steps),
            "--warmup", str(warmup), *extra]


def run_child(args, conf: dict, limit_bytes: int) -> dict:
    """Run one configuration in a subprocess; kill it if its RSS passes limit_bytes."""
    import psutil

    cmd = worker_cmd(conf, args.size, args.threads, args.inter_threads, args.steps, args.warmup,
                     "--clean-stall", str(args.clean_stall), "--clean-target", str(args.clean_target),
                     "--max-time", str(args.max_time), "--wait-quiet", str(args.wait_quiet), "--jit", args.jit,
                     "--seed", str(args.seed), *(["--no-metrics"] if args.no_metrics else []),
                     *(["--keras-steps"] if args.keras_steps else []))
    log.info("run %s", conf)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    killed, max_rss = False, 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
            max_rss = max(max_rss, rss)
            if rss > limit_bytes:
                proc.kill()
                killed = True
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = f"killed: RSS passed the limit {limit_bytes / GIB:.1f} GiB" if killed else \
        f"exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"
    return dict(conf, error=reason, watchdog_max_rss_mib=round(max_rss / 2**20, 1))


def fit_line(points: list[tuple[int, float]]):
    """(intercept, slope) of peak RSS (MiB) vs batch from the last two points."""
    (b0, r0), (b1, r1) = points[-2], points[-1]
    slope = (r1 - r0) / (b1 - b0) if b1 != b0 else 0.0
    return r0 - slope * b0, slope


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        rec = worker(args, json.loads(args.worker))
        print(json.dumps(rec, default=str), flush=True)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    limit = int(args.mem_limit_gib * GIB)
    result = {"script": "train_step", "label": args.label, "size": args.size, "jit": args.jit,
              "metrics": not args.no_metrics, "keras_steps": args.keras_steps, "results": [], "max_batch": {}}
    result["layouts"], result["batch_norms"] = {}, {}
    runs = [(stage, prec, bn, swish) for stage in args.stages for prec in args.precision
            for bn in args.batch_norm or [mu.stage_cfg(stage, args.size).batch_norm] for swish in args.swish or ["xla"]]
    for stage, prec, batch_norm, swish in runs:
        layout = result["layouts"][stage] = mu.stage_cfg(stage, args.size, args.layout).unet_layout
        result["batch_norms"][stage] = list(dict.fromkeys([*result["batch_norms"].get(stage, []), batch_norm]))
        label = f"{stage} {prec}" + (f" {batch_norm}" if args.batch_norm else "") + (f" {swish}" if args.swish else "")
        points = []
        for B in args.batch:
            rec = run_child(args, {"stage": stage, "precision": prec, "batch": B, "layout": layout,
                                  "batch_norm": batch_norm, "swish": swish}, limit)
            result["results"].append(rec)
            if "peak_rss_mib" in rec:
                points.append((B, rec["peak_rss_mib"]))
            log.info("%s b%d: %s img/s, peak RSS %s MiB, foreign cpu %s", label, B,
                     rec.get("images_per_s"), rec.get("peak_rss_mib"), rec.get("foreign_cpu_frac"))
        if not args.max_batch or not points:
            continue
        B = max(b for b, _ in points)
        largest_ok, stop = B, None
        while True:
            B *= 2
            avail = mem_available_bytes() - args.mem_margin_gib * GIB
            budget = min(limit, avail + 0)  # this process is small; children are gone between runs
            if len(points) >= 2:
                a, k = fit_line(points)
                predicted = (a + k * B) * 2**20
            else:  # one point: assume RSS grows proportionally above a 2 GiB base
                base = 2048.0
                predicted = (base + (points[-1][1] - base) * B / points[-1][0]) * 2**20
            if predicted > budget:
                stop = (f"batch {B} predicted {predicted / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB "
                        f"(limit {args.mem_limit_gib} GiB, available now {avail / GIB:.1f} GiB after margin)")
                break
            rec = run_child(args, {"stage": stage, "precision": prec, "batch": B, "layout": layout,
                               "batch_norm": batch_norm, "swish": swish, "steps": args.max_batch_steps}, int(budget))
            rec["max_batch_search"] = True
            result["results"].append(rec)
            log.info("%s b%d: %s img/s, peak RSS %s MiB", label, B, rec.get("images_per_s"),
                     rec.get("peak_rss_mib"))
            if "error" in rec:
                stop = f"batch {B}: {rec['error']}"
                break
            points.append((B, rec["peak_rss_mib"]))
            largest_ok = B
        est = None
        if len(points) >= 2:
            a, k = fit_line(points)
            if k > 0:
                est = int((args.mem_limit_gib * 1024 - a) / k)
        key = f"{stage}/{prec}" + (f"/{batch_norm}" if args.batch_norm else "") + (f"/{swish}" if args.swish else "")
        result["max_batch"][key] = {
            "largest_run": largest_ok, "stopped": stop,
            "rss_fit_mib": {"intercept": round(fit_line(points)[0], 1), "per_image": round(fit_line(points)[1], 1)}
            if len(points) >= 2 else None,
            f"extrapolated_max_batch_{args.mem_limit_gib:g}gib": est}
    result["contended_any"] = any(r.get("contended") for r in result["results"])
    result["machine"] = common.machine_info()
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
