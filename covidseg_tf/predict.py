"""Segment lungs and COVID-19 infection on X-ray files and score severity.

For each input image (PNG / JPEG / BMP / TIFF, 8 or 16 bit, gray / RGB / RGBA, or DICOM; see
covidseg_tf.imageio) `covidseg_tf.inference.Predictor` gives the lung and infection masks and the severity at the
input's own resolution (the same function the cascade SavedModel and `evaluate` run). Written into --out, per
input `<name>`:

    <name>_lung.png       lung mask, 8-bit 0/255, input resolution
    <name>_infection.png  infection mask, 8-bit 0/255, input resolution
    <name>_overlay.png    the X-ray with the lung outline + light tint (green) and the infection (red), input
                          resolution up to 2048 px a side (OVERLAY_MAX_SIDE), shrunk by an integer factor beyond
    <name>_seg.dcm        with --dicom, for a DICOM input: a DICOM Segmentation (right lung, left lung, infection)
    <name>_sr.dcm         with --dicom, for a DICOM input: a DICOM TID 1500 Measurement Report (severity per lung,
                          grade, assessed or why not), both referencing the input's study, series and instance
                          (`covidseg_tf.dicom`)
    <name>.json           sizes, areas, severity per lung and grade, the image-level head's verdict (models
                          with a head), model files and versions

The JSON also records the input's SHA-256 (``input_sha256``) and whether the input gate assessed it: an image
that cannot be a frontal chest X-ray (too small, extremely elongated, near-constant, in colour, noise-like, or
without a plausible pair of lungs in the lung model's map; `covidseg_tf.limits`) gets ``"assessed": false``, the
``"reason"``, null severity and grade, empty masks and a warning line, never a grade.
Images above the size limits (4096 px a side) are refused from their header, before decoding.

Inputs inside a folder keep their relative sub-folders under --out (``<out>/<folder name>/<sub-path>``).
Names clashing with another input's outputs or with an input file get a suffix (``a_png``, ``a_dcm``, ``b-1``),
compared case-insensitively (``good.PNG`` and ``good.png`` give ``good_PNG`` and ``good_png-1`` on any file
system), so an input is never overwritten; --out may lie inside an input folder (its files are then not walked
as inputs) but an input folder inside --out is refused.

The models are loaded for the first input that decodes (a run whose inputs are all refused ends without them).
Reruns are explicit: if any planned output exists, predict names the first and stops before loading models,
unless --overwrite, which replaces them and removes the earlier outputs of inputs that fail this time (so no
stale result survives as if fresh). Each input's files are written under temporary names and renamed, its JSON
last: a JSON only stands next to the complete files it describes. A file that cannot be read or processed is
logged and skipped; so is (never silently) what a folder walk cannot use: a dangling or looping link, a FIFO, a
folder that cannot be listed. Exit codes (`covidseg_tf.exitcodes`): 1 if any input failed (or none was found); 2
for a usage error found before anything is written (an --out that cannot be written or holds an input folder,
earlier outputs without --overwrite, a model that cannot be loaded); 130 after Ctrl-C (the outputs written are
complete); else 0.

Models (`covidseg_tf.inference.load_stage`): by default the shipped SavedModels `saved_models/lung/<N>` and
`saved_models/infection/<N>`, N = `config.SHIPPED_VERSION`; --lung-model / --infection-model also take a TF Serving
base folder (its highest integer version), a version folder, a Keras `.keras` file or a `.tflite` file.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidseg_tf import __version__, exitcodes
from covidseg_tf.cli import add_decision_flags, add_model_flags, decision_overrides
from covidseg_tf.dicom import DICOM_SUFFIXES
from covidseg_tf.files import (  # noqa: F401  (unwritable_reason: also predict.unwritable_reason)
    Unusable,
    path_problem,
    sha256_bytes,
    sha256_file,
    unwritable_reason,
)
from covidseg_tf.imageio import KNOWN_EXTENSIONS, DecodedImage, XRayReadError, decode_image, find_images
from covidseg_tf.report import INFECTION_RGB, LUNG_RGB

if TYPE_CHECKING:
    from covidseg_tf.inference import Prediction, Predictor, Stage

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = ("_lung.png", "_infection.png", "_overlay.png", ".json")
"""The files every input gets, the JSON last; a DICOM input with --dicom also gets DICOM_SUFFIXES' (before it)."""

