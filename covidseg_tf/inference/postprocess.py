"""From probabilities to what a user gets: the `Decision`, masks at an output size, severity and its grade.

    decision = Decision(infection_threshold=0.3, min_infection_percent=3.0)
    out = apply_decision(lung_prob, infection_prob, decision, size=(h, w))   # masks + severity at h x w
    severity_grade(float(out["severity_total"][0]))                          # "none" / "mild" / ...

`apply_decision` is the one post-processing step every entry point runs (predict, evaluate, tune, the SavedModel
signatures), as TensorFlow ops:

1. `threshold_mask`: each S x S probability map is resized bilinearly (no antialias) to the output size and
   thresholded there (``>= decision.threshold`` for the lung, ``>= decision.infection_threshold`` for the
   infection); a given lung mask at the output size replaces the predicted one.
2. The infection mask is multiplied by the lung mask: no infection is reported outside the lungs.
3. Image-level rules: an infection mask covering less than `min_infection_percent` of the lung is emptied, and so
   is one whose image head's COVID-19 probability (`infection_probability`) is below `min_infection_probability`.
4. The input gate (`preprocess.input_quality`): an image that is not assessed gets empty masks and severity 0.
5. `severity` on these output masks.

Severity is the infected fraction of the lung in percent, ``100 * |infection AND lung| / |lung|``, per lung field
and for both lungs together (0 when the lung, or its half, is empty). The two fields are split at one column per
image (`split_columns`): in the central band ``[0.25 W, 0.75 W)`` of the lung mask's column profile, the column with
the fewest lung pixels (the mediastinum gap); ties go to the column nearest the image centre, so an empty or merged
mask splits at the centre. Columns left of the split are the image's left half, which on a PA or AP view is the
PATIENT's RIGHT lung. A vertical split is a simplification: rotated images, lateral views or lungs overlapping the
midline are split at their narrowest column.

Grades (`severity_grade`): none (exactly 0 %), mild (< 25 %), moderate (25 % to < 50 %), severe (>= 50 %) of the
lung. They are a project convention, not a validated clinical scale: the quartile cut-offs of the chest-radiograph
extent score of Wong et al., Radiology 2020, with the two top bands merged into "severe".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from covidseg_tf.config import IMAGE_CLASSES, INFECTION, INFECTION_CLASS, LUNG

SPLIT_BAND = (0.25, 0.75)
"""Central band (fractions of the width) in which the column between the two lung fields is searched."""

SEVERITY_BANDS: tuple[tuple[float, str], ...] = ((25.0, "mild"), (50.0, "moderate"), (float("inf"), "severe"))
"""Upper bounds (exclusive, percent) of the grades above "none"."""

SEVERITY_KEYS = ("severity_left", "severity_right", "severity_total")


@dataclass(frozen=True)
class Decision:
    """How probabilities become masks: the two thresholds, the image-level rules and flip test-time augmentation.

    `Decision()` is the stages' config thresholds, no image-level rule, no flip; `python -m covidseg_tf.tune` chooses
    values on the validation split, `covidseg_tf.export` records them with a servable, and `Predictor.load` reads
    them back. Fields:

    * threshold: lung probability at or above which a pixel is lung (also the lung mask Stage 2 is given).
    * infection_threshold: infection probability at or above which a pixel is infection.
    * min_infection_percent: an infection mask covering less than this share of the lung (percent) is emptied.
    * hflip: each stage's probability is the mean of the image's and its mirror's.
    * min_infection_probability: the infection mask is emptied where the image head's COVID-19 probability is
      below this (0: the head is not consulted; > 0 needs an infection model with an image head).

    >>> Decision.of(0.4) == Decision(threshold=0.4, infection_threshold=0.4)
    True
    """

    threshold: float = LUNG.threshold
    infection_threshold: float = INFECTION.threshold
    min_infection_percent: float = 0.0
    hflip: bool = False
    min_infection_probability: float = 0.0

    def __post_init__(self) -> None:
        for name in ("threshold", "infection_threshold"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 <= float(self.min_infection_percent) < 100.0:
            raise ValueError(f"min_infection_percent must be in [0, 100), got {self.min_infection_percent}")
        if not 0.0 <= float(self.min_infection_probability) < 1.0:
            raise ValueError(f"min_infection_probability must be in [0, 1), got {self.min_infection_probability}")

    @property
    def uses_image_head(self) -> bool:
        """True if the decision consults the image-level head (`min_infection_probability` > 0)."""
        return float(self.min_infection_probability) > 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, value: Decision | float) -> Decision:
        """`value` itself, or for a number the decision with that threshold for both stages."""
        return value if isinstance(value, Decision) else cls(threshold=value, infection_threshold=value)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        """From `to_dict` output (unknown keys are an error naming them)."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Decision field(s) {sorted(unknown)}")
        return cls(**d)


