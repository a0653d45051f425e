"""Serving graphs for TF Serving: encoded-image decoding with size caps, signatures, warm-up records.

Everything here is pure TensorFlow (usable inside the `tf.function`s that `covidseg_tf.export` writes into a
SavedModel), except the warm-up record encoder, which runs at export time.

Signatures of a stage servable (`lung` or `infection`; ``<p>`` is the stage name):

    serving_default  inputs  images      (B,) string   PNG or JPEG bytes, any size up to MAX_SIDE, grey or colour
                             lung_masks  (B,) string   infection stage only: PNG lung mask of the same size
                                                       (0/1 or 0/255; any value > 0, or > 127 for 0/255 masks)
                     outputs <p>_mask_bytes  (B,) string           PNG mask (uint8 0/255) at each INPUT's size
                             height, width   (B,) int32            each input's size
    predict_pixels   inputs  pixels      (B, S, S, C) float32  raw 0..255 (C = 3; 4 for infection: + lung 0/1)
                     outputs <p>_prob, <p>_mask                (B, S, S, 1) float32 at the MODEL size S

A stage servable applies exactly what its manifest (`inference.stages.ExportManifest`) records: the lung stage
its threshold; the infection stage its whole `Decision` through `postprocess.apply_decision` with the given lung
mask (threshold, flip test-time augmentation, the image-level rules), so its masks are the cascade's for the same
lung mask. An infection stage with an image-level head adds to both signatures `image_class_prob` ((B, C) float32,
the softmax over COVID-19 / Non-COVID / Normal, `covidseg_tf.config.IMAGE_CLASSES`).

The cascade servable: `serving_default` takes `images` only and returns lung_mask_bytes, infection_mask_bytes
(input-size PNGs; the infection PNG is inside the lung PNG), severity_left, severity_right, severity_total
((B,) float32 percent of the patient's left/right/both lungs, computed on the input-size masks), height, width,
and the input-quality gate's verdict (`inference.preprocess.input_quality`, thresholds in `covidseg_tf.limits`):

                     assessed        (B,) bool    False: the image cannot be a frontal chest X-ray (too small,
                                                  extreme aspect ratio, near-constant, in colour, noise-like,
                                                  no plausible lungs); its masks are EMPTY and its severities 0,
                                                  which is no finding: report "not assessed"
                     reason          (B,) string  why not ("" when assessed), e.g. "too small: 2x2 pixels ..."

and, when its infection stage has an image-level head:

                     infection_probability  (B,) float32  the head's probability that the image shows infection
                                                          (its COVID-19 class; 0 where not assessed)
                     image_class            (B,) string   the most probable class ("" where not assessed)
                     image_class_prob       (B, C) float32  the class probabilities (COVID-19, Non-COVID, Normal)

Its `predict_pixels` takes (B, S, S, 3) pixels and returns the tensors of `inference.Predictor.predict_pixels`
(lung_prob, lung_mask, infection_prob, infection_mask + severity, at S; with a head also image_class_prob and
infection_probability), without the gate (the caller chose the pixels). The colour share is measured from the
file's own RGB pixels (`colour_share`, a second decode of colour files only), as `imageio.decode_image` measures
it for `predict`.

Pixels and masks follow `covidseg_tf.inference` (the one place for them): images become model pixels with
`preprocess.to_model_pixels`, probabilities become input-size masks with `postprocess.threshold_mask` /
`apply_decision`, so `predict` and this SavedModel give the same masks and severity for the same image. They also
decode alike (`gray_pixels`): JPEG with the accurate integer DCT that Pillow uses, 16-bit grey PNG stretched
min..max like `imageio.to_uint8`.

Why this representation: `serving_default` is the REST entry point, and TF Serving's REST API returns every
output of a signature as JSON (it cannot filter outputs), so it returns only compact (B,) outputs: a PNG string
per image (images of one batch may differ in size, and a string can hold a mask of any size) and scalars. The
dense (B, S, S, 1) float maps (hundreds of thousands of JSON numbers per image at S = 448) are only in
`predict_pixels`, for gRPC / in-process batch users. Output names ending in ``_bytes`` are base64-encoded by
TF Serving's REST API (``{"b64": ...}``). All outputs have the batch as their first dimension, as TF
Serving's row ("instances") format requires.

Bad input raises ONE InvalidArgument naming the first bad item of the batch and why (never a crash or a silent
wrong answer): an empty batch, bytes that are not PNG or JPEG (by magic number), a truncated PNG header, a
PNG/JPEG whose header declares more than the size policy of `covidseg_tf.limits` (sides 1..MAX_SIDE, at most
MAX_PIXELS; checked from the header - PNG IHDR bytes, `tf.image.extract_jpeg_shape` - BEFORE decoding, so a
decompression bomb is never inflated), a corrupt image ("images[3] is a corrupt PNG or JPEG: the decoder rejects
its data"; decoding runs in a `tf.data` map with `ignore_errors` so that the failing item can be named, see
`decode_each`), a lung mask
whose size differs from its image.

Numerics: the served graphs' convolutions (TensorFlow's CPU kernels as grappler rewrites them) sum in an order
that depends on the intra-op thread count, so probabilities differ in the last bits (fp32) or by
up to ~1e-2 (bf16) between thread counts, and a few mask pixels at the threshold (hence severity in the second
decimal) may flip. The TF1 (TF Serving) and TF2 loaders give bit-identical outputs at the same thread count; pin
`--tensorflow_intra_op_parallelism` (TF Serving) / `tf.config.threading.set_intra_op_parallelism_threads` for
bit-exact reproducibility across machines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from covidseg_tf import limits
from covidseg_tf.inference.postprocess import (
    SEVERITY_KEYS,
    Decision,
    apply_decision,
    image_class_names,
    infection_probability,
    threshold_mask,
)
from covidseg_tf.inference.predictor import Predictor, run_stages
from covidseg_tf.inference.preprocess import input_quality, resize_mask, to_model_pixels
from covidseg_tf.inference.stages import IMAGE_CLASS_PROB, ExportManifest, as_stage, model_input_size

log = logging.getLogger(__name__)

MAX_SIDE = limits.MAX_SIDE
"""Largest accepted image side in pixels (checked from the file header before decoding; `covidseg_tf.limits`)."""
MAX_PIXELS = limits.MAX_PIXELS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DEFAULT_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "predict_pixels"
WARMUP_FILE = "tf_serving_warmup_requests"


# --------------------------------------------------------------------------------------------------------------
# Decoding with header checks
# --------------------------------------------------------------------------------------------------------------


def _be_uint32(four: tf.Tensor) -> tf.Tensor:
    """Big-endian uint32 of a (4,) uint8 tensor, as int64."""
    b = tf.cast(four, tf.int64)
    return b[0] * 16777216 + b[1] * 65536 + b[2] * 256 + b[3]


def _msg(*parts: Any) -> tf.Tensor:
    """Join python strings and scalar/vector tensors into one error message (vectors as "a x b")."""
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(tf.constant(part))
        else:
            t = tf.convert_to_tensor(part)
            if t.dtype != tf.string:
                t = tf.strings.as_string(t)
            out.append(tf.strings.reduce_join(t, separator="x") if t.shape.rank else t)
    return tf.strings.join(out)


def _header(data: tf.Tensor, what: tf.Tensor, max_side: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) int64 declared by a PNG/JPEG header ([0, 0] if none) and the problem with it: a scalar
    string naming `what`, "" when the item may be decoded. Checks, in order: PNG or JPEG magic number, PNG long
    enough to hold IHDR, both sides in 1..max_side, at most `limits.MAX_PIXELS` pixels. A JPEG whose header
    cannot be parsed makes `tf.image.extract_jpeg_shape` fail (`decode_each` names the item)."""
    length = tf.strings.length(data)
    is_png = tf.equal(tf.strings.substr(data, 0, len(PNG_MAGIC)), PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    has_ihdr = is_png & (length >= 33)

    def png_hw() -> tf.Tensor:
        # Padded so that even a short string gives 8 bytes (the result is only used for a long enough PNG).
        padded = tf.strings.join([data, tf.constant(b"\0" * 24)])
        ihdr = tf.io.decode_raw(tf.strings.substr(padded, 16, 8), tf.uint8)
        return tf.stack([_be_uint32(ihdr[4:8]), _be_uint32(ihdr[0:4])])  # IHDR: width, then height

    def jpeg_hw() -> tf.Tensor:
        return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)

    hw = tf.cond(is_jpeg, jpeg_hw, lambda: tf.where(has_ihdr, png_hw(), tf.zeros([2], tf.int64)))
    problem = tf.where(hw[0] * hw[1] > MAX_PIXELS,
                       _msg(what, " is ", hw, f" pixels (height x width); at most {MAX_PIXELS} pixels are decoded"),
                       "")
    problem = tf.where(tf.reduce_all((hw >= 1) & (hw <= max_side)), problem,
                       _msg(what, " is ", hw, f" pixels (height x width); each side must be 1..{max_side}"))
    problem = tf.where(is_png & ~has_ihdr, _msg(what, " is a truncated PNG (no IHDR chunk)"), problem)
    problem = tf.where(is_png | is_jpeg, problem, _msg(what, " is not a PNG or JPEG image (", length, " bytes)"))
    return hw, problem


