"""Data audit of a COVID-QU-Ex manual download: split leakage (exact and near-duplicate images) and mask rules.

Reads exactly what the `covid_qu_ex` TFDS builder reads (same discovery and decoding: `covid_qu_ex.sources`).

Rules (documented in `--help` and in the JSON under "rules"):

- exact duplicate: identical decoded 8-bit gray pixels (SHA-256 of shape + pixel bytes), whatever the file bytes;
- near duplicate: not exact, and the Pearson correlation of the two images' `thumb_size` x `thumb_size` box-filtered
  thumbnails is >= `near_threshold` (default 32 px, 0.96). Correlation ignores brightness and contrast changes,
  so re-exported, re-windowed or slightly shifted copies of the same radiograph score ~0.97-1.0; on the real
  data, pairs at 0.96-0.97 are mostly the same patient on another day, different patients rarely exceed 0.95.
  The JSON also lists how many cross-split pairs every threshold from 0.90 to 0.99 would give;
- masks: values must be binary ({0, 255} or {0, 1}); infection pixels must lie inside the lung mask (after the
  builder's binarization); infection masks of Non-COVID and Normal images must be empty; lung masks must not be
  empty; masks must have their image's size; every file must decode.

Leakage is reported between different splits (the headline numbers); duplicates inside one split are listed
separately.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from tfds_covidqu.covid_qu_ex import sources
from tfds_covidqu.covid_qu_ex.sources import CovidQuExDataError, ExampleFiles

logger = logging.getLogger(__name__)

DEFAULT_NEAR_THRESHOLD = 0.96
DEFAULT_THUMB_SIZE = 32
_SWEEP = (0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
_BLOCK = 2048  # rows of the correlation matrix computed at once


@dataclass
class _Item:
    files: ExampleFiles
    digest: str
    thumb: np.ndarray  # unit-norm, zero-mean float32 vector


def _ref(ex: ExampleFiles) -> dict[str, str]:
    return {"split": ex.split, "label": ex.label, "file_name": ex.file_name, "path": ex.where("image")}


def pixel_digest(image: np.ndarray) -> str:
    """SHA-256 of an image's shape and pixel bytes (exact-duplicate key)."""
    h = hashlib.sha256(f"{image.shape}|{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def thumbnail(image: np.ndarray, size: int = DEFAULT_THUMB_SIZE) -> np.ndarray:
    """Zero-mean unit-norm float32 vector of the size x size box-filtered thumbnail (dot product = correlation)."""
    t = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX), dtype=np.float32).ravel()
    t = t - t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 1e-6 else t  # a flat image correlates with nothing


def _check_masks(ex: ExampleFiles, image_size: tuple[int, int], problems: dict[str, list]) -> None:
    """Appends the mask rule violations of one example to `problems[kind]`."""
    binary = {}
    for kind in ("lung_mask", "infection_mask"):
        member = getattr(ex, kind)
        if member is None:
            continue
        where = ex.where(kind)
        try:
            im = sources.open_image(ex.source.read(member), where)
        except CovidQuExDataError as e:
            problems["unreadable"].append({"file": where, "error": str(e)})
            continue
        if im.size != image_size:
            problems["size_mismatch"].append(
                {"file": where, "mask_size": list(im.size), "image_size": list(image_size)}
            )
            continue
        raw = sources.raw_array(im)
        values = np.unique(raw)
        if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}
                or (raw.dtype != np.uint8 and set(values.tolist()) <= {0, 65535})):
            bad = values[(values != 0) & (values != values.max())]
            problems["non_binary"].append({
                "file": where, "values": values[:12].tolist(), "n_values": int(values.size),
                "non_binary_pixels": int(np.isin(raw, bad).sum()),
            })
        binary[kind] = sources.binarize_mask(im)
    lung, infection = binary.get("lung_mask"), binary.get("infection_mask")
    if lung is not None and not lung.any():
        problems["empty_lung_mask"].append({"file": ex.where("lung_mask")})
    if infection is not None and infection.any():
        if lung is not None:
            outside = int((infection & (1 - lung)).sum())
            if outside:
                problems["infection_outside_lung"].append({
                    "file": ex.where("infection_mask"), "outside_pixels": outside,
                    "infection_pixels": int(infection.sum()),
                })
        if ex.label != "COVID-19":
            problems["infection_in_non_covid"].append(
                {"file": ex.where("infection_mask"), "label": ex.label, "infection_pixels": int(infection.sum())}
            )