OVERLAY_MAX_SIDE = 2048
"""The overlay (a picture to look at; the masks keep the input's size) is drawn at most this many pixels a side."""


def model_info(predictor: Predictor) -> dict[str, Any]:
    """Model files and library versions for the JSON reports (see `model_file_info`)."""
    import keras
    import tensorflow as tf

    return {"lung": model_file_info(predictor.lung_model, predictor.sources["lung"]),
            "infection": model_file_info(predictor.infection_model, predictor.sources["infection"]),
            "image_size": predictor.image_size, "decision": predictor.decision.to_dict(), "covidseg_tf": __version__,
            "keras": keras.__version__, "tensorflow": tf.__version__}


def model_file_info(stage: Stage, given: Path | None) -> dict[str, Any]:
    """{"path", "format" (the stage's: "keras", "savedmodel", "tflite", "frozen"), "bytes", "sha256"} of a loaded
    stage, plus `precision` / `image_size` from its export manifest; a TFLite stage's `precision` is its file's own
    ("fp32" or "int8", `TFLiteStage.precision`), not the SavedModel's beside it. The path is what the stage was
    loaded from (`given` when it does not know): for a SavedModel its version folder, whose bytes are the total of
    its files and whose sha256 is that of its saved_model.pb; a model without a file has no bytes or sha256."""
    path = stage.path or given
    record: dict[str, Any] = {"path": None if path is None else str(path), "format": stage.format}
    if path is not None and path.is_dir():
        record.update(bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                      sha256=sha256_file(path / "saved_model.pb"))
    elif path is not None:
        record.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    if stage.manifest is not None:
        record.update({k: v for k, v in (("precision", stage.manifest.precision),
                                          ("image_size", stage.manifest.image_size)) if v is not None})
    if stage.format == "tflite":
        record["precision"] = stage.precision
    return record


