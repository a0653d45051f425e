"""The evaluation report: Markdown Tables I/II, JSON, and Fig. 1 as a PNG (rendering only; the numbers come from
covidseg_tf.evaluate)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = {
    "lung": "Stage 1 (lung)",
    "infection_cascade": "Stage 2 (infection), Stage-1 lung masks (cascade)",
    "infection_gt_lung": "Stage 2 (infection), ground-truth lung masks (ablation)",
}
FIGURE_ROWS = 6
LUNG_RGB = (0, 220, 90)
INFECTION_RGB = (255, 30, 30)
"""The colours of the predicted lungs and infection in predict's overlay, the DICOM segments and the viewer."""


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
        colors = (("lung_pred", (0, 200, 90)), ("infection_gt", (255, 200, 0)), ("infection_pred", (255, 30, 30)))
        for key, color in colors:
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


def markdown_table(title: str, results: dict[str, dict[str, Any]], variants: Sequence[str],
                   class_names: Sequence[str]) -> str:
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
            for cls in class_names:
                row = res[v][cls]
                if not row["n"]:
                    continue
                lines.append(f"| {split} | {VARIANTS[v]} | {cls} | {row['n']} | {_fmt(row['dice_pooled'])} | "
                             f"{_fmt(row['dice_per_image_mean'])} | {_fmt(row['iou_pooled'])} | "
                             f"{_fmt(row['iou_per_image_mean'])} | {_fmt(row['loss'])} |")
    return "\n".join(lines) + "\n"


def image_level_table(results: dict[str, Any]) -> str:
    """Markdown table of the image-level "any infection" figures per split (`evaluate.image_level_figures`)."""
    rows = ["Image level, \"any infection\" (positive: COVID-19 images):", "",
            "| split | rule | sensitivity | specificity | ROC AUC |", "|---|---|---:|---:|---:|"]
    for split, r in results.items():
        figures = r.get("image_level")
        if not figures:
            continue
        m = figures["mask"]
        rows.append(f"| {split} | infection mask has any pixel | {_fmt(m['sensitivity'])} | "
                    f"{_fmt(m['specificity'])} | |")
        head = figures.get("head")
        if head:
            rows.append(f"| {split} | image head: infection probability >= {head['threshold']:g} | "
                        f"{_fmt(head['sensitivity'])} | {_fmt(head['specificity'])} | {_fmt(head['auc'])} |")
    return "\n".join(rows)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json, report.md (Tables I and II) beside the figure(s) already in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results = report["results"]
    md = [f"# Evaluation of the covidseg-tf cascade on `{report['dataset']}`", "",
          f"- Lung model: `{report['lung_model']}`", f"- Infection model: `{report['infection_model']}`",
          f"- Models at {report['image_size']} px; masks and metrics at each image's native size; decision "
          f"{report['decision']}; splits: {', '.join(results)}"
          + (f", first {report['limit']} images" if report['limit'] else ""),
          "- *pooled*: summed intersections over summed areas of all images (the seed's tables); *mean per "
          "image*: average of per-image scores, where empty truth + empty prediction = 1 (Non-COVID and Normal "
          "images have no infection, so for Stage 2 they score 1 or 0); *mean per COVID-19 image*: the same "
          "over COVID-19 images only. Loss: the stage's training loss per image on the probabilities.", "",
          markdown_table("Table I: lung segmentation (Stage 1)", results, ["lung"], report["class_names"]), ""]
    if any("infection_cascade" in r for r in results.values()):
        md += [markdown_table("Table II: infection segmentation (Stage 2)", results,
                              ["infection_cascade", "infection_gt_lung"], report["class_names"]), ""]
        sev = {s: r.get("severity_mae_covid") for s, r in results.items()}
        md += ["Severity (total infected lung %), mean absolute error vs ground truth over COVID-19 images: " +
               ", ".join(f"{s}: {_fmt(v)} points" for s, v in sev.items()), ""]
        md += [image_level_table(results), ""]
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