def _pairs_above(thumbs: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, corr) with i < j and corr >= threshold, computed block-wise (memory ~ _BLOCK x N floats)."""
    out = []
    n = len(thumbs)
    for start in range(0, n, _BLOCK):
        block = thumbs[start:start + _BLOCK] @ thumbs.T
        rows, cols = np.nonzero(block >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c > i:
                out.append((i, c, float(block[r, c])))
    return out


def audit(
    manual_dir: str | Path,
    part: str = "infection",
    near_threshold: float = DEFAULT_NEAR_THRESHOLD,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Audits `part` of the COVID-QU-Ex data in `manual_dir`; returns the JSON-able report (see module doc).

    Raises CovidQuExDataError only when the part cannot be found at all; per-file problems go in the report.
    """
    scan = sources.scan(manual_dir, part)
    mask_problems: dict[str, list] = {k: [] for k in (
        "unreadable", "size_mismatch", "non_binary", "infection_outside_lung", "infection_in_non_covid",
        "empty_lung_mask")}
    items: list[_Item] = []
    examples = list(sources.iter_all(scan.examples))
    for ex in tqdm(examples, desc=f"audit {part}", unit="img", disable=not progress):
        try:
            im = sources.open_image(ex.source.read(ex.image), ex.where("image"))
        except CovidQuExDataError as e:
            mask_problems["unreadable"].append({"file": ex.where("image"), "error": str(e)})
            continue
        gray = sources.to_gray8(im)
        items.append(_Item(ex, pixel_digest(gray), thumbnail(gray, thumb_size)))
        _check_masks(ex, im.size, mask_problems)

    # Exact duplicates.
    groups: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        groups.setdefault(it.digest, []).append(k)
    exact_cross, exact_within = [], []
    exact_pairs: set[tuple[int, int]] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        exact_pairs.update((a, b) for a in members for b in members if a < b)
        group = [_ref(items[k].files) for k in members]
        (exact_cross if len({g["split"] for g in group}) > 1 else exact_within).append(group)

    # Near duplicates.
    thumbs = np.stack([it.thumb for it in items]) if items else np.zeros((0, thumb_size * thumb_size), np.float32)
    pairs = [p for p in _pairs_above(thumbs, min(min(_SWEEP), near_threshold)) if (p[0], p[1]) not in exact_pairs]
    sweep = {f"{t:.2f}": 0 for t in _SWEEP}
    near_cross, near_within = [], []
    for i, j, corr in sorted(pairs, key=lambda p: -p[2]):
        a, b = items[i].files, items[j].files
        cross = a.split != b.split
        if cross:
            for t in _SWEEP:
                sweep[f"{t:.2f}"] += corr >= t
        if corr >= near_threshold:
            entry = {"a": _ref(a), "b": _ref(b), "correlation": round(corr, 5)}
            (near_cross if cross else near_within).append(entry)

    def _images_in(pairs_: list[dict]) -> int:
        return len({p[s]["path"] for p in pairs_ for s in ("a", "b")})

    report = {
        "manual_dir": str(manual_dir),
        "part": part,
        "source": str(scan.source.root) if scan.source else None,
        "counts": scan.counts(),
        "n_images": len(examples),
        "rules": {
            "exact_duplicate": "identical decoded 8-bit gray pixels (SHA-256 of shape + pixels)",
            "near_duplicate": f"not exact and Pearson correlation of {thumb_size}x{thumb_size} box-filtered "
            f"thumbnails >= {near_threshold}",
            "masks": "values in {0,255} or {0,1}; infection inside lung; infection empty for Non-COVID/Normal; "
            "lung mask not empty; same size as the image",
        },
        "layout_problems": scan.problems,
        "exact_duplicates": {"cross_split": exact_cross, "within_split": exact_within},
        "near_duplicates": {
            "threshold": near_threshold,
            "thumb_size": thumb_size,
            "cross_split": near_cross,
            "within_split": near_within,
            "cross_split_pairs_by_threshold": sweep,
        },
        "mask_problems": mask_problems,
    }
    report["summary"] = {
        "images": len(examples),
        "layout_problems": len(scan.problems),
        "exact_duplicate_groups_cross_split": len(exact_cross),
        "exact_duplicate_groups_within_split": len(exact_within),
        "near_duplicate_pairs_cross_split": len(near_cross),
        "near_duplicate_images_cross_split": _images_in(near_cross),
        "near_duplicate_pairs_within_split": len(near_within),
        **{f"mask_{k}": len(v) for k, v in mask_problems.items()},
    }
    if scan.source is not None:
        scan.source.close()
    return report


