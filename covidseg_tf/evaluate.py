"""Evaluate the cascade on a TFDS split: Table I (lung), Table II (infection), Fig. 1, as Markdown + JSON + PNG.

    python -m covidseg_tf.evaluate --dataset covid_qu_ex/infection --split validation   # the shipped models
    python -m covidseg_tf.evaluate --lung-model runs/lung/model.keras --infection-model runs/infection/model.keras

Models (`covidseg_tf.inference.load_stage`): by default the shipped SavedModels (`saved_models/lung/<N>`,
`saved_models/infection/<N>`, N = `config.SHIPPED_VERSION`); a base or version folder, a `.keras` or a `.tflite` file
works too.
The report names the files used (for a SavedModel, its version folder).

How the numbers are made
    * Every image runs through `covidseg_tf.inference` exactly as `predict` runs it (model pixels, both stages,
      masks at the image's own size, severity on those masks); Dice and IoU compare these masks with the
      ground-truth masks at their NATIVE size (256 px for COVID-QU-Ex). The images of one batch must share a size.
    * Stage 1 (Table I): the predicted lung mask vs the ground-truth lung mask.
    * Stage 2 (Table II) twice: "cascade" feeds Stage 2 the Stage-1 lung mask and restricts the infection to it
      (what a user gets); "GT lungs" feeds the ground-truth lung mask (nearest to the model size) instead and
      restricts to the ground truth (ablation: Stage 2 alone).
    * Each Dice / IoU three ways, in named columns: pooled over all images of the split (sum of intersections
      over sum of areas, the seed recipe's way), mean of per-image scores over all images (an image with empty
      truth and empty prediction scores 1, so for the infection stage the Non-COVID / Normal images, which have
      no infection, count as perfect when nothing is predicted and as 0 otherwise), and mean of per-image scores
      over the COVID-19 images only. A second table per stage breaks the numbers down per class (the class names
      come from the dataset's `label` feature).
    * Loss: the stage's training loss (covidseg_tf.losses, weights from covidseg_tf.config.StageConfig) per
      image on the raw probabilities at the model size (for Stage 2 before restriction to the lung mask), averaged.
    * Severity: mean absolute error (percentage points) of the predicted total severity against the one
      computed from the ground-truth masks, over COVID-19 images.
    * Image level ("any infection": the COVID-19 class, the only one with infection masks): sensitivity and
      specificity of "the cascade's infection mask has any pixel" (what a user sees), and, for an infection
      model with an image head, of "its infection probability >= the decision's min_infection_probability" (0.5
      where the decision does not consult the head) and the head's ROC AUC (`image_level_figures`).
    * Fig. 1 (covidseg_tf.report): COVID-19 images with infection, ordered by ground-truth infected lung fraction
      and picked at evenly spaced ranks (mild to severe; a fixed choice for a given split).

Memory stays small: only per-image counts and scores are kept, never the masks (the figure re-reads its few
images in a second pass).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidseg_tf import __version__, exitcodes
from covidseg_tf.cli import add_dataset_flags, add_decision_flags, add_model_flags, decision_overrides
from covidseg_tf.config import default_config

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- aggregation
@dataclass
class Scores:
    """Per-image confusion counts, scores and losses of one model variant on one split; `class_names` are the
    dataset's label names (index = label id)."""

    class_names: Sequence[str] = ()
    labels: list[int] = field(default_factory=list)
    tp: list[int] = field(default_factory=list)
    fp: list[int] = field(default_factory=list)
    fn: list[int] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def add(self, y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int],
            loss: Sequence[float] | None = None) -> None:
        """Add a batch: y_true / y_pred (B, H, W[, 1]) in {0, 1}; labels (B,) class ids; per-image losses."""
        from covidseg_tf import metrics

        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        tp, fp, fn = metrics.confusion_counts(y_true, y_pred)
        self.tp += tp.tolist()
        self.fp += fp.tolist()
        self.fn += fn.tolist()
        self.dice += metrics.dice_from_counts(tp, fp, fn).tolist()  # per image, from the same counts
        self.iou += metrics.iou_from_counts(tp, fp, fn).tolist()
        self.labels += [int(x) for x in labels]
        if loss is not None:
            self.loss += [float(x) for x in loss]

    def __len__(self) -> int:
        return len(self.labels)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per subset ("all" and each class): n, pooled and per-image-mean Dice / IoU, mean loss."""
        from covidseg_tf.metrics import dice_from_counts, iou_from_counts

        labels = np.asarray(self.labels, np.int64)
        out: dict[str, dict[str, Any]] = {}
        for subset in ("all", *self.class_names):
            sel = np.ones(len(labels), bool) if subset == "all" else labels == list(self.class_names).index(subset)
            n = int(sel.sum())
            row: dict[str, Any] = {"n": n}
            if n:
                counts = [np.sum(np.asarray(c)[sel]) for c in (self.tp, self.fp, self.fn)]  # pooled over the subset
                d, i = float(dice_from_counts(*counts)), float(iou_from_counts(*counts))
                row.update(dice_pooled=d, dice_per_image_mean=float(np.mean(np.asarray(self.dice)[sel])),
                           iou_pooled=i, iou_per_image_mean=float(np.mean(np.asarray(self.iou)[sel])))
                row["loss"] = float(np.mean(np.asarray(self.loss)[sel])) if len(self.loss) == len(labels) else None
            out[subset] = row
        return out


def image_level_figures(positive: Sequence[bool], flagged: Sequence[bool],
                        probability: Sequence[float] | None = None, threshold: float = 0.5) -> dict[str, Any]:
    """Image-level "any infection" figures: `positive` (the image truly has infection), `flagged` (the cascade's
    infection mask has a pixel), `probability` (the image head's infection probability, None without a head).

    Returns {"n_positive", "n_negative", "mask": {"sensitivity", "specificity"}, "head": {"threshold",
    "sensitivity", "specificity", "auc"} or None}; a rate without images to compute it on is None.

    >>> r = image_level_figures([True, True, False, False], [True, False, False, True], [0.9, 0.4, 0.2, 0.6])
    >>> r["mask"], r["head"]["auc"]
    ({'sensitivity': 0.5, 'specificity': 0.5}, 0.75)
    """
    pos = np.asarray(positive, bool)
    flagged_ = np.asarray(flagged, bool)

    def rates(pred: np.ndarray) -> dict[str, float | None]:
        return {"sensitivity": float(pred[pos].mean()) if pos.any() else None,
                "specificity": float((~pred[~pos]).mean()) if (~pos).any() else None}

    head = None
    if probability is not None:
        prob = np.asarray(probability, np.float64)
        auc = None
        if pos.any() and (~pos).any():  # Mann-Whitney: P(score of a positive > a negative), ties count half
            p, n = prob[pos][:, None], prob[~pos][None, :]
            auc = float(np.mean((p > n) + 0.5 * (p == n)))
        head = {"threshold": float(threshold), **rates(prob >= threshold), "auc": auc}
    return {"n_positive": int(pos.sum()), "n_negative": int((~pos).sum()), "mask": rates(flagged_), "head": head}


# ----------------------------------------------------------------------------------------------- model side
def make_loss(stage: str):
    """The training loss of `stage` as a callable (y_true, y_pred) -> scalar."""
    from covidseg_tf import losses

    return losses.make_loss(default_config(stage))


def batch_scores(predictor: Any, lung_loss: Any, infection_loss: Any, with_infection: bool) -> Any:
    """evaluate's bookkeeping of one batch, for `Predictor.predict_batches(..., then=...)`: (batch, stages) ->
    masks at the native size and per-image losses, as TensorFlow ops.

    Outputs: "lung_pred", "infection_cascade", "infection_gt_lung" (B, H, W, 1) 0/1, "severity_total" (B,) of the
    cascade, "<name>_loss" (B,) per-image losses at the model size, and for a model with an image head
    "infection_probability" (B,).
    """
    import tensorflow as tf

    from covidseg_tf.inference.postprocess import apply_decision, infection_probability, threshold_mask
    from covidseg_tf.inference.predictor import run_stages
    from covidseg_tf.inference.preprocess import resize_mask, to_model_pixels

    size, decision = predictor.image_size, predictor.decision

    def per_image(loss_fn, y_true, y_pred):
        return tf.map_fn(lambda a: tf.cast(loss_fn(a[0][None], a[1][None]), tf.float32), (y_true, y_pred),
                         fn_output_signature=tf.float32)

    def then(batch: dict[str, Any], stages: dict[str, Any]) -> dict[str, Any]:
        gray = batch["image"]
        lung_gt = tf.cast(batch["lung_mask"] > 0, tf.float32)
        hw = tf.shape(gray)[1:3]
        lung_gt_small = resize_mask(lung_gt, size)
        out = {"lung_loss": per_image(lung_loss, lung_gt_small, stages["lung_prob"])}
        if not with_infection:
            out["lung_pred"] = threshold_mask(stages["lung_prob"], hw, decision.threshold)
            return out
        inf_gt_small = resize_mask(tf.cast(batch["infection_mask"] > 0, tf.float32), size)
        image_class = stages.get("image_class_prob")
        m = apply_decision(stages["lung_prob"], stages["infection_prob"], decision, hw, image_class_prob=image_class)
        out.update(lung_pred=m["lung_mask"], infection_cascade=m["infection_mask"], severity_total=m["severity_total"],
                   infection_cascade_loss=per_image(infection_loss, inf_gt_small, stages["infection_prob"]))
        if image_class is not None:
            out["infection_probability"] = infection_probability(image_class)
        gt = run_stages(None, predictor.infection_model, to_model_pixels(gray, size), decision,
                        lung_mask=lung_gt_small)  # the ablation: Stage 2 given the ground-truth lungs
        gt_masks = apply_decision(stages["lung_prob"], gt["infection_prob"], decision, hw, lung_mask=lung_gt,
                                  image_class_prob=gt.get("image_class_prob"))
        out["infection_gt_lung"] = gt_masks["infection_mask"]
        out["infection_gt_lung_loss"] = per_image(infection_loss, inf_gt_small, gt["infection_prob"])
        return out

    return then


def make_step(predictor: Any, lung_loss: Any, infection_loss: Any, with_infection: bool) -> Any:
    """`batch_scores` of one batch as a tf.function step(gray uint8, lung_gt, infection_gt), each (B, H, W, 1) at
    the native size (what `evaluate_split` computes per batch through `Predictor.predict_batches`)."""
    import tensorflow as tf

    then = batch_scores(predictor, lung_loss, infection_loss, with_infection)
    img = tf.TensorSpec([None, None, None, 1], tf.uint8)
    msk = tf.TensorSpec([None, None, None, 1], tf.float32)

    @tf.function(input_signature=[img, msk, msk])
    def step(gray, lung_gt, infection_gt):
        batch = {"image": gray, "lung_mask": lung_gt, "infection_mask": infection_gt}
        return predictor.run_batch(batch, infection=with_infection, then=then)

    return step


def model_path(stage: Any, given: Path) -> Path:
    """What the report names: the file or version folder the stage was loaded from (a base folder resolves to its
    version), else `given`."""
    return stage.path or given


# ----------------------------------------------------------------------------------------------- main work
def evaluate_split(builder, split: str, predictor: Any, then: Any, with_infection: bool, batch_size: int,
                   limit: int | None, figure_path: Path | None, progress: bool = True,
                   head_threshold: float = 0.5) -> dict[str, Any]:
    """Run the models over one split (`Predictor.predict_batches` with evaluate's `then`, `batch_scores`); returns
    the summaries (and writes Fig. 1 when asked). `head_threshold`: the infection probability at which the image
    head's verdict counts as "infection" (`image_level_figures`)."""
    import tensorflow as tf

    from covidseg_tf.data import load_split
    from covidseg_tf.inference.postprocess import severity
    from covidseg_tf.report import make_figure, pick_figure_rows

    class_names = builder.info.features["label"].names
    covid_id = class_names.index("COVID-19")
    examples = load_split(builder, split).enumerate().map(lambda i, ex: dict(ex, index=i))
    total = builder.info.splits[split].num_examples
    if limit:
        examples = examples.take(limit)
        total = min(total, limit)
    scores = {"lung": Scores(class_names)}
    if with_infection:
        scores.update(infection_cascade=Scores(class_names), infection_gt_lung=Scores(class_names))
    sev_err: list[float] = []
    infected_fraction: dict[int, float] = {}
    positive: list[bool] = []
    flagged: list[bool] = []
    probability: list[float] = []

    def truth(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        lung = (batch["lung_mask"].numpy() > 0).astype(np.float32)
        return lung, (batch["infection_mask"].numpy() > 0).astype(np.float32) if with_infection else 0 * lung

    batches = predictor.predict_batches(examples, batch_size=batch_size, infection=with_infection, then=then,
                                        desc=f"evaluate {split}" if progress else None, total=total)
    for batch, out in batches:
        lung_gt, inf_gt = truth(batch)
        labels = batch["label"].numpy()
        scores["lung"].add(lung_gt, out["lung_pred"].numpy(), labels, out["lung_loss"].numpy())
        if with_infection:
            for name in ("infection_cascade", "infection_gt_lung"):
                scores[name].add(inf_gt, out[name].numpy(), labels, out[f"{name}_loss"].numpy())
            true_sev = severity(lung_gt, inf_gt)["severity_total"].numpy()
            covid = labels == covid_id
            positive += covid.tolist()
            flagged += (out["infection_cascade"].numpy().reshape(len(labels), -1).max(axis=1) > 0).tolist()
            if "infection_probability" in out:
                probability += out["infection_probability"].numpy().tolist()
            sev_err += np.abs(out["severity_total"].numpy() - true_sev)[covid].tolist()
            lung_px = lung_gt.sum(axis=(1, 2, 3))
            inf_px = (inf_gt * lung_gt).sum(axis=(1, 2, 3))
            for i, c, lp, ip in zip(batch["index"].numpy(), covid, lung_px, inf_px):
                if c and lp > 0:
                    infected_fraction[int(i)] = float(ip / lp)
    result: dict[str, Any] = {k: v.summary() for k, v in scores.items()}
    if with_infection:
        result["severity_mae_covid"] = float(np.mean(sev_err)) if sev_err else None
        result["image_level"] = image_level_figures(positive, flagged, probability or None, head_threshold)
    if figure_path is not None and with_infection:
        chosen = pick_figure_rows(infected_fraction)
        rows: dict[int, dict[str, Any]] = {}
        if chosen:
            sel = tf.constant(chosen, tf.int64)
            picked = examples.filter(lambda ex: tf.reduce_any(tf.equal(ex["index"], sel)))
            for batch, out in predictor.predict_batches(picked, batch_size=len(chosen), then=then):
                _, inf_gt = truth(batch)
                for j, i in enumerate(batch["index"].numpy()):
                    i = int(i)
                    rows[i] = {"image": batch["image"].numpy()[j, :, :, 0],
                               "lung_pred": out["lung_pred"].numpy()[j, :, :, 0],
                               "infection_gt": inf_gt[j, :, :, 0],
                               "infection_pred": out["infection_cascade"].numpy()[j, :, :, 0],
                               "caption": f"#{i}  GT infected {100 * infected_fraction[i]:.1f}% of lung  |  "
                                          f"lung Dice {scores['lung'].dice[i]:.3f}  infection Dice "
                                          f"{scores['infection_cascade'].dice[i]:.3f}"}
        make_figure([rows[i] for i in chosen if i in rows], figure_path)
        result["figure_rows"] = chosen
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m covidseg_tf.evaluate",
        description="Evaluate Stage 1 and Stage 2 on a TFDS split: Tables I/II (Markdown + JSON) and Fig. 1 (PNG).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m covidseg_tf.evaluate --out reports/synthetic   # the shipped models\n"
               "  python -m covidseg_tf.evaluate --lung-model runs/lung/model.keras \\\n"
               "      --infection-model runs/infection/model.keras --out reports/synthetic\n"
               "  python -m covidseg_tf.evaluate --lung-model saved_models/lung/5 \\\n"
               "      --infection-model saved_models/infection/5 --dataset covid_qu_ex/infection \\\n"
               "      --manual-dir ~/covidqu --split validation test --out reports/real\n"
               "a model is a SavedModel base folder (its highest integer version), a version folder or a .keras "
               "file.\n"
               "refused (exit 2): a model that cannot be loaded, a bad flag value; a dataset that cannot be built "
               "or loaded: exit 1.\n" + exitcodes.EPILOG)
    add_model_flags(p)
    add_dataset_flags(p, default="covid_qu_ex/synthetic")
    p.add_argument("--split", nargs="+", default=["validation"], help="split(s) to evaluate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    add_decision_flags(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    p.add_argument("--out", type=Path, default=Path("reports/eval"), help="report folder (default: %(default)s)")
    p.add_argument("--no-figure", action="store_true", help="skip Fig. 1")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the report dict (also written to --out)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    import keras
    import tensorflow as tf

    from covidseg_tf.data import load_builder
    from covidseg_tf.inference import Predictor
    from covidseg_tf.report import write_report

    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    t0 = time.time()
    predictor = Predictor.load(args.lung_model, args.infection_model, image_size=args.image_size,
                               **decision_overrides(args))
    builder = load_builder(args.dataset, args.data_dir, args.manual_dir)
    with_infection = "infection_mask" in builder.info.features
    then = batch_scores(predictor, make_loss("lung"), make_loss("infection"), with_infection)
    results: dict[str, Any] = {}
    figures: dict[str, str] = {}
    for split in args.split:
        fig = None if args.no_figure or not with_infection else args.out / f"fig1_{split}.png"
        results[split] = evaluate_split(builder, split, predictor, then, with_infection, args.batch_size, args.limit,
                                        fig, progress=not args.quiet,
                                        head_threshold=predictor.decision.min_infection_probability or 0.5)
        if fig is not None:
            figures[split] = str(fig)
    report = {
        "dataset": builder.info.full_name, "splits": list(args.split), "limit": args.limit,
        "lung_model": str(model_path(predictor.lung_model, args.lung_model)),
        "infection_model": str(model_path(predictor.infection_model, args.infection_model)),
        "image_size": predictor.image_size, "decision": predictor.decision.to_dict(),
        "class_names": list(builder.info.features["label"].names),
        "results": results, "figures": figures, "seconds": time.time() - t0,
        "versions": {"covidseg_tf": __version__, "keras": keras.__version__, "tensorflow": tf.__version__},
    }
    paths = write_report(report, args.out)
    log.info("report: %s, %s; figures: %s", paths["markdown"], paths["json"], ", ".join(figures.values()) or "none")
    return report


def cli() -> None:
    """`python -m covidseg_tf.evaluate`: a dataset that cannot be built or loaded (exit 1) or a bad model path or
    --dataset name (a usage error, exit 2) ends with one readable error line, a Ctrl-C with one line (exit 130)."""
    exitcodes.run_dataset_cli(main, "python -m covidseg_tf.evaluate", "no report was written")


if __name__ == "__main__":
    cli()
