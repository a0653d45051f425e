"""Dice and IoU: Keras metrics pooled over an epoch, and numpy functions for evaluation.

Binarization everywhere: prediction positive iff ``y_pred >= threshold`` (default 0.5, as keras.metrics.BinaryIoU);
truth positive iff ``y_true >= 0.5`` (masks in {0, 1}; {0, 255} works too).

Pooled (micro) scores, the seed's numbers: TP, FP, FN are summed over every pixel of every image first, then
``IoU = TP / (TP + FP + FN)`` and ``Dice = 2 TP / (2 TP + FP + FN)`` (= 2 |P∩T| / (|P| + |T|)).

Empty-mask rule (per image, and for pooled scores when nothing at all is positive): empty truth and empty
prediction -> 1.0; empty truth and non-empty prediction -> 0.0 (and non-empty truth, empty prediction -> 0.0).

Keras metrics: ``PooledDice`` (name "dice") and ``PooledIoU`` (name "iou") share keras.metrics.BinaryIoU's
confusion matrix, accumulated in float64 (exact counts: an int32 matrix would overflow after ~10^4 448x448 images).
Numpy: ``confusion_counts``, ``dice_per_image``, ``iou_per_image``, ``pooled_dice``, ``pooled_iou``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

TRUTH_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------------------
# Keras metrics (training / validation, accumulated over the epoch)
# ---------------------------------------------------------------------------------------------------------


class _PooledOverlap(keras.metrics.BinaryIoU):
    """keras.metrics.BinaryIoU's 2x2 confusion matrix of (truth, prediction), with the positive-class counts."""

    def __init__(self, threshold: float = 0.5, name: str | None = None, dtype: Any = "float64") -> None:
        super().__init__(target_class_ids=(1,), threshold=threshold, name=name, dtype=dtype)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        truth = ops.convert_to_tensor(y_true, dtype="float32") >= TRUTH_THRESHOLD
        if sample_weight is not None:  # weighted pixels: BinaryIoU's own matrix (a scatter over every pixel)
            return super().update_state(ops.cast(truth, self.dtype), y_pred, sample_weight)
        # unweighted, the same matrix from three counts, without the scatter: a few passes instead of one
        # float64 ScatterNd over (truth, prediction) pairs, a few % of a training step
        pred = ops.convert_to_tensor(y_pred, dtype="float32") >= self.threshold
        tp, positives, predicted = (ops.cast(ops.count_nonzero(t), self.dtype)
                                    for t in (ops.logical_and(truth, pred), truth, pred))
        n = ops.cast(ops.size(truth), self.dtype)
        cm = ops.stack([ops.stack([n - positives - predicted + tp, predicted - tp]),
                        ops.stack([positives - tp, tp])])
        return self.total_cm.assign(self.total_cm + cm)

    def counts(self) -> tuple[Any, Any, Any]:
        """(TP, FP, FN) so far: rows of the matrix are the truth, columns the prediction."""
        cm = self.total_cm
        return cm[1, 1], cm[0, 1], cm[1, 0]

    def _ratio(self, numerator: Any, denominator: Any) -> Any:
        # nothing positive anywhere (truth and prediction empty) -> 1.0, the empty-mask rule
        score = ops.where(denominator > 0, numerator / ops.maximum(denominator, 1), ops.ones_like(denominator))
        return ops.cast(score, "float32")

    def get_config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "name": self.name, "dtype": self._dtype}


@keras.saving.register_keras_serializable(package="covidseg_tf")
class PooledIoU(_PooledOverlap):
    """IoU = TP / (TP + FP + FN) of the positive class, pooled over all pixels seen since the last reset."""

    def __init__(self, threshold: float = 0.5, name: str = "iou", dtype: Any = "float64") -> None:
        super().__init__(threshold=threshold, name=name, dtype=dtype)

    def result(self) -> Any:
        tp, fp, fn = self.counts()
        return self._ratio(tp, tp + fp + fn)


@keras.saving.register_keras_serializable(package="covidseg_tf")
class PooledDice(_PooledOverlap):
    """Dice = 2 TP / (2 TP + FP + FN) of the positive class, pooled over all pixels seen since the last reset."""

    def __init__(self, threshold: float = 0.5, name: str = "dice", dtype: Any = "float64") -> None:
        super().__init__(threshold=threshold, name=name, dtype=dtype)

    def result(self) -> Any:
        tp, fp, fn = self.counts()
        return self._ratio(2 * tp, 2 * tp + fp + fn)


def make_metrics(threshold: float = 0.5) -> list[keras.metrics.Metric]:
    """[PooledDice ("dice"), PooledIoU ("iou")] for model.compile."""
    return [PooledDice(threshold=threshold), PooledIoU(threshold=threshold)]


# ---------------------------------------------------------------------------------------------------------
# numpy (evaluation)
# ---------------------------------------------------------------------------------------------------------


def confusion_counts(
    y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image (TP, FP, FN) pixel counts, each int64 of shape (N,).

    y_true, y_pred: same shape (N, H, W) or (N, H, W, 1) (any shape with the images on axis 0).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred shapes differ: {y_true.shape} vs {y_pred.shape}")
    if y_true.ndim < 2:
        raise ValueError(f"expected a batch of masks (N, H, W[, 1]), got shape {y_true.shape}")
    truth = (y_true >= TRUTH_THRESHOLD).reshape(len(y_true), -1)
    pred = (y_pred >= threshold).reshape(len(y_pred), -1)
    tp = np.count_nonzero(truth & pred, axis=1).astype(np.int64)
    fp = np.count_nonzero(~truth & pred, axis=1).astype(np.int64)
    fn = np.count_nonzero(truth & ~pred, axis=1).astype(np.int64)
    return tp, fp, fn


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 1.0 where the denominator is 0 (empty truth and empty prediction)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.ones_like(denominator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def dice_from_counts(tp: Any, fp: Any, fn: Any) -> np.ndarray:
    """2 TP / (2 TP + FP + FN), elementwise; 1.0 where truth and prediction are both empty."""
    tp, fp, fn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn))
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou_from_counts(tp: Any, fp: Any, fn: Any) -> np.ndarray:
    """TP / (TP + FP + FN), elementwise; 1.0 where truth and prediction are both empty."""
    tp, fp, fn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn))
    return _ratio(tp, tp + fp + fn)


def dice_per_image(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Dice of every image, shape (N,); empty truth: 1.0 if the prediction is empty too, else 0.0."""
    return dice_from_counts(*confusion_counts(y_true, y_pred, threshold))


def iou_per_image(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """IoU of every image, shape (N,); empty truth: 1.0 if the prediction is empty too, else 0.0."""
    return iou_from_counts(*confusion_counts(y_true, y_pred, threshold))


def pooled_dice(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> float:
    """Dice of all pixels of all images together (same number as PooledDice over the same data)."""
    return float(dice_from_counts(*(c.sum() for c in confusion_counts(y_true, y_pred, threshold))))


def pooled_iou(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of all pixels of all images together (same number as PooledIoU over the same data)."""
    return float(iou_from_counts(*(c.sum() for c in confusion_counts(y_true, y_pred, threshold))))
