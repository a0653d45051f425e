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

`--tflite` adds the second export target: each stage version folder also holds `stage.tflite` (float32, batch 1,
`covidseg_tf.optimize.tflite_model`), which `inference.load_stage` / `Predictor.load` and so every CLI's
--lung-model / --infection-model accept, run on TFLite's XNNPACK CPU kernels. TF Serving ignores the file.
"""

from __future__ import annotations

import argparse
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

import tensorflow as tf

from covidseg_tf import exitcodes, serving
from covidseg_tf.cli import add_decision_flags, decision_overrides
from covidseg_tf.config import default_config
from covidseg_tf.files import integer_versions, unwritable_reason
from covidseg_tf.inference.postprocess import Decision
from covidseg_tf.inference.stages import (
    TFLITE_FILE,
    ExportManifest,
    head_agreement,
    keras_model,
    model_input_size,
    stage_agreement,
)
from covidseg_tf.optimize import PRECISIONS, frozen_stage, tflite_model

log = logging.getLogger(__name__)

SERVABLES = ("lung", "infection", "cascade")
PROG = "python -m covidseg_tf.export"


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


def _write_savedmodel(
    path: Path,
    signatures: dict[str, tuple[Callable, list]],
    warmup: list[bytes] | None,
    manifest: ExportManifest,
    tflite: bytes | None = None,
) -> None:
    """Save the signature functions (over frozen stage graphs: no variables) as a SavedModel at `path`, with
    `tflite` (if given) as `path/stage.tflite`."""
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
        (path / TFLITE_FILE).write_bytes(tflite)
        manifest = manifest.replace(tflite={"file": TFLITE_FILE, "precision": "fp32", "bytes": len(tflite)})
    manifest.replace(signatures=sorted(signatures), tensorflow=tf.__version__, keras=keras.__version__,
                     exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     max_side=serving.MAX_SIDE).write(path)


def export_stage(
    model: Any,
    stage: str,
    base_dir: Path | str,
    decision: Decision | float = 0.5,
    warmup: bool = True,
    image_size: int | None = None,
    precision: str = "fp32",
    tflite: bool = False,
) -> Path:
    """Export one Keras stage model (input (None, S, S, 3|4)) to `<base_dir>/<stage>/<N>/`; returns that path.

    `stage` names the servable ("lung" or "infection"); it also prefixes the output names (`lung_prob`, ...).
    `decision` (a `Decision` or one threshold): the lung stage records and applies its `threshold`; the infection
    stage records and applies the whole decision (`Predictor.load` reads it from there).
    `image_size` is only needed for a model built with a free input size (it must match a fixed one).
    The graph is BatchNorm-folded and frozen, in `precision` ("fp32" or "bf16"; see covidseg_tf.optimize).
    `tflite` also writes the float32 TFLite copy `<N>/stage.tflite` (any `precision`).
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
    content = tflite_model(model, "fp32", image_size=size) if tflite else None
    return write_version(Path(base_dir) / stage,
                         lambda tmp: _write_savedmodel(tmp, signatures, records, manifest, content))


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
        "  python -m covidseg_tf.predict --lung-model saved_models/lung/3/stage.tflite \\\n"
        "      --infection-model saved_models/infection/3/stage.tflite xray.png\n"
        "then serve them:\n"
        "  docker run -p 8501:8501 -v $PWD/saved_models:/models tensorflow/serving "
        "--model_config_file=/models/models.config\n"
        "refused (exit 2, nothing written): a model that is not a .keras file, an --out that is a file or cannot "
        "be written, a bad --decision file\n" + exitcodes.EPILOG,
    )
    p.add_argument("--lung-model", required=True, type=Path, help="Stage 1 .keras file")
    p.add_argument("--infection-model", required=True, type=Path, help="Stage 2 .keras file")
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
    p.add_argument("--tflite", action="store_true",
                   help="also write each stage as float32 TFLite, <version>/stage.tflite, which the CLIs take as "
                   "--lung-model/--infection-model (XNNPACK on CPU; TF Serving ignores it)")
    p.add_argument("--no-warmup", action="store_true", help="do not write assets.extra warm-up requests")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    reason = unwritable_reason(args.out)  # before the models load and freeze (tens of seconds)
    if reason:
        print(f"{PROG}: error: --out {args.out}: {reason}", file=sys.stderr)
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
    warm = not args.no_warmup
    written = {}
    if "lung" in args.only:
        written["lung"] = export_stage(lung, "lung", args.out, decision, warmup=warm,
                                        image_size=args.image_size, precision=args.precision, tflite=args.tflite)
    if "infection" in args.only:
        written["infection"] = export_stage(infection, "infection", args.out, decision, warmup=warm,
                                             image_size=args.image_size, precision=args.precision,
                                             tflite=args.tflite)
    if "cascade" in args.only:
        written["cascade"] = export_cascade(lung, infection, args.out, decision, warmup=warm,
                                            image_size=args.image_size, precision=args.precision)
    for name, path in written.items():
        log.info("%-9s -> %s", name, path)
    return exitcodes.OK


if __name__ == "__main__":
    exitcodes.run_cli(main, PROG, "no partial version is left (each is written to a temporary folder first)")
