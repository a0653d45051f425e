#!/usr/bin/env python3
"""The input gate's statistics on the real COVID-QU-Ex images and on generated non-X-rays, with their margins.

For every image of the chosen splits (default Train, Val and Test of ../shared/covidqu, Kaggle's layout
``Infection Segmentation Data/Infection Segmentation Data/<split>/<class>/images/*.png``) it decodes the file as
`predict` does (`imageio.decode_image`: grey pixels and the colour share) and runs the gate exactly as
`Predictor.predict` decides it (`Predictor.input_gate`: `preprocess.input_quality` on the model pixels and Stage 1's
lung probabilities of the given models). Per split it reports how many images the gate refuses (the false
refusals: every real image is a chest X-ray) with the first few files and reasons, and for every statistic its
minimum, maximum, 0.1 / 1 / 50 / 99 / 99.9 percentiles and the MARGIN: how far the worst image of the split is
from its threshold (positive: inside; for a ratio threshold also as a factor). The pixel statistics that depend
on the model size (grey-level standard deviation, roughness, detail) are also reported at --pixel-sizes (default 256,
the next models' size), which needs no model.

The generated set (`covidseg_tf.nonxray`, --seeds seeds of every kind) goes through the same gate from its PNG
bytes (per kind: how many were refused, by which check, and how many by the expected one; `blobs_on_black` is
reported, not required), and so do the inverted Val images (255 - x: a negative, e.g. a MONOCHROME1 file shown
as MONOCHROME2, reported, not required to be refused); for each the check that refused it and the statistics.
Train and Val choose the thresholds; Test is only reported.

Prints ONE JSON line (and appends it to --json-out). Skips (exit 0, "skipped") without the real data. Takes a
few minutes on 2 cores (about 7,000 images through Stage 1 at the lung model's size with flip TTA).

Example:
  python bench/ood_gate.py --json-out bench/results/ood_gate.jsonl
  python bench/ood_gate.py --lung-model saved_models/lung/5 --infection-model saved_models/infection/5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository first on sys.path)

from covidseg_tf import limits  # noqa: E402
from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUT = Path("Infection Segmentation Data") / "Infection Segmentation Data"

# statistic -> (threshold, "min" if the gate refuses below it / "max" if above it)
THRESHOLDS: dict[str, list[tuple[float, str]]] = {
    "grey_std": [(limits.MIN_STD, "min")],
    "colour": [(limits.MAX_COLOUR_SHARE, "max")],
    "roughness": [(limits.MAX_ROUGHNESS, "max")],
    "detail": [(limits.MIN_DETAIL, "min")],
    "lung_area": [(limits.MIN_LUNG_AREA, "min"), (limits.MAX_LUNG_AREA, "max")],
    "lung_balance": [(limits.MIN_LUNG_BALANCE, "min")],
    "lung_x": [(limits.LUNG_CENTRE_X[0], "min"), (limits.LUNG_CENTRE_X[1], "max")],
    "lung_y": [(limits.LUNG_CENTRE_Y[0], "min"), (limits.LUNG_CENTRE_Y[1], "max")],
    "lung_confidence": [(limits.MIN_LUNG_CONFIDENCE, "min")],
}
STATS = tuple(THRESHOLDS)


def summarize(values: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per statistic: min, max, percentiles and the margin of the worst value to each threshold."""
    out: dict[str, Any] = {}
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        row: dict[str, Any] = {"min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}
        row.update({f"p{q:g}": round(float(np.percentile(v, q)), 4) for q in (0.1, 1, 50, 99, 99.9)})
        margins = {}
        for threshold, side in THRESHOLDS.get(name.split("@")[0], []):
            worst = float(v.min()) if side == "min" else float(v.max())
            margin = worst - threshold if side == "min" else threshold - worst
            key = f"{side} {threshold:g}"
            margins[key] = {"worst": round(worst, 4), "margin": round(margin, 4)}
            if threshold > 0 and worst > 0:
                margins[key]["factor"] = round(worst / threshold if side == "min" else threshold / worst, 2)
        if margins:
            row["margins"] = margins
        out[name] = row
    return out


def gate_rows(predictor: Any, grays: list[np.ndarray], colour: list[float], pixel_sizes: list[int]) -> dict[str, Any]:
    """`Predictor.input_gate` of a batch, plus the pixel statistics at `pixel_sizes`."""
    import tensorflow as tf

    from covidseg_tf.inference.preprocess import detail, roughness, to_model_pixels

    q = predictor.input_gate(grays, colour)
    for size in pixel_sizes:
        pixels = tf.stack([to_model_pixels(tf.constant(g[:, :, None]), size) for g in grays])
        q[f"grey_std@{size}"] = tf.math.reduce_std(pixels[..., 0], axis=[1, 2]).numpy()
        q[f"roughness@{size}"] = roughness(pixels).numpy()
        q[f"detail@{size}"] = detail(pixels).numpy()
    return q


def run_files(predictor: Any, files: list[Path], pixel_sizes: list[int], batch: int, invert: bool = False
              ) -> dict[str, Any]:
    """The gate over `files` (inverted with `invert`): per-image statistics, refusals."""
    from covidseg_tf.imageio import decode_image

    columns: dict[str, list] = {}
    for i in range(0, len(files), batch):
        decoded = [decode_image(f.read_bytes(), str(f)) for f in files[i:i + batch]]
        grays = [255 - d.gray if invert else d.gray for d in decoded]
        q = gate_rows(predictor, grays, [d.colour for d in decoded], pixel_sizes)
        for k, v in q.items():
            columns.setdefault(k, []).extend(list(v))
    assessed = np.array(columns["assessed"], bool)
    refused = [{"file": str(f), "reason": r} for f, r, ok in zip(files, columns["reason"], assessed) if not ok]
    checks: dict[str, int] = {}
    for c in columns["check"]:
        if c:
            checks[c] = checks.get(c, 0) + 1
    stats = {k: np.array(v, np.float64) for k, v in columns.items() if k not in ("assessed", "reason", "check")}
    return {"images": len(files), "refused": int((~assessed).sum()),
            "refused_rate": round(float((~assessed).mean()), 5) if len(files) else None,
            "refused_by_check": checks, "refused_first": refused[:10], "stats": summarize(stats)}


def run_generated(predictor: Any, seeds: int, pixel_sizes: list[int]) -> dict[str, Any]:
    """The generated non-X-ray set through the gate from its PNG bytes: per kind and seed, the check and stats."""
    from covidseg_tf import nonxray
    from covidseg_tf.imageio import decode_image

    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in range(seeds):
        images = nonxray.make_all(seed)
        decoded = [decode_image(nonxray.encode_png(img), f"{kind}.png") for kind, img in images.items()]
        q = gate_rows(predictor, [d.gray for d in decoded], [d.colour for d in decoded], pixel_sizes)
        for i, kind in enumerate(images):
            row = {"seed": seed, "assessed": bool(q["assessed"][i]), "check": q["check"][i],
                   "expected": nonxray.EXPECTED[kind], "reason": q["reason"][i]}
            row.update({k: round(float(q[k][i]), 4) for k in q if k not in ("assessed", "reason", "check")})
            rows.setdefault(kind, []).append(row)
    summary = {kind: {"refused": sum(not r["assessed"] for r in rs), "of": len(rs),
                      "checks": sorted({r["check"] for r in rs}), "expected": nonxray.EXPECTED[kind],
                      "as_expected": sum(r["check"] == r["expected"] for r in rs), "rows": rs}
               for kind, rs in rows.items()}
    required = [s for kind, s in summary.items() if kind in nonxray.REQUIRED]
    return {"kinds": summary, "required_refused": sum(s["refused"] for s in required),
            "required_as_expected": sum(s["as_expected"] for s in required),
            "required_of": sum(s["of"] for s in required)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "covidqu",
                   help="the COVID-QU-Ex folder (default: ../shared/covidqu beside the repository)")
    p.add_argument("--splits", nargs="+", default=["Train", "Val", "Test"])
    p.add_argument("--lung-model", default=str(DEFAULT_LUNG_MODEL), help="default: the shipped lung model")
    p.add_argument("--infection-model", default=str(DEFAULT_INFECTION_MODEL),
                   help="default: the shipped infection model (only its recorded decision, e.g. flip TTA, is used)")
    p.add_argument("--pixel-sizes", type=int, nargs="*", default=[256],
                   help="extra sizes for the pixel statistics (default: 256)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the generated non-X-ray set (default: 5)")
    p.add_argument("--no-inverted", action="store_true", help="skip the inverted Val images")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per split (a quick look)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    common.configure_tf(args.threads, 1)
    root = args.data / LAYOUT
    if not root.is_dir():
        common.emit({"bench": "ood_gate", "skipped": f"no real data at {root}"}, args.json_out)
        return 0
    from covidseg_tf.inference import Predictor

    t0 = time.perf_counter()
    predictor = Predictor.load(args.lung_model, args.infection_model)
    result: dict[str, Any] = {
        "bench": "ood_gate", "lung_model": args.lung_model, "infection_model": args.infection_model,
        "image_size": predictor.image_size, "decision": predictor.decision.to_dict(),
        "limits": {k: getattr(limits, k) for k in (
            "MIN_SIDE", "MAX_ASPECT", "MIN_STD", "COLOUR_CHROMA", "MAX_COLOUR_SHARE", "MAX_ROUGHNESS", "DETAIL_CELLS",
            "MIN_DETAIL", "LUNG_CUTOFF", "LUNG_SURE", "MIN_LUNG_AREA", "MAX_LUNG_AREA", "MIN_LUNG_BALANCE",
            "LUNG_CENTRE_X", "LUNG_CENTRE_Y", "MIN_LUNG_CONFIDENCE")},
        "splits": {},
    }
    for split in args.splits:
        files = sorted((root / split).glob("*/images/*.png"))[:args.limit]
        result["splits"][split] = run_files(predictor, files, args.pixel_sizes, args.batch)
    if not args.no_inverted:
        files = sorted((root / "Val").glob("*/images/*.png"))[:args.limit]
        result["inverted_val"] = run_files(predictor, files, args.pixel_sizes, args.batch, invert=True)
    result["generated"] = run_generated(predictor, args.seeds, args.pixel_sizes)
    chosen = [s for s in ("Train", "Val") if s in result["splits"]]
    result["false_refusals_train_val"] = sum(result["splits"][s]["refused"] for s in chosen)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    common.emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