def gray_pixels(data: tf.Tensor) -> tf.Tensor:
    """(H, W, 1) uint8 grey pixels of PNG/JPEG bytes by `covidseg_tf.imageio`'s rules, so `predict` and the
    SavedModel see the same pixels: a JPEG through libjpeg's accurate integer DCT (Pillow's; TensorFlow's default
    fast DCT differs by up to a dozen grey levels; a 4-component CMYK JPEG through RGB, then ITU-R 601 luma, as
    Pillow converts it, within 2 grey levels), a 16-bit grey PNG stretched from its own min..max to 0..255
    (`imageio.to_uint8`), other PNGs as TensorFlow decodes them to 8-bit grey (luma of colour within 1 level)."""
    head = tf.io.decode_raw(tf.strings.substr(tf.strings.join([data, b"\0" * 26]), 0, 26), tf.uint8)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    gray16 = tf.equal(tf.strings.substr(data, 0, len(PNG_MAGIC)), PNG_MAGIC) & tf.equal(head[24], 16) & tf.equal(
        head[25], 0)  # IHDR bit depth 16, colour type 0 (grey)

    def jpeg() -> tf.Tensor:
        def gray() -> tf.Tensor:
            return tf.io.decode_jpeg(data, channels=1, dct_method="INTEGER_ACCURATE")

        def cmyk() -> tf.Tensor:  # libjpeg cannot convert 4 components to 1; to RGB it can (as Pillow does), then luma
            rgb = tf.cast(tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"), tf.float32)
            luma = tf.tensordot(rgb, tf.constant([0.299, 0.587, 0.114]), axes=1)[..., tf.newaxis]
            return tf.cast(tf.clip_by_value(tf.round(luma), 0.0, 255.0), tf.uint8)

        return tf.cond(tf.equal(tf.image.extract_jpeg_shape(data)[2], 4), cmyk, gray)

    def png16() -> tf.Tensor:
        v = tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16), tf.float64)
        lo, hi = tf.reduce_min(v), tf.reduce_max(v)
        scale = tf.math.divide_no_nan(tf.constant(255.0, tf.float64), hi - lo)
        return tf.cast(tf.clip_by_value(tf.round((v - lo) * scale), 0.0, 255.0), tf.uint8)

    def other() -> tf.Tensor:
        return tf.io.decode_image(data, channels=1, dtype=tf.uint8, expand_animations=False)

    image = tf.cond(is_jpeg, jpeg, lambda: tf.cond(gray16, png16, other))
    image.set_shape([None, None, 1])
    return image


