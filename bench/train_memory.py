#!/usr/bin/env python3
"""Where the peak RSS of training goes (issue 26): per stage, in a fresh subprocess each, the RSS high-water mark
(/proc/self/status VmHWM) and the current RSS (VmRSS) after each phase, and from the runtime phase on the MiB of
tensors TensorFlow's CPU allocator holds, now and at most so far ("tensors", "tensors_peak"):

  runtime     TensorFlow, Keras and the package's training modules imported (covidseg_tf.train, .data, .models, ...),
              TensorFlow as train imports it (without Keras' optional pandas / IPython; --env
              COVIDSEG_OPTIONAL_IMPORTS=keep: with them)
  pipeline    (--input data|pipeline) the TFDS builder opened, the Stage-1 mask table made (infection stage,
              --lung-model), the training pipeline built as covidseg_tf.train builds it
  data        (--input data) --data-batches batches drawn through that pipeline, no model: the tf.data share
  model       the stage model built (random init) and compiled as covidseg_tf.train compiles it (its optimizer,
              the stage's loss and Dice/IoU metrics, the step functions of covidseg_tf.steps, which drop the graph
              they were traced in; --keras-steps: Keras' own, which keep it)
  traced      (--trace-apart) the training step traced as a tf.function over model.train_step (what
              train_on_batch runs) but not yet run: the graph as Python and TensorFlow hold it; the record's
              graph_ops counts its ops by name scope
  first_step  the first training step (tracing included, but with --trace-apart)
  steady      after --warmup more steps and --steps timed ones (median step time, and the process's CPU seconds
              per timed step: less disturbed by other processes than the wall time)
  trimmed     then gc.collect() and glibc malloc_trim(0): the RSS still live (not a peak; steady's VmRSS minus
              this is free memory the allocators held)

--input synthetic: model.train_on_batch on one fixed in-memory batch (as bench/train_step.py, the figure
bench/compare_peer.py compares with the peer's); --input pipeline: model.fit over the real training pipeline
(covidseg_tf.data.make_pipeline on the TFDS data, augmentation, shuffle, prefetch), the step time from a callback;
--input data: the pipeline alone. A lever is one change from the defaults: --env KEY=VALUE (e.g. MALLOC_ARENA_MAX=2,
LD_PRELOAD=..., TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1, COVIDSEG_OPTIONAL_IMPORTS=keep), --keras-steps, --remat-encoder,
--jit, --steps-per-execution, --no-metrics, --pipeline KEY=VALUE (keywords of make_pipeline, e.g.
shuffle_buffer=256). Step times share the box with whatever else runs (foreign_cpu_frac says how much): compare them
only within one alternating run.

Prints ONE JSON line; --json-out appends it to a file (bench/results/train_memory.jsonl).

Examples:
  python bench/train_memory.py --size 256 --batch 16 --lever baseline --json-out bench/results/train_memory.jsonl
  python bench/train_memory.py --lever malloc_arena_2 --env MALLOC_ARENA_MAX=2
  python bench/train_memory.py --size 256 --batch 16 --precision bf16 --lever keras_steps --keras-steps
  python bench/train_memory.py --input data --data-batches 240 --stages infection \\
      --lung-model runs/lung/model.keras --lever data_only
  python bench/train_memory.py --size 64 --batch 1 --trace-apart   # the graph's share: tensors are small here
  python bench/train_memory.py --size 256 --batch 16 --precision bf16 --stages infection --inter-threads 1 \\
      --timeline --env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1
  python bench/train_memory.py --size 64 --batch 2 --steps 1 --warmup 0          # quick smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

log = logging.getLogger("bench.train_memory")
_IN_USE = b"generic.current_allocated_bytes"  # tcmalloc's bytes handed out now
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--stages", nargs="+", choices=["lung", "infection"], default=["lung", "infection"])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--input", choices=["synthetic", "pipeline", "data"], default="synthetic")
    p.add_argument("--lever", default="baseline", help="name of the change measured (copied into the JSON)")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="environment of the worker")
    p.add_argument("--pipeline", nargs="*", default=[], metavar="KEY=VALUE",
                   help="keywords of covidseg_tf.data.make_pipeline (ints), e.g. shuffle_buffer=256")
    p.add_argument("--remat-encoder", type=int, default=None, metavar="THRESHOLD",
                   help="keras RematScope(mode='larger_than', output_size_threshold=THRESHOLD) on the encoder's "
                        "layers but its BatchNorms (elements per output, batch excluded)")
    p.add_argument("--jit", choices=["off", "on"], default="off")
    p.add_argument("--steps-per-execution", type=int, default=1, help="(--input pipeline) model.compile's")
    p.add_argument("--optimizer", choices=["keras", "fused"], default="fused",
                   help="covidseg_tf.optimizers.FusedAdamW (train's, default) or keras.optimizers.AdamW (before "
                        "issue 26)")
    p.add_argument("--no-metrics", action="store_true", help="compile without the Dice/IoU metrics")
    p.add_argument("--keras-steps", action="store_true",
                   help="Keras' own train function, which keeps its traced graph (default: train's, "
                        "covidseg_tf.steps.release_traced_steps)")
    p.add_argument("--timeline", action="store_true",
                   help="(--input synthetic, under tcmalloc) one more step with tcmalloc's bytes in use sampled every "
                        "0.5 ms and its kernels traced: when the step peaks and which layer runs then (record "
                        "'timeline')")
    p.add_argument("--trace-apart", action="store_true",
                   help="(--input synthetic) trace the training step before it first runs: phase 'traced' and "
                        "graph_ops (see above)")
    p.add_argument("--grappler", nargs="*", default=[], metavar="OPTION=0|1",
                   help="tf.config.optimizer.set_experimental_options, e.g. disable_meta_optimizer=1")
    p.add_argument("--decoded-cache", action="store_true",
                   help="(--input data|pipeline) cache decoded examples (load_split(decode=True), before issue 26) "
                        "instead of their PNG bytes (as covidseg_tf.train does)")
    p.add_argument("--data-batches", type=int, default=240, help="(--input data) batches drawn")
    p.add_argument("--dataset", default="covid_qu_ex/infection")
    p.add_argument("--data-dir", default="/work/tfds")
    p.add_argument("--manual-dir", default=str(REPO.parent / "shared" / "covidqu"))
    p.add_argument("--lung-model", default=None,
                   help="(infection stage, --input data|pipeline) Stage-1 model.keras: the lung channel, as "
                        "train --lung-model (else the ground-truth lung masks)")
    p.add_argument("--stage1-cache", default="/tmp/train_memory/stage1_masks",
                   help="folder of the Stage-1 mask cache (train's <output>/stage1_masks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    common.add_common_args(p)
    p.set_defaults(steps=4, warmup=2)
    args = p.parse_args(argv)
    if args.timeline and args.input != "synthetic":
        p.error(f"--timeline times train_on_batch's step; --input {args.input} runs model.fit (use synthetic)")
    if args.trace_apart and args.input != "synthetic":
        p.error(f"--trace-apart traces train_on_batch's step; --input {args.input} runs model.fit (use synthetic)")
    return args


def rss_mib() -> dict[str, float]:
    """{"hwm": VmHWM, "rss": VmRSS} of this process, MiB; once TensorFlow is imported also "tensors" and
    "tensors_peak": the bytes TensorFlow's CPU allocator has handed out now and at most so far
    (`tf.config.experimental.get_memory_info`): live tensors, without what the allocators keep free, the runtime,
    the graphs and the kernels; under tcmalloc also `tcmalloc_mib`."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line[2:5].lower()] = round(int(line.split()[1]) / 1024, 1)
    if "tensorflow" in sys.modules:
        info = sys.modules["tensorflow"].config.experimental.get_memory_info("CPU:0")
        out.update(tensors=round(info["current"] / 2**20, 1), tensors_peak=round(info["peak"] / 2**20, 1))
    out.update(tcmalloc_mib())
    return out


