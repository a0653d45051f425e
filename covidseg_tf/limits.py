"""The input policy of every entry point, in one place: which images are decoded and which are assessed.

Every number here is used by the Python path (`covidseg_tf.imageio`, `covidseg_tf.predict`, the batch predictor)
AND by the SavedModels (`covidseg_tf.serving`, `covidseg_tf.inference.preprocess.input_quality`), so one image
meets the same rule everywhere. This module imports nothing heavy (no TensorFlow): the CLIs read it before loading
models.

Size limits (an error, checked from the file header BEFORE any pixel is decoded)
    Each side 1..MAX_SIDE pixels and at most MAX_PIXELS pixels (height x width) per image. Read from the PNG IHDR,
    the JPEG SOF (Pillow's lazy open / `tf.image.extract_jpeg_shape`) or DICOM Rows / Columns (read with
    ``stop_before_pixels``), so a decompression bomb (a small file declaring a huge image) is refused without
    being inflated: a 12000 x 12000 PNG of zeros is 300 kB on disk and 144 MB decoded. A multi-frame DICOM is
    decoded one frame only (the first). `imageio.decode_xray` raises `XRayReadError` naming the file and the
    limit; the SavedModel answers INVALID_ARGUMENT naming the item. A deflated DICOM (its whole dataset
    zlib-compressed) is inflated at most to MAX_INFLATED_BYTES.

Quality gate (never an error: the image is decoded, then reported "not assessed" with the reason)
    An input that cannot be a chest X-ray gets no masks and no severity, whatever the models would say about it.
    The checks, in the order the reason names the first failing one (the check's name in brackets, as
    `covidseg_tf.inference.preprocess.input_quality` returns it in "check"):

    * [size] too small: a side below MIN_SIDE pixels (a 2 x 2 or 1 x 1 image);
    * [aspect] extreme aspect ratio: the long side more than MAX_ASPECT times the short side (the cascade squeezes
      every image to a square; a 5000 x 300 strip would be stretched 16.7-fold);
    * [constant] near-constant: the standard deviation of the grey levels of the model pixels (the image resized
      to the model's S x S input, 0..255) below MIN_STD (a uniform grey image, a blank page);
    * [colour] a colour image: more than MAX_COLOUR_SHARE of its pixels clearly coloured (chroma, max(R,G,B) -
      min(R,G,B) of the decoded 8-bit pixel, >= COLOUR_CHROMA). Measured at decode time on the file's own RGB
      pixels (`imageio.decode_image`, `serving.colour_share`); grey files (PNG/JPEG/DICOM grey, 16-bit grey)
      have 0. A photograph, a screenshot or a heat-map overlay is refused; a grey X-ray saved as RGB (chroma 0
      or a few levels of JPEG noise), a faint film tint or a small coloured annotation passes;
    * [noise] noise-like: roughness (mean absolute difference of neighbouring model pixels, along rows and
      columns, divided by their grey-level standard deviation) above MAX_ROUGHNESS. White noise scores about 1,
      an X-ray about 0.1;
    * [smooth] no structure: detail (mean absolute difference between the model pixels and their smooth version,
      DETAIL_CELLS x DETAIL_CELLS cell means resized back, divided by the grey-level standard deviation) below
      MIN_DETAIL: a gradient, a blurred blob. An X-ray has ribs, vessels and edges;
    * [lungs] no plausible lungs in Stage 1's lung probability map at the model size S (computed anyway; the
      decision's threshold does not matter here: a pixel is lung at probability >= LUNG_CUTOFF):
        - lung area: the lung share of the image in [MIN_LUNG_AREA, MAX_LUNG_AREA];
        - two lungs: the smaller of the image's left and right halves holds >= MIN_LUNG_BALANCE of the lung;
        - position: the lung centroid (fractions of width and height) inside LUNG_CENTRE_X x LUNG_CENTRE_Y;
        - confidence: the share of the lung pixels with p >= LUNG_SURE >= MIN_LUNG_CONFIDENCE: a trained lung
          model is sure of most of the lungs of an X-ray (0.53 - 0.96) and hesitant on what it has never seen.

    The rule is TensorFlow ops in `covidseg_tf.inference.preprocess.input_quality` (the lung part in
    `covidseg_tf.inference.preprocess.lung_plausibility`), run by `Predictor.predict` (predict, the batch
    predictor) and by the cascade SavedModel's serving_default (`assessed`, `reason` outputs; versions exported
    before the colour, noise, smooth and lung checks have only the first three). Callers of `Predictor.predict`
    that pass no colour share (e.g. `evaluate` on TFDS images, which are grey) skip the colour check.

    Not refused: an inverted (negative) X-ray is refused only when the lung model fails on it, which is rare (33
    of the 932 inverted Val images with the shipped models): its lungs are found, bright, and no cheap statistic
    tried (lung vs mediastinum brightness) separates it from every real image (the decoders already turn
    MONOCHROME1 DICOMs the right way up); a black-and-white photograph of a scene usually passes (9 of 10
    `covidseg_tf.nonxray.grey_photo` with the shipped models: only the lung checks could refuse it, and the lung
    model is as sure of its dark shapes as of real lungs), and so may a grey image whose dark blotches the lung
    model takes for small lungs (`nonxray.blobs_on_black`) - the lung statistics cannot refuse these without
    refusing real small or framed X-rays. The gate is a guard against the wrong KIND of input (colour, noise,
    blank, other modalities), not a certificate that an input is a chest X-ray.

    How the numbers were chosen: every real COVID-QU-Ex Train and Val image (4,660; all 256 x 256 grey PNGs) must
    pass with a wide margin, with the shipped models (128 px) and at 256 px for the pixel statistics (the next
    models' size), and every image of the generated non-X-ray set (`covidseg_tf.nonxray.REQUIRED`) must be refused.
    `python bench/ood_gate.py` recomputes the statistics (per split: minimum, maximum, the margin to each
    threshold, refused images) and the set's values; its result is in bench/RESULTS.md ("Out-of-distribution
    gate"). Thresholds sit well outside the real images' range, about half way to the nearest non-X-ray, so that
    the next models (same interface) keep every real image: rerun the script with their paths.
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


COLOUR_CHROMA = 48
"""Chroma (max(R,G,B) - min(R,G,B), 8-bit levels) at or above which a pixel is "clearly coloured": above JPEG's
colour noise on a grey image (a few levels) and a faint film tint; skin, sky and grass in a photograph are 60-120."""

MAX_COLOUR_SHARE = 0.10
"""Largest share (0..1) of clearly coloured pixels the gate assesses (the real data: 0, all grey; photographs and
RGB noise: 0.9 and more). 10 % lets a grey X-ray with a coloured marker, ruler or text label pass."""

MAX_ROUGHNESS = 0.6
"""Largest roughness (mean |difference| of neighbouring model pixels / their grey-level standard deviation) the
gate assesses. Real Train + Val: at most 0.22 at 128 px (0.18 at 256 px); uniform noise: 0.94 (1.15 at 256 px);
rendered text 0.5 at 128 px, refused by the lung checks instead."""

DETAIL_CELLS = 16
"""The smooth version of an image, for the detail statistic, is its model pixels averaged to DETAIL_CELLS x
DETAIL_CELLS cells and resized back (bilinear): structure coarser than 1/16 of the image is not detail."""

MIN_DETAIL = 0.02
"""Smallest detail (mean |model pixels - their smooth version| / grey-level standard deviation) the gate assesses.
Real Train + Val: at least 0.052 at 128 px (0.056 at 256 px; ribs, vessels, edges); a smooth gradient: 0.005 -
0.01."""

LUNG_CUTOFF = 0.5
"""Lung probability at or above which a pixel counts as lung for the lung checks (fixed: the decision's
--threshold, which a user may change, does not move the gate)."""

LUNG_SURE = 0.9
"""Lung probability at or above which a lung pixel counts as "sure" (the confidence statistic)."""

MIN_LUNG_AREA = 0.01
"""Smallest lung share of the image (0..1) the gate assesses. Real Train + Val: at least 0.025 (a small child's
X-ray inside a black frame, Val Normal (10271); the next smallest 0.034); a checkerboard or a CT-like disc:
0 - 0.02."""

MAX_LUNG_AREA = 0.8
"""Largest lung share of the image (0..1) the gate assesses. Real Train + Val: at most 0.56."""

MIN_LUNG_BALANCE = 0.01
"""Smallest share of the lung (0..1) in the image half that holds less of it: two lungs, not one blob. Real
Train + Val with version 2's lung model: at least 0.12 (Test: 0.057); with version 3's: 0.021 (Train
`Non-COVID/non_COVID (27).png`, whose left lung is opacified: the lung model finds one lung), Val 0.165; with
version 5's (256 px): Train 0.099, Val 0.179. Kept loose: a patient with one white-out, collapsed or removed lung is
a real X-ray."""

LUNG_CENTRE_X = (0.2, 0.8)
"""Range of the lung centroid's horizontal position (0 left .. 1 right) the gate assesses. Real Train + Val:
0.30 - 0.67."""

LUNG_CENTRE_Y = (0.08, 0.85)
"""Range of the lung centroid's vertical position (0 top .. 1 bottom) the gate assesses. Real Train + Val:
0.17 - 0.65."""

MIN_LUNG_CONFIDENCE = 0.3
"""Smallest confidence (share of the lung pixels whose probability is >= LUNG_SURE) the gate assesses. Real Train
+ Val with version 2's lung model: at least 0.53; text, checkerboards, CT- and MRI-like images: 0 - 0.24; noise
about 0.4 (refused before). With version 3's lung model: Train at least 0.65, Val 0.33 (one image; the next
0.66); but text on a page reaches 0.34 - 0.42 and passes (bench/RESULTS.md, "the input gate with version 3"). With
version 5's (256 px): Train at least 0.57, Val 0.53, Test 0.74; text on a page finds no lung at all and is refused
again (bench/RESULTS.md, "Version 5")."""

GATE_CHECKS = ("size", "aspect", "constant", "colour", "noise", "smooth", "lungs")
"""The gate's checks in the order the first failing one is reported (module docstring)."""
