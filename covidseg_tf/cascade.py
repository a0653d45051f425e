"""The cascade, in one place: image -> model pixels -> Stage 1 -> Stage 2 -> masks at a requested size -> severity.

Every entry point runs these functions: `predict` (files), `evaluate` (TFDS splits), training's Stage-1 masks
(`train --lung-masks stage1`), the SavedModel signatures (`covidseg_tf.serving`) and `bench/`. All are pure
TensorFlow ops: they work eagerly, inside `tf.function` and inside an exported SavedModel.

Model pixels (`to_model_pixels`)
    A decoded grey image (0..255) is resized to the model's S x S input with ONE rule: bilinear with antialias
    (antialias only changes anything when shrinking, e.g. a 3000 px DICOM), clipped to 0..255 and repeated to
    RGB. Masks that are inputs or targets are resized with nearest neighbour (`resize_mask`).

Stages (`run_stages`)
    Stage 1 (lung model) gives a lung probability map at S; thresholding it AT S gives the lung mask that Stage 2
    sees as its 4th channel (`lung_input`). A given `lung_mask` (e.g. the ground truth: the ablation of
    `evaluate`) replaces it. Training's Stage-1 masks are this same `lung_input`, so Stage 2 trains on what it gets
    at inference.

Masks at an output size (`masks_at`)
    The two S x S probability maps are resized bilinearly (no antialias) to the requested height x width (the
    input's own size for `predict` and the SavedModel; S when none is asked), thresholded there (``>= threshold``
    for the lung, ``>= infection_threshold`` for the infection) and the infection mask is multiplied by the lung
    mask, so no infection is reported outside the lungs. A given `lung_mask` at the output size replaces the
    predicted lung mask. Image-level decision: an infection mask covering less than `min_infection_percent` of
    the lung mask is emptied (healthy X-rays get no scattered false positives), and so is one whose image-level
    head says "no infection" (see below). Severity is computed on these output masks, so one image gets the same
    masks and severity from every entry point.

Image-level head
    An infection model trained with `--image-head-weight` also returns, per image, softmax probabilities over
    `config.IMAGE_CLASSES` (COVID-19 / Non-COVID / Normal). `run_stages` returns them as `image_class_prob`
    (mean over the flip with `hflip`); the COVID-19 column is the image's `infection_probability`: the
    probability that the X-ray shows any infection. With `Decision.min_infection_probability` > 0 the infection
    mask of an image below it is emptied (the head tells "other pneumonia", which the area rule cannot, from
    COVID-19), which lets `tune` keep small findings the area rule would throw away. Models without a head
    have no such outputs and cannot take such a decision (`Cascade` says so).

Decision (`Decision`)
    The thresholds, the image-level rule and horizontal-flip test-time augmentation (`hflip`: each stage's
    probability is the mean of the image's and its mirror's) are one frozen object. Its values are chosen on the
    validation split (`python -m covidseg_tf.tune`) and recorded in exported SavedModels (`covidseg_export.json`);
    `Cascade.load` takes them from an exported infection stage unless told otherwise.

Input gate (`input_quality`, `lung_plausibility`)
    Images that cannot be frontal chest X-rays - too small, extremely elongated, near-constant, in colour,
    noise-like, or without a plausible pair of lungs in Stage 1's probability map (too little or too much lung,
    one-sided, off centre, or a hesitant lung model); the checks, thresholds and how they were chosen are in
    `covidseg_tf.limits` - are "not assessed": `masks_at(..., assessed=...)` empties their masks and zeroes their
    severity, and every entry point says so with the reason (`Prediction.assessed` / `.reason`, predict's JSON,
    the cascade SavedModel's `assessed` / `reason` outputs) instead of a grade. The rule is computed once, here,
    from the input's height x width, its model pixels, the colour share its decoder measured
    (`imageio.decode_image`, `serving.colour_share`) and the lung probabilities Stage 1 computes anyway, so it
    costs the same for any input size.

Models
    `load_model` reads a stage model from a `.keras` file or from a stage SavedModel written by
    covidseg_tf.export (a version folder, or a TF Serving base folder such as `saved_models/lung`, whose highest
    integer version is used); the latter is wrapped as a `SavedModelStage`, callable like the Keras model.
    `Cascade` holds the two stage models, checks that they agree (channels, input size) and runs the steps above
    on decoded images.

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

import contextlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from covidseg_tf.config import IMAGE_CLASS_OUTPUT, IMAGE_CLASSES, INFECTION_CLASS, MASK_OUTPUT, Decision, split_outputs
from covidseg_tf.limits import (
    COLOUR_CHROMA,
    DETAIL_CELLS,
    LUNG_CENTRE_X,
    LUNG_CENTRE_Y,
    LUNG_CUTOFF,
    LUNG_SURE,
    MAX_ASPECT,
    MAX_COLOUR_SHARE,
    MAX_LUNG_AREA,
    MAX_ROUGHNESS,
    MIN_DETAIL,
    MIN_LUNG_AREA,
    MIN_LUNG_BALANCE,
    MIN_LUNG_CONFIDENCE,
    MIN_SIDE,
    MIN_STD,
)
from covidseg_tf.paths import integer_versions

log = logging.getLogger(__name__)

# Central band (fractions of the width) in which the split column between the two lung fields is searched.
SPLIT_BAND = (0.25, 0.75)

SEVERITY_BANDS: tuple[tuple[float, str], ...] = ((25.0, "mild"), (50.0, "moderate"), (float("inf"), "severe"))
"""Upper bounds (exclusive, percent) of the grades above "none"; see the module docstring."""

SEVERITY_KEYS = ("severity_left", "severity_right", "severity_total")
SIZE_DIVISOR = 32
"""Model input sides are multiples of this (the U-Net downsamples 5 times)."""


# ----------------------------------------------------------------------------------------------- pixels and masks
def to_model_pixels(gray: tf.Tensor, size: int) -> tf.Tensor:
    """Grey images (B, H, W, 1) or (H, W, 1), any numeric dtype on 0..255 -> float32 (B, S, S, 3) or (S, S, 3)
    model pixels: bilinear with antialias, clipped to 0..255, grey repeated to RGB (module docstring)."""
    x = tf.image.resize(tf.cast(gray, tf.float32), (size, size), method="bilinear", antialias=True)
    return tf.repeat(tf.clip_by_value(x, 0.0, 255.0), 3, axis=-1)


def resize_mask(mask: tf.Tensor, size: Any) -> tf.Tensor:
    """A 0/1 mask (…, H, W, C) resized with nearest neighbour to `size` (an int S or a (height, width) pair)."""
    hw = (size, size) if isinstance(size, int) else size
    return tf.image.resize(mask, hw, method="nearest")


def mask_at(prob: tf.Tensor, size: Any, threshold: float) -> tf.Tensor:
    """(B, S, S, 1) probabilities -> (B, H, W, 1) float32 0/1 mask: bilinear resize to `size` ((H, W) or None
    for S), then ``>= threshold``."""
    prob = tf.cast(prob, tf.float32)
    if size is not None:
        prob = tf.image.resize(prob, size, method="bilinear")
    return tf.cast(prob >= threshold, tf.float32)


# ----------------------------------------------------------------------------------------------- input quality
def lung_plausibility(lung_prob: tf.Tensor) -> dict[str, tf.Tensor]:
    """Statistics of Stage 1's lung probability maps that say whether they show a frontal chest X-ray's lungs,
    and the verdict, as TensorFlow ops (thresholds and how they were chosen: `covidseg_tf.limits`).

    Args:
        lung_prob: (B, S, S, 1) (or (B, S, S)) lung probabilities at the model size (`run_stages`' "lung_prob").

    Returns:
        (B,) tensors: "lung_area" (share of the image with p >= LUNG_CUTOFF), "lung_balance" (share of that lung
        in the image half holding less of it, 0..0.5), "lung_x", "lung_y" (the lung centroid, 0..1 of the width
        and height; 0.5 without lung), "lung_confidence" (share of the lung pixels with p >= LUNG_SURE; 0
        without lung), "plausible" (bool) and "reason" (string, "" when plausible): the first failing check of
        area, two lungs, position, confidence.
    """
    p = tf.cast(lung_prob, tf.float32)
    if p.shape.rank == 4:
        p = p[..., 0]
    lung = tf.cast(p >= LUNG_CUTOFF, tf.float32)
    height, width = tf.shape(p)[1], tf.shape(p)[2]
    n = tf.reduce_sum(lung, axis=[1, 2])
    area = n / tf.cast(height * width, tf.float32)
    left = tf.reduce_sum(lung[:, :, : width // 2], axis=[1, 2])
    balance = tf.math.divide_no_nan(tf.minimum(left, n - left), n)
    ys = tf.linspace(0.0, 1.0, height)[tf.newaxis, :, tf.newaxis]
    xs = tf.linspace(0.0, 1.0, width)[tf.newaxis, tf.newaxis, :]
    empty = n <= 0
    cx = tf.where(empty, 0.5, tf.math.divide_no_nan(tf.reduce_sum(lung * xs, axis=[1, 2]), n))
    cy = tf.where(empty, 0.5, tf.math.divide_no_nan(tf.reduce_sum(lung * ys, axis=[1, 2]), n))
    confidence = tf.math.divide_no_nan(tf.reduce_sum(tf.cast(p >= LUNG_SURE, tf.float32) * lung, axis=[1, 2]), n)

    def pct(x: tf.Tensor) -> tf.Tensor:
        return tf.strings.as_string(100.0 * x, precision=1)

    def num(x: tf.Tensor) -> tf.Tensor:
        return tf.strings.as_string(x, precision=2)

    few, many = area < MIN_LUNG_AREA, area > MAX_LUNG_AREA
    one_sided = balance < MIN_LUNG_BALANCE
    off_centre = ((cx < LUNG_CENTRE_X[0]) | (cx > LUNG_CENTRE_X[1]) | (cy < LUNG_CENTRE_Y[0])
                  | (cy > LUNG_CENTRE_Y[1]))
    unsure = confidence < MIN_LUNG_CONFIDENCE
    none = tf.fill(tf.shape(area), "")
    reason = tf.where(unsure, tf.strings.join([
        "the lung model is unsure: ", pct(confidence), f" % of the lung area at probability >= {LUNG_SURE:g} < ",
        f"{100 * MIN_LUNG_CONFIDENCE:g} %"]), none)
    reason = tf.where(off_centre, tf.strings.join([
        "lungs off centre: centroid at x ", num(cx), ", y ", num(cy),
        f" of the image (expected x {LUNG_CENTRE_X[0]:g}..{LUNG_CENTRE_X[1]:g}, "
        f"y {LUNG_CENTRE_Y[0]:g}..{LUNG_CENTRE_Y[1]:g})"]), reason)
    reason = tf.where(one_sided, tf.strings.join([
        "no two lungs: the emptier image half holds ", pct(balance),
        f" % of the lung area < {100 * MIN_LUNG_BALANCE:g} %"]), reason)
    reason = tf.where(many, tf.strings.join([
        "lung area ", pct(area), f" % of the image > {100 * MAX_LUNG_AREA:g} %"]), reason)
    reason = tf.where(few, tf.strings.join([
        "lung area ", pct(area), f" % of the image < {100 * MIN_LUNG_AREA:g} %"]), reason)
    return {"lung_area": area, "lung_balance": balance, "lung_x": cx, "lung_y": cy, "lung_confidence": confidence,
            "plausible": ~(few | many | one_sided | off_centre | unsure), "reason": reason}


def roughness(pixels: tf.Tensor) -> tf.Tensor:
    """(B,) mean absolute difference of neighbouring pixels (rows and columns) of channel 0 of (B, S, S, C)
    model pixels, divided by their grey-level standard deviation (0 for a constant image): about 1 for white
    noise, about 0.1 for an X-ray."""
    g = tf.cast(pixels, tf.float32)[..., 0]
    dy = tf.reduce_mean(tf.abs(g[:, 1:, :] - g[:, :-1, :]), axis=[1, 2])
    dx = tf.reduce_mean(tf.abs(g[:, :, 1:] - g[:, :, :-1]), axis=[1, 2])
    return tf.math.divide_no_nan(0.5 * (dx + dy), tf.math.reduce_std(g, axis=[1, 2]))


def detail(pixels: tf.Tensor) -> tf.Tensor:
    """(B,) mean absolute difference between channel 0 of (B, S, S, C) model pixels and their smooth version
    (`limits.DETAIL_CELLS` x DETAIL_CELLS cell means, resized back bilinearly), divided by their grey-level
    standard deviation (0 for a constant image): about 0.01 for a smooth gradient, 0.05 - 0.45 for an X-ray."""
    g = tf.cast(pixels, tf.float32)[..., :1]
    smooth = tf.image.resize(tf.image.resize(g, (DETAIL_CELLS, DETAIL_CELLS), method="area"), tf.shape(g)[1:3],
                             method="bilinear")
    return tf.math.divide_no_nan(tf.reduce_mean(tf.abs(g - smooth), axis=[1, 2, 3]),
                                 tf.math.reduce_std(g, axis=[1, 2, 3]))


def input_quality(pixels: tf.Tensor, sizes: tf.Tensor, colour: tf.Tensor | None = None,
                  lung_prob: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """The input gate (`covidseg_tf.limits`: the checks, their order and thresholds) of a batch, as TensorFlow
    ops: the one place `Cascade.predict` and the cascade SavedModel decide whether an image is assessed.

    Args:
        pixels: (B, S, S, C) model pixels of the images (`to_model_pixels`, 0..255; channel 0 is used).
        sizes: (B, 2) the images' own (height, width).
        colour: (B,) share (0..1) of clearly coloured pixels of each decoded file (`imageio.decode_image`,
            `serving.colour_share`); None skips the colour check (grey or unknown input).
        lung_prob: (B, S, S, 1) Stage 1's lung probabilities of these pixels; None skips the lung checks.

    Returns:
        {"assessed": (B,) bool, "reason": (B,) string ("" when assessed), "check": (B,) string, the failing
        check's name from `limits.GATE_CHECKS` ("" when assessed), "grey_std", "roughness", "detail", "colour"
        (B,) float32, and with `lung_prob` the statistics of `lung_plausibility`}. The first failing check names
        the reason: too small, extreme aspect ratio, near-constant, then (prefixed "not a frontal chest X-ray: ")
        colour, noise-like, no structure, lungs.
    """
    sizes = tf.cast(sizes, tf.int32)
    hw = tf.cast(sizes, tf.float32)
    short, long = tf.reduce_min(hw, axis=1), tf.reduce_max(hw, axis=1)
    std = tf.math.reduce_std(tf.cast(pixels, tf.float32)[..., 0], axis=[1, 2])
    rough, fine = roughness(pixels), detail(pixels)
    colour = tf.zeros_like(std) if colour is None else tf.reshape(tf.cast(colour, tf.float32), tf.shape(std))
    small, elongated, flat = short < MIN_SIDE, long > MAX_ASPECT * short, std < MIN_STD
    coloured, noisy, smooth = colour > MAX_COLOUR_SHARE, rough > MAX_ROUGHNESS, fine < MIN_DETAIL
    none = tf.fill(tf.shape(std), "")
    out: dict[str, tf.Tensor] = {"grey_std": std, "roughness": rough, "detail": fine, "colour": colour}
    not_xray = "not a frontal chest X-ray: "
    reason, check = none, none
    if lung_prob is not None:
        lungs = lung_plausibility(lung_prob)
        out.update({k: v for k, v in lungs.items() if k not in ("plausible", "reason")})
        implausible = ~lungs["plausible"]
        reason = tf.where(implausible, tf.strings.join([not_xray, lungs["reason"]]), reason)
        check = tf.where(implausible, "lungs", check)
    else:
        implausible = tf.zeros_like(small)
    size_text = tf.strings.join([tf.strings.as_string(sizes[:, 0]), "x", tf.strings.as_string(sizes[:, 1]),
                                 " pixels (height x width)"])
    for failed, name, text in (
        (smooth, "smooth", [not_xray, "no structure: detail ", tf.strings.as_string(fine, precision=3),
                            f" < {MIN_DETAIL:g} (a smooth gradient or blur; an X-ray has ribs, vessels and edges)"]),
        (noisy, "noise", [not_xray, "noise-like: roughness ", tf.strings.as_string(rough, precision=2),
                          f" > {MAX_ROUGHNESS:g} (neighbouring pixels differ like random noise)"]),
        (coloured, "colour", [not_xray, "a colour image: ", tf.strings.as_string(100.0 * colour, precision=1),
                              f" % of the pixels clearly coloured (chroma >= {COLOUR_CHROMA}) > "
                              f"{100 * MAX_COLOUR_SHARE:g} %"]),
        (flat, "constant", ["near-constant image: grey-level standard deviation ",
                            tf.strings.as_string(std, precision=2), f" < {MIN_STD:g}"]),
        (elongated, "aspect", ["extreme aspect ratio: ", size_text, ", ", tf.strings.as_string(long / short,
                                                                                               precision=1),
                               f":1 > {MAX_ASPECT:g}:1"]),
        (small, "size", ["too small: ", size_text, f"; each side must be >= {MIN_SIDE}"]),
    ):
        reason = tf.where(failed, tf.strings.join(text), reason)
        check = tf.where(failed, name, check)
    out.update({"assessed": ~(small | elongated | flat | coloured | noisy | smooth | implausible), "reason": reason,
                "check": check})
    return out


# ----------------------------------------------------------------------------------------------- severity
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
    return _split_of_columns(tf.reduce_sum(_binary(lung_mask), axis=1))


def _split_of_columns(cols: tf.Tensor) -> tf.Tensor:
    """`split_columns` from (B, W) lung pixels per image column."""
    width = tf.shape(cols)[1]
    w = tf.cast(width, tf.float32)
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

    Pixels are counted per image column first (exact: whole numbers far below 2^24), so the memory beyond the
    masks themselves is a few (B, W) rows, whatever the image height.
    """
    lung = _binary(lung_mask)
    lung_cols = tf.reduce_sum(lung, axis=1)  # (B, W) lung pixels per column
    inf_cols = tf.reduce_sum(_binary(infection_mask) * lung, axis=1)  # infected lung pixels per column
    split = _split_of_columns(lung_cols)
    x = tf.range(tf.shape(lung_cols)[1], dtype=tf.int32)
    image_left = tf.cast(x[tf.newaxis, :] < split[:, tf.newaxis], tf.float32)  # (B, W)
    image_right = 1.0 - image_left

    def percent(region: tf.Tensor) -> tf.Tensor:
        lung_px = tf.reduce_sum(lung_cols * region, axis=1)
        inf_px = tf.reduce_sum(inf_cols * region, axis=1)
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


# ----------------------------------------------------------------------------------------------- the cascade
def run_stages(lung_model: Any, infection_model: Any | None, pixels: tf.Tensor, threshold: float,
               lung_mask: tf.Tensor | None = None, hflip: bool = False) -> dict[str, tf.Tensor]:
    """Stage 1, then (unless `infection_model` is None) Stage 2, at the models' size S.

    Args:
        lung_model: callable mapping (B, S, S, 3) pixels to (B, S, S, 1) probabilities (Keras or SavedModelStage).
        infection_model: callable mapping (B, S, S, 4) (pixels + lung mask 0/1) to (B, S, S, 1) probabilities.
        pixels: float32 (B, S, S, 3) model pixels (`to_model_pixels`).
        threshold: probability at or above which a Stage-1 pixel is lung.
        lung_mask: (B, S, S, 1) 0/1 mask fed to Stage 2 instead of Stage 1's (e.g. the ground truth).
        hflip: average each stage's probabilities with those of the mirrored input (test-time augmentation).

    Returns:
        {"lung_prob", "lung_input", "infection_prob"} (B, S, S, 1) float32; `lung_input` is the 0/1 mask Stage 2
        was given (absent `infection_prob` without an infection model); for an infection model with an image
        head also "image_class_prob" (B, len(IMAGE_CLASSES)) float32 (module docstring, "Image-level head").
    """
    pixels = tf.cast(pixels, tf.float32)
    lung_prob = _probabilities(lung_model, pixels, hflip)[0]
    lung_input = tf.cast(lung_prob >= threshold, tf.float32) if lung_mask is None else tf.cast(lung_mask, tf.float32)
    out = {"lung_prob": lung_prob, "lung_input": lung_input}
    if infection_model is not None:
        out["infection_prob"], image_class = run_stage2(infection_model, pixels, lung_input, hflip, with_class=True)
        if image_class is not None:
            out["image_class_prob"] = image_class
    return out


def run_stage2(infection_model: Any, pixels: tf.Tensor, lung_input: tf.Tensor, hflip: bool = False,
               with_class: bool = False) -> Any:
    """Stage 2 alone: (B, S, S, 3) model pixels + (B, S, S, 1) 0/1 lung mask -> (B, S, S, 1) float32 probabilities;
    with `with_class`, the pair (those, the image head's (B, len(IMAGE_CLASSES)) probabilities or None)."""
    x = tf.concat([tf.cast(pixels, tf.float32), tf.cast(lung_input, tf.float32)], axis=-1)
    prob, image_class = _probabilities(infection_model, x, hflip)
    return (prob, image_class) if with_class else prob


def _probabilities(model: Any, x: tf.Tensor, hflip: bool) -> tuple[tf.Tensor, tf.Tensor | None]:
    """model(x)'s mask and image class probabilities (None without a head) as float32; with `hflip`, each the mean
    with the prediction on the mirrored input (the mask mirrored back)."""
    mask, image_class = _float32(split_outputs(model(x, training=False)))
    if hflip:
        mirrored, mirrored_class = _float32(split_outputs(model(tf.reverse(x, axis=[2]), training=False)))
        mask = 0.5 * (mask + tf.reverse(mirrored, axis=[2]))
        if image_class is not None:
            image_class = 0.5 * (image_class + mirrored_class)
    return mask, image_class


def _float32(tensors: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(None if t is None else tf.cast(t, tf.float32) for t in tensors)


def infection_probability(image_class_prob: tf.Tensor) -> tf.Tensor:
    """(B,) probability that an image shows infection: the COVID-19 column of the head's (B, C) probabilities.

    >>> float(infection_probability(tf.constant([[0.7, 0.2, 0.1]]))[0]) == 0.7
    True
    """
    return tf.cast(image_class_prob, tf.float32)[:, INFECTION_CLASS]


def image_class_names(image_class_prob: tf.Tensor) -> tf.Tensor:
    """(B,) string: the most probable of `config.IMAGE_CLASSES` per image."""
    return tf.gather(tf.constant(IMAGE_CLASSES), tf.argmax(image_class_prob, axis=-1))


def has_image_head(model: Any) -> bool:
    """True if a stage model (Keras, FrozenStage, SavedModelStage, TFLiteStage) returns image class probabilities."""
    flag = getattr(model, "has_image_head", None)
    if isinstance(flag, bool):
        return flag
    from covidseg_tf.models import has_image_head as keras_has_image_head

    return keras_has_image_head(model)


def masks_at(lung_prob: tf.Tensor, infection_prob: tf.Tensor, decision: Decision | float, size: Any = None,
             lung_mask: tf.Tensor | None = None, assessed: tf.Tensor | None = None,
             image_class_prob: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """Lung and infection masks of a batch at `size` ((H, W); None = the maps' own size) and their severity.

    `decision` gives the thresholds and the image-level rules (a float: one threshold for both, no rule).
    `lung_mask`, (B, H, W, 1) 0/1 at the output size, replaces the predicted lung mask (the ground-truth ablation).
    `assessed`, (B,) bool (`input_quality`), empties both masks and zeroes the severity where it is False.
    `image_class_prob`, (B, C) from an image head (`run_stages`), is needed when the decision consults the head
    (`Decision.min_infection_probability` > 0): images whose `infection_probability` is below it get no infection.
    Returns {"lung_mask", "infection_mask"} (B, H, W, 1) float32 0/1 (infection inside lung) and the
    `SEVERITY_KEYS` (B,) float32 percentages (see `severity`).
    """
    decision = Decision.of(decision)
    lung = mask_at(lung_prob, size, decision.threshold) if lung_mask is None else tf.cast(lung_mask, tf.float32)
    infection = mask_at(infection_prob, size, decision.infection_threshold) * lung
    sev = severity(lung, infection)
    keep = tf.ones_like(sev["severity_total"])
    if decision.min_infection_percent > 0:
        keep *= tf.cast(sev["severity_total"] >= decision.min_infection_percent, tf.float32)
    if decision.uses_image_head:
        if image_class_prob is None:
            raise ValueError(f"the decision consults the image-level head (min_infection_probability "
                             f"{decision.min_infection_probability:g}) but no image class probabilities were given: "
                             "the infection model has no image head")
        keep *= tf.cast(infection_probability(image_class_prob) >= decision.min_infection_probability, tf.float32)
    if decision.min_infection_percent > 0 or decision.uses_image_head:
        infection = infection * keep[:, tf.newaxis, tf.newaxis, tf.newaxis]
        sev = {k: v * keep for k, v in sev.items()}
    if assessed is not None:  # the quality gate: no result for an input that cannot be a chest X-ray
        keep = tf.cast(assessed, tf.float32)
        lung, infection = (m * keep[:, tf.newaxis, tf.newaxis, tf.newaxis] for m in (lung, infection))
        sev = {k: v * keep for k, v in sev.items()}
    return {"lung_mask": lung, "infection_mask": infection, **sev}


def run_cascade(lung_model: Any, infection_model: Any, pixels: tf.Tensor,
                threshold: Decision | float = 0.5) -> dict[str, tf.Tensor]:
    """Both stages on a batch of model pixels, masks and severity at the models' size S.

    Returns {"lung_prob", "lung_mask", "infection_prob", "infection_mask"}: (B, S, S, 1) float32 (masks 0/1; the
    infection mask is inside the lung mask) and the `SEVERITY_KEYS` (B,) float32 percentages; with an image head
    also "image_class_prob" (B, C) and "infection_probability" (B,).
    """
    decision = Decision.of(threshold)
    stages = run_stages(lung_model, infection_model, pixels, decision.threshold, hflip=decision.hflip)
    out = {"lung_prob": stages["lung_prob"], "infection_prob": stages["infection_prob"]}
    image_class = stages.get("image_class_prob")
    if image_class is not None:
        out.update(image_class_prob=image_class, infection_probability=infection_probability(image_class))
    out.update(masks_at(stages["lung_prob"], stages["infection_prob"], decision, image_class_prob=image_class))
    return out


@dataclass
class Prediction:
    """Masks (H x W uint8 0/1, at the image's own size) and severity (percent) of one image.

    `assessed` is False for an image the quality gate refused (`input_quality`; `reason` says why): its masks are
    empty and its severity 0, which is no finding - report it as "not assessed", never as a grade.
    `image_class_probabilities` ({class name: probability}, `config.IMAGE_CLASSES`) comes from an infection model
    with an image head (None without one).
    """

    lung: np.ndarray
    infection: np.ndarray
    severity_left: float
    severity_right: float
    severity_total: float
    assessed: bool = True
    reason: str = ""
    image_class_probabilities: dict[str, float] | None = None

    @property
    def infection_probability(self) -> float | None:
        """The head's probability that the image shows infection (its COVID-19 class), or None without a head."""
        probs = self.image_class_probabilities
        return None if probs is None else probs[IMAGE_CLASSES[INFECTION_CLASS]]

    @property
    def image_class(self) -> str | None:
        """The head's most probable class, or None without a head."""
        probs = self.image_class_probabilities
        return None if probs is None else max(probs, key=probs.__getitem__)


class Cascade:
    """The two stage models (Keras, SavedModel or TFLite, see `load_model`), checked to agree, with their
    `Decision`.

    `cascade.predict([gray, ...])` runs decoded H x W uint8 images (any sizes) through `to_model_pixels`, both
    stages in one batch, and `masks_at` each image's own size.
    """

    def __init__(self, lung_model: Any, infection_model: Any, decision: Decision | float = 0.5,
                 image_size: int | None = None):
        decision = Decision.of(decision)
        self.lung_model, self.infection_model = lung_model, infection_model
        self.sources: dict[str, Path | None] = {"lung": None, "infection": None}
        self.decision = decision
        self.image_size = stage_agreement(lung_model, infection_model, image_size)
        self.has_image_head = head_agreement(infection_model, decision)
        s = self.image_size
        self._stages = tf.function(
            lambda p: run_stages(lung_model, infection_model, p, decision.threshold, hflip=decision.hflip),
            input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)])
        self._lung_stage = tf.function(  # Stage 1 alone, for `input_gate`
            lambda p: run_stages(lung_model, None, p, decision.threshold, hflip=decision.hflip)["lung_prob"],
            input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)])
        prob = tf.TensorSpec([1, s, s, 1], tf.float32)
        classes = tf.TensorSpec([1, len(IMAGE_CLASSES)], tf.float32)
        self._masks = tf.function(
            lambda lp, ip, hw, ok, ic: _as_uint8_masks(masks_at(lp, ip, decision, hw, assessed=ok,
                                                                image_class_prob=ic if self.has_image_head else None)),
            input_signature=[prob, prob, tf.TensorSpec([2], tf.int32), tf.TensorSpec([1], tf.bool), classes])

    @property
    def threshold(self) -> float:
        """The lung (Stage-1) threshold."""
        return self.decision.threshold

    @classmethod
    def load(cls, lung_path: str | Path, infection_path: str | Path, decision: Decision | None = None,
             image_size: int | None = None, **overrides: Any) -> Cascade:
        """Load both stage models (`load_model`) and check them; `sources` keeps the paths given.

        `decision` defaults to the one recorded in an exported infection stage (`Decision()` for a `.keras`
        file); `overrides` (Decision field=value, None ignored) replace single fields, e.g. threshold=0.4.
        """
        lung, infection = load_model(lung_path, stage="lung"), load_model(infection_path, stage="infection")
        if decision is None:
            recorded = getattr(infection, "info", {}).get("decision")
            decision = Decision.from_dict(recorded) if recorded else Decision()
        changes = {k: v for k, v in overrides.items() if v is not None}
        if changes:
            decision = replace(decision, **changes)
        cascade = cls(lung, infection, decision, image_size)
        cascade.sources = {"lung": Path(lung_path), "infection": Path(infection_path)}
        return cascade

    def model_pixels(self, gray: np.ndarray) -> tf.Tensor:
        """H x W uint8 -> (S, S, 3) float32 model pixels (`to_model_pixels`)."""
        return to_model_pixels(tf.convert_to_tensor(np.asarray(gray)[:, :, None]), self.image_size)

    def input_gate(self, grays: Sequence[np.ndarray], colour: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """The input gate's verdict and statistics (`input_quality`: "assessed", "reason", "check" and every
        statistic, as numpy arrays of one value per image) for decoded H x W uint8 images, exactly as `predict`
        decides them, running Stage 1 only (no masks); `colour` as in `predict`. Used by bench/ood_gate.py."""
        if colour is not None and len(colour) != len(grays):
            raise ValueError(f"{len(colour)} colour shares for {len(grays)} images: give one per image")
        pixels = tf.stack([self.model_pixels(g) for g in grays])
        sizes = tf.constant([np.shape(g)[:2] for g in grays], tf.int32)
        quality = input_quality(pixels, sizes, None if colour is None else tf.constant(colour, tf.float32),
                                self._lung_stage(pixels))
        out = {k: v.numpy() for k, v in quality.items()}
        for k in ("reason", "check"):
            out[k] = np.array([r.decode() for r in out[k]], dtype=object)
        return out

    def predict(self, grays: Sequence[np.ndarray], colour: Sequence[float] | None = None) -> list[Prediction]:
        """Masks and severity of decoded H x W uint8 images, each at its own size, after the input gate
        (`input_quality`: an image it refuses gets `assessed=False`, its reason, empty masks, severity 0).

        `colour`, one number per image, is the share of clearly coloured pixels of each decoded file
        (`imageio.decode_image(...).colour`, as predict and batch_predict pass it); None skips the colour check
        (grey arrays, e.g. TFDS images)."""
        if not len(grays):
            return []
        if colour is not None and len(colour) != len(grays):
            raise ValueError(f"{len(colour)} colour shares for {len(grays)} images: give one per image")
        pixels = tf.stack([self.model_pixels(g) for g in grays])
        sizes = tf.constant([np.shape(g)[:2] for g in grays], tf.int32)
        stages = self._stages(pixels)
        quality = input_quality(pixels, sizes, None if colour is None else tf.constant(colour, tf.float32),
                                stages["lung_prob"])
        image_class = stages.get("image_class_prob")
        if image_class is None:
            image_class = tf.zeros([len(grays), len(IMAGE_CLASSES)], tf.float32)  # unused without a head
        out = []
        for i in range(len(grays)):
            ok = bool(quality["assessed"][i])
            m = self._masks(stages["lung_prob"][i:i + 1], stages["infection_prob"][i:i + 1], sizes[i],
                            tf.constant([ok]), image_class[i:i + 1])
            probs = None
            if self.has_image_head and ok:
                probs = {name: float(p) for name, p in zip(IMAGE_CLASSES, image_class[i].numpy())}
            out.append(Prediction(lung=m["lung_mask"].numpy()[0, :, :, 0],
                                  infection=m["infection_mask"].numpy()[0, :, :, 0],
                                  **{k: float(m[k].numpy()[0]) for k in SEVERITY_KEYS},
                                  assessed=ok, reason=quality["reason"][i].numpy().decode(),
                                  image_class_probabilities=probs))
        return out


def _as_uint8_masks(m: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """`masks_at`'s output with uint8 masks (a quarter of the float32 bytes handed to numpy)."""
    return dict(m, lung_mask=tf.cast(m["lung_mask"], tf.uint8), infection_mask=tf.cast(m["infection_mask"], tf.uint8))


def model_input_size(model: Any, image_size: int | None = None) -> tuple[int, int]:
    """(S, C) of a model with a square (B, S, S, C) input (Keras model or SavedModelStage).

    A model built with a free size (None, None) takes `image_size` (a multiple of 32); a fixed-size model takes
    its own size, and `image_size`, when given, must agree with it.
    """
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else tuple(model.input_shape)
    name = getattr(model, "name", model)
    if len(shape) != 4 or shape[3] is None or shape[1] != shape[2]:
        raise ValueError(f"model {name!r} has input shape {shape}; expected a square (None, S, S, C) input "
                         "(or (None, None, None, C) with an image size S)")
    if shape[1] is None:
        if image_size is None:
            raise ValueError(f"model {name!r} has a free input size {shape}; give the image size (a multiple of "
                             f"{SIZE_DIVISOR})")
        if image_size <= 0 or image_size % SIZE_DIVISOR:
            raise ValueError(f"image size must be a positive multiple of {SIZE_DIVISOR}, got {image_size}")
        return int(image_size), int(shape[3])
    if image_size is not None and image_size != shape[1]:
        raise ValueError(f"model {name!r} takes {shape[1]} px, not an image size of {image_size}")
    return int(shape[1]), int(shape[3])


def stage_agreement(lung_model: Any, infection_model: Any, image_size: int | None = None) -> int:
    """The cascade's input size S, after checking that the lung model takes 3 channels, the infection model 4,
    and both the same size (ValueError naming what differs)."""
    size, c1 = model_input_size(lung_model, image_size)
    size2, c2 = model_input_size(infection_model, image_size or size)
    if (c1, c2) != (3, 4):
        raise ValueError(f"the cascade needs a 3-channel lung model and a 4-channel infection model, got {c1} and {c2}")
    if size != size2:
        raise ValueError(f"the lung model takes {size} px but the infection model {size2} px; the cascade needs "
                         "one size")
    return size


def head_agreement(infection_model: Any, decision: Decision) -> bool:
    """Whether the infection model has an image head (`has_image_head`), after checking that a decision which
    consults the head (`Decision.uses_image_head`) gets one (ValueError otherwise)."""
    head = has_image_head(infection_model)
    if decision.uses_image_head and not head:
        raise ValueError(f"the decision consults the image-level head (min_infection_probability "
                         f"{decision.min_infection_probability:g}) but the infection model has none; use "
                         "--min-infection-probability 0 or a model trained with --image-head-weight")
    return head


EXPORT_INFO = Path("assets.extra") / "covidseg_export.json"
IMAGE_CLASS_PROB = "image_class_prob"
"""Output name of the image head's (B, C) class probabilities in the SavedModel signatures (`covidseg_tf.serving`)."""
"""What covidseg_tf.export wrote into each version folder (servable, image_size, precision, ...)."""

_EXPECTED = ("expected a Keras `.keras` file, a stage SavedModel version folder (holding saved_model.pb), a TF "
             "Serving base folder of integer versions such as saved_models/lung, or a `.tflite` stage file "
             "(`covidseg_tf.export --tflite`)")
TFLITE_FILE = "stage.tflite"
"""The TFLite copy of a stage that `covidseg_tf.export --tflite` writes into the stage's version folder."""
_HOW_TO_GET = ("train the stages with `python -m covidseg_tf.train --stage lung|infection ... --output runs/NAME` "
               "(it writes runs/NAME/model.keras and exports saved_models/<stage>/<N>/), export .keras models with "
               "`python -m covidseg_tf.export ... --out saved_models/`, run `python -m covidseg_tf.demo`, or pass "
               "--lung-model/--infection-model")


@contextlib.contextmanager
def quiet_absl(level: int = logging.ERROR) -> Any:
    """Inside the block, TensorFlow's Python log (logger "absl") shows only records at `level` or above."""
    absl = logging.getLogger("absl")
    old = absl.level
    absl.setLevel(level)
    try:
        yield
    finally:
        absl.setLevel(old)


class SavedModelStage:
    """A stage SavedModel written by `covidseg_tf.export.export_stage`, called like the Keras stage model.

    `stage(pixels, training=False)` maps (B, S, S, C) raw pixels to (B, S, S, 1) float32 probabilities through
    the `predict_pixels` signature (for an infection stage with an image head, the dict {"mask": those,
    "image_class": (B, C) probabilities} that the Keras model returns); it works eagerly and inside `tf.function`.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.info: dict[str, Any] = json.loads((self.path / EXPORT_INFO).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: a SavedModel without a readable {EXPORT_INFO} ({e}); "
                             f"{_EXPECTED}, written by covidseg_tf.export") from e
        self.stage = self.info.get("servable")
        if self.stage == "cascade":
            raise ValueError(f"{self.path} is a cascade SavedModel (both stages in one servable); pass the stage "
                             "SavedModels (saved_models/lung and saved_models/infection) or .keras files instead")
        if self.stage not in ("lung", "infection"):
            raise ValueError(f"{self.path}: servable {self.stage!r} in {EXPORT_INFO}; expected 'lung' or 'infection'")
        try:
            with quiet_absl():  # silence "ops with unsaved custom gradients": inference needs none
                self._loaded = tf.saved_model.load(str(self.path))  # keeps the signature's resources alive
                self._fn = self._loaded.signatures["predict_pixels"]
        except Exception as e:
            raise ValueError(f"{self.path}: cannot load the `predict_pixels` signature of this SavedModel: "
                             f"{type(e).__name__}: {e}") from e
        spec = self._fn.structured_input_signature[1]["pixels"]
        self.input_shape: tuple[int | None, ...] = tuple(spec.shape.as_list())
        self.name = f"{self.stage}_v{self.path.name}"
        self._output = f"{self.stage}_prob"
        self.has_image_head = IMAGE_CLASS_PROB in self._fn.structured_outputs
        log.info("loaded %s stage SavedModel %s (input %s)", self.stage, self.path, self.input_shape)

    def __call__(self, pixels: tf.Tensor, training: bool = False) -> tf.Tensor | dict[str, tf.Tensor]:
        """(B, S, S, C) pixels -> (B, S, S, 1) float32 probabilities, with a head the dict of mask and image class
        probabilities (`training` is ignored)."""
        out = self._fn(pixels=tf.cast(pixels, tf.float32))
        if self.has_image_head:
            return {MASK_OUTPUT: out[self._output], IMAGE_CLASS_OUTPUT: out[IMAGE_CLASS_PROB]}
        return out[self._output]

    def __repr__(self) -> str:
        return f"SavedModelStage({str(self.path)!r}, stage={self.stage!r}, input_shape={self.input_shape})"


class TFLiteStage:
    """A TFLite stage (`covidseg_tf.optimize.tflite_model`, batch 1), called like the Keras stage model.

    `stage(pixels, training=False)` maps (B, S, S, C) raw pixels to (B, S, S, 1) float32 probabilities (with an
    image head, the dict of those and the (B, C) class probabilities, like the Keras model), one image
    per interpreter call (XNNPACK, `threads` threads: default TensorFlow's intra-op setting, as `batch_predict
    --tf-threads` sets it, else TF_NUM_INTRAOP_THREADS, else every core); it works
    eagerly and inside `tf.function` (through `tf.numpy_function`). Calls are serialised: one interpreter.
    A file written by `covidseg_tf.export --tflite` sits in a stage version folder, whose `covidseg_export.json`
    gives its stage and the recorded decision (`info`); a bare file's stage comes from its input channels.
    """

    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        self.path = None if isinstance(model, bytes) else Path(model)
        where = "TFLite model" if self.path is None else str(self.path)
        threads = (threads or tf.config.threading.get_intra_op_parallelism_threads()
                   or int(os.environ.get("TF_NUM_INTRAOP_THREADS", 0)) or os.cpu_count() or 1)
        self.threads = threads
        try:
            content = model if isinstance(model, bytes) else self.path.read_bytes()
            self._interpreter = _tflite_interpreter(content, threads)
            self._interpreter.allocate_tensors()
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{where}: cannot load this TFLite model: {type(e).__name__}: {e}; {_EXPECTED}") from e
        inp, out = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        shape = tuple(int(d) for d in inp[0]["shape"])
        if len(inp) != 1 or len(out) not in (1, 2) or len(shape) != 4 or shape[0] != 1 or shape[1] != shape[2]:
            raise ValueError(f"{where}: a TFLite model with inputs {[tuple(d['shape']) for d in inp]}; expected "
                             "one (1, S, S, C) input, as `covidseg_tf.export --tflite` writes")
        masks = [d for d in out if len(d["shape"]) == 4]
        heads = [d for d in out if len(d["shape"]) == 2]
        if len(masks) != 1 or len(heads) != len(out) - 1:
            raise ValueError(f"{where}: a TFLite model with outputs {[tuple(d['shape']) for d in out]}; expected a "
                             "(1, S, S, 1) mask and optionally a (1, C) image class output")
        self._input, self._output = inp[0]["index"], masks[0]["index"]
        self._head = heads[0]["index"] if heads else None
        self.has_image_head = self._head is not None
        self.input_shape: tuple[int | None, ...] = (None, *shape[1:])
        self._classes = int(heads[0]["shape"][1]) if heads else 0
        info_file = None if self.path is None else self.path.parent / EXPORT_INFO
        self.info: dict[str, Any] = json.loads(info_file.read_text()) if info_file and info_file.is_file() else {}
        self.stage = self.info.get("servable") or {3: "lung", 4: "infection"}.get(shape[3])
        self.name = f"{self.stage}_tflite"
        self._lock = threading.Lock()
        log.info("loaded %s TFLite stage %s (input %s, %d threads)", self.stage, where, self.input_shape, threads)

    def run(self, pixels: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """(B, S, S, C) pixels -> (B, S, S, 1) float32 probabilities, in numpy (with an image head, the pair of
        those and the (B, C) class probabilities)."""
        pixels = np.asarray(pixels, np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"{self.name}: pixels of shape {pixels.shape}; expected (B, *{self.input_shape[1:]})")
        masks, classes = [], []
        with self._lock:
            for image in pixels:
                self._interpreter.set_tensor(self._input, image[None])
                self._interpreter.invoke()
                masks.append(self._interpreter.get_tensor(self._output)[0].astype(np.float32))
                if self._head is not None:
                    classes.append(self._interpreter.get_tensor(self._head)[0].astype(np.float32))
        mask = np.stack(masks) if masks else np.zeros((0, *self.input_shape[1:3], 1), np.float32)
        if self._head is None:
            return mask
        return mask, (np.stack(classes) if classes else np.zeros((0, self._classes), np.float32))

    def __call__(self, pixels: tf.Tensor, training: bool = False) -> tf.Tensor | dict[str, tf.Tensor]:
        """(B, S, S, C) pixels -> (B, S, S, 1) float32 probabilities, with an image head the dict of those and the
        class probabilities (`training` is ignored)."""
        if tf.executing_eagerly():
            out = self.run(np.asarray(pixels))
            if self._head is None:
                return tf.constant(out)
            return {MASK_OUTPUT: tf.constant(out[0]), IMAGE_CLASS_OUTPUT: tf.constant(out[1])}
        dtypes = [tf.float32] if self._head is None else [tf.float32, tf.float32]
        result = tf.numpy_function(self.run, [tf.cast(pixels, tf.float32)], dtypes, stateful=True)
        result = result if isinstance(result, (list, tuple)) else [result]
        result[0].set_shape([pixels.shape[0], *self.input_shape[1:3], 1])
        if self._head is None:
            return result[0]
        result[1].set_shape([pixels.shape[0], self._classes])
        return {MASK_OUTPUT: result[0], IMAGE_CLASS_OUTPUT: result[1]}

    def __repr__(self) -> str:
        return f"TFLiteStage({str(self.path or '<bytes>')!r}, stage={self.stage!r}, input_shape={self.input_shape})"


def _tflite_interpreter(content: bytes, threads: int) -> Any:
    """LiteRT's interpreter (package ai-edge-litert) or, without it, TensorFlow's deprecated `tf.lite.Interpreter`."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is in requirements.txt
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_content=content, num_threads=threads)


def saved_model_version(path: Path | str) -> Path:
    """The version folder of a SavedModel path: `path` itself if it holds saved_model.pb, else its highest
    integer-named sub-folder (TF Serving's choice; other names such as `.tmp-*` are ignored).

    Raises:
        ValueError: no saved_model.pb and no integer version folder, or the chosen version has no saved_model.pb.
    """
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        return p
    versions = integer_versions(p)
    if not versions:
        what = "is empty" if not any(p.iterdir()) else "has no saved_model.pb and no integer version folders"
        raise ValueError(f"{p} {what}: it is not a SavedModel; {_EXPECTED}. To get models: {_HOW_TO_GET}")
    latest = versions[max(versions)]
    if not (latest / "saved_model.pb").is_file():
        raise ValueError(f"{latest} (latest version of {p}) has no saved_model.pb; {_EXPECTED}")
    return latest


def load_model(path: str | Path, stage: str | None = None) -> Any:
    """Load a stage model: a `.keras` file (custom objects registered, not compiled), a stage SavedModel
    (version folder or TF Serving base folder, see `saved_model_version`) as a `SavedModelStage`, or a `.tflite`
    file as a `TFLiteStage`.

    `stage` ("lung" or "infection"), when given, must be the model's stage (SavedModel) or match its number of
    input channels (3 or 4).

    Raises:
        FileNotFoundError: `path` does not exist (the message says how to obtain a model).
        ValueError: `path` is neither a loadable `.keras` file nor a lung/infection SavedModel (the message says
            which, e.g. a cascade SavedModel or a base folder without versions), or is the other stage.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {p} not found; {_HOW_TO_GET}")
    if p.is_dir():
        model = SavedModelStage(saved_model_version(p))
    else:
        model = TFLiteStage(p) if p.suffix == ".tflite" else _load_keras(p)
    if stage is not None:
        channels = model.input_shape[-1]
        found = getattr(model, "stage", None) or {3: "lung", 4: "infection"}.get(channels)
        if found != stage:
            raise ValueError(f"{p} is not a {stage} stage model (it is {found or 'unknown'}, input shape "
                             f"{tuple(model.input_shape)}); check --lung-model / --infection-model")
    return model


def _load_keras(p: Path) -> Any:
    """A `.keras` file as an uncompiled Keras model (ValueError naming `p` if it is not one)."""
    if p.suffix != ".keras":
        raise ValueError(f"{p}: not a model; {_EXPECTED}")
    import keras

    import covidseg_tf.models  # noqa: F401  (registers the custom layers)

    for extra in ("covidseg_tf.losses", "covidseg_tf.metrics"):  # registered objects a saved config may name
        try:
            __import__(extra)
        except ImportError:  # pragma: no cover - optional when loading uncompiled
            pass
    import zipfile

    # Keras says "File not found" for a file that exists but is no zip, and a KeyError for a zip without a model
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p}: not a Keras model: not a zip archive ({p.stat().st_size} bytes), which every "
                         f".keras file is; {_EXPECTED}")
    with zipfile.ZipFile(p) as z:
        if "config.json" not in z.namelist():
            raise ValueError(f"{p}: not a Keras model: a zip archive with no config.json; {_EXPECTED}")
    try:
        return keras.models.load_model(p, compile=False)
    except Exception as e:
        raise ValueError(f"{p}: cannot load Keras model: {type(e).__name__}: {e}") from e