@functools.cache
def _tcmalloc_property() -> Callable | None:
    """tcmalloc's MallocExtension_GetNumericProperty when it is preloaded, else None (looked up once)."""
    import ctypes

    return getattr(ctypes.CDLL(None), "MallocExtension_GetNumericProperty", None)


def _tcmalloc_value_mib(prop: bytes) -> float | None:
    """tcmalloc's numeric property `prop` in MiB; None without tcmalloc or when it does not know `prop`."""
    import ctypes

    get, value = _tcmalloc_property(), ctypes.c_size_t()
    return round(value.value / 2**20, 1) if get is not None and get(prop, ctypes.byref(value)) else None


def tcmalloc_mib() -> dict[str, float]:
    """Under a preloaded tcmalloc (which gives TensorFlow's tensors with TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1, when
    get_memory_info sees none): {"malloc_in_use": bytes handed out now, "malloc_heap": its heap, which it keeps
    (the peak of what was in use, plus its free lists)}; {} under another malloc."""
    values = {"malloc_in_use": _tcmalloc_value_mib(_IN_USE), "malloc_heap": _tcmalloc_value_mib(b"generic.heap_size")}
    return {key: value for key, value in values.items() if value is not None}


def step_timeline(step, points: int = 20) -> dict:
    """One call of `step` with tcmalloc's bytes in use sampled every 0.5 ms by a thread and its kernels traced by
    TensorFlow's profiler (bench/op_profile.py reads the trace): "before" (MiB in use before the step), "peak_mib"
    and "peak_at" (its fraction of the step), "peak_layer" (the layer whose kernel started last before the peak),
    and "curve": [fraction, MiB in use, layer] at `points` + 1 even steps through the step. The profiler's clock is
    aligned on the step's first kernel, so a layer is where the step was to within a kernel or so."""
    import bisect
    import tempfile
    import threading

    import op_profile
    import tensorflow as tf

    if _tcmalloc_value_mib(_IN_USE) is None:
        return {"error": "not under tcmalloc (LD_PRELOAD it, and TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1)"}
    samples: list[tuple[int, float]] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.time_ns(), _tcmalloc_value_mib(_IN_USE)))
            time.sleep(0.0005)

    with tempfile.TemporaryDirectory(prefix="timeline_") as tmp:
        tf.profiler.experimental.start(tmp)
        thread = threading.Thread(target=sample)
        thread.start()
        t0 = time.time_ns()
        step()
        t1 = time.time_ns()
        done.set()
        thread.join()
        tf.profiler.experimental.stop()
        kernels = sorted((start, layer) for start, _, _, layer in op_profile.kernel_events(Path(tmp)))
    shift = t0 - kernels[0][0] if kernels else 0
    starts = [t + shift for t, _ in kernels]

    def layer_at(t: int) -> str:
        i = bisect.bisect_right(starts, t) - 1
        return kernels[i][1] if i >= 0 else ""

    def at(fraction: float) -> tuple[int, float]:
        t = t0 + (t1 - t0) * fraction
        return min(samples, key=lambda s: abs(s[0] - t))

    peak = max(samples, key=lambda s: s[1])
    return {"before": samples[0][1], "peak_mib": peak[1], "peak_at": round((peak[0] - t0) / (t1 - t0), 3),
            "peak_layer": layer_at(peak[0]), "step_s": round((t1 - t0) / 1e9, 3), "samples": len(samples),
            "curve": [[i / points, at(i / points)[1], layer_at(at(i / points)[0])] for i in range(points + 1)]}