def colour_share(data: tf.Tensor) -> tf.Tensor:
    """Share (0..1, float32 scalar) of the clearly coloured pixels of PNG/JPEG bytes, as `imageio.colour_share`
    measures it on Pillow's RGB pixels: chroma max(R,G,B) - min(R,G,B) >= `limits.COLOUR_CHROMA`. Only colour
    files are decoded a second time, as RGB (a PNG of colour type 2, 3 or 6 - RGB, palette, RGBA - or a JPEG of 3
    or more components, through the accurate integer DCT); a grey file gives 0 without decoding."""
    head = tf.io.decode_raw(tf.strings.substr(tf.strings.join([data, b"\0" * 26]), 0, 26), tf.uint8)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(data, 0, len(PNG_MAGIC)), PNG_MAGIC)
    png_colour = is_png & ((head[25] == 2) | (head[25] == 3) | (head[25] == 6))  # IHDR colour type

    def jpeg_channels() -> tf.Tensor:
        return tf.image.extract_jpeg_shape(data)[2]

    colourful = png_colour | (is_jpeg & (tf.cond(is_jpeg, jpeg_channels, lambda: tf.constant(1, tf.int32)) >= 3))

    def share() -> tf.Tensor:
        rgb = tf.cond(is_jpeg, lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                      lambda: tf.io.decode_png(data, channels=3, dtype=tf.uint8))
        rgb = tf.cast(rgb, tf.int32)
        chroma = tf.reduce_max(rgb, axis=-1) - tf.reduce_min(rgb, axis=-1)
        return tf.reduce_mean(tf.cast(chroma >= limits.COLOUR_CHROMA, tf.float32))

    return tf.cond(colourful, share, lambda: tf.constant(0.0, tf.float32))


