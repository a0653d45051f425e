#!/usr/bin/env python3
"""Cascade inference latency: Keras models (graph-compiled tf.function, fixed input signature) and exported
SavedModels (signature `predict_pixels`), fp32 and bf16, per stage and for the whole cascade.

For every precision x batch it times (median of --steps after tracing + --warmup calls):
  keras/lung       tf.function(model(x)), input_signature (B, S, S, 3), jit_compile per --jit
  keras/infection  same, (B, S, S, 4)
  keras/cascade    tf.function(Predictor(lung, infection).predict_pixels(pixels)): both stages + thresholds + severity
  savedmodel/cascade  covidseg_tf.export.export_cascade(precision=fp32|bf16) -> tf.saved_model.load ->
                      signatures["predict_pixels"] (BatchNorm folded + frozen, as the product serves it)
  savedmodel/lung, savedmodel/infection   (with --savedmodel-stages)
bf16 = the models built under keras' "mixed_bfloat16" policy (variables float32, compute bfloat16; the
preprocessing and the sigmoid stay float32, see covidseg_tf.models).

Also: forward FLOPs per image (conv/dense MACs x 2 from the layer shapes = the peer's counting rule, and the
tf.compat.v1 profiler's total over the frozen graph, which adds element-wise ops), parameters, peak RSS, and
the agreement with the fp32/plain model of every other precision/variant on the SAME weights (fp32 weights
copied into the bf16 model): max |p - p_fp32| of the probabilities and Dice between the thresholded masks, per
stage and for the cascade's masks, against a stated tolerance (TOL_* below).

Variants: plain = tf.function(model) as built; fast = BatchNorm folded into the convs (`optimize.fold_batchnorm`) +
the concrete function frozen (variables -> constants); tflite = the stages as `covidseg_tf.export --tflite` writes
them (`optimize.tflite_model`, float32, run by `inference.stages.TFLiteStage` on XNNPACK with --threads threads; fp32
only), the cascade's glue still in TensorFlow. Same outputs up to round-off (measured, see agreement).
tflite-int8 = Stage 1 as int8 TFLite (`optimize.tflite_model(mode="int8")`, calibrated on --calibration real X-rays
from --images, else noise), Stage 2 float32 TFLite: the mix that passes bench/int8_gate.py's accuracy gate.
tflite-int8-bf16 = that int8 Stage 1 with Stage 2 as the bf16 frozen graph `export --precision bf16` serves
(`optimize.frozen_stage`), listed under precision bf16: what `predict --lung-model <lung>/stage.tflite
--infection-model <bf16 infection version>` runs.

Prints ONE JSON line; --json-out appends it to a file.

Examples:
  python bench/infer.py --size 448 --batch 1 8 --precision fp32 bf16 --json-out bench/results/infer.jsonl
  python bench/infer.py --size 128 --batch 1 --steps 2 --warmup 1 --no-savedmodel      # quick smoke test
  python bench/infer.py --size 448 --batch 1 --precision bf16 --jit off on --no-savedmodel   # XLA vs not
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import models_util as mu  # noqa: E402

log = logging.getLogger("bench.infer")

# bf16 vs fp32 acceptance (stated tolerance, checked on the same weights and inputs; see bench/README.md)
# Stated tolerance of a precision/variant against fp32/plain on the same weights and inputs:
TOL_MAX_ABS_PROB = 0.01   # max |p - p_fp32| over all pixels, each stage on the same input: the acceptance test
TOL_MIN_MASK_DICE = 0.98  # Dice of the thresholded masks; only meaningful for trained weights (random-weight
#                           models put many pixels within 1e-3 of the threshold, where any rounding flips them)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    p.add_argument("--jit", nargs="+", choices=["off", "on"], default=["off"],
                   help="tf.function jit_compile (XLA) for the Keras functions")
    p.add_argument("--targets", nargs="*", choices=["lung", "infection", "cascade"],
                   default=["lung", "infection", "cascade"], help="Keras functions to time")
    p.add_argument("--variants", nargs="+", choices=["plain", "fast", "tflite", "tflite-int8", "tflite-int8-bf16"],
                   default=["plain", "fast"],
                   help="plain: tf.function(model) as built; fast: BatchNorm folded into the convs "
                        "(covidseg_tf.optimize.fold_batchnorm) and the concrete function frozen (variables -> "
                        "constants); tflite: float32 TFLite stages (fp32 only); tflite-int8: Stage 1 int8 TFLite, "
                        "Stage 2 float32 TFLite (fp32 only); tflite-int8-bf16: Stage 1 int8 TFLite, Stage 2 the "
                        "bf16 frozen graph (bf16 only)")
    p.add_argument("--calibration", type=int, default=32,
                   help="X-rays from --images that calibrate the tflite-int8 variant's Stage 1")
    p.add_argument("--no-savedmodel", action="store_true", help="skip the SavedModel export + timing")
    p.add_argument("--savedmodel-stages", action="store_true",
                   help="also export/time the lung and infection servables (cascade only by default)")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--lung-model", default=None, help="trained Stage-1 .keras to take weights from (optional)")
    p.add_argument("--infection-model", default=None, help="trained Stage-2 .keras (optional)")
    p.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "covidqu"),
                   help="folder searched for *.png X-rays for the accuracy check (random pixels if none)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--keep-bn-init", action="store_true",
                   help="keep the identity BatchNorm statistics of random init (default: randomize them, "
                        "see randomize_bn_statistics)")
    p.add_argument("--seed", type=int, default=0)
    mu.add_layout_arg(p)
    common.add_common_args(p)
    return p.parse_args(argv)


def _sample_pixels(folder: str, n: int, size: int, seed: int):
    """(n, S, S, 3) float32 0..255 from up to n real X-rays under `folder` (else uniform noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    files = sorted(p for p in Path(folder).rglob("*.png") if p.parent.name == "images")[:4000] \
        if Path(folder).is_dir() else []
    if not files:
        return rng.uniform(0, 255, (n, size, size, 3)).astype("float32"), "uniform-noise"
    from PIL import Image

    pick = [files[i] for i in rng.choice(len(files), size=min(n, len(files)), replace=False)]
    arrs = [np.asarray(Image.open(f).convert("L").resize((size, size), Image.BILINEAR), dtype="float32")
            for f in pick]
    x = np.repeat(np.stack(arrs)[..., None], 3, axis=-1)
    return x, f"{len(pick)} png from {folder}"


def randomize_bn_statistics(pair, seed: int, which=(True, True)) -> None:
    """Give the BatchNorm layers of randomly initialised models non-trivial statistics (at init they are the
    identity: mean 0, variance 1, gamma 1, beta 0), so the BN-folding check (variant "fast") and the
    probabilities are not degenerate. Deterministic in `seed`; trained models (--lung-model ...) are left alone."""
    import keras
    import numpy as np

    for model, do in zip(pair, which):
        if not do:
            continue
        rng = np.random.default_rng(seed)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                n = layer.moving_mean.shape
                layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
                layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
                layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
                layer.beta.assign(rng.normal(0, 0.1, n).astype("float32"))


def trained_like_stage(stage: str, size: int, seed: int = 0, layout: str | None = None):
    """(model, pixels): the stage at `size` px, random init with trained-like BatchNorm statistics
    (`randomize_bn_statistics`: identity statistics fold into zero biases, which grappler drops, and every fusion of
    an activation into its convolution with them), and one (1, S, S, C) float32 noise image to time it on."""
    import numpy as np
    import tensorflow as tf

    model = mu.build_stage(stage, size, "fp32", seed=seed, layout=layout)
    randomize_bn_statistics([model], seed)
    channels = int(model.inputs[0].shape[-1])
    pixels = np.random.default_rng(0).uniform(0, 255, (1, size, size, channels)).astype("float32")
    return model, tf.constant(pixels)


def _dice(a, b) -> float:
    s = float(a.sum() + b.sum())
    return 1.0 if s == 0 else float(2.0 * (a * b).sum() / s)


def _cascade_outputs(lung, inf, x, ref_lung_mask, threshold):
    import tensorflow as tf

    from covidseg_tf.inference.predictor import Predictor, run_stages

    f = tf.function(lambda px: Predictor(lung, inf, threshold).predict_pixels(px))
    out = {k: v.numpy() for k, v in f(x).items()}
    if ref_lung_mask is None:
        ref_lung_mask = out["lung_mask"]
    # stage 2 alone on the SAME lung channel (the reference lung mask), to isolate its own error
    same = run_stages(None, inf, x, threshold, lung_mask=ref_lung_mask)  # the mask of a head model too
    out["infection_prob_same_input"] = same["infection_prob"].numpy()
    return out


def agreement(reference, others, pixels, threshold):
    """Each of `others` {name: (lung, infection)} against `reference` (lung, infection) on the same inputs:
    per stage max/mean |dp|, Dice of the masks, and for the cascade mask Dice and severity difference."""
    import numpy as np
    import tensorflow as tf

    x = tf.constant(pixels)
    ref = _cascade_outputs(*reference, x, None, threshold)
    result = {}
    for name, pair in others.items():
        got = _cascade_outputs(*pair, x, ref["lung_mask"], threshold)
        out = {}
        for key in ("lung_prob", "infection_prob_same_input", "infection_prob"):
            d = np.abs(ref[key].astype("float64") - got[key].astype("float64"))
            near = np.abs(ref[key] - threshold) < max(float(d.max()), 1e-7)
            out[key] = {"max_abs": float(f"{d.max():.3g}"), "mean_abs": float(f"{d.mean():.3g}"),
                        "mask_dice": round(_dice(ref[key] >= threshold, got[key] >= threshold), 5),
                        "share_px_within_maxabs_of_threshold": round(float(near.mean()), 5)}
        out["cascade_lung_mask_dice"] = round(_dice(ref["lung_mask"], got["lung_mask"]), 5)
        out["cascade_infection_mask_dice"] = round(_dice(ref["infection_mask"], got["infection_mask"]), 5)
        out["severity_total_max_abs_pct"] = round(float(np.abs(ref["severity_total"] - got["severity_total"]).max()), 4)
        worst_abs = max(out[k]["max_abs"] for k in ("lung_prob", "infection_prob_same_input"))
        worst_dice = min(out[k]["mask_dice"] for k in ("lung_prob", "infection_prob_same_input"))
        out["within_tolerance"] = bool(worst_abs <= TOL_MAX_ABS_PROB)
        out["mask_dice_ok"] = bool(worst_dice >= TOL_MIN_MASK_DICE)
        result[name] = out
    result["reference"] = "fp32/plain"
    result["reference_prob_range"] = {k: [round(float(ref[k].min()), 4), round(float(ref[k].max()), 4)]
                                      for k in ("lung_prob", "infection_prob")}
    result["tolerance"] = {"max_abs_prob": TOL_MAX_ABS_PROB, "min_mask_dice": TOL_MIN_MASK_DICE,
                           "applies_to": "lung_prob and infection_prob_same_input (each stage on the same input); "
                           "within_tolerance = max_abs test, mask_dice_ok = Dice test (trained weights only)"}
    return result


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    tfinfo = common.configure_tf(args.threads, args.inter_threads)
    import numpy as np
    import tensorflow as tf

    from covidseg_tf.inference.predictor import Predictor

    S = args.size
    t0 = time.perf_counter()
    models = {}
    for prec in args.precision:
        models[prec] = (mu.build_stage("lung", S, prec, args.lung_model, args.seed, args.layout),
                        mu.build_stage("infection", S, prec, args.infection_model, args.seed, args.layout))
    if not args.keep_bn_init:
        for pair in models.values():
            if args.lung_model is None or args.infection_model is None:
                randomize_bn_statistics(pair, args.seed, (args.lung_model is None, args.infection_model is None))
    if "fp32" in models:  # the same weights in every precision
        for prec in models:
            if prec != "fp32":
                models[prec][0].set_weights(models["fp32"][0].get_weights())
                models[prec][1].set_weights(models["fp32"][1].get_weights())
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed)
    result = {"script": "infer", "label": args.label, "size": S, "threshold": args.threshold,
              "layouts": {stage: mu.stage_cfg(stage, S, args.layout).unet_layout for stage in ("lung", "infection")},
              "weights": {"lung": args.lung_model or "random", "infection": args.infection_model or "random"},
              "build_s": round(build_s, 2), "results": []}
    waited = common.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else (None, None)
    result["wait_quiet_s"], result["busy_before"] = round(waited[0] or 0, 1), waited[1]

    def timed(fn, x, **meta):
        t = time.perf_counter()
        fn(x)  # tracing + first run
        trace_s = time.perf_counter() - t
        tm = common.time_steps(lambda: fn(x), args.steps, args.warmup, args.clean_stall, args.clean_target,
                               args.max_time)
        rec = dict(meta, trace_s=round(trace_s, 2), **tm.summary(meta["batch"]))
        rec["per_image_s"] = round(rec["median_s"] / meta["batch"], 5)
        result["results"].append(rec)
        log.info("%s/%s %s %s b%d jit=%s: median %.4f s (foreign cpu %.2f)", meta["source"], meta["variant"],
                 meta["precision"], meta["target"], meta["batch"], meta.get("jit"), rec["median_s"],
                 rec["foreign_cpu_frac"] or 0)
        return rec

    def sync(outputs):  # block on one output (the call already is synchronous on CPU; this is belt and braces)
        if isinstance(outputs, dict):
            outputs = next(iter(outputs.values()))
        if isinstance(outputs, (list, tuple)):  # a frozen concrete function returns a flat list
            outputs = outputs[0]
        return outputs.numpy()

    fast = {}
    if "fast" in args.variants:
        from covidseg_tf.optimize import fold_batchnorm, foldable_pairs

        t = time.perf_counter()
        fast = {prec: (fold_batchnorm(lung), fold_batchnorm(inf)) for prec, (lung, inf) in models.items()}
        result["fold_s"] = round(time.perf_counter() - t, 1)
        result["folded_bn_pairs"] = {"lung": len(foldable_pairs(next(iter(models.values()))[0])),
                                     "infection": len(foldable_pairs(next(iter(models.values()))[1]))}

    tflite = {}
    if "tflite" in args.variants and "fp32" in models:
        from covidseg_tf.inference.stages import TFLiteStage
        from covidseg_tf.optimize import tflite_model

        t = time.perf_counter()
        tflite["fp32"] = tuple(TFLiteStage(tflite_model(m), threads=args.threads) for m in models["fp32"])
        result["tflite_convert_s"] = round(time.perf_counter() - t, 1)
    int8, mixed = {}, {}
    if {"tflite-int8", "tflite-int8-bf16"} & set(args.variants) and "fp32" in models:
        from covidseg_tf.inference.stages import TFLiteStage
        from covidseg_tf.optimize import frozen_stage, tflite_model

        t = time.perf_counter()
        lung_fp32, inf_fp32 = models["fp32"]
        calibration, result["int8_calibration"] = _sample_pixels(args.images, args.calibration, S, args.seed + 1)
        lung_int8 = TFLiteStage(tflite_model(lung_fp32, "int8", calibration), threads=args.threads)
        if "tflite-int8" in args.variants:
            int8["fp32"] = (lung_int8, tflite["fp32"][1] if "fp32" in tflite
                            else TFLiteStage(tflite_model(inf_fp32), threads=args.threads))
        if "tflite-int8-bf16" in args.variants and "bf16" in models:
            mixed["bf16"] = (lung_int8, frozen_stage(inf_fp32, "bf16", S))
        result["tflite_int8_convert_s"] = round(time.perf_counter() - t, 1)

    for prec, (lung, inf) in models.items():
        for B in args.batch:
            px = tf.constant(rng.uniform(0, 255, (B, S, S, 3)).astype("float32"))
            px4 = tf.concat([px, tf.cast(tf.random.uniform((B, S, S, 1), seed=1) > 0.5, tf.float32)], -1)
            s3, s4 = tf.TensorSpec([B, S, S, 3], tf.float32), tf.TensorSpec([B, S, S, 4], tf.float32)
            for variant in args.variants:
                stages = {"plain": (lung, inf), "fast": fast.get(prec), "tflite": tflite.get(prec),
                          "tflite-int8": int8.get(prec), "tflite-int8-bf16": mixed.get(prec)}[variant]
                if stages is None:  # a TFLite variant at a precision it does not have
                    continue
                a, b = stages
                for jit in args.jit:
                    jc, fz = jit == "on" and not variant.startswith("tflite"), variant == "fast"
                    if jc and fz:  # freezing rebuilds the graph without the XLA attribute: not a jit run
                        continue
                    for target in args.targets:
                        try:
                            if target == "lung":
                                fn, x = common.compiled(lambda v, m=a: m(v, training=False), s3, fz, jc), px
                            elif target == "infection":
                                fn, x = common.compiled(lambda v, m=b: m(v, training=False), s4, fz, jc), px4
                            else:
                                cascade = Predictor(a, b, args.threshold)
                                fn, x = common.compiled(lambda v, c=cascade: c.predict_pixels(v), s3, fz, jc), px
                            timed(lambda v, fn=fn: sync(fn(v)), x, source="keras", variant=variant,
                                  precision=prec, target=target, batch=B, jit=jit)
                        except Exception as e:  # noqa: BLE001  (e.g. XLA unsupported op): record, go on
                            result["results"].append({"source": "keras", "variant": variant, "precision": prec,
                                                      "target": target, "batch": B, "jit": jit,
                                                      "error": f"{type(e).__name__}: {e}"[:500]})
                            log.warning("%s %s %s b%d jit=%s failed: %s", variant, prec, target, B, jit, e)
        if not args.no_savedmodel:
            from covidseg_tf.export import export_cascade, export_stage

            # what covidseg_tf.export serves: BatchNorm folded, frozen, weights in `prec` (from the fp32 model)
            a, b = models.get("fp32", (lung, inf))
            if prec in ("fp32", "bf16"):
              with tempfile.TemporaryDirectory(prefix="bench_sm_") as tmp:
                t = time.perf_counter()
                paths = {"cascade": export_cascade(a, b, tmp, args.threshold, warmup=False, precision=prec)}
                if args.savedmodel_stages:
                    paths["lung"] = export_stage(a, "lung", tmp, args.threshold, warmup=False, precision=prec)
                    paths["infection"] = export_stage(b, "infection", tmp, args.threshold, warmup=False,
                                                      precision=prec)
                export_s = time.perf_counter() - t
                for target, path in paths.items():
                    t = time.perf_counter()
                    loaded = tf.saved_model.load(str(path))
                    sig = loaded.signatures["predict_pixels"]
                    load_s = time.perf_counter() - t
                    for B in args.batch:
                        px = tf.constant(rng.uniform(0, 255, (B, S, S, 3)).astype("float32"))
                        if target == "infection":
                            px = tf.concat([px, tf.ones((B, S, S, 1))], -1)
                        rec = timed(lambda v, sig=sig: sync(sig(pixels=v)), px, source="savedmodel",
                                    variant="fast", precision=prec, target=target, batch=B, jit="off")
                        rec["export_s_all"], rec["load_s"] = round(export_s, 1), round(load_s, 2)
                    del loaded, sig

    ref = models.get("fp32") or next(iter(models.values()))
    if not args.no_flops:
        fl = {}
        for stage, m in zip(("lung", "infection"), ref):
            c = int(m.inputs[0].shape[-1])
            f = tf.function(lambda x, m=m: m(x, training=False))
            fl[stage] = {"conv_dense_from_shapes": mu.conv_flops_per_image(m),
                         "tf_profiler_total": mu.profiler_flops(f, tf.TensorSpec([1, S, S, c], tf.float32)),
                         "params": mu.param_count(m)}
        fl["rule"] = ("conv_dense_from_shapes: 2 FLOPs per MAC of Conv2D/DepthwiseConv2D/Dense (the peer's "
                      "counting rule); tf_profiler_total: tf.compat.v1 profiler float_ops of the frozen batch-1 "
                      "graph (also counts BN, activations, adds)")
        result["flops_per_image"] = fl
    if not args.no_accuracy and "fp32" in models:
        others = {f"{p}/plain": m for p, m in models.items() if p != "fp32"}
        others.update({f"{p}/fast": m for p, m in fast.items()})
        others.update({f"{p}/tflite": m for p, m in tflite.items()})
        others.update({f"{p}/tflite-int8": m for p, m in int8.items()})
        others.update({f"{p}/tflite-int8-bf16": m for p, m in mixed.items()})
        if others:
            pixels, src = _sample_pixels(args.images, 4, S, args.seed)
            result["agreement_vs_fp32"] = agreement(models["fp32"], others, pixels, args.threshold)
            result["agreement_vs_fp32"]["inputs"] = src

    # summary: best batch-1 cascade time per source
    best = {}
    for r in result["results"]:
        if r.get("target") == "cascade" and r.get("batch") == 1 and "median_s" in r:
            key = r["source"]
            if key not in best or r["median_s"] < best[key]["median_s"]:
                best[key] = {"median_s": r["median_s"], "precision": r["precision"], "variant": r["variant"],
                             "jit": r["jit"], "foreign_cpu_frac": r["foreign_cpu_frac"]}
    result["best_cascade_b1"] = best
    result["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    result["contended_any"] = any(r.get("contended") for r in result["results"])
    result.update(tf=tfinfo, machine=common.machine_info())
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
