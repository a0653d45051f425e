"""Segment lungs and COVID-19 infection on X-ray files and score severity.

For each input image (PNG / JPEG / BMP / TIFF, 8 or 16 bit, gray / RGB / RGBA, or DICOM; see
covidseg_tf.imageio) `covidseg_tf.cascade.Cascade` gives the lung and infection masks and the severity at the
input's own resolution (the same function the cascade SavedModel and `evaluate` run). Written into --out, per
input `<name>`:

    <name>_lung.png       lung mask, 8-bit 0/255, input resolution
    <name>_infection.png  infection mask, 8-bit 0/255, input resolution
    <name>_overlay.png    the X-ray with the lung outline + light tint (green) and the infection (red)
    <name>.json           sizes, areas, severity per lung and grade, model files and versions

Inputs inside a folder keep their relative sub-folders under --out (``<out>/<folder name>/<sub-path>``).
Names clashing with another input's outputs or with an input file get a suffix (``a_png``, ``a_dcm``, ``b-1``),
so an input is never overwritten; --out may lie inside an input folder (its files are then not walked as
inputs) but an input folder inside --out is refused. A file that cannot be read or processed is logged and
skipped; the exit code is 1 if any input failed (or none was found), else 0.

Models (covidseg_tf.cascade.load_model): by default the shipped SavedModels `saved_models/lung/1` and
`saved_models/infection/1` (config.SHIPPED_VERSION); --lung-model / --infection-model also take a TF Serving base
folder (its highest integer version), a version folder or a Keras `.keras` file.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidseg_tf import __version__
from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL, add_decision_flags, decision_overrides
from covidseg_tf.imageio import KNOWN_EXTENSIONS, find_images, read_xray
from covidseg_tf.paths import sha256_file

if TYPE_CHECKING:
    from covidseg_tf.cascade import Cascade, Prediction

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = ("_lung.png", "_infection.png", "_overlay.png", ".json")

LUNG_RGB = (0, 220, 90)
INFECTION_RGB = (255, 30, 30)


def model_info(cascade: Cascade) -> dict[str, Any]:
    """Model files and library versions for the JSON reports (see `model_file_info`)."""
    import keras
    import tensorflow as tf

    return {"lung": model_file_info(cascade.lung_model, cascade.sources["lung"]),
            "infection": model_file_info(cascade.infection_model, cascade.sources["infection"]),
            "image_size": cascade.image_size, "decision": cascade.decision.to_dict(), "covidseg_tf": __version__,
            "keras": keras.__version__, "tensorflow": tf.__version__}


def model_file_info(model: Any, given: Path) -> dict[str, Any]:
    """Path, size and sha256 of a loaded model's `.keras` file (`given`) or, for a SavedModel, its version folder,
    the total size of its files, the sha256 of its saved_model.pb and `precision` / `image_size` of its export."""
    from covidseg_tf.cascade import SavedModelStage

    if not isinstance(model, SavedModelStage):
        return {"path": str(given), "format": "keras", "bytes": given.stat().st_size, "sha256": sha256_file(given)}
    path = model.path
    record = {"path": str(path), "format": "savedmodel",
              "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
              "sha256": sha256_file(path / "saved_model.pb")}
    record.update({k: model.info[k] for k in ("precision", "image_size") if k in model.info})
    return record


def overlay(gray: np.ndarray, lung: np.ndarray, infection: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: the X-ray with a light green lung tint + outline and the infection in translucent red."""
    from PIL import Image, ImageFilter

    rgb = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
    lung_b = lung.astype(bool)
    inf_b = infection.astype(bool)
    rgb[lung_b] = 0.85 * rgb[lung_b] + 0.15 * np.array(LUNG_RGB, np.float32)
    rgb[inf_b] = 0.5 * rgb[inf_b] + 0.5 * np.array(INFECTION_RGB, np.float32)
    width = max(1, round(min(gray.shape) / 256))
    eroded = np.asarray(Image.fromarray(lung_b.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1)))
    outline = lung_b & (eroded == 0)
    rgb[outline] = np.array(LUNG_RGB, np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def plan_outputs(files: list[Path], roots: list[Path], out_dir: Path) -> dict[Path, Path]:
    """Output stem (without suffix) for each input: keeps sub-folders, never collides with inputs or itself.

    Existing outputs of an earlier run in a dedicated output folder are replaced; in a folder that holds
    inputs, no existing file is ever replaced (a numeric suffix is added instead).
    """
    inputs = {f.resolve() for f in files}
    input_dirs = {f.parent for f in inputs}
    taken: set[Path] = set()
    plan: dict[Path, Path] = {}
    dir_roots = [r.resolve() for r in roots if r.is_dir()]

    def base_of(f: Path) -> Path:  # out_dir / <input folder name>/<sub-folders> / stem
        rf = f.resolve()
        for r in dir_roots:
            if r in rf.parents:
                return out_dir / r.name / rf.parent.relative_to(r) / f.stem
        return out_dir / f.stem

    stems: dict[Path, int] = {}
    for f in files:
        stems[base_of(f)] = stems.get(base_of(f), 0) + 1
    for f in files:
        base = base_of(f)
        if stems[base] > 1:  # e.g. a.png and a.dcm in one folder
            base = base.with_name(f"{f.stem}_{f.suffix.lstrip('.').lower() or 'noext'}")
        candidate, n = base, 1
        # in a folder holding inputs, any existing file is someone's data: never replace it
        protect = base.parent.resolve() in input_dirs
        while any((candidate.parent / (candidate.name + s)).resolve() in inputs or
                  (candidate.parent / (candidate.name + s)) in taken or
                  (protect and (candidate.parent / (candidate.name + s)).exists()) for s in OUTPUT_SUFFIXES):
            candidate = base.with_name(f"{base.name}-{n}")
            n += 1
        taken.update(candidate.parent / (candidate.name + s) for s in OUTPUT_SUFFIXES)
        plan[f] = candidate
    return plan


def render_outputs(source: str, gray: np.ndarray, pred: Prediction, stem: str,
                   models: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON record and the encoded outputs of one prediction: {output path: bytes} for `stem` + each of
    OUTPUT_SUFFIXES (the JSON last). `source` names the input, `stem` is any path prefix (local or a URL)."""
    from PIL import Image

    from covidseg_tf.cascade import severity_grade

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    names = dict(zip(("lung", "infection", "overlay", "json"), (stem + s for s in OUTPUT_SUFFIXES)))
    h, w = gray.shape
    lung_px, inf_px = int(pred.lung.sum()), int(pred.infection.sum())
    record = {
        "file": source,
        "size": {"height": h, "width": w},
        "lung_area_px": lung_px,
        "lung_area_percent_of_image": 100.0 * lung_px / (h * w),
        "infection_area_px": inf_px,
        "infection_area_percent_of_image": 100.0 * inf_px / (h * w),
        "severity": {
            "left": pred.severity_left,  # patient's left lung (image right on a PA view)
            "right": pred.severity_right,  # patient's right lung (image left)
            "total": pred.severity_total,
            "grade": severity_grade(pred.severity_total),
            "unit": "percent of lung area infected",
        },
        "outputs": {k: v for k, v in names.items() if k != "json"},
        "models": models,
    }
    encoded = {names["lung"]: png(pred.lung * 255), names["infection"]: png(pred.infection * 255),
               names["overlay"]: png(overlay(gray, pred.lung, pred.infection)),
               names["json"]: (json.dumps(record, indent=2) + "\n").encode()}
    return record, encoded


def process_file(cascade: Cascade, path: Path, stem: Path, models: dict[str, Any]) -> dict[str, Any]:
    """Predict one file and write its four outputs (`render_outputs`); returns the JSON record."""
    gray = read_xray(path)
    record, encoded = render_outputs(str(path), gray, cascade.predict([gray])[0], str(stem), models)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for name, data in encoded.items():
        Path(name).write_bytes(data)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m covidseg_tf.predict",
        description="Lung + COVID-19 infection masks, overlay and severity for X-ray files (PNG/JPEG/DICOM...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m covidseg_tf.predict xray.png --out preds      # the shipped models\n"
               "  python -m covidseg_tf.predict scans/ other.dcm --out preds \\\n"
               "      --lung-model runs/lung/model.keras --infection-model runs/infection/model.keras\n"
               "  python -m covidseg_tf.predict xray.png --out preds \\\n"
               "      --lung-model saved_models/lung/2 --infection-model saved_models/infection/2\n"
               "a model is a SavedModel base folder (its highest integer version), a version folder or a .keras "
               "file;\n"
               f"folders are searched recursively for {', '.join(sorted(KNOWN_EXTENSIONS))}; exit code 1 if any "
               "input failed.")
    p.add_argument("inputs", nargs="+", type=Path, help="image/DICOM files or folders")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; inputs are never overwritten)")
    p.add_argument("--lung-model", type=Path, default=DEFAULT_LUNG_MODEL,
                   help="Stage-1 model: SavedModel base or version folder, or .keras file (default: %(default)s)")
    p.add_argument("--infection-model", type=Path, default=DEFAULT_INFECTION_MODEL,
                   help="Stage-2 model: SavedModel base or version folder, or .keras file (default: %(default)s)")
    add_decision_flags(p)
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size, only for models without a fixed one (default: the models' size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    out_dir: Path = args.out
    if out_dir.exists() and not out_dir.is_dir():
        log.error("--out %s exists and is not a folder", out_dir)
        return 1
    out_abs = out_dir.resolve()
    for p in args.inputs:
        if p.is_dir() and (p.resolve() == out_abs or out_abs in p.resolve().parents):
            log.error("input folder %s is inside --out %s: outputs and inputs would mix; choose another --out",
                      p, out_dir)
            return 1
    files, missing = find_images(list(args.inputs), exclude=out_dir)
    for m in missing:
        log.error("input %s does not exist; skipped", m)
    if not files:
        log.error("no input images found in %s", ", ".join(map(str, args.inputs)))
        return 1
    try:
        from covidseg_tf.cascade import Cascade

        cascade = Cascade.load(args.lung_model, args.infection_model, image_size=args.image_size,
                               **decision_overrides(args))
    except (ValueError, FileNotFoundError, ImportError) as e:
        log.error("%s", e)
        return 1
    models = model_info(cascade)
    plan = plan_outputs(files, list(args.inputs), out_dir)
    failed = list(missing)
    for f in tqdm(files, desc="predict", unit="img", disable=args.quiet):
        try:
            rec = process_file(cascade, f, plan[f], models)
            log.info("%s: lung %d px, infection %d px, severity %.1f%% (%s)", f, rec["lung_area_px"],
                     rec["infection_area_px"], rec["severity"]["total"], rec["severity"]["grade"])
        except Exception as e:  # one bad file never loses the rest
            log.error("skipping %s: %s", f, e)
            failed.append(f)
    ok = len(files) - (len(failed) - len(missing))
    log.info("%d of %d input(s) processed into %s", ok, len(files) + len(missing), out_dir)
    if failed:
        log.error("%d input(s) failed: %s", len(failed), ", ".join(map(str, failed)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
