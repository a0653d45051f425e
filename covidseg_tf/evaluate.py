"""Evaluate the cascade on a TFDS split: Table I (lung), Table II (infection), Fig. 1, as Markdown + JSON + PNG.

    python -m covidseg_tf.evaluate --dataset covid_qu_ex/infection --split validation   # saved_models/{lung,infection}
    python -m covidseg_tf.evaluate --lung-model runs/lung/model.keras --infection-model runs/infection/model.keras

Models (covidseg_tf.cascade.load_model): by default the repository's exported SavedModels `saved_models/lung` and
`saved_models/infection` (highest version of each); a version folder or a `.keras` file works too. The report
names the files used (for a SavedModel, its version folder).

How the numbers are made
    * Every image is resized to the models' input size (bilinear, like training) and its masks with nearest
      neighbour from their native size; all metrics are computed at that size on 0/1 masks (probability >=
      --threshold). They are therefore not native-resolution (256 px for COVID-QU-Ex) metrics.
    * Stage 1 (Table I): lung probability vs the ground-truth lung mask.
    * Stage 2 (Table II) twice: "cascade" feeds the Stage-1 predicted lung mask (what a user gets) and the
      predicted infection is restricted to that mask (covidseg_tf.cascade.run_cascade); "GT lungs" feeds the
      ground-truth lung mask instead (ablation: Stage 2 alone) and restricts to it.
    * Each Dice / IoU three ways, in named columns: pooled over all images of the split (sum of intersections
      over sum of areas, the seed's way), mean of per-image scores over all images (an image with empty truth
      and empty prediction scores 1, so for the infection stage the Non-COVID / Normal images, which have no
      infection, count as perfect when nothing is predicted and as 0 otherwise), and mean of per-image scores
      over the COVID-19 images only. A second table per stage breaks the numbers down per class.
    * Loss: the stage's training loss (covidseg_tf.losses, weights from covidseg_tf.config.StageConfig) per
      image on the raw probabilities (for Stage 2 before restriction to the lung mask), averaged.
    * Severity: mean absolute error (percentage points) of the predicted total severity against the one
      computed from the ground-truth masks, over COVID-19 images.
    * Fig. 1: COVID-19 images with infection, ordered by ground-truth infected lung fraction and picked at
      evenly spaced ranks (mild to severe; a fixed choice for a given split), with X-ray, Stage-1 lung mask,
      ground-truth infection and predicted (cascade) infection, each row annotated with its Dice values.

Memory stays small: only per-image counts and scores are kept, never the masks (the figure re-reads its few
images in a second pass).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from covidseg_tf import __version__
from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL, default_config

log = logging.getLogger(__name__)

CLASS_NAMES = ("COVID-19", "Non-COVID", "Normal")
SUBSETS = ("all",) + CLASS_NAMES
VARIANTS = {
    "lung": "Stage 1 (lung)",
    "infection_cascade": "Stage 2 (infection), Stage-1 lung masks (cascade)",
    "infection_gt_lung": "Stage 2 (infection), ground-truth lung masks (ablation)",
}
FIGURE_ROWS = 6


# ----------------------------------------------------------------------------------------------- aggregation
@dataclass
class Scores:
    """Per-image confusion counts, scores and losses of one model variant on one split."""

    labels: list[int] = field(default_factory=list)
    tp: list[int] = field(default_factory=list)
    fp: list[int] = field(default_factory=list)
    fn: list[int] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def add(self, y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int], loss: Sequence[float] | None = None) -> None:
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
        for subset in SUBSETS:
            sel = np.ones(len(labels), bool) if subset == "all" else labels == CLASS_NAMES.index(subset)
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


# ----------------------------------------------------------------------------------------------- model side
def make_loss(stage: str):
    """The training loss of `stage` as a callable (y_true, y_pred) -> scalar."""
    from covidseg_tf import losses

    return losses.make_loss(default_config(stage))


def make_step(lung_model, infection_model, threshold: float, size: int, lung_loss, infection_loss, with_infection: bool):
    """A tf.function: (rgb, lung_gt, infection_gt) -> predictions, masks and per-image losses of a batch."""
    import tensorflow as tf

    def per_image(loss_fn, y_true, y_pred):
        return tf.map_fn(lambda a: tf.cast(loss_fn(a[0][None], a[1][None]), tf.float32), (y_true, y_pred),
                         fn_output_signature=tf.float32)

    img = tf.TensorSpec([None, size, size, 3], tf.float32)
    msk = tf.TensorSpec([None, size, size, 1], tf.float32)

    @tf.function(input_signature=[img, msk, msk])
    def step(rgb, lung_gt, infection_gt):
        lung_prob = tf.cast(lung_model(rgb, training=False), tf.float32)
        lung_pred = tf.cast(lung_prob >= threshold, tf.float32)
        out = {"lung_pred": lung_pred, "lung_loss": per_image(lung_loss, lung_gt, lung_prob)}
        if with_infection:
            for name, lung in (("cascade", lung_pred), ("gt_lung", lung_gt)):
                prob = tf.cast(infection_model(tf.concat([rgb, lung], -1), training=False), tf.float32)
                out[f"infection_{name}"] = tf.cast(prob >= threshold, tf.float32) * lung
                out[f"infection_{name}_loss"] = per_image(infection_loss, infection_gt, prob)
        return out

    return step


def model_path(model: Any, given: Path) -> Path:
    """What the report names: the version folder of a SavedModel (a base folder resolves to one), else `given`."""
    from covidseg_tf.cascade import SavedModelStage

    return model.path if isinstance(model, SavedModelStage) else given


def prepare(examples, size: int, with_infection: bool, batch_size: int):
    """Examples -> batches of (rgb, lung_gt, infection_gt, label, index) at `size` (see data.to_model_inputs)."""
    import tensorflow as tf

    from covidseg_tf.data import to_model_inputs

    def fn(i, ex):
        lung = tf.cast(ex["lung_mask"], tf.uint8)
        inf = tf.cast(ex["infection_mask"], tf.uint8) if with_infection else tf.zeros_like(lung)
        x, y = to_model_inputs(ex["image"], tf.concat([lung, inf], -1), size, "infection")
        return x[..., :3], x[..., 3:], y, ex["label"], i

    return examples.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)


# ----------------------------------------------------------------------------------------------- figure
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def make_figure(rows: list[dict[str, Any]], path: Path, panel: int = 192) -> None:
    """Fig. 1 as a PNG (PIL): per row X-ray | Stage-1 lung | GT infection | predicted infection + caption."""
    from PIL import Image, ImageDraw

    titles = ("X-ray", "Stage-1 lung mask", "GT infection", "Predicted infection")
    head, cap, pad = 28, 22, 6
    width = pad + len(titles) * (panel + pad)
    height = head + max(1, len(rows)) * (panel + cap + pad)
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    font, small = _font(16), _font(13)
    for j, t in enumerate(titles):
        draw.text((pad + j * (panel + pad) + 4, 6), t, fill="black", font=font)
    if not rows:
        draw.text((pad, head + 10), "no COVID-19 image with infection in this selection", fill="black", font=font)
    for r, row in enumerate(rows):
        y0 = head + r * (panel + cap + pad)
        gray = row["image"].astype(np.uint8)
        panels = [np.repeat(gray[..., None], 3, -1)]
        for key, color in (("lung_pred", (0, 200, 90)), ("infection_gt", (255, 200, 0)), ("infection_pred", (255, 30, 30))):
            m = row[key].astype(bool)
            p = np.repeat(gray[..., None].astype(np.float32) * 0.6, 3, -1)
            p[m] = 0.35 * p[m] + 0.65 * np.array(color, np.float32)
            panels.append(np.clip(p, 0, 255).astype(np.uint8))
        for j, p in enumerate(panels):
            im = Image.fromarray(p).resize((panel, panel), Image.NEAREST)
            fig.paste(im, (pad + j * (panel + pad), y0))
        draw.text((pad, y0 + panel + 3), row["caption"], fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)


def pick_figure_rows(infected_fraction: dict[int, float], k: int = FIGURE_ROWS) -> list[int]:
    """Indices of up to k images with infection, at evenly spaced ranks of their infected fraction."""
    items = sorted((f, i) for i, f in infected_fraction.items() if f > 0)
    if len(items) <= k:
        return [i for _, i in items]
    ranks = np.unique(np.round(np.linspace(0, len(items) - 1, k)).astype(int))
    return [items[r][1] for r in ranks]


# ----------------------------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}"


SUMMARY_HEADER = ("| Split | Model | Images | Dice, pooled | Dice, mean per image | Dice, mean per COVID-19 image | "
                  "IoU, pooled | IoU, mean per image | IoU, mean per COVID-19 image | Loss, mean per image |")
CLASS_HEADER = ("| Split | Model | Class | Images | Dice, pooled | Dice, mean per image | IoU, pooled | "
                "IoU, mean per image | Loss, mean per image |")


def markdown_table(title: str, results: dict[str, dict[str, Any]], variants: Sequence[str]) -> str:
    """A stage's Markdown table: one row per split and model variant with each metric three ways (pooled
    over all images, mean per image over all images, mean per image over the COVID-19 images), followed by the
    per-class breakdown."""
    lines = [f"### {title}", "", SUMMARY_HEADER, "|---|---|" + "---:|" * 8]
    for split, res in results.items():
        for v in variants:
            if v not in res or not res[v]["all"]["n"]:
                continue
            a, c = res[v]["all"], res[v]["COVID-19"]
            lines.append(f"| {split} | {VARIANTS[v]} | {a['n']} | {_fmt(a['dice_pooled'])} | "
                         f"{_fmt(a['dice_per_image_mean'])} | {_fmt(c.get('dice_per_image_mean'))} | "
                         f"{_fmt(a['iou_pooled'])} | {_fmt(a['iou_per_image_mean'])} | "
                         f"{_fmt(c.get('iou_per_image_mean'))} | {_fmt(a['loss'])} |")
    lines += ["", f"Per class ({title.split(':')[0]}):", "", CLASS_HEADER, "|---|---|---|" + "---:|" * 6]
    for split, res in results.items():
        for v in variants:
            if v not in res:
                continue
            for cls in CLASS_NAMES:
                row = res[v][cls]
                if not row["n"]:
                    continue
                lines.append(f"| {split} | {VARIANTS[v]} | {cls} | {row['n']} | {_fmt(row['dice_pooled'])} | "
                             f"{_fmt(row['dice_per_image_mean'])} | {_fmt(row['iou_pooled'])} | "
                             f"{_fmt(row['iou_per_image_mean'])} | {_fmt(row['loss'])} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json, report.md (Tables I and II) beside the figure(s) already in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results = report["results"]
    md = [f"# Evaluation of the covidseg-tf cascade on `{report['dataset']}`", "",
          f"- Lung model: `{report['lung_model']}`", f"- Infection model: `{report['infection_model']}`",
          f"- Image size {report['image_size']} px (masks resized nearest from native), threshold "
          f"{report['threshold']}, splits: {', '.join(results)}" + (f", first {report['limit']} images" if report['limit'] else ""),
          "- *pooled*: summed intersections over summed areas of all images (the seed's tables); *mean per "
          "image*: average of per-image scores, where empty truth + empty prediction = 1 (Non-COVID and Normal "
          "images have no infection, so for Stage 2 they score 1 or 0); *mean per COVID-19 image*: the same "
          "over COVID-19 images only. Loss: the stage's training loss per image on the probabilities.", "",
          markdown_table("Table I: lung segmentation (Stage 1)", results, ["lung"]), ""]
    if any("infection_cascade" in r for r in results.values()):
        md += [markdown_table("Table II: infection segmentation (Stage 2)", results, ["infection_cascade", "infection_gt_lung"]), ""]
        sev = {s: r.get("severity_mae_covid") for s, r in results.items()}
        md += ["Severity (total infected lung %), mean absolute error vs ground truth over COVID-19 images: " +
               ", ".join(f"{s}: {_fmt(v)} points" for s, v in sev.items()), ""]
    else:
        md += ["Table II: not computed (the dataset has no infection masks).", ""]
    for split, fig in report.get("figures", {}).items():
        md += [f"Fig. 1 ({split}): COVID-19 images from mild to severe ground-truth infection "
               f"(X-ray | Stage-1 lung mask | GT infection | predicted infection).", "",
               f"![Fig. 1 {split}]({Path(fig).name})", ""]
    md += [f"covidseg-tf {report['versions']['covidseg_tf']}, Keras {report['versions']['keras']}, "
           f"TensorFlow {report['versions']['tensorflow']}; {report['seconds']:.0f} s."]
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text("\n".join(md) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------- main work
def evaluate_split(builder, split: str, step, size: int, with_infection: bool, batch_size: int,
                   limit: int | None, figure_path: Path | None, progress: bool = True) -> dict[str, Any]:
    """Run the models over one split; returns the summaries (and writes Fig. 1 when asked)."""
    import tensorflow as tf
    from tqdm import tqdm

    from covidseg_tf.cascade import severity
    from covidseg_tf.data import load_split

    examples = load_split(builder, split)
    total = builder.info.splits[split].num_examples
    if limit:
        examples = examples.take(limit)
        total = min(total, limit)
    scores = {"lung": Scores()}
    if with_infection:
        scores.update(infection_cascade=Scores(), infection_gt_lung=Scores())
    sev_err: list[float] = []
    infected_fraction: dict[int, float] = {}
    bar = tqdm(total=total, desc=f"evaluate {split}", unit="img", disable=not progress)
    for rgb, lung_gt, inf_gt, label, idx in prepare(examples, size, with_infection, batch_size):
        out = step(rgb, lung_gt, inf_gt)
        labels = label.numpy()
        scores["lung"].add(lung_gt.numpy(), out["lung_pred"].numpy(), labels, out["lung_loss"].numpy())
        if with_infection:
            for name in ("cascade", "gt_lung"):
                scores[f"infection_{name}"].add(inf_gt.numpy(), out[f"infection_{name}"].numpy(), labels,
                                                out[f"infection_{name}_loss"].numpy())
            pred_sev = severity(out["lung_pred"], out["infection_cascade"])["severity_total"].numpy()
            true_sev = severity(lung_gt, inf_gt)["severity_total"].numpy()
            covid = labels == CLASS_NAMES.index("COVID-19")
            sev_err += np.abs(pred_sev - true_sev)[covid].tolist()
            lung_px = lung_gt.numpy().sum(axis=(1, 2, 3))
            inf_px = (inf_gt.numpy() * lung_gt.numpy()).sum(axis=(1, 2, 3))
            for i, c, lp, ip in zip(idx.numpy(), covid, lung_px, inf_px):
                if c and lp > 0:
                    infected_fraction[int(i)] = float(ip / lp)
        bar.update(len(labels))
    bar.close()
    result: dict[str, Any] = {k: v.summary() for k, v in scores.items()}
    if with_infection:
        result["severity_mae_covid"] = float(np.mean(sev_err)) if sev_err else None
    if figure_path is not None and with_infection:
        chosen = pick_figure_rows(infected_fraction)
        rows: dict[int, dict[str, Any]] = {}
        if chosen:
            sel = tf.constant(chosen, tf.int64)
            for rgb, lung_gt, inf_gt, label, idx in prepare(examples, size, True, batch_size).unbatch().filter(
                    lambda *a: tf.reduce_any(tf.equal(a[4], sel))).batch(len(chosen)):
                out = step(rgb, lung_gt, inf_gt)
                for j, i in enumerate(idx.numpy()):
                    i = int(i)
                    rows[i] = {"image": rgb.numpy()[j, :, :, 0], "lung_pred": out["lung_pred"].numpy()[j, :, :, 0],
                               "infection_gt": inf_gt.numpy()[j, :, :, 0],
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
               "  python -m covidseg_tf.evaluate --out reports/synthetic   # the repo's saved_models/{lung,infection}\n"
               "  python -m covidseg_tf.evaluate --lung-model runs/lung/model.keras \\\n"
               "      --infection-model runs/infection/model.keras --out reports/synthetic\n"
               "  python -m covidseg_tf.evaluate --lung-model saved_models/lung/2 \\\n"
               "      --infection-model saved_models/infection/2 --dataset covid_qu_ex/infection \\\n"
               "      --manual-dir ~/covidqu --split validation test --out reports/real\n"
               "a model is a SavedModel base folder (its highest integer version), a version folder or a .keras "
               "file.\n")
    p.add_argument("--lung-model", type=Path, default=DEFAULT_LUNG_MODEL,
                   help="Stage-1 model: SavedModel base or version folder, or .keras file (default: %(default)s)")
    p.add_argument("--infection-model", type=Path, default=DEFAULT_INFECTION_MODEL,
                   help="Stage-2 model: SavedModel base or version folder, or .keras file (default: %(default)s)")
    p.add_argument("--dataset", default="covid_qu_ex/synthetic", help="TFDS name/config (default: %(default)s)")
    p.add_argument("--data-dir", help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", help="folder with the COVID-QU-Ex files (to build the real dataset)")
    p.add_argument("--split", nargs="+", default=["validation"], help="split(s) to evaluate (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size; only for models without a fixed one (default: the models' input size)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=default_config("infection").threshold,
                   help="probability threshold of both stages (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    p.add_argument("--out", type=Path, default=Path("reports/eval"), help="report folder (default: %(default)s)")
    p.add_argument("--no-figure", action="store_true", help="skip Fig. 1")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the report dict (also written to --out)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    import keras
    import tensorflow as tf

    from covidseg_tf.cascade import load_model, model_image_size
    from covidseg_tf.data import load_builder

    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    t0 = time.time()
    lung_model = load_model(args.lung_model, stage="lung")
    infection_model = load_model(args.infection_model, stage="infection")
    size = model_image_size(lung_model, args.image_size or default_config("lung").image_size)
    if args.image_size and args.image_size != size:
        raise SystemExit(f"--image-size {args.image_size} differs from the lung model's fixed input size {size}")
    inf_size = model_image_size(infection_model, size)
    if inf_size != size:
        raise SystemExit(f"the lung model takes {size} px but the infection model {inf_size} px")
    builder = load_builder(args.dataset, args.data_dir, args.manual_dir)
    with_infection = "infection_mask" in builder.info.features
    step = make_step(lung_model, infection_model, args.threshold, size, make_loss("lung"), make_loss("infection"),
                     with_infection)
    results: dict[str, Any] = {}
    figures: dict[str, str] = {}
    for split in args.split:
        fig = None if args.no_figure or not with_infection else args.out / f"fig1_{split}.png"
        results[split] = evaluate_split(builder, split, step, size, with_infection, args.batch_size, args.limit,
                                        fig, progress=not args.quiet)
        if fig is not None:
            figures[split] = str(fig)
    report = {
        "dataset": builder.info.full_name, "splits": list(args.split), "limit": args.limit,
        "lung_model": str(model_path(lung_model, args.lung_model)),
        "infection_model": str(model_path(infection_model, args.infection_model)),
        "image_size": size, "threshold": args.threshold, "class_names": list(CLASS_NAMES),
        "results": results, "figures": figures, "seconds": time.time() - t0,
        "versions": {"covidseg_tf": __version__, "keras": keras.__version__, "tensorflow": tf.__version__},
    }
    paths = write_report(report, args.out)
    log.info("report: %s, %s; figures: %s", paths["markdown"], paths["json"], ", ".join(figures.values()) or "none")
    return report


def cli() -> None:
    """`python -m covidseg_tf.evaluate`: a bad model path or dataset ends with one readable error line."""
    from covidseg_tf.data import DatasetError

    try:
        main()
    except (FileNotFoundError, ValueError, DatasetError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
