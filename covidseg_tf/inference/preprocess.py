"""Model pixels and the input gate: what an image becomes before the stages, and whether it is assessed at all.

    pixels = to_model_pixels(gray, size)                       # (B, H, W, 1) 0..255 -> (B, S, S, 3) float32
    quality = input_quality(pixels, sizes, colour, lung_prob)  # {"assessed", "reason", "check", statistics}

Model pixels: a decoded grey image (0..255) is resized to the model's S x S input with one rule, bilinear with
antialias (antialias only changes anything when shrinking), clipped to 0..255 and repeated to RGB. Masks that are
inputs or targets are resized with nearest neighbour (`resize_mask`).

The gate: images that cannot be frontal chest X-rays (too small, extremely elongated, near-constant, in colour,
noise-like, without structure, or without a plausible pair of lungs in Stage 1's probability map) are "not
assessed": `postprocess.apply_decision(..., assessed=...)` empties their masks and zeroes their severity, and
every entry point says so with the reason. The checks, their order and thresholds are in `covidseg_tf.limits`.
All functions are TensorFlow ops: they run eagerly, inside `tf.function` and inside an exported SavedModel.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

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

SIZE_DIVISOR = 32
"""Model input sides are multiples of this (the U-Net downsamples 5 times)."""


def to_model_pixels(gray: tf.Tensor, size: int) -> tf.Tensor:
    """Grey images (B, H, W, 1) or (H, W, 1), any numeric dtype on 0..255 -> float32 (B, S, S, 3) or (S, S, 3)
    model pixels: bilinear with antialias, clipped to 0..255, grey repeated to RGB."""
    x = tf.image.resize(tf.cast(gray, tf.float32), (size, size), method="bilinear", antialias=True)
    return tf.repeat(tf.clip_by_value(x, 0.0, 255.0), 3, axis=-1)


def resize_mask(mask: tf.Tensor, size: Any) -> tf.Tensor:
    """A 0/1 mask (…, H, W, C) resized with nearest neighbour to `size` (an int S or a (height, width) pair)."""
    hw = (size, size) if isinstance(size, int) else size
    return tf.image.resize(mask, hw, method="nearest")


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
    ops: the one place `Predictor.predict` and the cascade SavedModel decide whether an image is assessed.

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