def decode_each(items: tf.Tensor, names: tf.Tensor, fn: Callable[..., tuple[tf.Tensor, ...]],
                signature: tuple[tf.TensorSpec, ...], max_side: int = MAX_SIDE,
                with_bytes: bool = False) -> tuple[tf.Tensor, ...]:
    """`fn(gray)` (with `with_bytes`: `fn(gray, data)`, the item's encoded bytes too) of every encoded item of a
    (B,) batch, stacked: tensors of `signature`, batch first.

    Each item's header is checked (`_header`: format, truncation, the size policy) and only an item that passes
    is decoded to (H, W, 1) uint8 grey (`gray_pixels`) and given to `fn`, so a decompression bomb is never
    inflated. This runs in a `tf.data` map with `ignore_errors`: an item the decoder rejects (a corrupt PNG/JPEG
    behind a valid magic number) is dropped instead of failing with the decoder's own message ("Invalid PNG
    data, size 14560"), which cannot say which item it was. Then ONE InvalidArgument names the first bad item in
    batch order and why, e.g. "images[3] is a corrupt PNG or JPEG: the decoder rejects its data".
    """
    n = tf.size(items)

    def item(i: tf.Tensor, data: tf.Tensor, what: tf.Tensor) -> tuple[tf.Tensor, ...]:
        _, problem = _header(data, what, max_side)

        def decoded() -> tuple[tf.Tensor, ...]:
            return tuple(fn(gray_pixels(data), data) if with_bytes else fn(gray_pixels(data)))

        def skipped() -> tuple[tf.Tensor, ...]:
            return tuple(tf.zeros(spec.shape, spec.dtype) for spec in signature)

        return (i, problem) + tuple(tf.cond(tf.equal(problem, ""), decoded, skipped))

    specs = (tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.string)) + tuple(signature)
    empty = tuple(tf.zeros([0] + spec.shape.as_list(), spec.dtype) for spec in specs)  # when every item fails
    ds = tf.data.Dataset.from_tensor_slices((tf.range(n), items, names)).map(item).ignore_errors()
    ds = ds.batch(tf.cast(n, tf.int64)).concatenate(tf.data.Dataset.from_tensors(empty)).take(1)
    out = ds.get_single_element()
    index, problems = out[0], tf.concat([out[1], [""]], 0)
    present = tf.scatter_nd(index[:, tf.newaxis], tf.ones_like(index), [n]) > 0
    position = tf.scatter_nd(index[:, tf.newaxis], tf.range(tf.size(index)) + 1, [n]) - 1
    corrupt = tf.strings.join([names, " is a corrupt PNG or JPEG: the decoder rejects its data"])
    item_problem = tf.where(present, tf.gather(problems, tf.where(present, position, tf.size(index))), corrupt)
    bad = tf.not_equal(item_problem, "")
    first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
    all_ok = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [tf.gather(item_problem, first)])
    with tf.control_dependencies([all_ok]):
        return tuple(tf.identity(t) for t in out[2:])


