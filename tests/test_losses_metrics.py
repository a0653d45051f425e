"""Losses and metrics against hand-computed values (including empty masks), serialization, dtypes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidseg_tf import losses, metrics
from covidseg_tf.config import INFECTION, LUNG


def _batch() -> tuple[np.ndarray, np.ndarray]:
    """Two 2x2 images. Image 0: truth 2 px, image 1: truth 1 px. Probabilities in (0, 1) (no clipping)."""
    y_true = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 1]]], dtype="float32")[..., None]
    y_pred = np.array([[[0.9, 0.4], [0.2, 0.6]], [[0.1, 0.3], [0.7, 0.8]]], dtype="float32")[..., None]
    return y_true, y_pred


def _by_hand(y_true: np.ndarray, y_pred: np.ndarray, gamma: float = 2.0) -> dict[str, float]:
    t, p = y_true.astype("float64").ravel(), y_pred.astype("float64").ravel()
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = t * p + (1 - t) * (1 - p)
    dice = 1 - 2 * (t * p).sum() / (t.sum() + p.sum()) if t.sum() > 0 else 0.0
    return {"dice": dice, "bce": bce.mean(), "focal": ((1 - p_t) ** gamma * bce).mean()}


# ------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("cfg", [LUNG, INFECTION], ids=["lung", "infection"])
def test_loss_equals_hand_computed(cfg):
    y_true, y_pred = _batch()
    loss = losses.make_loss(cfg)
    assert loss.weights == cfg.loss_weights
    hand = _by_hand(y_true, y_pred)
    components = {k: float(v) for k, v in loss.components(y_true, y_pred).items()}
    assert set(components) == set(cfg.loss_weights)
    for term, value in components.items():
        assert value == pytest.approx(hand[term], rel=1e-5), term
    expected = sum(w * hand[term] for term, w in cfg.loss_weights.items())
    assert float(loss(y_true, y_pred)) == pytest.approx(expected, rel=1e-5)


def test_dice_term_is_pooled_over_the_batch():
    """keras.losses.Dice(axis=None) = one Dice of the whole batch (smp's dims=(0, 2)), not a per-image mean."""
    y_true, y_pred = _batch()
    dice = float(losses.SegmentationLoss(weights={"dice": 1.0})(y_true, y_pred))
    pooled = 1 - 2 * (y_true * y_pred).sum() / (y_true.sum() + y_pred.sum())
    per_image = np.mean(
        [1 - 2 * (t * p).sum() / (t.sum() + p.sum()) for t, p in zip(y_true, y_pred, strict=True)]
    )
    assert abs(pooled - per_image) > 1e-3  # the example tells them apart
    assert dice == pytest.approx(pooled, rel=1e-5)


def test_image_dice_term_is_a_mean_over_images_with_findings():
    """"image_dice": each image holding a positive pixel counts once; images without one do not count."""
    y_true, y_pred = _batch()
    y_true = y_true.copy()
    y_true[0] = 0.0  # one image without a finding, which must not enter the mean
    term = float(losses.SegmentationLoss(weights={"image_dice": 1.0})(y_true, y_pred))
    per_image = [1 - 2 * (t * p).sum() / (t.sum() + p.sum()) for t, p in zip(y_true, y_pred, strict=True) if t.sum()]
    assert len(per_image) == len(y_true) - 1
    assert term == pytest.approx(np.mean(per_image), rel=1e-5)
    pooled = float(losses.SegmentationLoss(weights={"dice": 1.0})(y_true, y_pred))
    assert abs(term - pooled) > 1e-3  # the example tells it apart from the pooled term
    assert float(losses.SegmentationLoss(weights={"image_dice": 1.0})(np.zeros_like(y_pred), y_pred)) == 0.0


def test_empty_truth_batch_drops_dice_term():
    _, y_pred = _batch()
    y_true = np.zeros_like(y_pred)
    loss = losses.make_loss(INFECTION)
    components = {k: float(v) for k, v in loss.components(y_true, y_pred).items()}
    assert components["dice"] == 0.0  # undefined without positives: zeroed like smp's DiceLoss
    hand = _by_hand(y_true, y_pred)
    w = INFECTION.loss_weights
    assert float(loss(y_true, y_pred)) == pytest.approx(w["bce"] * hand["bce"] + w["focal"] * hand["focal"], rel=1e-5)
    # a perfect prediction of an empty mask costs (almost) nothing
    assert float(loss(y_true, np.zeros_like(y_pred))) < 1e-5


def test_perfect_prediction_has_near_zero_loss():
    y_true, _ = _batch()
    assert float(losses.make_loss(INFECTION)(y_true, y_true)) < 1e-5


def test_loss_config_round_trip_and_keras_serialization():
    loss = losses.SegmentationLoss(weights={"dice": 0.5, "bce": 0.3, "focal": 0.2}, focal_gamma=3.0)
    config = loss.get_config()
    assert config["weights"] == {"dice": 0.5, "bce": 0.3, "focal": 0.2} and config["focal_gamma"] == 3.0
    clone = losses.SegmentationLoss.from_config(config)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, losses.SegmentationLoss)
    y_true, y_pred = _batch()
    for other in (clone, restored):
        assert other.get_config() == config
        assert float(other(y_true, y_pred)) == pytest.approx(float(loss(y_true, y_pred)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loss_is_float32_for_low_precision_inputs(dtype):
    import tensorflow as tf

    y_true, y_pred = _batch()
    y_pred = y_pred.copy()
    y_pred[0, 0, 0, 0] = 1.0  # saturated probabilities: log(1 - p) must not blow up
    y_pred[1, 0, 0, 0] = 0.0
    low = tf.constant(y_pred, dtype=dtype)
    loss = losses.make_loss(INFECTION)
    value = loss(tf.constant(y_true, dtype=dtype), low)
    assert value.dtype == "float32"
    assert np.isfinite(float(value))
    reference = float(loss(y_true, tf.cast(low, "float32").numpy()))
    assert float(value) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("weights", [{"dice": 1.0, "lovasz": 1.0}, {"dice": -1.0, "bce": 1.0}, {"bce": 0.0}])
def test_loss_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weight|term"):
        losses.SegmentationLoss(weights=weights)


# ------------------------------------------------------------------------------------------------ metrics


def _metric_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    """Two batches whose pooled score differs from the mean of per-batch scores."""
    t1 = np.zeros((1, 4, 4, 1), "float32")
    t1[0, :2, :2] = 1  # 4 positives
    p1 = np.zeros_like(t1)
    p1[0, :2, :1] = 0.9  # TP 2
    p1[0, 3, 3] = 0.5  # FP 1 (0.5 counts as positive: y_pred >= threshold)
    p1[0, 3, 2] = 0.49  # below threshold
    t2 = np.zeros((1, 4, 4, 1), "float32")
    t2[0, 0, :] = 1  # 4 positives
    p2 = t2 * 0.8  # TP 4
    return [(t1, p1), (t2, p2)]  # pooled: TP 6, FP 1, FN 2


def test_keras_metrics_pool_counts_over_batches():
    dice, iou = metrics.make_metrics()
    assert (dice.name, iou.name) == ("dice", "iou")
    for y_true, y_pred in _metric_batches():
        dice.update_state(y_true, y_pred)
        iou.update_state(y_true, y_pred)
    assert [float(c) for c in dice.counts()] == [6, 1, 2]
    assert float(dice.result()) == pytest.approx(12 / 15)
    assert float(iou.result()) == pytest.approx(6 / 9)
    assert dice.result().dtype == "float32"
    # numpy twins agree on the concatenated data
    y_true = np.concatenate([b[0] for b in _metric_batches()])
    y_pred = np.concatenate([b[1] for b in _metric_batches()])
    assert metrics.pooled_dice(y_true, y_pred) == pytest.approx(12 / 15)
    assert metrics.pooled_iou(y_true, y_pred) == pytest.approx(6 / 9)
    dice.reset_state()
    iou.reset_state()
    assert float(dice.result()) == 1.0 and float(iou.result()) == 1.0  # nothing seen: empty-mask rule


def test_keras_metrics_empty_masks():
    empty = np.zeros((2, 4, 4, 1), "float32")
    dice, iou = metrics.make_metrics()
    dice.update_state(empty, empty)
    iou.update_state(empty, empty)
    assert float(dice.result()) == 1.0 and float(iou.result()) == 1.0
    noisy = empty.copy()
    noisy[0, 0, 0] = 0.7
    dice.update_state(empty, noisy)
    iou.update_state(empty, noisy)
    assert float(dice.result()) == 0.0 and float(iou.result()) == 0.0


def test_keras_metrics_matrix_equals_binary_ious_without_its_scatter():
    """The unweighted update counts the same 2x2 matrix as keras.metrics.BinaryIoU (true negatives too) without its
    per-pixel ScatterNd; weighted pixels still go through BinaryIoU's own update."""
    rng = np.random.default_rng(4)
    y_true = (rng.random((3, 16, 16, 1)) > 0.6).astype("float32")
    y_pred = rng.random((3, 16, 16, 1)).astype("float32")
    dice, reference = metrics.PooledDice(threshold=0.4), keras.metrics.BinaryIoU(threshold=0.4, dtype="float64")
    for i in range(3):
        dice.update_state(y_true[i:i + 1], y_pred[i:i + 1])
        reference.update_state(y_true[i:i + 1], y_pred[i:i + 1])
    np.testing.assert_array_equal(dice.total_cm.numpy(), reference.total_cm.numpy())
    ops_types = {op.type for op in tf.function(dice.update_state).get_concrete_function(
        tf.TensorSpec((2, 8, 8, 1)), tf.TensorSpec((2, 8, 8, 1))).graph.get_operations()}
    assert "ScatterNd" not in ops_types and "UnsortedSegmentSum" not in ops_types
    weights = rng.random((3, 16, 16, 1)).astype("float32")
    weighted, weighted_ref = metrics.PooledIoU(), keras.metrics.BinaryIoU(dtype="float64")
    weighted.update_state(y_true, y_pred, sample_weight=weights)
    weighted_ref.update_state(y_true, y_pred, sample_weight=weights)
    np.testing.assert_allclose(weighted.total_cm.numpy(), weighted_ref.total_cm.numpy(), rtol=1e-6)


def test_keras_metrics_in_compiled_model_and_config(tmp_path):
    """Graph-mode update (model.evaluate), logged names, and a .keras round trip with loss + metrics."""
    y_true = np.concatenate([b[0] for b in _metric_batches()])
    y_pred = np.concatenate([b[1] for b in _metric_batches()])
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Identity()])
    model.compile(loss=losses.make_loss(LUNG), metrics=metrics.make_metrics())
    logs = model.evaluate(y_pred, y_true, batch_size=1, verbose=0, return_dict=True)
    assert logs["dice"] == pytest.approx(12 / 15) and logs["iou"] == pytest.approx(6 / 9)
    path = tmp_path / "identity.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, losses.SegmentationLoss) and loaded.loss.weights == LUNG.loss_weights
    # same batches -> same logs (the loss is batch-level, so only the metrics are batch-size independent)
    assert loaded.evaluate(y_pred, y_true, batch_size=1, verbose=0, return_dict=True) == pytest.approx(logs)
    again = loaded.evaluate(y_pred, y_true, batch_size=2, verbose=0, return_dict=True)
    assert (again["dice"], again["iou"]) == pytest.approx((logs["dice"], logs["iou"]))
    for metric in metrics.make_metrics(threshold=0.3):
        clone = type(metric).from_config(metric.get_config())
        assert (clone.name, clone.threshold) == (metric.name, 0.3)


