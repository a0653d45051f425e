"""Segment lungs and COVID-19 infection on X-ray files and score severity.

For each input image (PNG / JPEG / BMP / TIFF, 8 or 16 bit, gray / RGB / RGBA, or DICOM; see
covidseg_tf.imageio) the cascade runs at the models' input size; the two probability maps are resized
bilinearly back to the input's resolution and thresholded there, the infection mask is restricted to the
lung mask, and severity (covidseg_tf.cascade.severity) is computed on these full-resolution masks. Written
into --out, per input `<name>`:

    <name>_lung.png       lung mask, 8-bit 0/255, input resolution
    <name>_infection.png  infection mask, 8-bit 0/255, input resolution
    <name>_overlay.png    the X-ray with the lung outline + light tint (green) and the infection (red)
    <name>.json           sizes, areas, severity per lung and grade, model files and versions

Inputs inside a folder keep their relative sub-folders under --out (``<out>/<folder name>/<sub-path>``).
Names clashing with another input's outputs or with an input file get a suffix (``a_png``, ``a_dcm``, ``b-1``),
so an input is never overwritten; --out may lie inside an input folder (its files are then not walked as
inputs) but an input folder inside --out is refused. A file that cannot be read or processed is logged and
skipped; the exit code is 1 if any input failed (or none was found), else 0.

Models (covidseg_tf.cascade.load_model): by default the repository's exported TF Serving SavedModels
`saved_models/lung` and `saved_models/infection` (highest version of each); --lung-model / --infection-model
also take a version folder or a Keras `.keras` file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from covidseg_tf import __version__
from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL, default_config
from covidseg_tf.imageio import KNOWN_EXTENSIONS, find_images, read_xray

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = ("_lung.png", "_infection.png", "_overlay.png", ".json")

LUNG_RGB = (0, 220, 90)
INFECTION_RGB = (255, 30, 30)


@dataclass
class Prediction:
    """Masks (HxW uint8 0/1, input resolution) and severity of one image."""

    lung: np.ndarray
    infection: np.ndarray
    severity_left: float
    severity_right: float
    severity_total: float


class Predictor:
    """The two stage models (Keras or SavedModel, see cascade.load_model) plus the pre/post-processing of
    single images."""

    def __init__(self, lung_model_path: str | Path, infection_model_path: str | Path, threshold: float | None = None,
                 image_size: int | None = None):
        import tensorflow as tf

        from covidseg_tf.cascade import load_model, model_image_size, run_cascade

        self.lung_model_path = Path(lung_model_path)
        self.infection_model_path = Path(infection_model_path)
        self.lung_model = load_model(self.lung_model_path, stage="lung")
        self.infection_model = load_model(self.infection_model_path, stage="infection")
        self.threshold = default_config("infection").threshold if threshold is None else float(threshold)
        self.image_size = model_image_size(self.lung_model, image_size or default_config("lung").image_size)
        if image_size and image_size != self.image_size:
            raise ValueError(f"--image-size {image_size} differs from the lung model's fixed input size {self.image_size}")
        inf_size = model_image_size(self.infection_model, self.image_size)
        if inf_size != self.image_size:
            raise ValueError(f"the lung model takes {self.image_size} px but the infection model {inf_size} px")
        spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)
        self._cascade = tf.function(lambda p: run_cascade(self.lung_model, self.infection_model, p, self.threshold),
                                    input_signature=[spec])

    def model_info(self) -> dict[str, Any]:
        """Model files and library versions for the JSON reports.

        Per model: `path`, `bytes`, `sha256` of the `.keras` file; for a SavedModel the version folder, the
        total size of its files, the sha256 of its saved_model.pb, and `precision` / `image_size` of its export.
        """
        import keras
        import tensorflow as tf

        return {"lung": model_file_info(self.lung_model, self.lung_model_path),
                "infection": model_file_info(self.infection_model, self.infection_model_path),
                "image_size": self.image_size, "threshold": self.threshold, "covidseg_tf": __version__,
                "keras": keras.__version__, "tensorflow": tf.__version__}

    def predict(self, gray: np.ndarray) -> Prediction:
        """Run the cascade on one HxW uint8 image; masks come back at HxW (see the module docstring)."""
        import tensorflow as tf

        from covidseg_tf.cascade import severity

        h, w = gray.shape
        s = self.image_size
        x = tf.convert_to_tensor(gray[None, :, :, None], tf.float32)
        # bilinear like the training pipeline; antialias only matters when shrinking large (e.g. DICOM) images
        x = tf.clip_by_value(tf.image.resize(x, (s, s), method="bilinear", antialias=True), 0.0, 255.0)
        out = self._cascade(tf.repeat(x, 3, axis=-1))
        lung_prob = tf.image.resize(out["lung_prob"], (h, w), method="bilinear")
        inf_prob = tf.image.resize(out["infection_prob"], (h, w), method="bilinear")
        lung = tf.cast(lung_prob >= self.threshold, tf.float32)
        infection = tf.cast(inf_prob >= self.threshold, tf.float32) * lung
        sev = {k: float(v.numpy()[0]) for k, v in severity(lung, infection).items()}
        return Prediction(lung=lung.numpy()[0, :, :, 0].astype(np.uint8),
                          infection=infection.numpy()[0, :, :, 0].astype(np.uint8),
                          severity_left=sev["severity_left"], severity_right=sev["severity_right"],
                          severity_total=sev["severity_total"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_file_info(model: Any, given: Path) -> dict[str, Any]:
    """Path, size and sha256 of a loaded model's `.keras` file (`given`) or SavedModel version folder."""
    from covidseg_tf.cascade import SavedModelStage

    if not isinstance(model, SavedModelStage):
        return {"path": str(given), "format": "keras", "bytes": given.stat().st_size, "sha256": _sha256(given)}
    path = model.path
    record = {"path": str(path), "format": "savedmodel",
              "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
              "sha256": _sha256(path / "saved_model.pb")}
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