def traced_step(model, data: tuple, phases: dict, rec: dict):
    """`model.train_step` on `data` as a tf.function (what train_on_batch runs), traced and not yet run: adds the
    phase "traced" and rec["graph_ops"], the traced graph's ops by name scope (model: the forward pass, gradient,
    optimizer, other: loss, metrics). Returns the step to call."""
    import collections

    import tensorflow as tf

    model._maybe_symbolic_build(data_batch=data)  # builds the optimizer and metrics, as train_on_batch does first
    fn = tf.function(model.train_step, reduce_retracing=True)
    graph = fn.get_concrete_function(data).graph
    phases["traced"] = rss_mib()
    scopes = ((model.name, "model"), ("gradient_tape", "gradient"), (model.optimizer.name, "optimizer"))

    def part(op_name: str) -> str:
        top = op_name.split("/")[0]  # a scope that is used again gets a suffix: lung_unet_1
        return next((p for scope, p in scopes if top == scope or top.startswith(scope + "_")), "other")

    ops = collections.Counter(part(op.name) for op in graph.get_operations())
    rec["graph_ops"] = dict(total=sum(ops.values()), **{k: ops[k] for k in ("model", "gradient", "optimizer",
                                                                            "other")})
    return lambda: fn(data)


# ----------------------------------------------------------------------------------------------- worker
def worker(args, stage: str) -> dict:
    phases: dict[str, dict[str, float]] = {}
    tfinfo = common.configure_tf(args.threads, args.inter_threads, training=True)  # imported as train does
    import keras
    import numpy as np
    import tensorflow as tf

    from covidseg_tf import data, train
    from covidseg_tf.config import default_config
    from covidseg_tf.models import build_stage_model
    from covidseg_tf.optimizers import make_optimizer
    from covidseg_tf.steps import release_traced_steps

    if args.grappler:
        options = common.key_values(args.grappler)
        tf.config.optimizer.set_experimental_options({k: bool(int(v)) for k, v in options.items()})
    phases["runtime"] = rss_mib()
    cfg = default_config(stage).replace(image_size=args.size, batch_size=args.batch, encoder_weights="none",
                                        dataset=args.dataset)
    keras.utils.set_random_seed(args.seed)
    rec: dict = {"stage": stage}
    train_ds = None
    if args.input in ("data", "pipeline"):
        builder = data.load_builder(cfg.dataset, args.data_dir, args.manual_dir)
        table = None
        if stage == "infection" and args.lung_model:
            lung = train._load_lung_model(Path(args.lung_model), cfg.image_size)  # kept alive, as train_stage does
            names, pngs = train.stage1_lung_masks(lung, Path(args.lung_model), builder, ("train", "validation"),
                                                  Path(args.stage1_cache), cfg.threshold, cfg.image_size)
            table = data.masks_lookup(names, pngs)
            rec["stage1_masks"] = {"n": len(pngs), "png_mib": round(sum(map(len, pngs)) / 2**20, 1)}
        examples = data.load_split(builder, "train", decode=args.decoded_cache)
        train_ds = data.make_pipeline(examples, cfg, training=True, seed=args.seed, stage1_masks=table, repeat=True,
                                      **{k: int(v) for k, v in common.key_values(args.pipeline).items()})
        phases["pipeline"] = rss_mib()
    if args.input == "data":
        t = time.perf_counter()
        n = 0
        for n, _ in enumerate(train_ds.take(args.data_batches), 1):
            if n == 1:
                phases["first_batch"] = rss_mib()
        rec["data_batches"], rec["data_s"] = n, round(time.perf_counter() - t, 1)
        phases["data"] = rss_mib()
        return dict(rec, rss_phases_mib=phases, peak_rss_mib=phases["data"]["hwm"], tf=tfinfo)

    keras.mixed_precision.set_global_policy({"fp32": "float32", "bf16": "mixed_bfloat16"}[args.precision])
    model = build_stage_model(cfg, encoder_weights=None)
    if args.remat_encoder is not None:  # set after the build: build_unet clones the model (fused BatchNorm)
        import math

        from covidseg_tf.models import ENCODER_PREFIXES

        # RematScope(mode="larger_than") itself fails in a TF graph ("'SymbolicTensor' object has no attribute
        # 'sparse'": it sizes the output with compute_output_spec on graph tensors), so its choice is made here
        # and given as mode="list_of_layers"; not the layers taking `training` (BatchNorm, Dropout): in a graph
        # tf.recompute_grad (tf.custom_gradient) takes no keyword arguments
        names = [layer.name for layer in model.layers if layer.name.startswith(ENCODER_PREFIXES)
                 and not getattr(layer, "_call_has_training_arg", True)
                 and not isinstance(layer, keras.layers.InputLayer)
                 and math.prod(d or 1 for d in layer.output.shape[1:]) > args.remat_encoder]
        with keras.RematScope(mode="list_of_layers", layer_names=names):
            from keras.src.backend.common.remat import get_current_remat_mode

            mode = get_current_remat_mode()
        for layer in model.layers:
            if layer.name in names:
                layer._remat_mode = mode
        rec["remat_layers"] = len(names)
    optimizer = keras.optimizers.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                       clipnorm=cfg.clipnorm) if args.optimizer == "keras" else make_optimizer(cfg)
    kw = train.compile_args(cfg)
    if args.no_metrics:
        kw.pop("metrics")
    model.compile(optimizer=optimizer, jit_compile=args.jit == "on", steps_per_execution=args.steps_per_execution,
                  **kw)
    if not args.keras_steps:
        release_traced_steps(model)  # as train does (--trace-apart traces a tf.function of its own)
    phases["model"] = rss_mib()

    times: list[float] = []
    if args.input == "synthetic":
        rng = np.random.default_rng(args.seed)
        x = rng.uniform(0, 255, (args.batch, args.size, args.size, cfg.in_channels)).astype("float32")
        if cfg.in_channels == 4:
            x[..., 3] = rng.random((args.batch, args.size, args.size)) > 0.5
        y = (rng.random((args.batch, args.size, args.size, 1)) > 0.7).astype("float32")
        x, y = tf.constant(x), tf.constant(y)
        if args.trace_apart:
            step = traced_step(model, (x, y, None), phases, rec)
        else:
            def step():
                return model.train_on_batch(x, y)
        step()
        phases["first_step"] = rss_mib()
        cpu = []
        tm = common.time_steps(lambda: (step(), cpu.append(common._self_cpu_s())), args.steps,
                               args.warmup, args.clean_stall, 0, args.max_time)
        times = tm.times
        rec["cpu_s_per_step"] = round((cpu[-1] - cpu[args.warmup - 1 if args.warmup else 0]) /
                                      max(1, len(cpu) - max(args.warmup, 1)), 3)
        rec.update(foreign_cpu_frac=tm.foreign_cpu_frac, psi_stall_frac=tm.psi_stall_frac)
    else:
        spe = args.steps_per_execution
        marks: list[float] = []
        cpu: list[float] = []

        class Timer(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                marks.append(time.perf_counter())
                cpu.append(common._self_cpu_s())
                if len(marks) == 1:
                    phases["first_step"] = rss_mib()

        calls = 1 + args.warmup + args.steps  # executions of the train function
        busy0, cpu0 = common._proc_stat_busy(), common._self_cpu_s()
        model.fit(train_ds, epochs=1, steps_per_epoch=calls * spe, callbacks=[Timer()], verbose=0)
        times = [(b - a) / spe for a, b in zip(marks[args.warmup:], marks[args.warmup + 1:])]
        rec["cpu_s_per_step"] = round((cpu[-1] - cpu[args.warmup]) / (len(cpu) - 1 - args.warmup) / spe, 3)
        busy1, cpu1 = common._proc_stat_busy(), common._self_cpu_s()
        if busy0 and busy1 and busy1[1] > busy0[1]:
            total = busy1[1] - busy0[1]
            own = (cpu1 - cpu0) * os.sysconf("SC_CLK_TCK") / total
            rec["foreign_cpu_frac"] = round(max(0.0, (busy1[0] - busy0[0]) / total - own), 3)
    phases["steady"] = rss_mib()
    if args.timeline:  # after the peak was read: the profiler's buffers are not the step's
        rec["timeline"] = step_timeline(step)
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    phases["trimmed"] = rss_mib()  # what is left once Python's garbage and glibc's free pages are returned
    rec.update(median_step_s=round(statistics.median(times), 4), times_s=[round(t, 3) for t in times],
               peak_rss_mib=phases["steady"]["hwm"], rss_phases_mib=phases, params=model.count_params(),
               tf=tfinfo)
    return rec


# ----------------------------------------------------------------------------------------------- parent
def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, args.worker), default=str), flush=True)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    env = dict(os.environ, **common.key_values(args.env))
    result = {"script": "train_memory", "lever": args.lever, "label": args.label, "size": args.size,
              "batch": args.batch, "precision": args.precision, "input": args.input, "env": common.key_values(args.env),
              "pipeline": common.key_values(args.pipeline), "decoded_cache": args.decoded_cache,
              "remat_encoder": args.remat_encoder, "jit": args.jit,
              "steps_per_execution": args.steps_per_execution, "metrics": not args.no_metrics,
              "optimizer": args.optimizer, "grappler": common.key_values(args.grappler),
              "trace_apart": args.trace_apart, "keras_steps": args.keras_steps, "timeline": args.timeline,
              "steps": args.steps, "warmup": args.warmup, "results": []}
    argv = sys.argv[1:] if argv is None else list(argv)
    for stage in args.stages:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", stage]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            rec = json.loads(lines[-1])
        else:
            tail = proc.stderr.strip().splitlines()[-3:]
            rec = {"stage": stage, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        rec["wall_s"] = round(time.perf_counter() - t, 1)
        log.info("%s %s: peak %s MiB, step %s s", args.lever, stage, rec.get("peak_rss_mib"),
                 rec.get("median_step_s"))
        result["results"].append(rec)
    result["machine"] = common.machine_info()
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
