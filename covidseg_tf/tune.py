"""Choose the cascade's decision on the validation split: infection threshold, image-level rules, flip TTA.

    python -m covidseg_tf.tune --dataset covid_qu_ex/infection --manual-dir ~/covidqu --out reports/decision.json
    python -m covidseg_tf.export --lung-model L.keras --infection-model I.keras --decision reports/decision.json ...

Both stages run once over the split (twice with `--hflip both`: without and with horizontal-flip test-time
augmentation); every candidate decision then turns the same probabilities into masks with
`covidseg_tf.inference.postprocess.apply_decision` (the function every entry point runs), at the models' input
size, against the ground-truth masks resized there with nearest neighbour (for COVID-QU-Ex and 256 px models that
is the native size). The objective is the mean per-image infection Dice over ALL images, where an image with no
infection scores 1 when nothing is predicted and 0 otherwise: it rewards segmenting COVID-19 images and leaving
Non-COVID / Normal images empty alike. For an infection model with an image-level head the grid also spans
the head's rule (`Decision.min_infection_probability`, MIN_INFECTION_PROBABILITIES; 0 = the head is not consulted):
it only empties whole images, so it is scored from the same per-image counts at no extra model cost. The JSON
written to --out holds the chosen decision (what `export --decision` reads), its figures and the whole grid. Use
the validation split to choose, never the test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidseg_tf import exitcodes
from covidseg_tf.cli import add_dataset_flags, add_model_flags, probability_threshold
from covidseg_tf.config import LUNG

if TYPE_CHECKING:
    from covidseg_tf.inference.postprocess import Decision

log = logging.getLogger(__name__)

INFECTION_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_INFECTION_PERCENTS = (0.0, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)
MIN_INFECTION_PROBABILITIES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The image head's rule, tried only for infection models with a head (0: the head is not consulted)."""


def collect(predictor, builder, split: str, hflip: bool, batch_size: int, limit: int | None) -> dict[str, np.ndarray]:
    """Probabilities (float16) and ground truth at the model size, and labels, for every image of `split`
    (`Predictor.predict_batches`); for an infection model with an image head also "infection_probability" (B,)
    float32."""
    import tensorflow as tf

    from covidseg_tf.inference.postprocess import infection_probability
    from covidseg_tf.inference.preprocess import resize_mask

    size, head = predictor.image_size, predictor.has_image_head

    def then(batch: dict[str, tf.Tensor], stages: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"lung": resize_mask(tf.cast(batch["lung_mask"] > 0, tf.float32), size),
                "infection": resize_mask(tf.cast(batch["infection_mask"] > 0, tf.float32), size),
                "infection_probability": infection_probability(stages["image_class_prob"]) if head
                else tf.zeros(tf.shape(batch["image"])[:1])}

    keys = ("lung_prob", "infection_prob", "lung", "infection")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*keys, "label", "infection_probability")}
    for batch, out in predictor.predict_batches(split, builder=builder, batch_size=batch_size, limit=limit,
                                                hflip=hflip, then=then,
                                                desc=f"tune {split} (hflip {'on' if hflip else 'off'})"):
        for key in keys:
            parts[key].append(out[key].numpy().astype(np.float16))
        parts["infection_probability"].append(out["infection_probability"].numpy().astype(np.float32))
        parts["label"].append(batch["label"].numpy())
    data = {k: np.concatenate(v) for k, v in parts.items()}
    if not head:
        del data["infection_probability"]
    return data


def score(data: dict[str, np.ndarray], decision: Decision, class_names: Sequence[str],
          chunk: int = 128) -> dict[str, float]:
    """Infection figures of one decision on collected probabilities (see the module docstring)."""
    return score_head_rules(data, decision, class_names, [decision.min_infection_probability], chunk)[0]


def score_head_rules(data: dict[str, np.ndarray], decision: Decision, class_names: Sequence[str],
                     min_probabilities: Sequence[float], chunk: int = 128) -> list[dict[str, float]]:
    """`score` of `decision` with each of `min_probabilities` as its `min_infection_probability`, from one pass of
    `apply_decision` (the head's rule only empties whole images: their true positives become false negatives)."""
    import tensorflow as tf

    from covidseg_tf import metrics
    from covidseg_tf.inference.postprocess import apply_decision, severity

    without_head = replace(decision, min_infection_probability=0.0)
    counts, pred_sev, true_sev = [], [], []
    for i in range(0, len(data["label"]), chunk):
        sl = slice(i, i + chunk)
        m = apply_decision(tf.constant(data["lung_prob"][sl], tf.float32),
                           tf.constant(data["infection_prob"][sl], tf.float32), without_head)
        pred = m["infection_mask"].numpy()
        counts.append(np.stack(metrics.confusion_counts(data["infection"][sl].astype(np.float32), pred), axis=1))
        pred_sev.append(m["severity_total"].numpy())
        true_sev.append(severity(data["lung"][sl].astype(np.float32),
                                 data["infection"][sl].astype(np.float32))["severity_total"].numpy())
    tp0, fp0, fn0 = np.concatenate(counts).T
    pred_sev0, true_sev_all = np.concatenate(pred_sev), np.concatenate(true_sev)
    covid = data["label"] == list(class_names).index("COVID-19")
    rows = []
    for h in min_probabilities:
        keep = np.ones(len(tp0), bool)
        if h > 0:
            if "infection_probability" not in data:
                raise ValueError(f"min_infection_probability {h:g} needs an infection model with an image head")
            keep = data["infection_probability"] >= h
        tp, fp, fn = tp0 * keep, fp0 * keep, fn0 + tp0 * ~keep
        dice = metrics.dice_from_counts(tp, fp, fn)
        err = np.abs(pred_sev0 * keep - true_sev_all)
        any_px = (tp + fp) > 0
        rows.append({
            "dice_per_image_mean": float(dice.mean()),
            "dice_pooled": float(metrics.dice_from_counts(tp.sum(), fp.sum(), fn.sum())),
            "dice_per_covid_image_mean": float(dice[covid].mean()) if covid.any() else float("nan"),
            "healthy_with_infection_fraction": float(any_px[~covid].mean()) if (~covid).any() else float("nan"),
            "covid_with_infection_fraction": float(any_px[covid].mean()) if covid.any() else float("nan"),
            "severity_mae_covid": float(err[covid].mean()) if covid.any() else float("nan")})
    return rows