def format_summary(report: dict[str, Any], max_items: int = 10) -> str:
    """Readable multi-line summary of an audit report."""
    s = report["summary"]
    nd = report["near_duplicates"]
    lines = [
        f"COVID-QU-Ex audit of '{sources.PART_FOLDERS[report['part']]}' in {report['source']}",
        f"  images: {s['images']}  " + "  ".join(
            f"{split}: " + "/".join(str(n) for n in c.values()) for split, c in report["counts"].items()
        ) + "  (COVID-19/Non-COVID/Normal)",
        f"  layout problems: {s['layout_problems']}",
        f"  exact duplicates across splits: {s['exact_duplicate_groups_cross_split']} group(s); "
        f"within a split: {s['exact_duplicate_groups_within_split']}",
        f"  near duplicates across splits (corr >= {nd['threshold']} on {nd['thumb_size']}px thumbnails): "
        f"{s['near_duplicate_pairs_cross_split']} pair(s), {s['near_duplicate_images_cross_split']} image(s); "
        f"within a split: {s['near_duplicate_pairs_within_split']} pair(s)",
        "  cross-split pairs by threshold: "
        + ", ".join(f"{t}: {n}" for t, n in nd["cross_split_pairs_by_threshold"].items()),
        "  mask problems: " + ", ".join(f"{k}: {len(v)}" for k, v in report["mask_problems"].items()),
    ]
    for p in report["layout_problems"][:max_items]:
        lines.append(f"    layout: {p}")
    for g in report["exact_duplicates"]["cross_split"][:max_items]:
        lines.append("    exact: " + "  ==  ".join(f"{r['split']}:{r['label']}/{r['file_name']}" for r in g))
    for p in nd["cross_split"][:max_items]:
        a, b = p["a"], p["b"]
        lines.append(f"    near {p['correlation']:.4f}: {a['split']}:{a['label']}/{a['file_name']}  ~  "
                     f"{b['split']}:{b['label']}/{b['file_name']}")
    for kind, entries in report["mask_problems"].items():
        for e in entries[:max_items]:
            detail = {k: v for k, v in e.items() if k != "file"}
            lines.append(f"    {kind}: {e['file']} {detail}")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description/epilog line breaks."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tfds_covidqu.audit",
        description="Audit a COVID-QU-Ex manual download (the files the covid_qu_ex TFDS builder reads): exact and\n"
        "near-duplicate images across Train/Val/Test, and masks that break the rules.\n\n"
        "  exact duplicate: identical decoded 8-bit gray pixels (SHA-256)\n"
        "  near duplicate:  not exact, Pearson correlation of box-filtered thumbnails >= --near_threshold\n"
        "                   (brightness/contrast invariant; the JSON lists the cross-split counts at 0.90-0.99)\n"
        "  masks:           values {0,255} or {0,1}; infection inside lung; no infection in Non-COVID/Normal;\n"
        "                   lung mask not empty; mask size = image size; every file decodes\n\n"
        "Prints a summary; --out writes the full JSON report.",
        formatter_class=_HelpFormatter,
        epilog="examples:\n"
        "  python -m tfds_covidqu.audit --manual_dir ../shared/covidqu\n"
        "  python -m tfds_covidqu.audit --manual_dir ~/kaggle/covidqu --out reports/audit.json   # holds archive.zip\n"
        "  python -m tfds_covidqu.audit --manual_dir D --part lung --near_threshold 0.97 --quiet",
    )
    p.add_argument("--manual_dir", required=True, type=Path,
                   help="folder holding the Kaggle zip, the extracted download or the part folder itself; "
                        "or the zip file")
    p.add_argument("--part", choices=sorted(sources.PART_FOLDERS), default="infection", help="which data part")
    p.add_argument("--out", type=Path, default=None, help="write the full JSON report here")
    p.add_argument("--near_threshold", type=float, default=DEFAULT_NEAR_THRESHOLD,
                   help="thumbnail correlation at or above which two images are near duplicates")
    p.add_argument("--thumb_size", type=int, default=DEFAULT_THUMB_SIZE, help="thumbnail side in pixels")
    p.add_argument("--max_items", type=int, default=10, help="findings listed per category in the summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not 0.0 < args.near_threshold <= 1.0:
        _parser().error("--near_threshold must be in (0, 1]")
    if args.thumb_size < 4:
        _parser().error("--thumb_size must be >= 4")
    try:
        report = audit(args.manual_dir, args.part, args.near_threshold, args.thumb_size, progress=not args.quiet)
    except CovidQuExDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(report, args.max_items))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
