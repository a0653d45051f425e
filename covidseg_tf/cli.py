"""The flags the CLIs share: models, dataset, decision (argparse helpers).

    parser = argparse.ArgumentParser()
    add_model_flags(parser); add_dataset_flags(parser); add_decision_flags(parser)
    args = parser.parse_args()
    Predictor.load(args.lung_model, args.infection_model, **decision_overrides(args))

Importing this module loads neither TensorFlow nor Keras, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from covidseg_tf import config


def probability_threshold(text: str) -> float:
    """argparse type of a threshold flag: a number strictly between 0 and 1 (otherwise argparse prints a one-line
    usage error and exits 2, before any model is loaded; `Decision` checks the same rule)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (a probability strictly between 0 and 1), got {text}")
    return value


def add_model_flags(parser: Any, *, urls: bool = False, image_size: bool = True) -> None:
    """--lung-model, --infection-model (default: `config.DEFAULT_LUNG_MODEL` / `DEFAULT_INFECTION_MODEL`, read at each
    call: the shipped versions) and, with `image_size`, --image-size on an
    argparse parser. With `urls` the model flags stay strings, so that gs://... or s3://... survive."""
    kind, where = (str, "; a URL is copied to each worker") if urls else (Path, "")
    parser.add_argument("--lung-model", type=kind, default=kind(config.DEFAULT_LUNG_MODEL),
                        help=f"Stage-1 model: SavedModel base or version folder, .keras file, or .tflite file (export "
                             f"--tflite){where} "
                             "(default: %(default)s)")
    parser.add_argument("--infection-model", type=kind, default=kind(config.DEFAULT_INFECTION_MODEL),
                        help="Stage-2 model, like --lung-model (default: %(default)s)")
    if image_size:
        parser.add_argument("--image-size", type=int, default=None,
                            help="model input size, only for models without a fixed one (default: the models' size)")


def add_dataset_flags(parser: Any, default: str | None = "covid_qu_ex/infection") -> None:
    """--dataset (unless `default` is None), --data-dir, --manual-dir on an argparse parser: the TFDS dataset and
    where it is built from."""
    if default is not None:
        parser.add_argument("--dataset", default=default, help="TFDS name/config (default: %(default)s)")
    parser.add_argument("--data-dir", help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", help="folder holding the Kaggle COVID-QU-Ex zip or its extracted folder "
                                             "(to build the real dataset)")


def add_decision_flags(parser: Any) -> None:
    """--threshold, --infection-threshold, --min-infection-percent, --min-infection-probability, --hflip/--no-hflip
    on an argparse parser; each defaults to None: the decision recorded in the models (see `decision_overrides`)."""
    parser.add_argument("--threshold", type=probability_threshold, default=None,
                        help="lung probability threshold (default: the models' recorded decision, else 0.5)")
    parser.add_argument("--infection-threshold", type=probability_threshold, default=None,
                        help="infection probability threshold (default: recorded, else 0.5)")
    parser.add_argument("--min-infection-percent", type=float, default=None,
                        help="empty infection masks covering less of the lung than this (default: recorded, else 0)")
    parser.add_argument("--min-infection-probability", type=float, default=None,
                        help="empty infection masks where the image-level head's COVID-19 probability is below this; "
                             "0 ignores the head; needs an infection model with a head (default: recorded, else 0)")
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                        help="horizontal-flip test-time augmentation (default: recorded, else off)")


def decision_overrides(args: Any) -> dict[str, Any]:
    """The Decision fields given on the command line (for `Predictor.load(..., **overrides)`)."""
    import dataclasses

    from covidseg_tf.inference.postprocess import Decision  # here: the flags themselves need no TensorFlow

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Decision) if getattr(args, f.name) is not None}
