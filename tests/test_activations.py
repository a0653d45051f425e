"""covidseg_tf.activations: xla_swish computes Keras' swish and its gradient, the gradient runs as one XLA-compiled
function, built U-Nets train with it, and saved models load and export with it."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import training_gradients_and_peak

from covidseg_tf.activations import KERAS_SWISH, is_swish, use_swish, xla_swish


def _value_and_grad(fn, x: tf.Tensor, dy: tf.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return y.numpy(), tape.gradient(y, x, output_gradients=dy).numpy()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_value_and_gradient_equal_keras_swish(dtype, tol):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(0, 4, (2, 8, 8, 5)), dtype)
    dy = tf.constant(rng.normal(0, 1, (2, 8, 8, 5)), dtype)
    y_ref, g_ref = _value_and_grad(KERAS_SWISH, x, dy)
    y, g = _value_and_grad(xla_swish, x, dy)
    assert y.dtype == g.dtype == np.dtype(dtype)  # the gradient comes back in the activations' dtype
    np.testing.assert_array_equal(y.astype(np.float32), y_ref.astype(np.float32))  # the same forward ops
    g32, g_ref32 = g.astype(np.float32), g_ref.astype(np.float32)
    assert np.abs(g32).max() > 1  # not a degenerate input
    np.testing.assert_allclose(g32, g_ref32, atol=tol * np.abs(g_ref32).max(), rtol=tol)


def test_the_gradient_is_one_xla_compiled_function():
    """The traced training gradient calls a function marked for XLA (`_XlaMustCompile`), whose body holds the
    element-wise ops; Keras' swish puts them in the graph itself."""
    def traced_ops(fn):
        @tf.function
        def grad(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return tape.gradient(y, x)

        graph = grad.get_concrete_function(tf.TensorSpec((1, 4, 4, 2), tf.float32)).graph
        ops = graph.get_operations()
        xla = [op for op in ops if op.node_def.attr["_XlaMustCompile"].b]
        return xla, [op.type for op in ops]

    xla, types = traced_ops(xla_swish)
    assert len(xla) == 1
    keras_xla, keras_types = traced_ops(KERAS_SWISH)
    assert keras_xla == [] and keras_types.count("Mul") > types.count("Mul")


def test_use_swish_swaps_only_swish_and_round_trips():
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="swish", name="c1")(x)
    h = keras.layers.Activation("silu", name="a1")(h)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c2")(h)
    m = keras.Model(x, keras.layers.Activation("sigmoid")(h))
    assert use_swish(m) == 2 and use_swish(m) == 0
    assert m.get_layer("c1").activation is xla_swish and m.get_layer("a1").activation is xla_swish
    assert m.get_layer("c2").activation is keras.activations.relu
    assert use_swish(m, KERAS_SWISH) == 2 and m.get_layer("a1").activation is KERAS_SWISH
    assert is_swish(KERAS_SWISH) and is_swish(xla_swish) and not is_swish(keras.activations.relu)
    with pytest.raises(ValueError, match="KERAS_SWISH or xla_swish"):
        use_swish(m, keras.activations.relu)