def test_per_image_numpy_scores_and_empty_rule():
    y_true = np.zeros((4, 3, 3), "float32")
    y_pred = np.zeros((4, 3, 3), "float32")
    y_true[0, 0, :2] = 1  # image 0: truth 2 px, prediction 1 right + 1 wrong
    y_pred[0, 0, 0] = 0.9
    y_pred[0, 2, 2] = 0.8
    # image 1: empty truth, empty prediction (probabilities below the threshold) -> 1
    y_pred[1] = 0.3
    y_pred[2, 1, 1] = 0.6  # image 2: empty truth, non-empty prediction -> 0
    y_true[3, 1, 1] = 1  # image 3: non-empty truth, empty prediction -> 0
    np.testing.assert_allclose(metrics.dice_per_image(y_true, y_pred), [2 / 4, 1, 0, 0])
    np.testing.assert_allclose(metrics.iou_per_image(y_true, y_pred), [1 / 3, 1, 0, 0])
    tp, fp, fn = metrics.confusion_counts(y_true, y_pred)
    assert tp.tolist() == [1, 0, 0, 0] and fp.tolist() == [1, 0, 1, 0] and fn.tolist() == [1, 0, 0, 1]
    # (N, H, W, 1) and {0, 255} truth give the same numbers; pooled = all pixels together
    np.testing.assert_allclose(metrics.dice_per_image(y_true[..., None] * 255, y_pred[..., None]), [0.5, 1, 0, 0])
    assert metrics.pooled_dice(y_true, y_pred) == pytest.approx(2 / (2 + 2 + 2))
    assert metrics.pooled_iou(y_true, y_pred) == pytest.approx(1 / 5)
    assert metrics.pooled_dice(y_true[1:2], y_pred[1:2]) == 1.0  # nothing positive anywhere
    # a stricter threshold removes the 0.6 false positive of image 2
    assert metrics.dice_per_image(y_true, y_pred, threshold=0.7)[2] == 1.0


def test_numpy_scores_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 4\) vs \(2, 4, 4, 1\)"):
        metrics.dice_per_image(np.zeros((2, 4, 4)), np.zeros((2, 4, 4, 1)))
