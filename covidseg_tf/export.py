"""Export trained stage models as versioned TF Serving SavedModels.

Layout (TF Serving model base paths; see saved_models/README.md):

    <out>/lung/<N>/        Stage 1          signatures: serving_default (encoded images), predict_pixels
    <out>/infection/<N>/   Stage 2          serving_default (images + lung_masks), predict_pixels
    <out>/cascade/<N>/     both + severity  serving_default (encoded images), predict_pixels

Each version is written to a temporary folder `<out>/<name>/.tmp-*` beside the versions and then renamed to
the next free integer, so TF Serving (which only loads integer-named folders) never sees half a version and an
existing version is never overwritten. Each version holds `assets.extra/tf_serving_warmup_requests`
(PredictionLog records, one per signature) and `assets.extra/covidseg_export.json`, the
`inference.stages.ExportManifest` of what was exported (a stage servable applies what it records).
The signatures and their input/output names are documented in `covidseg_tf.serving`.

The served graphs are inference copies (covidseg_tf.optimize): BatchNorm folded into the convolutions, weights
frozen into graph constants, in float32 or (`--precision bf16`) bfloat16 with float32 input/output. Freezing also
stores each weight once, where Keras' own `ExportArchive` writes every variable twice (keras-team/keras#23553).

`--from DIR` re-exports bf16 servables (e.g. the shipped ones) in float32 from their SavedModels alone, for CPUs
without bfloat16 units (`reexport_fp32`, covidseg_tf.upcast): no .keras file is needed.

`--tflite` adds the second export target: each stage version folder also holds `stage.tflite` (float32, batch 1,
`covidseg_tf.optimize.tflite_model`), which `inference.load_stage` / `Predictor.load` and so every CLI's
--lung-model / --infection-model accept, run on TFLite's XNNPACK CPU kernels. TF Serving ignores the file.
`--tflite int8 --calibration-dir DIR` writes the `--int8-stages` (default: Stage 1 only, the set that passes the
accuracy gate of bench/int8_gate.py) as int8 TFLite instead, calibrated on images of DIR (Stage 2 on each with its
Stage-1 lung mask, `optimize.calibration_pixels`), the other stage as float32; the manifest's `tflite` entry
(`inference.stages.TFLiteExport`) records each file's precision, and for int8 the calibration count and the layers
kept in float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from covidseg_tf import exitcodes, serving, upcast
from covidseg_tf.cli import add_decision_flags, decision_overrides
from covidseg_tf.config import default_config
from covidseg_tf.files import integer_versions, unwritable_reason
from covidseg_tf.imageio import KNOWN_EXTENSIONS, find_images, read_xray
from covidseg_tf.inference.postprocess import Decision
from covidseg_tf.inference.preprocess import to_model_pixels
from covidseg_tf.inference.stages import (
    TFLITE_FILE,
    ExportManifest,
    TFLiteExport,
    head_agreement,
    keras_model,
    model_input_size,
    stage_agreement,
)
from covidseg_tf.optimize import PRECISIONS, calibration_pixels, float32_layers, frozen_stage, tflite_model

log = logging.getLogger(__name__)

SERVABLES = ("lung", "infection", "cascade")
PROG = "python -m covidseg_tf.export"
TFLITE_PRECISIONS = ("fp32", "int8")
"""What `--tflite [PRECISION]` writes: float32 TFLite, or int8 for the `--int8-stages`."""
INT8_STAGES = ("lung",)
"""`--int8-stages`' default: Stage 1 in int8 passes bench/int8_gate.py's accuracy gate (300 Val images: Dice within
0.0003, mean |severity difference| 0.37 points), Stage 2 in int8 fails it (infection Dice -0.0079, 3.39 points)."""
CALIBRATION_IMAGES = 64


def next_version_dir(base: Path | str) -> int:
    """The next free version number under a model base path (1 when there is none yet)."""
    return max(integer_versions(base), default=0) + 1


def write_version(base: Path | str, writer: Callable[[Path], None], attempts: int = 20) -> Path:
    """Run `writer(tmp_dir)` in a temporary folder under `base`, then rename it to `base/<next version>`.

    The rename is atomic on one file system. If another writer takes the same number first (the rename fails
    because that folder exists and is not empty), the next number is tried; the temporary folder is removed on
    any error.
    """
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        writer(tmp)
        for _ in range(attempts):
            target = base / str(next_version_dir(base))
            if target.exists():  # an empty folder someone else created: never reuse it
                continue
            try:
                os.rename(tmp, target)
            except OSError:
                if target.exists():
                    continue
                raise
            log.info("wrote %s", target)
            return target
        raise RuntimeError(f"could not claim a free version number under {base} after {attempts} attempts")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def calibration_files(folders: Path | str | Sequence[Path | str], count: int = CALIBRATION_IMAGES) -> list[Path]:
    """The X-ray files of `folders` (each searched recursively, `imageio.find_images`) that calibrate int8: every
    k-th of them all in sorted order, k = (files // count) or 1, at most `count` of them.

    Raises:
        ValueError: a folder is missing, not a folder, or holds no X-ray image file (the message names it).
    """
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    found: dict[Path, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"--calibration-dir {folder}: {'not a folder' if folder.exists() else 'no such folder'}"
                             "; give folders of X-ray images (e.g. Train PNGs)")
        files = find_images([folder])[0]
        if not files:
            raise ValueError(f"--calibration-dir {folder}: no X-ray image file "
                             f"({' '.join(sorted(KNOWN_EXTENSIONS))}) in it or below it")
        for f in files:
            found.setdefault(f.resolve(), f)
    files = sorted(found.values())
    return files[::max(1, len(files) // count)][:count]


def read_calibration(files: Sequence[Path], image_size: int) -> np.ndarray:
    """(N, S, S, 3) float32 model pixels of X-ray files: each read as predict reads it (`imageio.read_xray`) and made
    model pixels by `preprocess.to_model_pixels` (ValueError, an `imageio.XRayReadError`, naming an unreadable
    file)."""
    return np.stack([to_model_pixels(tf.constant(read_xray(f)[:, :, None]), image_size).numpy() for f in files])


def _tflite(model: Any, mode: str, size: int, calibration: Any = None) -> tuple[bytes, TFLiteExport]:
    """A stage's TFLite bytes in `mode` ("fp32" or "int8", calibrated on `calibration` pixels) and their manifest
    entry (without the byte count)."""
    if mode not in TFLITE_PRECISIONS:
        raise ValueError(f"--tflite precision must be one of {TFLITE_PRECISIONS}, got {mode!r}")
    if mode == "fp32":
        return tflite_model(model, "fp32", image_size=size), TFLiteExport(precision="fp32")
    if calibration is None or not len(calibration):
        raise ValueError("int8 TFLite needs calibration pixels (export --calibration-dir)")
    content = tflite_model(model, "int8", calibration, image_size=size)
    return content, TFLiteExport(precision="int8", calibration_images=len(calibration),
                                 float_layers=float32_layers(model))


def _write_savedmodel(
    path: Path,
    signatures: dict[str, tuple[Callable, list]],
    warmup: list[bytes] | None,
    manifest: ExportManifest,
    tflite: tuple[bytes, TFLiteExport] | None = None,
) -> None:
    """Save the signature functions (over frozen stage graphs: no variables) as a SavedModel at `path`, with
    `tflite` (if given: its bytes and manifest entry) as `path/stage.tflite`."""
    import keras

    module = tf.Module()
    concrete = {}
    for name, (fn, input_signature) in signatures.items():
        function = tf.function(fn, input_signature=input_signature)
        setattr(module, name, function)
        concrete[name] = function.get_concrete_function()
    # No gradients are served; Keras' swish carries a custom gradient that cannot be saved from a frozen graph.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, str(path), signatures=concrete, options=options)
    if warmup:
        serving.write_warmup(path, warmup)
    if tflite is not None:
        content, entry = tflite
        (path / TFLITE_FILE).write_bytes(content)
        manifest = manifest.replace(tflite=dataclasses.replace(entry, file=TFLITE_FILE, bytes=len(content)))
    manifest.replace(signatures=sorted(signatures), tensorflow=tf.__version__, keras=keras.__version__,
                     exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     max_side=manifest.max_side or serving.MAX_SIDE).write(path)


def export_stage(
    model: Any,
    stage: str,
    base_dir: Path | str,
    decision: Decision | float = 0.5,
    warmup: bool = True,
    image_size: int | None = None,
    precision: str = "fp32",
    tflite: bool | str | None = False,
    calibration: Any = None,
) -> Path:
    """Export one Keras stage model (input (None, S, S, 3|4)) to `<base_dir>/<stage>/<N>/`; returns that path.

    `stage` names the servable ("lung" or "infection"); it also prefixes the output names (`lung_prob`, ...).
    `decision` (a `Decision` or one threshold): the lung stage records and applies its `threshold`; the infection
    stage records and applies the whole decision (`Predictor.load` reads it from there).
    `image_size` is only needed for a model built with a free input size (it must match a fixed one).
    The graph is BatchNorm-folded and frozen, in `precision` ("fp32" or "bf16"; see covidseg_tf.optimize).
    `tflite` also writes a TFLite copy `<N>/stage.tflite` (any `precision`): True or "fp32" float32, "int8" int8
    calibrated on `calibration`, (N, S, S, C) model pixels of real images (for the infection stage with their
    Stage-1 masks: `optimize.calibration_pixels`).
    """
    if stage not in ("lung", "infection"):
        raise ValueError(f"stage must be 'lung' or 'infection', got {stage!r}")
    model = keras_model(model)
    size, channels = model_input_size(model, image_size)
    expected = default_config(stage).in_channels
    if channels != expected:
        raise ValueError(f"the {stage} stage takes {expected} input channels, but the model takes {channels}")
    decision = Decision.of(decision)
    if stage == "lung":
        manifest = ExportManifest(servable=stage, image_size=size, channels=channels, threshold=decision.threshold,
                                  precision=precision, model=model.name)
    else:
        head_agreement(model, decision)
        manifest = ExportManifest(servable=stage, image_size=size, channels=channels,
                                  threshold=decision.infection_threshold, decision=decision, precision=precision,
                                  model=model.name)
    signatures = serving.stage_signatures(frozen_stage(model, precision, size), manifest)
    records = serving.warmup_requests(stage, size, channels) if warmup else None
    mode = "fp32" if tflite is True else tflite or None
    converted = _tflite(model, mode, size, calibration) if mode else None
    return write_version(Path(base_dir) / stage,
                         lambda tmp: _write_savedmodel(tmp, signatures, records, manifest, converted))


def export_cascade(
    lung_model: Any,
    infection_model: Any,
    base_dir: Path | str,
    decision: Decision | float = 0.5,
    warmup: bool = True,
    image_size: int | None = None,
    precision: str = "fp32",
) -> Path:
    """Export both Keras stages as one servable `<base_dir>/cascade/<N>/` (masks + severity, by `decision`, which
    its manifest records); returns that path."""
    decision = Decision.of(decision)
    lung_model, infection_model = keras_model(lung_model), keras_model(infection_model)
    size = stage_agreement(lung_model, infection_model, image_size)
    lung, infection = frozen_stage(lung_model, precision, size), frozen_stage(infection_model, precision, size)
    signatures = serving.cascade_signatures(lung, infection, decision, size)
    records = serving.warmup_requests("cascade", size, 3) if warmup else None
    manifest = ExportManifest(servable="cascade", image_size=size, channels=3, threshold=decision.threshold,
                              decision=decision, precision=precision, model=[lung_model.name, infection_model.name])
    return write_version(Path(base_dir) / "cascade",
                         lambda tmp: _write_savedmodel(tmp, signatures, records, manifest))


def reexport_fp32(version_dir: Path | str, base_dir: Path | str, warmup: bool = True) -> Path:
    """The bf16 servable at `version_dir` re-exported in float32 from its SavedModel alone (covidseg_tf.upcast) as
    `<base_dir>/<servable>/<N>`; returns that folder. ValueError naming the folder when it is not a bf16 export."""
    signatures, manifest, tflite = upcast.float32_servable(version_dir)
    records = serving.warmup_requests(manifest.servable, manifest.image_size, manifest.channels) if warmup else None
    return write_version(Path(base_dir) / manifest.servable,
                         lambda tmp: _write_savedmodel(tmp, signatures, records, manifest, tflite))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export the two trained stage models as versioned TF Serving SavedModels "
        "(<out>/lung/<N>, <out>/infection/<N>, <out>/cascade/<N>; N = next free version).",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # examples keep their lines; defaults in the help
        epilog="examples:\n"
        "  python -m covidseg_tf.export --lung-model runs/lung/model.keras \\\n"
        "      --infection-model runs/infection/model.keras --out saved_models/\n"
        "  python -m covidseg_tf.export --lung-model L.keras --infection-model I.keras --only cascade\n"
        "  python -m covidseg_tf.export --lung-model L.keras --infection-model I.keras --tflite   # + stage.tflite\n"
        "  python -m covidseg_tf.export --lung-model L.keras --infection-model I.keras --tflite int8 \\\n"
        "      --calibration-dir train_pngs/   # Stage 1 int8, Stage 2 float32 stage.tflite\n"
        "  python -m covidseg_tf.export --from saved_models --out saved_models_fp32   # shipped bf16 -> fp32\n"
        "  python -m covidseg_tf.predict --lung-model saved_models/lung/5/stage.tflite \\\n"
        "      --infection-model saved_models/infection/5 xray.png   # int8 Stage 1, bf16 Stage 2\n"
        "then serve them:\n"
        "  docker run -p 8501:8501 -v $PWD/saved_models:/models tensorflow/serving "
        "--model_config_file=/models/models.config\n"
        "refused (exit 2, nothing written): a model that is not a .keras file, an --out that is a file or cannot "
        "be written, a bad --decision file, a --calibration-dir that is missing, holds no image or an unreadable "
        "one, a --from folder that holds no servable or one that is not bf16\n" + exitcodes.EPILOG,
    )
    p.add_argument("--lung-model", type=Path, help="Stage 1 .keras file")
    p.add_argument("--infection-model", type=Path, help="Stage 2 .keras file")
    p.add_argument("--from", dest="from_dir", type=Path, default=None, metavar="DIR",
                   help="instead of the .keras models: re-export bf16 servables in fp32 from their SavedModels (the "
                   "same weights, exactly upcast, computed in float32: faster on CPUs without AVX512_BF16/AMX); DIR "
                   "is a base folder (the newest version of each --only servable in it) or one version folder")
    p.add_argument("--out", type=Path, default=Path("saved_models"),
                   help="base folder of the servables (default: %(default)s)")
    p.add_argument("--decision", type=Path, default=None,
                   help="JSON file of the decision chosen on the validation split (`python -m covidseg_tf.tune "
                   "--out FILE`); the flags below override single fields (default: the stages' config "
                   "thresholds, no image-level rule, no flip)")
    add_decision_flags(p)
    p.add_argument("--image-size", type=int, default=None,
                   help="serving size S, only for models built with a free input size (default: the models' own)")
    p.add_argument("--only", nargs="+", choices=SERVABLES, default=list(SERVABLES),
                   help=f"servables to write (default: {' '.join(SERVABLES)})")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="weights and compute of the served graphs (BatchNorm is folded either way); bf16 halves "
                   "the size and is faster on CPUs with bfloat16 units (AVX512_BF16, AMX; bench/RESULTS.md), within "
                   "the tolerance in saved_models/MODEL_CARD.md (default: %(default)s)")
    p.add_argument("--tflite", nargs="?", const="fp32", default=None, choices=TFLITE_PRECISIONS,
                   help="also write each stage as TFLite, <version>/stage.tflite, which the CLIs take as "
                   "--lung-model/--infection-model (XNNPACK on CPU; TF Serving ignores it): float32 (--tflite alone), "
                   "or with `int8` the --int8-stages in int8 (weights and activations; input preprocessing, input "
                   "and output float32; needs --calibration-dir) and the other stage in float32")
    p.add_argument("--int8-stages", nargs="+", choices=("lung", "infection"), default=None,
                   help="with --tflite int8: the stages written in int8 (default: lung: with Stage 1 in int8 the "
                   "cascade passes the accuracy gate of bench/int8_gate.py on 300 Val images, Dice within 0.0003 and "
                   "mean |severity difference| 0.37 points; with Stage 2 in int8 too it fails it, infection Dice "
                   "-0.0079 and 3.39 points; bench/RESULTS.md)")
    p.add_argument("--calibration-dir", type=Path, nargs="+", default=None, metavar="DIR",
                   help="with --tflite int8: folders of X-ray images only (read as predict reads them, searched "
                   "recursively: not a folder that holds masks too) whose pixels calibrate the int8 activation "
                   "ranges, e.g. Train PNGs, not the images you evaluate on; Stage 2 calibrates on each with its "
                   "Stage-1 lung mask under the exported decision")
    p.add_argument("--calibration-images", type=_positive_int, default=None,
                   help=f"with --tflite int8: how many images of --calibration-dir, every k-th file in sorted order "
                   f"(default: {CALIBRATION_IMAGES})")
    p.add_argument("--no-warmup", action="store_true", help="do not write assets.extra warm-up requests")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.from_dir is not None:
        _check_from(p, args)
    elif args.lung_model is None or args.infection_model is None:
        p.error("--lung-model and --infection-model are required (or --from DIR to re-export bf16 servables in fp32)")
    int8 = args.tflite == "int8"
    for flag in ("--int8-stages", "--calibration-dir", "--calibration-images"):
        if getattr(args, flag[2:].replace("-", "_")) is not None and not int8:
            p.error(f"{flag} applies to --tflite int8 only")
    if int8 and args.calibration_dir is None:
        p.error("--tflite int8 needs --calibration-dir DIR: a folder of X-ray images to calibrate on (e.g. Train "
                "PNGs)")
    args.int8_stages = list(args.int8_stages or INT8_STAGES) if int8 else []
    args.calibration_images = args.calibration_images or CALIBRATION_IMAGES
    if int8 and not set(args.int8_stages) & set(args.only):
        p.error(f"--tflite int8: --only {' '.join(args.only)} writes none of the --int8-stages "
                f"({' '.join(args.int8_stages)})")
    return args


def _check_from(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--from takes only --out, --only, --precision fp32, --no-warmup and -v: the rest describes .keras exports."""
    given = [flag for flag, value in (("--lung-model", args.lung_model), ("--infection-model", args.infection_model),
                                      ("--decision", args.decision), ("--image-size", args.image_size),
                                      ("--tflite", args.tflite), ("--int8-stages", args.int8_stages),
                                      ("--calibration-dir", args.calibration_dir),
                                      ("--calibration-images", args.calibration_images)) if value is not None]
    given += [f"--{name.replace('_', '-')}" for name in decision_overrides(args)]
    if given:
        p.error(f"--from re-exports servables as they are: {' '.join(given)} cannot be combined with it")
    if args.precision != "fp32":
        p.error("--from re-exports bf16 servables in fp32: --precision bf16 cannot be combined with it")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    reason = unwritable_reason(args.out)  # before the models load and freeze (tens of seconds)
    if reason:
        print(f"{PROG}: error: --out {args.out}: {reason}", file=sys.stderr)
        return exitcodes.USAGE
    if args.from_dir is not None:
        return _main_from(args)
    try:  # also before the models load
        files = calibration_files(args.calibration_dir, args.calibration_images) if args.int8_stages else []
    except ValueError as exc:
        log.error("%s", exc)
        return exitcodes.USAGE
    try:
        from covidseg_tf.inference.stages import load_stage  # looked up here: tests replace it

        for flag, path in (("--lung-model", args.lung_model), ("--infection-model", args.infection_model)):
            if path.suffix != ".keras":
                raise ValueError(f"{flag} {path}: export takes the .keras file of a training run "
                                 "(runs/<name>/model.keras); SavedModels are already exported")
        lung = load_stage(args.lung_model, stage="lung")
        infection = load_stage(args.infection_model, stage="infection")
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return exitcodes.USAGE
    try:
        recorded = json.loads(args.decision.read_text()) if args.decision else {}
        decision = Decision.from_dict({**recorded.get("decision", recorded), **decision_overrides(args)})
    except (OSError, ValueError, TypeError) as exc:
        log.error("--decision %s: %s", args.decision, exc)
        return exitcodes.USAGE
    int8 = [s for s in args.int8_stages if s in args.only]
    calibration = {}
    if int8:  # every calibration image is read before anything is written
        try:
            size = (stage_agreement(lung, infection, args.image_size) if "infection" in int8
                    else model_input_size(lung, args.image_size)[0])
        except ValueError as exc:
            log.error("%s", exc)
            return exitcodes.USAGE
        try:
            pixels = read_calibration(files, size)
        except ValueError as exc:
            log.error("--calibration-dir: %s", exc)
            return exitcodes.USAGE
        log.info("int8 TFLite of %s: calibrating on %d images of %s", " and ".join(int8), len(files),
                 " ".join(map(str, args.calibration_dir)))
        if "lung" in int8:
            calibration["lung"] = pixels
        if "infection" in int8:  # Stage 2 calibrates on what it meets in the cascade: each image + its lung mask
            calibration["infection"] = calibration_pixels(lung, pixels, decision)
    warm = not args.no_warmup
    written = {}
    for stage, model in (("lung", lung), ("infection", infection)):
        if stage in args.only:
            mode = ("int8" if stage in int8 else "fp32") if args.tflite else None
            written[stage] = export_stage(model, stage, args.out, decision, warmup=warm, image_size=args.image_size,
                                          precision=args.precision, tflite=mode, calibration=calibration.get(stage))
    if "cascade" in args.only:
        written["cascade"] = export_cascade(lung, infection, args.out, decision, warmup=warm,
                                            image_size=args.image_size, precision=args.precision)
    for name, path in written.items():
        log.info("%-9s -> %s", name, path)
    return exitcodes.OK


def _main_from(args: argparse.Namespace) -> int:
    """`--from`: every source is checked (a bf16 export) before anything is written."""
    try:
        sources = upcast.servable_versions(args.from_dir, args.only)
        for source in sources:
            upcast.check_bf16(source)
    except ValueError as exc:
        log.error("--from: %s", exc)
        return exitcodes.USAGE
    for source in sources:
        log.info("%s (bf16) -> %s", source, reexport_fp32(source, args.out, warmup=not args.no_warmup))
    return exitcodes.OK


if __name__ == "__main__":
    exitcodes.run_cli(main, PROG, "no partial version is left (each is written to a temporary folder first)")
