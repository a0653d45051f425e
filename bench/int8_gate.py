#!/usr/bin/env python3
"""The accuracy gate of the int8 TFLite cascade (issue 26): int8 stages against the float32 ones, through `Predictor`.

Both cascades run the same real Val images (--images, spread over the split: every k-th) with the same `Decision`
(default: the one recorded by the shipped infection stage, `--decision-of`), input gate included:
  fp32  covidseg_tf.optimize.frozen_stage(model, "fp32") of both stages (the float32 graph export serves)
  int8  covidseg_tf.optimize.tflite_model(model, "int8", ...) of both stages (what `export --tflite int8` writes),
        calibrated on --calibration Train images (every k-th; no Val image), Stage 2 on each image with its
        Stage-1 (fp32) lung mask (`optimize.calibration_pixels`); --int8-stages lung keeps Stage 2 float32 (and
        the reverse), --float-layers keeps more Keras layers of the int8 stages in float32
Gate (`gate` in the JSON): pooled lung and infection Dice (masks at the images' own size against the truth) within
--max-dice-drop of fp32, mean |Δ severity| (total, percentage points) <= --max-severity-diff, no image flips
assessed / not assessed. Also reported: max |Δp| of the lung, infection and image-head probabilities (model size,
after the decision's flip averaging), images whose infection finding (severity > 0) flips, the largest severity
differences. Prints ONE JSON line; --json-out appends it to a file.

  python bench/int8_gate.py --lung-model /work/train_runs/v3/lung128_ft/model.keras \\
      --infection-model /work/train_runs/v3/infection128/model.keras --manual-dir ../shared/covidqu \\
      --data-dir /work/tfds --images 300 --calibration 64 --json-out bench/results/int8_gate.jsonl
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def spread(builder, split: str, count: int) -> list[dict[str, np.ndarray]]:
    """`count` examples of `split`, every k-th (k = split size // count), as numpy dicts."""
    from covidseg_tf.data import load_split

    stride = max(1, builder.info.splits[split].num_examples // count)
    ex = load_split(builder, split).enumerate().filter(lambda i, _: i % stride == 0).take(count)
    return [{k: v.numpy() for k, v in e.items()} for _, e in ex]


def run(predictor, examples: list[dict[str, np.ndarray]], batch: int = 16) -> dict[str, np.ndarray]:
    """Masks, severity, assessed (`Predictor.predict`) and probabilities (`Predictor.predict_pixels`) per image."""
    import tensorflow as tf

    out: dict[str, list] = {k: [] for k in ("lung", "infection", "severity", "assessed", "lung_prob",
                                            "infection_prob", "image_class_prob")}
    for i in range(0, len(examples), batch):
        grays = [e["image"][..., 0] for e in examples[i:i + batch]]
        for p in predictor.predict(grays):
            out["lung"].append(p.lung)
            out["infection"].append(p.infection)
            out["severity"].append(p.severity_total)
            out["assessed"].append(p.assessed)
        probs = predictor.predict_pixels(tf.stack([predictor.model_pixels(g) for g in grays]))
        for k in ("lung_prob", "infection_prob", "image_class_prob"):
            if k in probs:
                out[k].extend(probs[k].numpy())
    return {k: np.asarray(v) for k, v in out.items() if len(v)}


def pooled_dice(truth: list[np.ndarray], pred: np.ndarray) -> float:
    from covidseg_tf import metrics

    counts = [metrics.confusion_counts(t[None, ..., 0] > 0, p[None] > 0) for t, p in zip(truth, pred)]
    tp, fp, fn = (sum(int(c[j].sum()) for c in counts) for j in range(3))
    return float(metrics.dice_from_counts(tp, fp, fn))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lung-model", required=True, help="Stage-1 .keras file")
    p.add_argument("--infection-model", required=True, help="Stage-2 .keras file")
    p.add_argument("--decision-of", default="saved_models/infection/5",
                   help="exported infection stage whose manifest's decision both cascades apply (default: %(default)s)")
    p.add_argument("--dataset", default="covid_qu_ex/infection")
    p.add_argument("--data-dir", help="TFDS data_dir")
    p.add_argument("--manual-dir", help="folder (or zip) with the COVID-QU-Ex files")
    p.add_argument("--images", type=int, default=300, help="Val images for the gate (default: %(default)s)")
    p.add_argument("--calibration", type=int, default=64,
                   help="Train images that calibrate int8 (default: %(default)s)")
    p.add_argument("--int8-stages", nargs="+", choices=("lung", "infection"), default=["lung", "infection"],
                   help="stages run in int8; the others stay float32 (default: both)")
    p.add_argument("--float-layers", nargs="*", default=[],
                   help="Keras layer names the int8 stages keep in float32 (besides the input preprocessing)")
    p.add_argument("--max-dice-drop", type=float, default=0.005)
    p.add_argument("--max-severity-diff", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2, help="TF intra-op threads and TFLite num_threads")
    p.add_argument("--json-out", help="append the JSON line to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result: dict[str, Any] = {"bench": "int8_gate", "machine": common.machine_info(),
                              "tf": common.configure_tf(args.threads, 1), "args": vars(args)}
    from covidseg_tf.data import load_builder
    from covidseg_tf.inference.predictor import Predictor
    from covidseg_tf.inference.stages import ExportManifest, TFLiteStage, load_stage, model_input_size
    from covidseg_tf.optimize import calibration_pixels, frozen_stage, tflite_model

    decision = ExportManifest.read(Path(args.decision_of)).decision
    models = {s: load_stage(getattr(args, f"{s}_model"), stage=s) for s in ("lung", "infection")}
    size, _ = model_input_size(models["lung"])
    builder = load_builder(args.dataset, args.data_dir, args.manual_dir)
    val = spread(builder, "validation", args.images)
    train = spread(builder, "train", args.calibration)
    labels = np.array([int(e["label"]) for e in val])
    result["images"] = {"validation": len(val), "per_class": np.bincount(labels).tolist(), "size": size,
                        "calibration_train": len(train), "decision": decision.to_dict()}

    t0 = time.perf_counter()
    fp32 = {s: frozen_stage(models[s], "fp32") for s in models}
    predictor = Predictor(fp32["lung"], fp32["infection"], decision)
    lung_pixels = np.stack([predictor.model_pixels(e["image"][..., 0]).numpy() for e in train])
    calibration = {"lung": lung_pixels, "infection": calibration_pixels(fp32["lung"], lung_pixels, decision)}
    int8 = {s: TFLiteStage(tflite_model(models[s], "int8", calibration[s], float_layers=args.float_layers),
                           args.threads) if s in args.int8_stages else fp32[s] for s in models}
    result["conversion_s"] = round(time.perf_counter() - t0, 1)
    outputs = {"fp32": run(predictor, val), "int8": run(Predictor(int8["lung"], int8["infection"], decision), val)}

    truth = {k: [e[f"{k}_mask"] for e in val] for k in ("lung", "infection")}
    acc = {v: {f"{k}_dice_pooled": round(pooled_dice(truth[k], o[k]), 5) for k in ("lung", "infection")}
           for v, o in outputs.items()}
    a, b = outputs["fp32"], outputs["int8"]
    dsev = np.abs(a["severity"] - b["severity"])
    worst = np.argsort(-dsev)[:5]
    compare = {
        "lung_dice_diff": round(acc["int8"]["lung_dice_pooled"] - acc["fp32"]["lung_dice_pooled"], 5),
        "infection_dice_diff": round(acc["int8"]["infection_dice_pooled"] - acc["fp32"]["infection_dice_pooled"], 5),
        "severity_mean_abs_diff": round(float(dsev.mean()), 4),
        "severity_mean_diff": round(float((b["severity"] - a["severity"]).mean()), 4),
        "severity_max_abs_diff": round(float(dsev.max()), 3),
        "assessed_flips": int((a["assessed"] != b["assessed"]).sum()),
        "not_assessed_fp32": int((~a["assessed"]).sum()),
        "finding_flips": int(((a["severity"] > 0) != (b["severity"] > 0)).sum()),
        "worst_severity": [{"index": int(i), "label": int(labels[i]), "fp32": round(float(a["severity"][i]), 2),
                            "int8": round(float(b["severity"][i]), 2)} for i in worst],
        **{f"{k}_max_abs_dp": round(float(np.abs(a[k] - b[k]).max()), 5)
           for k in ("lung_prob", "infection_prob", "image_class_prob") if k in a},
        **{f"{k}_mean_abs_dp": round(float(np.abs(a[k] - b[k]).mean()), 6) for k in ("lung_prob", "infection_prob")},
    }
    gate = {"lung_dice": abs(compare["lung_dice_diff"]) <= args.max_dice_drop,
            "infection_dice": abs(compare["infection_dice_diff"]) <= args.max_dice_drop,
            "severity": compare["severity_mean_abs_diff"] <= args.max_severity_diff,
            "assessed": compare["assessed_flips"] == 0}
    gate["passed"] = all(gate.values())
    result.update(accuracy=acc, int8_vs_fp32=compare, gate=gate)
    result["machine"]["loadavg_end"] = [round(v, 2) for v in __import__("os").getloadavg()]
    common.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