def process_file(predictor: Predictor, path: Path, stem: Path, models: dict[str, Any]) -> dict[str, Any]:
    """Predict one file and write its four outputs; returns the JSON record."""
    from PIL import Image

    from covidseg_tf.cascade import severity_grade

    gray = read_xray(path)
    pred = predictor.predict(gray)
    stem.parent.mkdir(parents=True, exist_ok=True)
    names = {k: stem.parent / (stem.name + s) for k, s in zip(("lung", "infection", "overlay", "json"), OUTPUT_SUFFIXES)}
    Image.fromarray(pred.lung * 255).save(names["lung"])
    Image.fromarray(pred.infection * 255).save(names["infection"])
    Image.fromarray(overlay(gray, pred.lung, pred.infection)).save(names["overlay"])
    h, w = gray.shape
    lung_px, inf_px = int(pred.lung.sum()), int(pred.infection.sum())
    record = {
        "file": str(path),
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
        "outputs": {k: str(v) for k, v in names.items() if k != "json"},
        "models": models,
    }
    names["json"].write_text(json.dumps(record, indent=2) + "\n")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m covidseg_tf.predict",
        description="Lung + COVID-19 infection masks, overlay and severity for X-ray files (PNG/JPEG/DICOM...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m covidseg_tf.predict xray.png --out preds      # the repo's saved_models/{lung,infection}\n"
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
    p.add_argument("--threshold", type=float, default=default_config("infection").threshold,
                   help="probability threshold of both stages (default: %(default)s)")
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
            log.error("input folder %s is inside --out %s: outputs and inputs would mix; choose another --out", p, out_dir)
            return 1
    files, missing = find_images(list(args.inputs), exclude=out_dir)
    for m in missing:
        log.error("input %s does not exist; skipped", m)
    if not files:
        log.error("no input images found in %s", ", ".join(map(str, args.inputs)))
        return 1
    try:
        predictor = Predictor(args.lung_model, args.infection_model, args.threshold, args.image_size)
    except (ValueError, FileNotFoundError, ImportError) as e:
        log.error("%s", e)
        return 1
    models = predictor.model_info()
    plan = plan_outputs(files, list(args.inputs), out_dir)
    failed = list(missing)
    for f in tqdm(files, desc="predict", unit="img", disable=args.quiet):
        try:
            rec = process_file(predictor, f, plan[f], models)
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
