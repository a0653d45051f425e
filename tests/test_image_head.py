"""The image-level head of Stage 2 (issue 22): model, data, training, frozen graph, serving of the mask."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from covidseg_tf.config import IMAGE_CLASS_OUTPUT, IMAGE_CLASSES, INFECTION_CLASS, MASK_OUTPUT, split_outputs

SIZE = 64


@pytest.fixture(scope="module")
def head_model():
    from covidseg_tf.models import build_unet

    return build_unet("efficientnetb0", (SIZE, SIZE, 4), image_classes=len(IMAGE_CLASSES), dropout=0.3,
                      name="infection_unet", layout="segmentation_models_pytorch")


def test_image_classes_are_the_builders_labels():
    from tfds_covidqu.covid_qu_ex.sources import CLASS_NAMES

    assert IMAGE_CLASSES == CLASS_NAMES
    assert IMAGE_CLASSES[INFECTION_CLASS] == "COVID-19"


def test_split_outputs_takes_either_form():
    assert split_outputs("mask") == ("mask", None)
    assert split_outputs({MASK_OUTPUT: 1, IMAGE_CLASS_OUTPUT: 2}) == (1, 2)


def test_head_model_outputs_mask_and_class_probabilities(head_model):
    from covidseg_tf.models import has_image_head

    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 4)).astype("float32")
    out = head_model(x, training=False)
    mask, probs = split_outputs(out)
    assert tuple(mask.shape) == (2, SIZE, SIZE, 1)
    assert tuple(probs.shape) == (2, len(IMAGE_CLASSES))
    np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, atol=1e-5)
    assert has_image_head(head_model)
    assert head_model.get_layer("image_head_dropout").rate == pytest.approx(0.3)


def test_no_head_model_is_unchanged():
    from covidseg_tf.models import build_unet, has_image_head

    model = build_unet("efficientnetb0", (SIZE, SIZE, 3))
    assert not has_image_head(model)
    assert not isinstance(model.output, dict)
    with pytest.raises(ValueError, match="image_classes"):
        build_unet("efficientnetb0", (SIZE, SIZE, 3), image_classes=1)


def test_head_model_round_trips_through_keras_file(head_model, tmp_path):
    from covidseg_tf.inference import load_stage

    path = tmp_path / "m.keras"
    head_model.save(path)
    loaded = load_stage(path)
    x = np.random.default_rng(1).uniform(0, 255, (1, SIZE, SIZE, 4)).astype("float32")
    for a, b in zip(split_outputs(head_model(x)), split_outputs(loaded(x))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_frozen_stage_keeps_both_outputs(head_model):
    from covidseg_tf.optimize import frozen_stage

    x = np.random.default_rng(2).uniform(0, 255, (2, SIZE, SIZE, 4)).astype("float32")
    x[..., 3] = x[..., 3] > 128
    frozen = frozen_stage(head_model)(x)
    assert set(frozen) == {MASK_OUTPUT, IMAGE_CLASS_OUTPUT}
    want = head_model(x, training=False)
    for key in (MASK_OUTPUT, IMAGE_CLASS_OUTPUT):
        np.testing.assert_allclose(np.asarray(frozen[key]), np.asarray(want[key]), atol=2e-4)


def test_cascade_takes_the_mask_of_a_head_model(head_model):
    from covidseg_tf.inference import Decision
    from covidseg_tf.inference.predictor import run_stages

    pixels = np.random.default_rng(3).uniform(0, 255, (1, SIZE, SIZE, 3)).astype("float32")
    lung = np.ones((1, SIZE, SIZE, 1), "float32")
    prob = run_stages(None, head_model, pixels, Decision(), lung_mask=lung)["infection_prob"]
    want = head_model(np.concatenate([pixels, lung], -1), training=False)[MASK_OUTPUT]
    np.testing.assert_allclose(np.asarray(prob), np.asarray(want), atol=1e-6)


def test_pipeline_yields_the_image_label(synthetic_data_dir):
    from covidseg_tf import data
    from covidseg_tf.config import default_config

    builder = data.load_builder("covid_qu_ex/synthetic", synthetic_data_dir)
    cfg = default_config("infection").replace(image_size=SIZE, batch_size=8, image_head_weight=0.2)
    examples = data.load_split(builder, "validation")
    want_labels = np.array([int(ex["label"]) for ex in examples.take(8)])
    want_infected = np.array([int(np.any(ex["infection_mask"])) for ex in examples.take(8)])
    x, y = next(iter(data.make_pipeline(examples, cfg, training=False)))
    assert set(y) == {MASK_OUTPUT, IMAGE_CLASS_OUTPUT}
    np.testing.assert_array_equal(y[IMAGE_CLASS_OUTPUT].numpy(), want_labels)
    assert tuple(x.shape) == (8, SIZE, SIZE, 4) and tuple(y[MASK_OUTPUT].shape) == (8, SIZE, SIZE, 1)
    # the head's infection class is exactly the images with infection
    np.testing.assert_array_equal(want_labels == INFECTION_CLASS, want_infected.astype(bool))
    # training (augmentation) keeps the label beside its masks
    xt, yt = next(iter(data.make_pipeline(examples, cfg, training=True, seed=0)))
    has_inf = yt[MASK_OUTPUT].numpy().reshape(8, -1).max(axis=1) > 0
    assert not np.any(has_inf & (yt[IMAGE_CLASS_OUTPUT].numpy() != INFECTION_CLASS))


def _train(tmp_path, synthetic_data_dir, *extra):
    from covidseg_tf.train import main

    return main(["--stage", "infection", "--dataset", "covid_qu_ex/synthetic", "--data-dir", str(synthetic_data_dir),
                 "--image-size", str(SIZE), "--batch-size", "4", "--steps-per-epoch", "3", "--validation-steps", "2",
                 "--encoder-weights", "none", "--lung-masks", "ground_truth", "--no-export", "--seed", "0",
                 "--output", str(tmp_path / "run"), *extra])


def _train_stage(tmp_path, synthetic_data_dir, **changes):
    """`_train` through the Python API, covidseg_tf.train.train_stage, with these StageConfig changes."""
    from covidseg_tf.config import default_config
    from covidseg_tf.train import train_stage

    cfg = default_config("infection").replace(dataset="covid_qu_ex/synthetic", image_size=SIZE, batch_size=4,
                                              encoder_weights="none", **changes)
    return train_stage(cfg, output=tmp_path / "run", data_dir=synthetic_data_dir, steps_per_epoch=3,
                       validation_steps=2, lung_masks="ground_truth", export=False, seed=0)


def test_train_with_image_head(tmp_path, synthetic_data_dir):
    from covidseg_tf.inference import load_stage
    from covidseg_tf.models import has_image_head

    summary = _train_stage(tmp_path, synthetic_data_dir, epochs=2, image_head_weight=0.2)
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert {"val_mask_dice", "val_image_class_accuracy", "image_class_loss"} <= set(rows[0])
    assert summary["best_val_dice"] == pytest.approx(max(float(r["val_mask_dice"]) for r in rows))
    assert has_image_head(load_stage(tmp_path / "run" / "model.keras"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["image_head_weight"] == 0.2


def _usage_error(capsys, fn, *args) -> str:
    """The one error line `fn(*args)` ends with (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_image_head_flag_errors(tmp_path, capsys):
    from covidseg_tf.train import main

    err = _usage_error(capsys, main, ["--stage", "lung", "--image-head-weight", "0.2",
                                      "--output", str(tmp_path / "lung")])
    assert "--image-head-weight must be 0 for the lung stage" in err
    assert not (tmp_path / "lung").exists()
    err = _usage_error(capsys, main, ["--stage", "infection", "--image-head-weight", "-1",
                                      "--output", str(tmp_path / "neg")])
    assert "--image-head-weight must be zero or more" in err


def test_rerun_cannot_add_or_drop_the_head(tmp_path, synthetic_data_dir, capsys):
    _train(tmp_path, synthetic_data_dir, "--epochs", "1", "--image-head-weight", "0.2")
    (tmp_path / "run" / "DONE").unlink()  # as if unfinished
    err = _usage_error(capsys, _train, tmp_path, synthetic_data_dir, "--epochs", "2")
    assert "--image-head-weight 0.2 -> 0" in err
