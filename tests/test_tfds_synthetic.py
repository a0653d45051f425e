"""Synthetic phantoms (covid_qu_ex/synthetic): reproducible, anatomically plausible, learnable, class-balanced."""

from __future__ import annotations

import numpy as np
import pytest

from tfds_covidqu.covid_qu_ex import phantoms


def test_make_phantom_is_seeded_and_typed():
    a = phantoms.make_phantom(np.random.default_rng(3), "COVID-19")
    b = phantoms.make_phantom(np.random.default_rng(3), 0)  # label index works too
    c = phantoms.make_phantom(np.random.default_rng(4), "COVID-19")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    image, lung, infection = a
    assert image.shape == lung.shape == infection.shape == (256, 256)
    assert image.dtype == lung.dtype == infection.dtype == np.uint8
    assert set(np.unique(lung)) == {0, 1} and set(np.unique(infection)) <= {0, 1}
    small = phantoms.make_phantom(np.random.default_rng(0), "Normal", size=96)
    assert small[0].shape == (96, 96)
    with pytest.raises(ValueError, match="unknown label"):
        phantoms.make_phantom(np.random.default_rng(0), "Flu")


def test_synthetic_examples_are_reproducible_per_split_and_index():
    a = phantoms.synthetic_example("validation", 5)
    b = phantoms.synthetic_example("validation", 5)
    c = phantoms.synthetic_example("test", 5)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["file_name"] == "synthetic_validation_0005.png"


def test_class_balance_2_1_1():
    labels = [phantoms.label_for_index(i) for i in range(phantoms.SPLIT_SIZES["train"])]
    counts = {c: labels.count(c) for c in phantoms.CLASS_NAMES}
    assert counts == {"COVID-19": 150, "Non-COVID": 75, "Normal": 75}


@pytest.mark.parametrize("split", ["train", "test"])
def test_phantom_rules_and_contrast(split):
    lung_gap, inf_gap = [], []
    for i in range(12):
        ex = phantoms.synthetic_example(split, i)
        image = ex["image"].astype(float)
        lung, inf = ex["lung_mask"].astype(bool), ex["infection_mask"].astype(bool)
        assert 0.08 < lung.mean() < 0.45, "two lung fields of plausible size"
        assert lung[:, :128].any() and lung[:, 128:].any(), "one lung on each side"
        assert not (inf & ~lung).any(), "infection only inside the lungs"
        if ex["label"] == "COVID-19":
            assert inf.sum() >= 0.003 * inf.size
            inf_gap.append(image[inf].mean() - image[lung & ~inf].mean())
        else:
            assert not inf.any()
        # body = bright region outside the lungs (exclude background air)
        body = (~lung) & (image > 90)
        lung_gap.append(image[body].mean() - image[lung & ~inf].mean())
    assert min(lung_gap) > 30, f"lungs must be clearly darker than the body: {lung_gap}"
    assert min(inf_gap) > 12, f"opacities must be visible: {inf_gap}"
    assert max(inf_gap) < 90, "but not trivially saturated"


def test_intensity_threshold_alone_does_not_solve_infection():
    """Opacities overlap with the body's gray levels: a global threshold cannot segment them (non-trivial)."""
    dices = []
    for i in range(8):
        ex = phantoms.synthetic_example("train", i)
        if ex["label"] != "COVID-19":
            continue
        image, inf = ex["image"], ex["infection_mask"].astype(bool)
        best = 0.0
        for t in range(60, 220, 5):
            pred = image > t
            best = max(best, 2 * (pred & inf).sum() / (pred.sum() + inf.sum()))
        dices.append(best)
    assert max(dices) < 0.5, dices


def test_built_synthetic_dataset_matches_generator(synthetic_data_dir):
    """The TFDS build (conftest fixture) holds exactly the generator's pixels: rebuilding gives the same data."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("covid_qu_ex/synthetic", data_dir=str(synthetic_data_dir))
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == phantoms.SPLIT_SIZES
    assert builder.info.file_format.value == "tfrecord"
    names = builder.info.features["label"].names
    for ex in tfds.as_numpy(builder.as_dataset(split="validation").take(6)):
        index = int(ex["file_name"].decode().rsplit("_", 1)[1].split(".")[0])
        ref = phantoms.synthetic_example("validation", index)
        assert names[ex["label"]] == ref["label"]
        for key in ("image", "lung_mask", "infection_mask"):
            np.testing.assert_array_equal(ex[key][..., 0], ref[key], err_msg=key)
