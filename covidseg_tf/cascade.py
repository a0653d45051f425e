"""The two-stage cascade and the severity score, in pure TensorFlow ops.

Everything here works eagerly, inside `tf.function` and in an exported SavedModel (covidseg_tf.export
imports `run_cascade`).

Cascade
    Stage 1 (lung model) gives a lung probability map; thresholding it gives the lung mask. Stage 2
    (infection model) sees the raw pixels plus that lung mask as a 4th channel; its thresholded output is
    multiplied by the lung mask, so no infection is ever reported outside the predicted lungs.

Severity
    Severity is the infected fraction of the lung, in percent: ``100 * |infection AND lung| / |lung|``, per
    lung field and for both lungs together; it is 0 when the (half of the) lung mask is empty.

    Splitting the lung mask into its two fields (per image): take the column profile of the binary lung
    mask (number of lung pixels in each image column). Inside the central band of columns
    ``[0.25 W, 0.75 W)`` choose the column with the fewest lung pixels (the mediastinum gap); ties (e.g. a
    gap several columns wide, or an empty mask) go to the column nearest the image centre, so an empty
    or fully merged mask falls back to the image centre. Columns left of the split are the image's left
    half, which on a PA (or AP) chest X-ray is the PATIENT's RIGHT lung; columns from the split on are the
    patient's LEFT lung. A vertical split is a simplification: strongly rotated images, lateral views or
    lungs that overlap across the midline are split at their narrowest column, which may be imperfect.

Severity grades (`severity_grade`)
    none (exactly 0 %), mild (< 25 %), moderate (25 % to < 50 %), severe (>= 50 %) of the lung area.
    These bands are a project convention, not a validated clinical scale: they follow the quartile
    cut-offs of the semi-quantitative chest-radiograph extent score of Wong et al., "Frequency and
    distribution of chest radiographic findings in patients positive for COVID-19", Radiology 2020
    (per lung: 0 none, 1 < 25 %, 2 25-50 %, 3 50-75 %, 4 > 75 % involvement), with the two top bands merged
    into "severe". Tahir et al. (the COVID-QU-Ex authors) report the infected-lung percentage itself; the
    grade is only a readable summary of that number.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

# Central band (fractions of the width) in which the split column between the two lung fields is searched.
SPLIT_BAND = (0.25, 0.75)

SEVERITY_BANDS: tuple[tuple[float, str], ...] = ((25.0, "mild"), (50.0, "moderate"), (float("inf"), "severe"))
"""Upper bounds (exclusive, percent) of the grades above "none"; see the module docstring."""


def _binary(mask: tf.Tensor) -> tf.Tensor:
    """(B, H, W) or (B, H, W, 1) mask -> (B, H, W) float32 in {0, 1} (values > 0.5 count as set)."""
    mask = tf.convert_to_tensor(mask)
    if mask.shape.rank == 4:
        mask = mask[..., 0]
    return tf.cast(tf.cast(mask, tf.float32) > 0.5, tf.float32)


def split_columns(lung_mask: tf.Tensor) -> tf.Tensor:
    """Column index (B,) int32 separating the two lung fields of each image (see the module docstring).

    Columns ``< split`` belong to the image's left half (the patient's right lung on a PA view).
    """
    lung = _binary(lung_mask)
    width = tf.shape(lung)[2]
    w = tf.cast(width, tf.float32)
    cols = tf.reduce_sum(lung, axis=1)  # (B, W) lung pixels per column
    x = tf.range(width, dtype=tf.float32)
    lo = tf.floor(SPLIT_BAND[0] * w)
    hi = tf.math.ceil(SPLIT_BAND[1] * w)
    in_band = (x >= lo) & (x < hi)
    # Lung pixel counts are integers, so `count * W` dominates and `|x - centre| < W` only breaks ties.
    score = cols * w + tf.abs(x - (w - 1.0) / 2.0)[tf.newaxis, :]
    score = tf.where(in_band[tf.newaxis, :], score, tf.fill(tf.shape(score), float("inf")))
    return tf.cast(tf.argmin(score, axis=1), tf.int32)


def severity(lung_mask: tf.Tensor, infection_mask: tf.Tensor) -> dict[str, tf.Tensor]:
    """Infected share of the lung in percent, per patient-side lung and in total.

    Args:
        lung_mask: (B, H, W, 1) or (B, H, W), values in {0, 1} (> 0.5 counts as lung).
        infection_mask: same shape; only infection inside the lung mask is counted.

    Returns:
        {"severity_left", "severity_right", "severity_total"}: (B,) float32 in [0, 100]; "left"/"right" are
        the PATIENT's sides (patient's right = image left on a PA view); 0 where the lung (side) is empty.
    """
    lung = _binary(lung_mask)
    infected = _binary(infection_mask) * lung
    split = split_columns(lung)
    x = tf.range(tf.shape(lung)[2], dtype=tf.int32)
    image_left = tf.cast(x[tf.newaxis, :] < split[:, tf.newaxis], tf.float32)[:, tf.newaxis, :]  # (B, 1, W)
    image_right = 1.0 - image_left

    def percent(region: tf.Tensor) -> tf.Tensor:
        lung_px = tf.reduce_sum(lung * region, axis=[1, 2])
        inf_px = tf.reduce_sum(infected * region, axis=[1, 2])
        return 100.0 * tf.math.divide_no_nan(inf_px, lung_px)

    return {
        "severity_left": percent(image_right),  # patient's left lung = image right
        "severity_right": percent(image_left),  # patient's right lung = image left
        "severity_total": percent(tf.ones_like(image_left)),
    }


def severity_grade(total_percent: Any) -> str:
    """Band name ("none", "mild", "moderate", "severe") of an infected-lung percentage (module docstring)."""
    p = float(total_percent)
    if p != p or p < 0:  # NaN or negative
        raise ValueError(f"severity percentage must be a number >= 0, got {total_percent!r}")
    if p == 0.0:
        return "none"
    for upper, name in SEVERITY_BANDS:
        if p < upper:
            return name
    return SEVERITY_BANDS[-1][1]


def run_cascade(lung_model: Any, infection_model: Any, pixels: tf.Tensor, threshold: float = 0.5) -> dict[str, tf.Tensor]:
    """Run Stage 1 then Stage 2 on a batch and score severity.

    Args:
        lung_model: Keras model (or any callable) mapping (B, S, S, 3) pixels to (B, S, S, 1) probabilities.
        infection_model: callable mapping (B, S, S, 4) (pixels + lung mask) to (B, S, S, 1) probabilities.
        pixels: float32 (B, S, S, 3), raw 0..255, at the models' input size.
        threshold: probability at or above which a pixel is set (both stages).

    Returns:
        {"lung_prob", "lung_mask", "infection_prob", "infection_mask"}: (B, S, S, 1) float32 (masks 0/1; the
        infection mask is inside the lung mask) and {"severity_left", "severity_right", "severity_total"}
        (B,) float32 percentages (see `severity`).
    """
    pixels = tf.cast(pixels, tf.float32)
    lung_prob = tf.cast(lung_model(pixels, training=False), tf.float32)
    lung_mask = tf.cast(lung_prob >= threshold, tf.float32)
    infection_prob = tf.cast(infection_model(tf.concat([pixels, lung_mask], axis=-1), training=False), tf.float32)
    infection_mask = tf.cast(infection_prob >= threshold, tf.float32) * lung_mask
    out = {
        "lung_prob": lung_prob,
        "lung_mask": lung_mask,
        "infection_prob": infection_prob,
        "infection_mask": infection_mask,
    }
    out.update(severity(lung_mask, infection_mask))
    return out


def load_model(path: str | Any) -> Any:
    """Load a trained stage model saved as `.keras` (custom objects registered, not compiled).

    Raises:
        FileNotFoundError: `path` does not exist (the message says how to obtain a model).
        ValueError: `path` is not a `.keras` file Keras can load.
    """
    from pathlib import Path

    import keras

    import covidseg_tf.models  # noqa: F401  (registers the custom layers)

    for extra in ("covidseg_tf.losses", "covidseg_tf.metrics"):  # registered objects a saved config may name
        try:
            __import__(extra)
        except ImportError:  # pragma: no cover - optional when loading uncompiled
            pass
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"model file {p} not found; train one with `python -m covidseg_tf.train --stage lung|infection ... "
            "--output runs/NAME` (it writes runs/NAME/model.keras) or run `python -m covidseg_tf.demo`")
    if p.suffix != ".keras":
        raise ValueError(f"{p}: expected a Keras `.keras` model file (SavedModel folders are for serving only)")
    try:
        return keras.models.load_model(p, compile=False)
    except Exception as e:
        raise ValueError(f"{p}: cannot load Keras model: {type(e).__name__}: {e}") from e


def model_image_size(model: Any, default: int | None = None) -> int:
    """Square input size S of a model built for (B, S, S, C) input, else `default` (error if None)."""
    shape = model.inputs[0].shape if getattr(model, "inputs", None) else None
    size = shape[1] if shape is not None and len(shape) == 4 else None
    if size is None or shape[2] != size:
        if default is None:
            raise ValueError(f"model {getattr(model, 'name', model)!r} has no fixed square input size; pass one")
        return int(default)
    return int(size)