def overlay(gray: np.ndarray, lung: np.ndarray, infection: np.ndarray) -> np.ndarray:
    """The X-ray with a light green lung tint + outline and the infection in translucent red, as h x w x 3 uint8:
    the input's own size up to OVERLAY_MAX_SIDE pixels a side, shrunk by an integer factor beyond (the X-ray by
    box averaging, the masks by taking every f-th pixel), so its cost is bounded whatever the input's size.

    The outline (about 1/256 of the short side wide) is an erosion computed from window sums (`_erode`), not a
    rank filter whose cost grows with its width; the colours come from a lookup table.
    """
    f = -(-max(gray.shape) // OVERLAY_MAX_SIDE)  # ceil
    if f > 1:
        from PIL import Image

        lung, infection = lung[::f, ::f], infection[::f, ::f]
        gray = np.asarray(Image.fromarray(gray).resize(lung.shape[::-1], Image.Resampling.BOX))
    lung_b, inf_b = lung.astype(bool), infection.astype(bool)
    state = lung_b.astype(np.uint8) + 2 * inf_b.astype(np.uint8)  # 0 none, 1 lung, 2 infection, 3 both
    state[lung_b & ~_erode(lung_b, max(1, round(min(gray.shape) / 256)))] = 4  # the outline
    g = np.arange(256, dtype=np.float32)[:, None]
    tinted = 0.85 * g + 0.15 * np.array(LUNG_RGB, np.float32)
    red = np.array(INFECTION_RGB, np.float32)
    colours = np.stack([np.repeat(g, 3, axis=1), tinted, 0.5 * g + 0.5 * red, 0.5 * tinted + 0.5 * red,
                        np.broadcast_to(np.array(LUNG_RGB, np.float32), (256, 3))])
    table = np.clip(np.round(colours), 0, 255).astype(np.uint8)  # (state, grey level, RGB)
    return table[state, gray]


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion of a bool mask by a (2 radius + 1)^2 square, outside the image counting as background: per
    axis, a pixel stays if its whole window is set, from the window sums of a cumulative sum (O(H x W), any
    radius)."""
    k = 2 * radius + 1

    def rows(m: np.ndarray) -> np.ndarray:  # along each row (axis 1, contiguous)
        n = m.shape[1]
        out = np.zeros_like(m)
        if n >= k:  # windows that reach past the border hold background: only interior pixels can stay
            c = np.zeros((m.shape[0], n + 1), np.uint16 if n < 65536 else np.int64)
            np.add.accumulate(m.view(np.uint8), axis=1, dtype=c.dtype, out=c[:, 1:])
            out[:, radius:n - radius] = (c[:, k:] - c[:, :n + 1 - k]) == k
        return out

    return np.ascontiguousarray(rows(np.ascontiguousarray(rows(mask).T)).T)


def _key(path: Path) -> str:
    """A path as a case-insensitive file system (macOS, Windows, exFAT) compares it."""
    return os.path.normcase(str(path)).casefold()


def output_paths(stem: Path) -> list[Path]:
    """Every output file an input planned at `stem` may have (OUTPUT_SUFFIXES and DICOM_SUFFIXES, the JSON last):
    the names reserved against collisions, checked for earlier runs and removed when stale."""
    return [stem.parent / (stem.name + s) for s in (*OUTPUT_SUFFIXES[:-1], *DICOM_SUFFIXES, OUTPUT_SUFFIXES[-1])]


def _earlier_output_of(stem: Path, source: Path) -> bool:
    """True if `stem`.json exists and is this program's record of `source` (an earlier run on the same file)."""
    try:
        record = json.loads((stem.parent / (stem.name + ".json")).read_text())
        return _key(Path(record["file"]).resolve()) == _key(source.resolve())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def plan_outputs(files: list[Path], roots: list[Path], out_dir: Path) -> dict[Path, Path]:
    """Output stem (without suffix) for each input: keeps sub-folders, never collides with inputs or itself.

    Names are compared case-insensitively, so the outputs of inputs that differ only by case or extension
    (``good.PNG``, ``good.png``, ``Good.png``) differ on any file system: inputs sharing a stem get their
    extension as written (``good_PNG``), and a name still taken gets a numeric suffix (``good_png-1``); the JSON
    names its input. In a folder that holds inputs, an existing file is never replaced unless it is an earlier
    output of the same input (its JSON names that file); a numeric suffix is added instead. Whether planned
    outputs already exist is `main`'s question (it refuses them without --overwrite).
    """
    inputs = {_key(f.resolve()) for f in files}
    input_dirs = {_key(f.resolve().parent) for f in files}
    taken: set[str] = set()
    plan: dict[Path, Path] = {}
    dir_roots = [r.resolve() for r in roots if r.is_dir()]

    def base_of(f: Path) -> Path:  # out_dir / <input folder name>/<sub-folders> / stem
        rf = f.resolve()
        for r in dir_roots:
            if r in rf.parents:
                return out_dir / r.name / rf.parent.relative_to(r) / f.stem
        return out_dir / f.stem

    stems: dict[str, int] = {}
    for f in files:
        stems[_key(base_of(f))] = stems.get(_key(base_of(f)), 0) + 1

    def blocked(candidate: Path, f: Path, protect: bool) -> bool:
        outs = output_paths(candidate)
        if any(_key(o.resolve()) in inputs or _key(o.resolve()) in taken for o in outs):
            return True
        # in a folder holding inputs, an existing file is someone's data unless it is our record of this input
        return protect and any(o.exists() for o in outs) and not _earlier_output_of(candidate, f)

    for f in files:
        base = base_of(f)
        if stems[_key(base)] > 1:  # e.g. a.png and a.dcm, or good.PNG and good.png, in one folder
            base = base.with_name(f"{f.stem}_{f.suffix.lstrip('.') or 'noext'}")
        candidate, n = base, 1
        protect = _key(base.parent.resolve()) in input_dirs
        while blocked(candidate, f, protect):
            candidate = base.with_name(f"{base.name}-{n}")
            n += 1
        taken.update(_key(o.resolve()) for o in output_paths(candidate))
        plan[f] = candidate
    return plan


def render_outputs(source: str, gray: np.ndarray, pred: Prediction, stem: str,
                   models: dict[str, Any], sha256: str | None = None,
                   dicom: Any = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON record and the encoded outputs of one prediction: {output path: bytes} for `stem` + each of
    OUTPUT_SUFFIXES (the JSON last). `source` names the input, `stem` is any path prefix (local or a URL),
    `sha256` (hex digest of the input file's bytes) is recorded as ``input_sha256``. Given `dicom`, the input's
    DICOM header (`imageio.DecodedImage.dicom`), the DICOM Segmentation and Measurement Report of the prediction
    (`covidseg_tf.dicom.seg_and_sr_bytes`) come too, before the JSON, which names them in ``"outputs"``; a header
    they cannot be made from raises `covidseg_tf.dicom.DicomWriteError` (nothing is rendered).

    An image the quality gate did not assess (`pred.assessed` False) gets ``"assessed": false``, its
    ``"reason"``, null severities and grade, and empty masks: never a grade.
    """
    from PIL import Image

    from covidseg_tf.inference.postprocess import severity_grade

    def png(array: np.ndarray, level: int = 6) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()

    names = dict(zip(("lung", "infection", "overlay", "json"), (stem + s for s in OUTPUT_SUFFIXES)))
    h, w = gray.shape
    lung_px, inf_px = int(pred.lung.sum()), int(pred.infection.sum())
    assessed = bool(pred.assessed)
    record = {
        "file": source,
        "input_sha256": sha256,
        "size": {"height": h, "width": w},
        "assessed": assessed,  # False: the input quality gate refused the image (covidseg_tf.limits)
        "reason": None if assessed else pred.reason,
        "lung_area_px": lung_px,
        "lung_area_percent_of_image": 100.0 * lung_px / (h * w),
        "infection_area_px": inf_px,
        "infection_area_percent_of_image": 100.0 * inf_px / (h * w),
        "severity": {
            "left": pred.severity_left if assessed else None,  # patient's left lung (image right on a PA view)
            "right": pred.severity_right if assessed else None,  # patient's right lung (image left)
            "total": pred.severity_total if assessed else None,
            "grade": severity_grade(pred.severity_total) if assessed else None,
            "unit": "percent of lung area infected",
        },
        # the infection model's image-level head (None without one, or when not assessed); the decision may
        # have emptied the infection mask because of it (`inference.Decision.min_infection_probability`)
        "image_level": None if pred.image_class_probabilities is None or not assessed else {
            "infection_probability": pred.infection_probability,
            "class": pred.image_class,
            "class_probabilities": pred.image_class_probabilities,
        },
        "outputs": {k: v for k, v in names.items() if k != "json"},
        "models": models,
    }
    encoded = {names["lung"]: png(pred.lung * 255), names["infection"]: png(pred.infection * 255),
               names["overlay"]: png(overlay(gray, pred.lung, pred.infection), level=1)}  # noisy RGB: zlib 6 is slow
    if dicom is not None:
        from covidseg_tf.dicom import Algorithm, seg_and_sr_bytes

        parts = seg_and_sr_bytes(dicom, {"lung": pred.lung, "infection": pred.infection}, record,
                                 Algorithm.from_models(models), name=source)
        for key, suffix, data in zip(("seg", "sr"), DICOM_SUFFIXES, parts):
            record["outputs"][key] = stem + suffix
            encoded[stem + suffix] = data
    encoded[names["json"]] = (json.dumps(record, indent=2) + "\n").encode()
    return record, encoded


def write_outputs(encoded: dict[str, bytes], stale: Sequence[Path] = ()) -> None:
    """Write one input's outputs (`render_outputs`, the JSON last) so that a JSON only ever stands next to the
    complete, fresh files it describes: an existing JSON is removed first, then the `stale` files not written
    this time (an earlier run's DICOM outputs), then each file is written under a temporary name and renamed over
    the old one, the new JSON last. An interrupted run leaves no JSON."""
    names = list(encoded)
    Path(names[-1]).unlink(missing_ok=True)
    for old in stale:
        if str(old) not in encoded:
            old.unlink(missing_ok=True)
    for name in names:
        tmp = Path(f"{name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(encoded[name])
            os.replace(tmp, name)
        finally:
            tmp.unlink(missing_ok=True)


def read_input(path: Path) -> tuple[bytes, DecodedImage]:
    """(bytes, decoded image: H x W uint8 grey and the file's colour share) of an input file, read once
    (`imageio.decode_image`: the size policy is checked from the header before decoding)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise XRayReadError(f"{path}: cannot read: {e}") from e
    return data, decode_image(data, str(path))


def process_file(predictor: Predictor, path: Path, stem: Path, models: dict[str, Any],
                 read: tuple[bytes, DecodedImage] | None = None, dicom: bool = False) -> dict[str, Any]:
    """Predict one file and write its outputs (`render_outputs`, `write_outputs`; with `dicom`, a DICOM input's
    SEG and SR too); returns the JSON record. `read` is `read_input(path)` when done already: the bytes decoded
    are the bytes hashed (``input_sha256``)."""
    data, image = read if read is not None else read_input(path)
    pred = predictor.predict([image.gray], colour=[image.colour])[0]
    record, encoded = render_outputs(str(path), image.gray, pred, str(stem), models, sha256=sha256_bytes(data),
                                     dicom=image.dicom if dicom else None)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_outputs(encoded, stale=output_paths(stem))
    return record


def remove_stale(stem: Path) -> list[Path]:
    """Remove the outputs at `stem` left by an earlier run (for an input that failed in this one); returns them."""
    stale = [o for o in output_paths(stem) if o.exists()]
    for o in stale[::-1]:  # the JSON first
        o.unlink()
    return stale


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
               "      --lung-model saved_models/lung/5 --infection-model saved_models/infection/5\n"
               "  python -m covidseg_tf.predict study/ --out preds --dicom    # + DICOM SEG and SR per DICOM input\n"
               "a model is a SavedModel base folder (its highest integer version), a version folder or a .keras "
               "file;\n"
               f"folders are searched recursively for {', '.join(sorted(KNOWN_EXTENSIONS))} (links to folders are "
               "not followed);\n"
               "refused, each named in an error (exit 1, the others processed): unreadable, corrupt or non-image "
               "files,\nimages above 4096 px a side (from the header), dangling or looping links, folders that "
               "cannot be listed;\n"
               "usage errors (exit 2, nothing written): an --out that cannot be written or holds an input folder, "
               "outputs of\nan earlier run without --overwrite, a model that cannot be loaded.\n" + exitcodes.EPILOG)
    p.add_argument("inputs", nargs="+", type=Path, help="image/DICOM files or folders")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; inputs are never overwritten)")
    add_model_flags(p)
    add_decision_flags(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run (without it, predict refuses to write over any "
                   "existing output and names it) and remove the earlier outputs of inputs that fail this time")
    p.add_argument("--dicom", action="store_true",
                   help="for each DICOM input, also write a DICOM Segmentation (<name>_seg.dcm) and a TID 1500 "
                   "Measurement Report (<name>_sr.dcm) referencing it, for PACS viewers; an input they cannot be made "
                   "for fails (exit 1) with nothing written; other formats get the usual files only")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    out_dir: Path = args.out
    reason = unwritable_reason(out_dir)  # a usage error, found before any input is read or model loaded
    if reason:
        print(f"{parser.prog}: error: --out {out_dir}: {reason}", file=sys.stderr)
        return exitcodes.USAGE
    out_abs = out_dir.resolve()
    for p in args.inputs:
        if path_problem(p) is None and p.is_dir() and (p.resolve() == out_abs or out_abs in p.resolve().parents):
            log.error("input folder %s is inside --out %s: outputs and inputs would mix; choose another --out",
                      p, out_dir)
            return exitcodes.USAGE
    unusable: list[Unusable] = []
    files, missing = find_images(list(args.inputs), exclude=out_dir, unusable=unusable)
    for m in missing:
        log.error("input %s does not exist; skipped", m)
    for u in unusable:  # never skipped without a word: a failed input (or, for a link to a folder, a warning)
        (log.error if u.error else log.warning)("%s: %s; skipped", u.path, u.reason)
    missing += [u.path for u in unusable if u.error]
    if not files:
        if missing:
            log.error("no input image could be read: %d path(s) failed (see above)", len(missing))
        else:
            log.error("no input images found in %s", ", ".join(map(str, args.inputs)))
        return exitcodes.FAILED
    plan = plan_outputs(files, [p for p in args.inputs if path_problem(p) is None], out_dir)
    existing = [o for f in files for o in output_paths(plan[f]) if o.exists()]
    if existing and not args.overwrite:
        log.error("%s already exists (%d output file(s) of an earlier run would be replaced): pass --overwrite to "
                  "replace them (the earlier outputs of inputs that fail are then removed) or choose another --out",
                  existing[0], len(existing))
        return exitcodes.USAGE
    failed = list(missing)

    def skip(f: Path, e: Exception) -> None:  # one bad file never loses the rest
        log.error("skipping %s: %s", f, e)
        failed.append(f)
        stale = remove_stale(plan[f]) if args.overwrite else []
        if stale:
            log.warning("removed %d output(s) of an earlier run of %s: %s", len(stale), f, ", ".join(map(str, stale)))

    predictor, models, finished = None, {}, 0
    try:
        for f in tqdm(files, desc="predict", unit="img", disable=args.quiet):
            try:
                read = read_input(f)
            except Exception as e:
                skip(f, e)
                finished += 1
                continue
            if predictor is None:  # loaded for the first readable input: a run of refused inputs never loads them
                try:
                    from covidseg_tf.inference import Predictor

                    predictor = Predictor.load(args.lung_model, args.infection_model, image_size=args.image_size,
                                               **decision_overrides(args))
                    models = model_info(predictor)
                except (ValueError, FileNotFoundError, ImportError) as e:
                    log.error("%s", e)
                    return exitcodes.USAGE  # --lung-model / --infection-model: nothing was written
            try:
                rec = process_file(predictor, f, plan[f], models, read, dicom=args.dicom)
            except Exception as e:
                skip(f, e)
                finished += 1
                continue
            finished += 1
            size = rec["size"]
            aspect = max(size["height"], size["width"]) / min(size["height"], size["width"])
            if not rec["assessed"]:
                log.warning("%s: not assessed (input quality gate): %s", f, rec["reason"])
                continue
            log.info("%s: lung %d px, infection %d px, severity %.1f%% (%s)%s", f, rec["lung_area_px"],
                     rec["infection_area_px"], rec["severity"]["total"], rec["severity"]["grade"],
                     f"; {size['height']}x{size['width']} px squeezed to the model's square ({aspect:.2f}:1)"
                     if aspect > 1.05 else "")
    except KeyboardInterrupt:  # each input's files are renamed into place, its JSON last: what stands is whole
        return exitcodes.interrupted(parser.prog, f"{finished} of {len(files)} input(s) done; their outputs are "
                                     "complete, the rest were not written (rerun with --overwrite)")
    ok = len(files) - (len(failed) - len(missing))
    log.info("%d of %d input(s) processed into %s", ok, len(files) + len(missing), out_dir)
    if failed:
        log.error("%d input(s) failed: %s", len(failed), ", ".join(map(str, failed)))
        return exitcodes.FAILED
    return exitcodes.OK


if __name__ == "__main__":
    exitcodes.run_cli(main, "python -m covidseg_tf.predict")  # a Ctrl-C before the inputs are read: one line, 130
