"""covidseg_tf.ensemble: stage models averaged into one flat Keras model that every tool takes as a stage (issue 22).

Two tiny Stage-2 U-Nets with image heads at different sizes (32 px with Keras' BatchNormalization, 64 px with
FusedBatchNormalization, BN statistics far from identity) check the arithmetic, the saved file and BatchNorm
folding; 1x1-convolution stages (`helpers.conv_stage`) check the 3-channel case, TFLite, the Predictor and the CLI.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import conv_cascade, conv_head_stage, conv_stage, phantom, randomize_batchnorms

from covidseg_tf import ensemble
from covidseg_tf.batchnorm import FusedBatchNormalization
from covidseg_tf.config import IMAGE_CLASS_OUTPUT, MASK_OUTPUT, default_config
from covidseg_tf.ensemble import ensemble_model
from covidseg_tf.inference.preprocess import resize_mask, to_model_pixels
from covidseg_tf.models import build_stage_model, has_image_head
from covidseg_tf.optimize import FoldedBatchNorm, fold_batchnorm, foldable_pairs

S = 64  # the ensemble's size: the larger member's


@pytest.fixture(scope="module")
def members() -> list[keras.Model]:
    """Stage-2 U-Nets with image heads: 32 px (Keras BN) and 64 px (fused BN), BN far from identity."""
    keras.utils.set_random_seed(5)
    cfg = default_config("infection").replace(image_head_weight=0.2)
    small = build_stage_model(cfg.replace(image_size=32, batch_norm="keras"), encoder_weights=None)
    large = build_stage_model(cfg.replace(image_size=S, batch_norm="fused"), encoder_weights=None)
    for seed, m in enumerate((small, large)):
        randomize_batchnorms(m, seed=seed)
    return [small, large]


@pytest.fixture(scope="module")
def ens(members) -> keras.Model:
    return ensemble_model(members)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """(2, S, S, 4) Stage-2 input as the cascade makes it: grey X-ray-like images as model pixels + a 0/1 mask."""
    grey = np.stack([phantom(90, 110, seed=i) for i in range(2)])[..., None]
    rgb = to_model_pixels(tf.constant(grey), S).numpy()
    mask = (rgb[..., :1] < 100).astype("float32")
    return np.concatenate([rgb, mask], -1)


def by_hand(members: list[keras.Model], x: np.ndarray, weights=(0.5, 0.5)) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's outputs computed outside it: each member on the input resized to its size as the cascade
    resizes (`to_model_pixels` of the grey channel, `resize_mask`), its mask resized back bilinearly, then means."""
    masks, classes = [], []
    for m, w in zip(members, weights):
        size = m.inputs[0].shape[1]
        own = x if size == x.shape[1] else np.concatenate(
            [to_model_pixels(tf.constant(x[..., :1]), size), resize_mask(tf.constant(x[..., 3:]), size)], -1)
        out = m(own, training=False)
        masks.append(w * tf.image.resize(out[MASK_OUTPUT], x.shape[1:3], method="bilinear").numpy())
        classes.append(w * out[IMAGE_CLASS_OUTPUT].numpy())
    return sum(masks), sum(classes)


def test_outputs_are_the_mean_of_the_members_at_their_own_sizes(members, ens, pixels):
    mask, image_class = by_hand(members, pixels)
    out = ens(pixels, training=False)
    assert set(out) == {MASK_OUTPUT, IMAGE_CLASS_OUTPUT}
    assert out[MASK_OUTPUT].shape == (2, S, S, 1) and out[IMAGE_CLASS_OUTPUT].shape == (2, 3)
    np.testing.assert_allclose(out[MASK_OUTPUT], mask, atol=1e-5)
    np.testing.assert_allclose(out[IMAGE_CLASS_OUTPUT], image_class, atol=1e-5)
    assert np.abs(mask - members[1](pixels, training=False)[MASK_OUTPUT]).max() > 1e-3  # both members count
    plain = ens(pixels)  # no `training`: inference too (BatchNorm with its moving statistics)
    np.testing.assert_allclose(plain[MASK_OUTPUT], out[MASK_OUTPUT], atol=1e-6)


def test_weights_make_weighted_means(members, pixels):
    weighted = ensemble_model(members, weights=[1, 3])(pixels, training=False)
    mask, image_class = by_hand(members, pixels, weights=(0.25, 0.75))
    np.testing.assert_allclose(weighted[MASK_OUTPUT], mask, atol=1e-5)
    np.testing.assert_allclose(weighted[IMAGE_CLASS_OUTPUT], image_class, atol=1e-5)


def test_resizes_are_tf_image_resize():
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 4)).astype("float32")
    x[..., 3] = x[..., 3] > 128
    inp = keras.Input((64, 64, 4))
    model = keras.Model(inp, ensemble.resize(inp, 32, [ensemble.PIXELS] * 3 + [ensemble.MASKS], "r"))
    got = model(x).numpy()
    np.testing.assert_allclose(got[..., :3], tf.image.resize(x[..., :3], (32, 32), antialias=True), atol=3e-4)
    np.testing.assert_array_equal(got[..., 3:], resize_mask(tf.constant(x[..., 3:]), 32))
    up = keras.Model(inp, ensemble.resize(inp, 96, [ensemble.PROBABILITIES] * 4, "u"))(x).numpy()
    np.testing.assert_allclose(up, tf.image.resize(x, (96, 96), method="bilinear"), atol=3e-4)