def lung_dice(data: dict[str, np.ndarray], threshold: float) -> float:
    """Pooled lung Dice at the model size."""
    from covidseg_tf import metrics

    tp, fp, fn = metrics.confusion_counts(data["lung"].astype(np.float32),
                                          (data["lung_prob"] >= threshold).astype(np.float32))
    return float(metrics.dice_from_counts(tp.sum(), fp.sum(), fn.sum()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m covidseg_tf.tune",
        description="Choose the cascade's infection threshold, image-level rules (area; the image head's "
                    "probability, for models with a head) and flip TTA on the validation split; writes the "
                    "decision that `python -m covidseg_tf.export --decision FILE` records.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m covidseg_tf.tune --dataset covid_qu_ex/infection --manual-dir ~/covidqu \\\n"
               "      --out reports/decision.json                         # the shipped models\n"
               "  python -m covidseg_tf.tune --lung-model runs/lung/model.keras \\\n"
               "      --infection-model runs/infection/model.keras --manual-dir ~/covidqu --hflip both \\\n"
               "      --out reports/decision.json\n"
               "refused (exit 2): a model that cannot be loaded, a dataset without infection masks; a dataset that "
               "cannot be\nbuilt or loaded: exit 1.\n" + exitcodes.EPILOG)
    add_model_flags(p, image_size=False)
    add_dataset_flags(p)
    p.add_argument("--split", default="validation", help="split to choose on (default: %(default)s)")
    p.add_argument("--threshold", type=probability_threshold, default=LUNG.threshold,
                   help="lung threshold, kept fixed (default: %(default)s)")
    p.add_argument("--hflip", choices=("off", "on", "both"), default="off",
                   help="flip TTA: try without, with, or both (both runs the models 3x) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from covidseg_tf.data import load_builder
    from covidseg_tf.inference import Decision, Predictor

    t0 = time.time()
    predictor = Predictor.load(args.lung_model, args.infection_model, Decision(threshold=args.threshold))
    head_rules = MIN_INFECTION_PROBABILITIES if predictor.has_image_head else (0.0,)
    builder = load_builder(args.dataset, args.data_dir, args.manual_dir)
    if "infection_mask" not in builder.info.features:
        parser.error(f"--dataset {args.dataset} has no infection masks: tune on covid_qu_ex/infection or synthetic")
    class_names = builder.info.features["label"].names
    grid = []
    for hflip in {"off": [False], "on": [True], "both": [False, True]}[args.hflip]:
        data = collect(predictor, builder, args.split, hflip, args.batch_size, args.limit)
        lung = lung_dice(data, args.threshold)
        for t in INFECTION_THRESHOLDS:
            for m in MIN_INFECTION_PERCENTS:
                decision = Decision(args.threshold, t, m, hflip)
                for h, row in zip(head_rules, score_head_rules(data, decision, class_names, head_rules)):
                    grid.append({"decision": replace(decision, min_infection_probability=h).to_dict(),
                                 "lung_dice_pooled": lung, **row})
    best = max(grid, key=lambda r: r["dice_per_image_mean"])
    baseline = next(r for r in grid if r["decision"] == Decision(threshold=args.threshold).to_dict()) \
        if args.hflip != "on" else None
    result = {"decision": best["decision"], "objective": "dice_per_image_mean", "chosen": best,
              "baseline": baseline, "split": args.split, "dataset": builder.info.full_name, "limit": args.limit,
              "lung_model": str(args.lung_model), "infection_model": str(args.infection_model),
              "seconds": round(time.time() - t0, 1), "grid": grid}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("chosen on %s: %s (%s); baseline %s", args.split, best["decision"],
             {k: round(v, 4) for k, v in best.items() if k != "decision"},
             baseline and {k: round(v, 4) for k, v in baseline.items() if k != "decision"})
    return result


def cli() -> None:
    """`python -m covidseg_tf.tune`: errors are one line (a bad model or --dataset name: exit 2; a dataset that
    cannot be built or loaded: exit 1), and so is a Ctrl-C (exit 130)."""
    exitcodes.run_dataset_cli(main, "python -m covidseg_tf.tune", "nothing was written")


if __name__ == "__main__":
    cli()