def _names(prefix: str, n: tf.Tensor) -> tf.Tensor:
    """["prefix[0]", "prefix[1]", ...] for error messages."""
    return tf.strings.join([prefix + "[", tf.strings.as_string(tf.range(n)), "]"])


def _assert_nonempty(batch: tf.Tensor, name: str) -> tf.Tensor:
    check = tf.debugging.Assert(
        tf.size(batch) > 0, [f"`{name}` is an empty batch: send at least one encoded image"]
    )
    with tf.control_dependencies([check]):
        return tf.identity(batch)


def load_images(images: tf.Tensor, size: int, max_side: int = MAX_SIDE) -> tuple[tf.Tensor, tf.Tensor]:
    """(B,) encoded images -> model pixels (B, size, size, 3) float32 0..255 and input sizes (B, 2) int32
    (`decode_each`: every bad item is an InvalidArgument naming it)."""
    images = _assert_nonempty(images, "images")

    def one(gray: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return to_model_pixels(gray, size), tf.shape(gray)[:2]

    return decode_each(images, _names("images", tf.size(images)), one,
                       (tf.TensorSpec([size, size, 3], tf.float32), tf.TensorSpec([2], tf.int32)), max_side)


def load_images_with_colour(images: tf.Tensor, size: int,
                            max_side: int = MAX_SIDE) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`load_images` plus each file's colour share (B,) float32 (`colour_share`), for the input gate."""
    images = _assert_nonempty(images, "images")

    def one(gray: tf.Tensor, data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return to_model_pixels(gray, size), tf.shape(gray)[:2], colour_share(data)

    signature = (tf.TensorSpec([size, size, 3], tf.float32), tf.TensorSpec([2], tf.int32),
                 tf.TensorSpec([], tf.float32))
    return decode_each(images, _names("images", tf.size(images)), one, signature, max_side, with_bytes=True)


def load_masks(masks: tf.Tensor, sizes: tf.Tensor, size: int, max_side: int = MAX_SIDE) -> tuple[tf.Tensor, tf.Tensor]:
    """(B,) encoded lung masks of the images' sizes -> (B, size, size, 1) 0/1 float32 (nearest) and the
    full-size masks as (B,) PNG strings of 0/1 uint8 (kept as strings since sizes differ)."""
    masks = _assert_nonempty(masks, "lung_masks")
    count_ok = tf.debugging.assert_equal(
        tf.size(masks), tf.shape(sizes)[0], message="`lung_masks` must hold one mask per image in `images`"
    )
    with tf.control_dependencies([count_ok]):
        masks = tf.identity(masks)

    def one(gray: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        cut = tf.where(tf.reduce_max(gray) > 1, tf.constant(127, tf.uint8), tf.constant(0, tf.uint8))
        binary = tf.cast(gray > cut, tf.uint8)
        return tf.cast(resize_mask(binary, size), tf.float32), tf.io.encode_png(binary), tf.shape(gray)[:2]

    names = _names("lung_masks", tf.size(masks))
    signature = (tf.TensorSpec([size, size, 1], tf.float32), tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int32))
    small, full, hw = decode_each(masks, names, one, signature, max_side)
    differs = tf.reduce_any(tf.not_equal(hw, sizes), axis=1)
    first = tf.argmax(tf.cast(differs, tf.int32), output_type=tf.int32)
    same = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(differs)),
        [_msg(tf.gather(names, first), " is ", tf.gather(hw, first), " but its image is ", tf.gather(sizes, first),
              " (height x width): sizes must match")],
    )
    with tf.control_dependencies([same]):
        return tf.identity(small), tf.identity(full)