def test_saved_file_round_trips_with_the_members_layers_at_top_level(members, ens, pixels, tmp_path):
    path = tmp_path / "ens.keras"
    ens.save(path)
    loaded = keras.models.load_model(path, compile=False)
    out, ref = loaded(pixels, training=False), ens(pixels, training=False)
    for key in (MASK_OUTPUT, IMAGE_CLASS_OUTPUT):
        np.testing.assert_array_equal(out[key], ref[key])
    layers = {layer.name: layer for layer in loaded.layers}
    assert len(layers) == len(loaded.layers)  # unique names
    assert not any(isinstance(layer, keras.Model) for layer in loaded.layers)  # flat: no nested member
    for i, m in enumerate(members):
        convs_bns = [la for la in m.layers if isinstance(la, (keras.layers.Conv2D, keras.layers.BatchNormalization))]
        assert len(convs_bns) > 50
        for layer in convs_bns:
            twin = layers[f"m{i}_{layer.name}"]
            assert type(twin) is type(layer)
            for a, b in zip(twin.get_weights(), layer.get_weights()):
                np.testing.assert_array_equal(a, b)
    assert isinstance(layers["m1_decoder_stage0a_bn"], FusedBatchNormalization)
    assert type(layers["m0_decoder_stage0a_bn"]) is keras.layers.BatchNormalization
    assert layers[MASK_OUTPUT] is loaded.get_layer(MASK_OUTPUT) and has_image_head(loaded)


def test_load_stage_takes_the_file_as_a_stage(ens, pixels, tmp_path):
    from covidseg_tf.inference.stages import KerasStage, load_stage
    from covidseg_tf.inference.stages import has_image_head as stage_has_head

    path = tmp_path / "ens.keras"
    ens.save(path)
    stage = load_stage(path, stage="infection")
    assert isinstance(stage, KerasStage)
    assert (stage.image_size, stage.channels, stage.has_image_head, stage.stage) == (S, 4, True, "infection")
    assert stage_has_head(stage)
    mask, image_class = stage.probabilities(pixels)
    np.testing.assert_allclose(mask, ens(pixels, training=False)[MASK_OUTPUT], atol=1e-6)
    assert image_class.shape == (2, 3)


def test_batchnorm_folding_folds_every_members_pairs(members, ens, pixels):
    pairs = foldable_pairs(ens)
    assert len(pairs) == sum(len(foldable_pairs(m)) for m in members) > 100
    assert {c.split("_")[0] for c in pairs} == {"m0", "m1"}
    folded = fold_batchnorm(ens)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert sum(isinstance(layer, FoldedBatchNorm) for layer in folded.layers) == len(pairs)
    got, ref = folded(pixels, training=False), ens(pixels, training=False)
    for key in (MASK_OUTPUT, IMAGE_CLASS_OUTPUT):
        np.testing.assert_allclose(got[key], ref[key], atol=1e-4)


# ----------------------------------------------------------------------------------------------- 1x1-conv stages
def test_bf16_copy_keeps_outputs_resizes_and_means_float32(ens, pixels):
    """A bf16 export rounds the members' convolutions only: the resizes, the members' sigmoids / softmaxes and the
    means stay float32 (`optimize._keeps_float32`)."""
    folded = fold_batchnorm(ens, "bf16")
    by_name = {layer.name: layer.compute_dtype for layer in folded.layers}
    float32 = [n for n in by_name if n in ("mask", "image_class") or n.endswith(("_sigmoid", "_image_class"))
               or "resize_" in n]
    assert {"mask", "image_class", "m0_sigmoid", "m1_sigmoid"} <= set(float32)
    assert any("resize_mask" in n for n in float32) and any("resize_input" in n for n in float32)
    assert all(by_name[n] == "float32" for n in float32), {n: by_name[n] for n in float32}
    assert "bfloat16" in set(by_name.values())  # the rest is bf16
    got, ref = folded(pixels, training=False), ens(pixels, training=False)
    for key in (MASK_OUTPUT, IMAGE_CLASS_OUTPUT):
        assert got[key].dtype == "float32"
        np.testing.assert_allclose(got[key], ref[key], atol=0.01)


def lung_conv(size: int, name: str) -> keras.Model:
    return conv_stage(size, 3, [-0.1 / 3, 0.02, 0.01], 8.0, name)


def test_three_channel_members_without_heads():
    a, b = lung_conv(32, "lung32"), lung_conv(64, "lung64")
    ens = ensemble_model([a, b], image_size=96)  # larger than both: each is resized up and its mask down
    x = np.random.default_rng(2).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    out = ens(x, training=False)
    assert isinstance(out, tf.Tensor) and out.shape == (2, 96, 96, 1)
    assert not has_image_head(ens) and ens.name == "lung_ensemble"
    ref = [tf.image.resize(m(tf.image.resize(x, (s, s), antialias=True)), (96, 96)) for m, s in ((a, 32), (b, 64))]
    np.testing.assert_allclose(out, (ref[0] + ref[1]) / 2, atol=1e-5)


