#!/usr/bin/env python3
"""Cascade inference as TFLite (XNNPACK), float32 and int8, against the TensorFlow graph the product serves.

Variants, each both stages of the cascade (`covidseg_tf.inference.predictor.run_stages`: Stage 1, threshold, Stage 2):
  tf_fp32         covidseg_tf.optimize.frozen_stage(model, "fp32"): BatchNorm folded, frozen (what export serves)
  tf_bf16         the same in bfloat16 (the shipped precision; emulated on CPUs without AVX512_BF16 or AMX)
  tflite_fp32     covidseg_tf.optimize.tflite_model, float32: what `covidseg_tf.export --tflite` writes
  tflite_dynamic  + Optimize.DEFAULT without calibration data: int8 weights, activations quantized on the fly
  tflite_int8     what `covidseg_tf.export --tflite int8` writes: int8 weights and activations, the input
                  preprocessing in float32, float32 input and output, calibrated on --calibration Train images
                  (Stage 2 with their Stage-1 masks, `optimize.calibration_pixels`); its accuracy gate under the
                  shipped decision: bench/int8_gate.py
  tflite_int8_lung  Stage 1 as tflite_int8, Stage 2 as tflite_fp32 (the mix that keeps int8_gate.py's gate)
Accuracy, on --images Val images spread over the split (every k-th): max |p - p_tf_fp32| of each stage's
probabilities and pooled lung / infection Dice at the images' own size (threshold 0.5 for both, no image-level
rule), and each variant's Dice minus tf_fp32's. Speed: batch 1, one cascade call per image, the variants timed
in turn (--rounds rounds of every variant), so their ratios hold on a busy machine; the absolute times do not.
--pause-pgid stops that process group (e.g. a training run) for the timing loop alone and always resumes it.
Prints ONE JSON line; --json-out appends it to a file.

  python bench/tflite.py --lung-model runs/lung/model.keras --infection-model runs/infection/model.keras \\
      --manual-dir ../shared/covidqu --data-dir /work/tfds --json-out bench/results/tflite.jsonl
  python bench/tflite.py ... --variants tf_fp32 tflite_int8 --images 20 --rounds 5      # quick look
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

VARIANTS = ("tf_fp32", "tf_bf16", "tflite_fp32", "tflite_dynamic", "tflite_int8", "tflite_int8_lung")


def load_images(builder, split: str, count: int, size: int) -> dict[str, np.ndarray]:
    """`count` examples spread over `split` (every k-th): model pixels (S px, 3 ch) + lung channel, truths."""
    import tensorflow as tf

    from covidseg_tf.data import load_split
    from covidseg_tf.inference.preprocess import resize_mask, to_model_pixels

    stride = max(1, builder.info.splits[split].num_examples // count)
    ex = load_split(builder, split).enumerate().filter(lambda i, _: i % stride == 0).take(count)
    out: dict[str, list] = {"pixels": [], "lung": [], "infection": [], "label": []}
    for _, e in ex:
        lung = tf.cast(e["lung_mask"] > 0, tf.float32)
        pixels = to_model_pixels(e["image"][None], size)[0]
        out["pixels"].append(np.concatenate([pixels.numpy(), resize_mask(lung[None], size)[0].numpy()], -1))
        out["lung"].append(lung.numpy())
        out["infection"].append(tf.cast(e["infection_mask"] > 0, tf.float32).numpy())
        out["label"].append(int(e["label"]))
    return {k: np.stack(v) for k, v in out.items()}


def cascade_outputs(lung, infection, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Both stages on every image, one at a time: probabilities at the model size, masks at the image size."""
    from covidseg_tf.inference.postprocess import apply_decision
    from covidseg_tf.inference.predictor import run_stages

    probs: dict[str, list] = {"lung_prob": [], "infection_prob": [], "lung_mask": [], "infection_mask": []}
    for x in data["pixels"]:
        st = run_stages(lung, infection, x[None, ..., :3], 0.5)
        m = apply_decision(st["lung_prob"], st["infection_prob"], 0.5, size=data["lung"].shape[1:3])
        for k, v in ((*st.items(), *m.items())):
            if k in probs:
                probs[k].append(v.numpy()[0])
    return {k: np.stack(v) for k, v in probs.items()}