def threshold_mask(prob: tf.Tensor, size: Any, threshold: float) -> tf.Tensor:
    """(B, S, S, 1) probabilities -> (B, H, W, 1) float32 0/1 mask: bilinear resize to `size` ((H, W), or None to
    stay at S), then ``>= threshold``."""
    prob = tf.cast(prob, tf.float32)
    if size is not None:
        prob = tf.image.resize(prob, size, method="bilinear")
    return tf.cast(prob >= threshold, tf.float32)


def infection_probability(image_class_prob: tf.Tensor) -> tf.Tensor:
    """(B,) probability that an image shows infection: the COVID-19 column of the head's (B, C) probabilities.

    >>> float(infection_probability(tf.constant([[0.7, 0.2, 0.1]]))[0]) == 0.7
    True
    """
    return tf.cast(image_class_prob, tf.float32)[:, INFECTION_CLASS]


def image_class_names(image_class_prob: tf.Tensor) -> tf.Tensor:
    """(B,) string: the most probable of `config.IMAGE_CLASSES` per image."""
    return tf.gather(tf.constant(IMAGE_CLASSES), tf.argmax(image_class_prob, axis=-1))


def apply_decision(lung_prob: tf.Tensor | None, infection_prob: tf.Tensor, decision: Decision | float,
                   size: Any = None, lung_mask: tf.Tensor | None = None, assessed: tf.Tensor | None = None,
                   image_class_prob: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """Lung and infection masks of a batch at `size` and their severity, by `decision` (module docstring).

    Args:
        lung_prob, infection_prob: (B, S, S, 1) probabilities (`lung_prob` may be None when `lung_mask` is given).
        decision: a `Decision` (a number: one threshold for both stages, no image-level rule).
        size: (H, W) of the output masks; None keeps S.
        lung_mask: (B, H, W, 1) 0/1 at the output size, used instead of the predicted lung mask.
        assessed: (B,) bool from `preprocess.input_quality`; False empties both masks and zeroes the severity.
        image_class_prob: (B, C) from an image head; needed when `decision.uses_image_head`.

    Returns:
        {"lung_mask", "infection_mask"}: (B, H, W, 1) float32 0/1 (infection inside the lung), and the
        `SEVERITY_KEYS` (B,) float32 percentages (`severity`).
    """
    decision = Decision.of(decision)
    if lung_mask is None:
        if lung_prob is None:
            raise ValueError("apply_decision needs lung probabilities or a lung mask")
        lung = threshold_mask(lung_prob, size, decision.threshold)
    else:
        lung = tf.cast(lung_mask, tf.float32)
    infection = threshold_mask(infection_prob, size, decision.infection_threshold) * lung
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
    if assessed is not None:  # the input gate: no result for an input that cannot be a chest X-ray
        keep = tf.cast(assessed, tf.float32)
        lung, infection = (m * keep[:, tf.newaxis, tf.newaxis, tf.newaxis] for m in (lung, infection))
        sev = {k: v * keep for k, v in sev.items()}
    return {"lung_mask": lung, "infection_mask": infection, **sev}


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
    """Band name ("none", "mild", "moderate", "severe") of an infected-lung percentage (module docstring).

    >>> severity_grade(0.0), severity_grade(24.9), severity_grade(25.0), severity_grade(80.0)
    ('none', 'mild', 'moderate', 'severe')
    """
    p = float(total_percent)
    if p != p or p < 0:  # NaN or negative
        raise ValueError(f"severity percentage must be a number >= 0, got {total_percent!r}")
    if p == 0.0:
        return "none"
    for upper, name in SEVERITY_BANDS:
        if p < upper:
            return name
    return SEVERITY_BANDS[-1][1]