def test_tflite_and_the_predictor_take_it(tmp_path):
    from covidseg_tf.inference import Predictor
    from covidseg_tf.inference.stages import TFLiteStage
    from covidseg_tf.optimize import tflite_model

    ens = ensemble_model([conv_head_stage(32, "h32"), conv_head_stage(64, "h64")])
    x = np.concatenate([np.random.default_rng(3).uniform(0, 255, (1, 64, 64, 3)),
                        np.ones((1, 64, 64, 1))], -1).astype("float32")
    tfl = TFLiteStage(tflite_model(ens))  # antialiased resizes included (TFLite has no ScaleAndTranslate kernel)
    got, ref = tfl(x), ens(x, training=False)
    for key in (MASK_OUTPUT, IMAGE_CLASS_OUTPUT):
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5)
    lung, _ = conv_cascade(64)
    lung.save(tmp_path / "lung.keras")
    ens.save(tmp_path / "ens.keras")
    (pred,) = Predictor.load(tmp_path / "lung.keras", tmp_path / "ens.keras").predict([phantom(80, 100)])
    assert pred.image_class_probabilities is not None and pred.infection.shape == (80, 100)


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("members")
    models = {"head32": conv_head_stage(32, "head32"), "head64": conv_head_stage(64, "head64"),
              "nohead64": conv_stage(64, 4, [0.01] * 4, -1.0, "nohead64"), "lung64": lung_conv(64, "lung64")}
    inp = keras.Input((10,))
    models["dense"] = keras.Model(inp, keras.layers.Dense(1, name="d")(inp))
    paths = {}
    for name, model in models.items():
        paths[name] = d / f"{name}.keras"
        model.save(paths[name])
    paths["text"] = d / "text.keras"
    paths["text"].write_text("not a model\n")
    paths["missing"] = d / "missing.keras"
    paths["savedmodel"] = d / "exported"
    return paths


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = ensemble.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def test_cli_writes_a_stage_file(files, tmp_path, capsys):
    from covidseg_tf.inference.stages import load_stage

    out = tmp_path / "sub" / "ens.keras"
    code, err = run(["--members", files["head32"], files["head64"], "--weights", "1", "2", "--out", out], capsys)
    assert code == 0, err
    stage = load_stage(out)
    assert (stage.image_size, stage.channels, stage.has_image_head) == (64, 4, True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ens.keras"]  # no partial file left
    code, err = run(["--members", files["head32"], files["head64"], "--out", out], capsys)
    assert code == 2 and "exists" in err and "--overwrite" in err
    code, err = run(["--members", files["head32"], files["head64"], "--image-size", "128", "--out", out,
                     "--overwrite"], capsys)
    assert code == 0, err
    assert load_stage(out).image_size == 128


@pytest.mark.parametrize("case, named, says", [
    (["text", "head64"], ["text"], "not a Keras model"),
    (["dense", "head64"], ["dense"], "not a stage model"),
    (["missing", "head64"], ["missing"], "not found"),
    (["savedmodel", "head64"], ["exported"], "must be a Keras stage model"),
    (["lung64", "head64"], ["lung64", "head64"], "different input channels"),
    (["head32", "nohead64"], ["nohead64"], "image-level head is on 1 of 2 members"),
])
def test_cli_refuses_members_naming_the_file(files, tmp_path, capsys, case, named, says):
    out = tmp_path / "ens.keras"
    code, err = run(["--members", *(files[c] for c in case), "--out", out], capsys)
    assert code == 2 and says in err, err
    for name in named:
        assert str(files[name if name != "exported" else "savedmodel"]) in err
    assert not out.exists()


@pytest.mark.parametrize("extra, says", [
    (["--weights", "1"], "1 weights for 2 members"),
    (["--weights", "1", "0"], "must be positive"),
    (["--weights", "1", "-2"], "must be positive"),
    (["--weights", "1", "nan"], "must be positive"),
    (["--image-size", "100"], "multiple of 32"),
])
def test_cli_refuses_bad_weights_and_sizes(files, tmp_path, capsys, extra, says):
    out = tmp_path / "ens.keras"
    code, err = run(["--members", files["head32"], files["head64"], *extra, "--out", out], capsys)
    assert code == 2 and says in err, err
    assert not out.exists()


def test_cli_refuses_one_member_and_a_bad_out(files, tmp_path, capsys):
    code, err = run(["--members", files["head32"], "--out", tmp_path / "e.keras"], capsys)
    assert code == 2 and "at least two members" in err
    code, err = run(["--members", files["head32"], files["head64"], "--out", tmp_path / "e.h5"], capsys)
    assert code == 2 and ".keras" in err
    (tmp_path / "dir.keras").mkdir()
    code, err = run(["--members", files["head32"], files["head64"], "--out", tmp_path / "dir.keras"], capsys)
    assert code == 2 and "is a folder" in err
