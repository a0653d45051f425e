"""The input policy of every entry point, in one place: which images are decoded and which are assessed.

Every number here is used by the Python path (`covidseg_tf.imageio`, `covidseg_tf.predict`, the batch predictor)
AND by the SavedModels (`covidseg_tf.serving`, `covidseg_tf.cascade.input_quality`), so one image meets the same
rule everywhere. This module imports nothing heavy (no TensorFlow): the CLIs read it before loading models.

Size limits (an error, checked from the file header BEFORE any pixel is decoded)
    Each side 1..MAX_SIDE pixels and at most MAX_PIXELS pixels (height x width) per image. Read from the PNG IHDR,
    the JPEG SOF (Pillow's lazy open / `tf.image.extract_jpeg_shape`) or DICOM Rows / Columns (read with
    ``stop_before_pixels``), so a decompression bomb (a small file declaring a huge image) is refused without
    being inflated: a 12000 x 12000 PNG of zeros is 300 kB on disk and 144 MB decoded. A multi-frame DICOM is
    decoded one frame only (the first). `imageio.decode_xray` raises `XRayReadError` naming the file and the
    limit; the SavedModel answers INVALID_ARGUMENT naming the item. A deflated DICOM (its whole dataset
    zlib-compressed) is inflated at most to MAX_INFLATED_BYTES.

Quality gate (never an error: the image is decoded, then reported "not assessed" with the reason)
    An input that cannot be a chest X-ray gets no masks and no severity, whatever the models would say about it:

    * too small: a side below MIN_SIDE pixels (a 2 x 2 or 1 x 1 image);
    * extreme aspect ratio: the long side more than MAX_ASPECT times the short side (the cascade squeezes every
      image to a square; a 5000 x 300 strip would be stretched 16.7-fold);
    * near-constant: the standard deviation of the grey levels of the model pixels (the image resized to the
      model's S x S input, 0..255) below MIN_STD (a uniform grey image, a blank page).

    The rule is TensorFlow ops in `covidseg_tf.cascade.input_quality`, run by `Cascade.predict` (predict, the batch
    predictor) and by the cascade SavedModel's serving_default (`assessed`, `reason` outputs). The thresholds are
    deliberately loose: every real COVID-QU-Ex Train and Val image passes with a wide margin (all 4,660 are
    256 x 256, aspect 1, grey-level standard deviation >= 11.1; tests/test_input_quality.py re-checks a sample).
"""

from __future__ import annotations

MAX_SIDE = 4096
"""Largest accepted image side in pixels (both entry points; an error above it)."""

MAX_PIXELS = MAX_SIDE * MAX_SIDE
"""Largest accepted height x width (16.8 MP: 16.8 MB per decoded 8-bit channel); an error above it."""

MAX_INFLATED_BYTES = 8 * MAX_PIXELS
"""Most bytes a deflated DICOM (whole dataset zlib-compressed) may inflate to (134 MB); an error above it."""

MIN_SIDE = 32
"""Smallest side (pixels) the quality gate assesses; smaller images are "not assessed" (the real data: 256)."""

MAX_ASPECT = 2.0
"""Largest long-side / short-side ratio the quality gate assesses (the real data: 1.0)."""

MIN_STD = 4.0
"""Smallest standard deviation of the model pixels' grey levels (0..255) the gate assesses (the real data: 11.1)."""


def size_problem(height: int, width: int) -> str | None:
    """Why an image of `height` x `width` pixels (from its header) must not be decoded, or None if it may."""
    if height < 1 or width < 1:
        return f"is {height}x{width} pixels (height x width): an empty image"
    if height > MAX_SIDE or width > MAX_SIDE:
        return f"is {height}x{width} pixels (height x width); each side must be 1..{MAX_SIDE}"
    if height * width > MAX_PIXELS:
        return f"is {height}x{width} pixels (height x width); at most {MAX_PIXELS} pixels are decoded"
    return None