def pooled_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    from covidseg_tf import metrics

    tp, fp, fn = metrics.confusion_counts(truth, pred)
    return float(metrics.dice_from_counts(tp.sum(), fp.sum(), fn.sum()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lung-model", required=True, help="Stage-1 .keras file")
    p.add_argument("--infection-model", required=True, help="Stage-2 .keras file")
    p.add_argument("--dataset", default="covid_qu_ex/infection")
    p.add_argument("--data-dir", help="TFDS data_dir")
    p.add_argument("--manual-dir", help="folder (or zip) with the COVID-QU-Ex files")
    p.add_argument("--images", type=int, default=100, help="Val images for the accuracy check")
    p.add_argument("--calibration", type=int, default=64, help="Train images that calibrate tflite_int8")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=10, help="timing rounds; each times every variant once")
    p.add_argument("--threads", type=int, default=2, help="TF intra-op threads and TFLite num_threads")
    p.add_argument("--pause-pgid", type=int, help="process group to SIGSTOP while timing (SIGCONT after, always)")
    p.add_argument("--json-out", help="append the JSON line to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result: dict[str, Any] = {"bench": "tflite", "machine": common.machine_info(),
                              "tf": common.configure_tf(args.threads, 1), "args": vars(args)}
    import tensorflow as tf

    from covidseg_tf.data import load_builder
    from covidseg_tf.inference.stages import TFLiteStage, load_stage, model_input_size
    from covidseg_tf.optimize import calibration_pixels, frozen_stage, tflite_model

    models = {"lung": load_stage(args.lung_model, stage="lung"),
              "infection": load_stage(args.infection_model, stage="infection")}
    size, _ = model_input_size(models["lung"])
    builder = load_builder(args.dataset, args.data_dir, args.manual_dir)
    val = load_images(builder, "validation", args.images, size)
    calibration = {"lung": load_images(builder, "train", args.calibration, size)["pixels"][..., :3]} \
        if {"tflite_int8", "tflite_int8_lung"} & set(args.variants) else {"lung": []}
    if len(calibration["lung"]):
        calibration["infection"] = calibration_pixels(frozen_stage(models["lung"], "fp32"), calibration["lung"])
    result["images"] = {"validation": len(val["label"]), "per_class": np.bincount(val["label"]).tolist(),
                        "size": size, "calibration_train": len(calibration["lung"])}

    stages: dict[str, tuple[Any, Any]] = {}
    sizes: dict[str, int] = {}
    variants = ["tf_fp32", *[v for v in args.variants if v != "tf_fp32"]]  # the reference comes first
    for v in variants:
        t0 = time.perf_counter()
        if v.startswith("tf_"):
            stages[v] = tuple(frozen_stage(models[s], v[3:]) for s in ("lung", "infection"))
        else:
            mode = {"lung": "int8", "infection": "fp32"} if v == "tflite_int8_lung" else dict.fromkeys(models, v[7:])
            content = {s: tflite_model(models[s], mode[s], calibration.get(s)) for s in ("lung", "infection")}
            sizes[v] = sum(len(c) for c in content.values())
            stages[v] = tuple(TFLiteStage(content[s], args.threads) for s in ("lung", "infection"))
        logging.info("%s ready in %.1f s", v, time.perf_counter() - t0)

    outputs = {v: cascade_outputs(*stages[v], val) for v in variants}
    ref = outputs["tf_fp32"]
    accuracy = {}
    for v in variants:
        o = outputs[v]
        accuracy[v] = {
            "lung_max_abs_dp": round(float(np.abs(o["lung_prob"] - ref["lung_prob"]).max()), 5),
            "infection_max_abs_dp": round(float(np.abs(o["infection_prob"] - ref["infection_prob"]).max()), 5),
            "lung_dice_pooled": round(pooled_dice(val["lung"], o["lung_mask"]), 5),
            "infection_dice_pooled": round(pooled_dice(val["infection"], o["infection_mask"]), 5)}
        for k in ("lung_dice_pooled", "infection_dice_pooled"):
            accuracy[v][k.replace("_pooled", "_minus_tf_fp32")] = round(accuracy[v][k] - accuracy["tf_fp32"][k], 5)
        if v in sizes:
            accuracy[v]["tflite_bytes"] = sizes[v]
    result["accuracy"] = accuracy

    from covidseg_tf.inference.predictor import run_stages

    x = tf.constant(val["pixels"][:1, ..., :3])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        run_stages(*stages[v], x, 0.5)["infection_prob"].numpy()
    if args.pause_pgid:
        os.killpg(args.pause_pgid, signal.SIGSTOP)
    t_pause = time.perf_counter()
    try:
        for _ in range(args.rounds):
            for v in variants:
                t = time.perf_counter()
                run_stages(*stages[v], x, 0.5)["infection_prob"].numpy()
                times[v].append(time.perf_counter() - t)
    finally:
        if args.pause_pgid:
            os.killpg(args.pause_pgid, signal.SIGCONT)
            result["paused_pgid_s"] = round(time.perf_counter() - t_pause, 1)
    med = {v: float(np.median(t)) for v, t in times.items()}
    result["cascade_batch1"] = {v: {"median_ms": round(1e3 * med[v], 2),
                                    "vs_tf_fp32": round(med[v] / med["tf_fp32"], 3),
                                    "times_ms": [round(1e3 * t, 1) for t in times[v]]} for v in variants}
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    common.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