def test_built_unets_train_with_xla_swish_and_load_back(tmp_path):
    """build_unet gives every EfficientNet swish `xla_swish`; the saved .keras names it and loads through
    `load_stage` with the same outputs; `fit` runs through the XLA gradient."""
    from covidseg_tf.inference import load_stage
    from covidseg_tf.models import build_unet

    model = build_unet("efficientnetb0", (64, 64, 3), name="lung_unet")
    swishes = [layer for layer in model.layers if is_swish(getattr(layer, "activation", None))]
    assert len(swishes) > 30 and all(layer.activation is xla_swish for layer in swishes)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    history = model.fit(x, (rng.random((2, 64, 64, 1)) > 0.5).astype("float32"), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    path = tmp_path / "lung.keras"
    model.save(path)
    assert "covidseg_tf>xla_swish" in json.dumps(json.loads(zipfile.ZipFile(path).read("config.json")))
    loaded = load_stage(path)
    np.testing.assert_allclose(np.asarray(loaded(x[:1])), np.asarray(model(x[:1])), atol=1e-6)


def test_without_xla_built_unets_keep_keras_swish(monkeypatch, caplog):
    """A TensorFlow built without XLA could not run xla_swish's gradient: the models keep Keras' swish, and say so."""
    from covidseg_tf.models import build_unet

    monkeypatch.setattr(tf.test, "is_built_with_xla", lambda: False)
    with caplog.at_level("WARNING", logger="covidseg_tf.activations"):
        model = build_unet("efficientnetb0", (64, 64, 3))
    swishes = [layer for layer in model.layers if is_swish(getattr(layer, "activation", None))]
    assert len(swishes) > 30 and all(layer.activation is KERAS_SWISH for layer in swishes)
    assert "built without XLA" in caplog.text


def _bn_swish_model(dtype: str, channels: int) -> keras.Model:
    from covidseg_tf.batchnorm import FusedBatchNormalization

    keras.utils.set_random_seed(0)
    x = keras.Input((32, 32, 8))
    h = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, dtype=dtype)(x)
    h = FusedBatchNormalization(dtype=dtype, name="bn")(h)
    h = keras.layers.Activation(xla_swish, dtype=dtype)(h)
    return keras.Model(x, keras.layers.Conv2D(1, 3, padding="same", dtype=dtype)(h))


def _train_gradients(model: keras.Model, x: tf.Tensor, link: bool, monkeypatch) -> tuple[list[np.ndarray], int]:
    """The weights' gradients of one training step, and the allocator's peak bytes during it; `link=False` runs the
    BatchNorm without marking its output (the swish then keeps that output for its gradient)."""
    from covidseg_tf import batchnorm

    with monkeypatch.context() as m:
        if not link:
            m.setattr(batchnorm.recompute, "mark", lambda y, *args: y)
        return training_gradients_and_peak(model, x)


@pytest.mark.parametrize("dtype, channels, rel", [("float32", 32, 1e-5), ("mixed_bfloat16", 32, 2.0**-7),
                                                  ("mixed_bfloat16", 24, 2.0**-7)])
def test_swish_after_batch_norm_recomputes_its_input(dtype, channels, rel, monkeypatch):
    """After a training FusedBatchNormalization the swish's gradient recomputes the BatchNorm's output from the
    BatchNorm's input: the same weight gradients (bfloat16: within one rounding of the recomputed value; 24
    channels is the BatchNorm's float32-kernel case) with the BatchNorm's output no longer held for the backward
    pass (float32: the step's peak drops by about its size)."""
    x = tf.constant(np.random.default_rng(0).normal(size=(16, 32, 32, 8)), tf.float32)
    model = _bn_swish_model(dtype, channels)
    ref, peak_ref = _train_gradients(model, x, False, monkeypatch)
    got, peak = _train_gradients(model, x, True, monkeypatch)
    for g, r in zip(got, ref):
        assert np.abs(r).max() > 0
        np.testing.assert_allclose(g, r, atol=rel * np.abs(r).max())
    if dtype == "float32":
        bn_output = 16 * 32 * 32 * channels * 4
        assert peak_ref - peak >= 0.75 * bn_output, (peak_ref, peak)


def test_swish_without_batch_norm_link_is_unchanged():
    """A swish on a tensor no BatchNorm marked (and a BatchNorm at inference) takes the plain path."""
    from covidseg_tf.recompute import recipe_of

    model = _bn_swish_model("float32", 8)
    x = tf.ones((2, 32, 32, 8))
    bn = model.get_layer("bn")
    assert recipe_of(bn(model.layers[1](x), training=False)) is None
    assert recipe_of(bn(model.layers[1](x), training=True)) is not None
