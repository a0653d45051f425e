"""Input pipeline: shapes and value ranges per stage, augmentation alignment, reproducibility, Stage-1 masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from covidseg_tf import data
from covidseg_tf.config import INFECTION, LUNG, AugmentConfig

NATIVE = 80


def _examples(n: int = 6, seed: int = 0) -> tf.data.Dataset:
    """Fake decoded TFDS examples: bright ellipse "lungs" on a dark background; infection = left half of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:NATIVE, :NATIVE]
    images, lungs, infs, names = [], [], [], []
    for i in range(n):
        cy, cx = rng.integers(30, 50, 2)
        lung = (((yy - cy) / 22.0) ** 2 + ((xx - cx) / 14.0) ** 2 <= 1).astype(np.uint8)
        inf = lung * (xx < cx)
        images.append((20 + 200 * lung)[..., None].astype(np.uint8))
        lungs.append(lung[..., None])
        infs.append(inf[..., None].astype(np.uint8))
        names.append(f"case_{i}.png")
    return tf.data.Dataset.from_tensor_slices({"image": np.stack(images), "lung_mask": np.stack(lungs),
                                               "infection_mask": np.stack(infs), "file_name": names,
                                               "label": np.zeros(n, np.int64)})


def _batches(ds: tf.data.Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_lung_stage_shapes_and_ranges():
    cfg = LUNG.replace(image_size=64, batch_size=4)
    (x, y), (x2, y2) = _batches(data.make_pipeline(_examples(), cfg, training=False))
    assert x.shape == (4, 64, 64, 3) and y.shape == (4, 64, 64, 1) and x2.shape[0] == 2
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 255
    np.testing.assert_array_equal(x[..., 0], x[..., 1])  # gray repeated to RGB
    assert set(np.unique(y)) <= {0.0, 1.0}


def test_infection_stage_has_lung_channel_and_infection_target():
    cfg = INFECTION.replace(image_size=64, batch_size=6)
    [(x, y)] = _batches(data.make_pipeline(_examples(), cfg, training=False))
    assert x.shape == (6, 64, 64, 4) and y.shape == (6, 64, 64, 1)
    assert set(np.unique(x[..., 3])) == {0.0, 1.0}
    # infection lies inside the lung channel, and the lung channel is where the image is bright
    assert np.all(y[..., 0] <= x[..., 3])
    assert np.mean((x[..., 0] > 110) == (x[..., 3] > 0.5)) > 0.98


def test_augmentation_keeps_image_and_masks_aligned():
    geometric = AugmentConfig(hflip_p=1.0, affine_p=1.0, brightness_contrast_p=0.0, noise_p=0.0)
    cfg = dataclasses.replace(INFECTION.replace(image_size=64, batch_size=6), augment=geometric)
    plain = _batches(data.make_pipeline(_examples(), cfg, training=False))[0]
    [(x, y)] = _batches(data.make_pipeline(_examples(), cfg, training=True, seed=3))
    assert not np.allclose(np.sort(x.ravel()), np.sort(plain[0].ravel())) or not np.array_equal(x, plain[0])
    bright = x[..., 0] > 110
    lung = x[..., 3] > 0.5
    # every moved pixel moved together: bright image pixels are exactly the (moved) lung mask, up to the
    # interpolated rim of the ellipse
    assert np.mean(bright == lung) > 0.98
    assert np.all(y[..., 0] <= x[..., 3])


def test_default_augmentation_changes_pixels_but_keeps_masks_binary():
    cfg = INFECTION.replace(image_size=64, batch_size=6)
    plain = _batches(data.make_pipeline(_examples(), cfg, training=False))[0]
    [(x, y)] = _batches(data.make_pipeline(_examples(), cfg, training=True, seed=1))
    assert set(np.unique(x[..., 3])) <= {0.0, 1.0} and set(np.unique(y)) <= {0.0, 1.0}
    assert not np.array_equal(np.sort(x, axis=None), np.sort(plain[0], axis=None))


def test_seeded_training_pipeline_is_reproducible():
    cfg = LUNG.replace(image_size=64, batch_size=3)
    a = _batches(data.make_pipeline(_examples(), cfg, training=True, seed=7))
    b = _batches(data.make_pipeline(_examples(), cfg, training=True, seed=7))
    c = _batches(data.make_pipeline(_examples(), cfg, training=True, seed=8))
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_stage1_masks_replace_the_ground_truth_lung_channel():
    cfg = INFECTION.replace(image_size=64, batch_size=6)
    full = np.ones((NATIVE, NATIVE, 1), np.uint8)
    names = [f"case_{i}.png" for i in range(6)]
    table = data.masks_lookup(names, [tf.io.encode_png(full).numpy()] * 6)
    [(x, _)] = _batches(data.make_pipeline(_examples(), cfg, training=False, stage1_masks=table))
    assert np.all(x[..., 3] == 1.0)


def test_missing_stage1_mask_is_an_error():
    cfg = INFECTION.replace(image_size=64, batch_size=6)
    table = data.masks_lookup(["other.png"], [b"x"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="no cached Stage-1 lung mask"):
        _batches(data.make_pipeline(_examples(), cfg, training=False, stage1_masks=table))


def test_lung_part_cannot_train_the_infection_stage():
    ds = _examples().map(lambda ex: {k: v for k, v in ex.items() if k != "infection_mask"})
    with pytest.raises(data.DatasetError, match="infection masks"):
        data.make_pipeline(ds, INFECTION.replace(image_size=64), training=False)


def _encoded(ds: tf.data.Dataset) -> tf.data.Dataset:
    """The examples with their images as PNG bytes, as `data.load_split(decode=False)` gives them."""
    return ds.map(lambda ex: {k: tf.io.encode_png(v) if k in data.IMAGE_FEATURES else v for k, v in ex.items()})


def test_pipeline_from_png_bytes_gives_the_same_batches():
    """train's pipelines cache the PNG bytes and decode them when drawn (issue 26): the same seeded training batches
    (shuffle order, augmentation, Stage-1 lung channel) as from decoded examples."""
    cfg = INFECTION.replace(image_size=64, batch_size=4)
    assert _encoded(_examples()).element_spec["image"].dtype == tf.string
    table = data.masks_lookup([f"case_{i}.png" for i in range(6)],
                              [tf.io.encode_png(np.ones((NATIVE, NATIVE, 1), np.uint8)).numpy()] * 6)
    for kw in ({"training": True, "seed": 3}, {"training": False, "stage1_masks": table}):
        want = _batches(data.make_pipeline(_examples(), cfg, **kw))
        got = _batches(data.make_pipeline(_encoded(_examples()), cfg, **kw))
        assert len(got) == len(want) == 2
        for (xa, ya), (xb, yb) in zip(want, got):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)

