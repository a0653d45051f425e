"""Segmentation loss: a weighted sum of Dice, binary cross-entropy and binary focal cross-entropy.

One serializable class covers both stages (`SegmentationLoss(weights={"dice": .7, "bce": .3})` for the lungs,
`{"dice": .5, "bce": .3, "focal": .2}` for the infection; the numbers live in config.StageConfig.loss_weights).
Each term is the Keras loss of the same name:

* "dice": ``keras.losses.Dice`` with ``axis=None``. NOTE: keras' Dice with the default ``axis=None`` reduces over
  ALL axes including the batch, i.e. it is ONE Dice of the whole batch (pooled intersection / pooled sums), not a
  mean of per-image Dice (that would be ``axis=(1, 2, 3)``). That is what the seed used (segmentation_models_pytorch
  ``DiceLoss(mode="binary")`` sums over dims (0, 2) = batch and pixels). Like smp, the Dice term is set to 0 when the
  batch holds no positive pixel at all (Dice is undefined there; keras' formula would give a constant 1 with zero
  gradient); BCE and focal still train on such batches.
* "image_dice": ``keras.losses.dice`` per image (``axis=(1, 2, 3)``), averaged over the images of the batch that hold
  a positive pixel (0 when none does). Where the pooled "dice" lets one large lesion outweigh many small ones, this
  term gives every image with a finding the same say, as the per-image Dice of the evaluation does. Images without a
  positive pixel are left to BCE and focal (their per-image Dice is 0 whatever the prediction).
* "bce": ``keras.losses.BinaryCrossentropy`` (mean over all pixels of the batch).
* "focal": ``keras.losses.BinaryFocalCrossentropy(gamma=2)`` without class balancing (smp's ``FocalLoss`` defaults:
  alpha None, gamma 2), mean over all pixels.

``y_pred`` are sigmoid probabilities (the models end in a float32 sigmoid). Everything is computed in float32
(inputs are cast), so the loss is numerically safe under a bfloat16/float16 mixed-precision policy.
The loss is a batch-level scalar: per-sample ``sample_weight`` is not meaningful for the pooled Dice term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
from keras import ops

from covidseg_tf.config import LOSS_TERMS, StageConfig

TERMS: tuple[str, ...] = LOSS_TERMS


@keras.saving.register_keras_serializable(package="covidseg_tf")
class SegmentationLoss(keras.losses.Loss):
    """sum(weights[term] * term(y_true, y_pred)) over the terms "dice", "image_dice", "bce", "focal" (see the module
    docstring).

    Args:
        weights: term -> weight, e.g. {"dice": 0.7, "bce": 0.3}; terms with weight 0 or absent are skipped.
        focal_gamma: focusing parameter of the focal term.
        focal_alpha: class-balancing weight of positives in the focal term (None = no balancing, smp default).
        name, reduction: as for keras.losses.Loss (the value is already a scalar; reduction keeps it).
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = None,
        name: str = "segmentation_loss",
        reduction: str | None = "sum_over_batch_size",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("dtype", None)  # always float32
        super().__init__(name=name, reduction=reduction, dtype="float32", **kwargs)
        weights = dict(weights if weights is not None else {"dice": 1.0})
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss term(s) {sorted(unknown)} in weights {weights}; expected {list(TERMS)}")
        if any(float(w) < 0 for w in weights.values()) or not any(float(w) > 0 for w in weights.values()):
            raise ValueError(f"loss weights must be >= 0 with at least one > 0, got {weights}")
        self.weights = {term: float(w) for term, w in weights.items()}
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = None if focal_alpha is None else float(focal_alpha)
        self._dice = keras.losses.Dice(axis=None, reduction="sum_over_batch_size", dtype="float32")
        self._bce = keras.losses.BinaryCrossentropy(reduction="sum_over_batch_size", dtype="float32")
        self._focal = keras.losses.BinaryFocalCrossentropy(
            apply_class_balancing=self.focal_alpha is not None,
            alpha=0.25 if self.focal_alpha is None else self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="sum_over_batch_size",
            dtype="float32",
        )

    def components(self, y_true: Any, y_pred: Any) -> dict[str, Any]:
        """The unweighted scalar value of every term with a non-zero weight (float32)."""
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        values: dict[str, Any] = {}
        if self.weights.get("dice", 0.0) > 0:
            has_positives = ops.cast(ops.sum(y_true) > 0, "float32")
            values["dice"] = self._dice(y_true, y_pred) * has_positives
        if self.weights.get("image_dice", 0.0) > 0:
            per_image = keras.losses.dice(y_true, y_pred, axis=(1, 2, 3))
            positive = ops.cast(ops.sum(y_true, axis=(1, 2, 3)) > 0, "float32")
            values["image_dice"] = ops.sum(per_image * positive) / ops.maximum(ops.sum(positive), 1.0)
        if self.weights.get("bce", 0.0) > 0:
            values["bce"] = self._bce(y_true, y_pred)
        if self.weights.get("focal", 0.0) > 0:
            values["focal"] = self._focal(y_true, y_pred)
        return values

    def call(self, y_true: Any, y_pred: Any) -> Any:
        values = self.components(y_true, y_pred)
        total = ops.zeros((), dtype="float32")
        for term, value in values.items():
            total = total + self.weights[term] * value
        return total

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {"weights": dict(self.weights), "focal_gamma": self.focal_gamma, "focal_alpha": self.focal_alpha}
        )
        return config


def make_loss(cfg: StageConfig) -> SegmentationLoss:
    """The loss of one stage: SegmentationLoss with cfg.loss_weights."""
    return SegmentationLoss(weights=cfg.loss_weights, name=f"{cfg.stage}_loss")