def _png(mask: tf.Tensor) -> tf.Tensor:
    """(1, H, W, 1) 0/1 float mask -> PNG string of uint8 0/255."""
    return tf.io.encode_png(tf.cast(mask[0], tf.uint8) * 255)


def stage_pngs(prob: tf.Tensor, sizes: tf.Tensor, threshold: float) -> tf.Tensor:
    """(B, S, S, 1) probabilities -> (B,) PNG masks (uint8 0/255) at each image's own size
    (`postprocess.threshold_mask`)."""

    def one(args: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        return _png(threshold_mask(args[0][tf.newaxis], args[1], threshold))

    return tf.map_fn(one, (prob, sizes), fn_output_signature=tf.TensorSpec([], tf.string))


def infection_pngs(prob: tf.Tensor, sizes: tf.Tensor, lung_pngs: tf.Tensor, decision: Decision,
                   image_class_prob: tf.Tensor | None = None) -> tf.Tensor:
    """(B, S, S, 1) infection probabilities -> (B,) PNG masks (uint8 0/255) at each image's own size, by
    `postprocess.apply_decision` with the given full-size lung masks ((B,) 0/1 or 0/255 PNGs) as the lung."""
    classes = tf.zeros([tf.shape(sizes)[0], 1]) if image_class_prob is None else image_class_prob

    def one(args: tuple[tf.Tensor, ...]) -> tf.Tensor:
        lung = tf.cast(tf.io.decode_png(args[2], channels=1) > 0, tf.float32)[tf.newaxis]
        m = apply_decision(None, args[0][tf.newaxis], decision, args[1], lung_mask=lung,
                           image_class_prob=None if image_class_prob is None else args[3][tf.newaxis])
        return _png(m["infection_mask"])

    return tf.map_fn(one, (prob, sizes, lung_pngs, classes), fn_output_signature=tf.TensorSpec([], tf.string))


def cascade_outputs(lung_prob: tf.Tensor, infection_prob: tf.Tensor, sizes: tf.Tensor,
                    decision: Decision, assessed: tf.Tensor | None = None,
                    image_class_prob: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """Per image, `postprocess.apply_decision` at its own size: lung and infection PNGs and the severity computed on
    them (empty masks and severity 0 where `assessed`, (B,) bool from `preprocess.input_quality`, is False).
    `image_class_prob` (B, C), from an image head, takes part in the decision where it consults the head."""
    if assessed is None:
        assessed = tf.ones(tf.shape(sizes)[:1], tf.bool)
    classes = tf.zeros([tf.shape(sizes)[0], 1]) if image_class_prob is None else image_class_prob

    def one(args: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
        m = apply_decision(args[0][tf.newaxis], args[1][tf.newaxis], decision, args[2], assessed=args[3][tf.newaxis],
                     image_class_prob=None if image_class_prob is None else args[4][tf.newaxis])
        return (_png(m["lung_mask"]), _png(m["infection_mask"])) + tuple(m[k][0] for k in SEVERITY_KEYS)

    string, number = tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.float32)
    out = tf.map_fn(one, (lung_prob, infection_prob, sizes, assessed, classes),
                    fn_output_signature=(string, string) + (number,) * len(SEVERITY_KEYS))
    return dict(zip(("lung_mask_bytes", "infection_mask_bytes") + SEVERITY_KEYS, out))


def image_level_outputs(image_class_prob: tf.Tensor, assessed: tf.Tensor) -> dict[str, tf.Tensor]:
    """The cascade servable's image-head outputs (module docstring), zero / "" where `assessed` is False."""
    ok = tf.cast(assessed, tf.float32)
    probs = image_class_prob * ok[:, tf.newaxis]
    return {"infection_probability": infection_probability(probs), IMAGE_CLASS_PROB: probs,
            "image_class": tf.where(assessed, image_class_names(image_class_prob), "")}


# --------------------------------------------------------------------------------------------------------------
# Signature functions
# --------------------------------------------------------------------------------------------------------------


def _with_class(out: dict[str, tf.Tensor], image_class: tf.Tensor | None) -> dict[str, tf.Tensor]:
    """`out` plus the image head's class probabilities, where the model has a head."""
    return out if image_class is None else dict(out, **{IMAGE_CLASS_PROB: image_class})


def stage_signatures(model: Any, manifest: ExportManifest) -> dict[str, tuple[Callable, list]]:
    """{signature name: (fn, input_signature)} of one stage servable (module docstring), applying exactly what its
    `manifest` records: a lung stage its `threshold`; an infection stage its whole `decision`
    (`postprocess.apply_decision` with the given lung mask, the decision's flip and image-level rules)."""
    stage = as_stage(model)
    p = manifest.servable
    size, channels = model_input_size(stage, manifest.image_size)

    def outputs_full(png: tf.Tensor, sizes: tf.Tensor) -> dict[str, tf.Tensor]:
        return {f"{p}_mask_bytes": png, "height": sizes[:, 0], "width": sizes[:, 1]}

    if p == "lung" and channels == 3:
        threshold = manifest.threshold

        def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
            pixels, sizes = load_images(images, size)
            return outputs_full(stage_pngs(stage.probabilities(pixels)[0], sizes, threshold), sizes)

        image_sig = [tf.TensorSpec([None], tf.string, name="images")]

        def serve_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
            prob = stage.probabilities(pixels)[0]
            return {f"{p}_prob": prob, f"{p}_mask": threshold_mask(prob, None, threshold)}

    elif p == "infection" and channels == 4:
        decision = manifest.decision

        def serve_images(images: tf.Tensor, lung_masks: tf.Tensor) -> dict[str, tf.Tensor]:
            pixels, sizes = load_images(images, size)
            lung_small, lung_full = load_masks(lung_masks, sizes, size)
            prob, image_class = stage.probabilities(tf.concat([pixels, lung_small], axis=-1), decision.hflip)
            png = infection_pngs(prob, sizes, lung_full, decision, image_class)
            return _with_class(outputs_full(png, sizes), image_class)

        image_sig = [
            tf.TensorSpec([None], tf.string, name="images"),
            tf.TensorSpec([None], tf.string, name="lung_masks"),
        ]

        def serve_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
            prob, image_class = stage.probabilities(pixels, decision.hflip)
            lung = tf.cast(pixels[..., 3:4] > 0.5, tf.float32)
            mask = apply_decision(None, prob, decision, lung_mask=lung, image_class_prob=image_class)["infection_mask"]
            return _with_class({f"{p}_prob": prob, f"{p}_mask": mask}, image_class)

    else:
        raise ValueError(f"a {p!r} servable of a model taking {channels} channels: expected a 3-channel lung or a "
                         "4-channel infection stage")

    return {
        DEFAULT_SIGNATURE: (serve_images, image_sig),
        PIXELS_SIGNATURE: (serve_pixels, [tf.TensorSpec([None, size, size, channels], tf.float32, name="pixels")]),
    }


def cascade_signatures(
    lung_model: Any, infection_model: Any, decision: Decision | float = 0.5, image_size: int | None = None
) -> dict[str, tuple[Callable, list]]:
    """{signature name: (fn, input_signature)} of the two-stage cascade (see the module docstring)."""
    predictor = Predictor(lung_model, infection_model, decision, image_size)
    decision, size = predictor.decision, predictor.image_size

    def serve_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return dict(predictor.predict_pixels(pixels))

    def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels, sizes, colour = load_images_with_colour(images, size)
        stages = run_stages(predictor.lung_model, predictor.infection_model, pixels, decision)
        quality = input_quality(pixels, sizes, colour, stages["lung_prob"])
        image_class = stages.get("image_class_prob")
        out = cascade_outputs(stages["lung_prob"], stages["infection_prob"], sizes, decision, quality["assessed"],
                              image_class)
        out["height"], out["width"] = sizes[:, 0], sizes[:, 1]
        out["assessed"], out["reason"] = quality["assessed"], quality["reason"]
        if image_class is not None:
            out.update(image_level_outputs(image_class, quality["assessed"]))
        return out

    return {
        DEFAULT_SIGNATURE: (serve_images, [tf.TensorSpec([None], tf.string, name="images")]),
        PIXELS_SIGNATURE: (serve_pixels, [tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")]),
    }


# --------------------------------------------------------------------------------------------------------------
# Warm-up records (TFRecord of tensorflow.serving.PredictionLog), encoded by hand
# --------------------------------------------------------------------------------------------------------------
# Field numbers from tensorflow_serving/apis/{prediction_log,predict,model}.proto (tensorflow-serving-api 2.21):
#   PredictionLog.predict_log = 6;  PredictLog.request = 1;
#   PredictRequest.model_spec = 1, PredictRequest.inputs = 2 (map<string, tensorflow.TensorProto>: entry key = 1,
#   value = 2);  ModelSpec.name = 1, ModelSpec.signature_name = 3.
# The TensorProto itself is serialized by TensorFlow's own tensor_pb2 (tf.make_tensor_proto). Encoding these few
# length-delimited fields by hand avoids depending on tensorflow-serving-api, whose wheel requires the full
# `tensorflow` package (it would replace tensorflow-cpu); tests parse the bytes with the real protos when present.

_LEN = 2  # wire type "length-delimited"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | _LEN) + _varint(len(payload)) + payload


def predict_log_bytes(model_name: str, signature_name: str, inputs: Mapping[str, Any]) -> bytes:
    """A serialized `tensorflow.serving.PredictionLog` holding one PredictRequest.

    `inputs` maps input names to numpy arrays (or lists of bytes for string inputs).
    """
    spec = _field(1, model_name.encode()) + _field(3, signature_name.encode())
    request = _field(1, spec)
    for key in sorted(inputs):
        value = inputs[key]
        array = np.array(value, dtype=object) if isinstance(value, (list, tuple)) else np.asarray(value)
        tensor = tf.make_tensor_proto(array).SerializeToString()
        request += _field(2, _field(1, key.encode()) + _field(2, tensor))
    return _field(6, _field(1, request))


def _sample_png(height: int, width: int, seed: int = 0) -> bytes:
    """A grey chest-X-ray-sized PNG with a smooth gradient and noise (warm-up input)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    img = 60 + 120 * (0.5 + 0.5 * np.sin(3 * x) * np.cos(2 * y)) + rng.normal(0, 8, (height, width))
    return tf.io.encode_png(np.clip(img, 0, 255).astype(np.uint8)[..., None]).numpy()


def _sample_mask_png(height: int, width: int) -> bytes:
    mask = np.zeros((height, width, 1), np.uint8)
    mask[height // 6 : 5 * height // 6, width // 8 : 3 * width // 8] = 255
    mask[height // 6 : 5 * height // 6, 5 * width // 8 : 7 * width // 8] = 255
    return tf.io.encode_png(mask).numpy()


def warmup_requests(model_name: str, size: int, channels: int, sample_side: int = 256) -> list[bytes]:
    """Serialized PredictionLog records exercising every signature of a servable once (batch of 1)."""
    image = _sample_png(sample_side, sample_side)
    default_inputs: dict[str, Any] = {"images": [image]}
    if channels == 4:
        default_inputs["lung_masks"] = [_sample_mask_png(sample_side, sample_side)]
    pixels = np.zeros((1, size, size, channels), np.float32)
    pixels[..., :3] = 128.0
    return [
        predict_log_bytes(model_name, DEFAULT_SIGNATURE, default_inputs),
        predict_log_bytes(model_name, PIXELS_SIGNATURE, {"pixels": pixels}),
    ]


def write_warmup(version_dir: Path | str, records: Iterable[bytes]) -> Path:
    """Write `<version_dir>/assets.extra/tf_serving_warmup_requests` (TFRecord)."""
    path = Path(version_dir) / "assets.extra" / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path
