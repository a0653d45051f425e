"""covidseg_tf.fast_layers: the U-Nets train and infer with the faster subclasses, which compute the same values and
gradients as Keras' layers, and survive a save and load."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize_batchnorms, stage2_pixels

from covidseg_tf.config import default_config
from covidseg_tf.fast_layers import (
    MatMulConv2D,
    NearestUpSampling2D,
    WindowAveragePooling2D,
    faster_class,
    plain_class,
    with_layer_classes,
)
from covidseg_tf.inference.stages import load_stage
from covidseg_tf.models import build_stage_model

SIZE = 64
FAST = (NearestUpSampling2D, WindowAveragePooling2D, MatMulConv2D)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    cfg = default_config("infection").replace(image_size=SIZE, encoder_weights="none", image_head_weight=0.2)
    m = build_stage_model(cfg)
    randomize_batchnorms(m, seed=3)
    return m


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return stage2_pixels(2, SIZE, seed=5)


def _count(model: keras.Model) -> dict[type, int]:
    return {cls: sum(type(layer) is cls for layer in model.layers) for cls in FAST}


def test_the_unet_is_built_with_the_fast_layers(model):
    counts = _count(model)
    se_convs = [layer for layer in model.layers if layer.name.endswith(("se_reduce", "se_expand"))]
    assert counts[NearestUpSampling2D] == 5  # one per decoder stage
    assert counts[WindowAveragePooling2D] == len(se_convs) // 2 + 1  # every squeeze and the image head's pool
    assert counts[MatMulConv2D] == len(se_convs) > 20
    assert all(type(layer) is MatMulConv2D for layer in se_convs)
    assert type(model.get_layer("final_conv")) is keras.layers.Conv2D  # 3x3 on the full map: a convolution


def test_plain_copy_has_keras_classes_and_the_same_outputs_and_gradients(model, pixels):
    plain = with_layer_classes(model, plain_class)
    assert not any(_count(plain).values())
    fast = with_layer_classes(plain, faster_class)
    assert fast is not plain and _count(fast) == _count(model)
    assert with_layer_classes(model, faster_class) is model  # nothing left to swap
    x = tf.constant(pixels)

    def loss_and_grads(m):
        with tf.GradientTape() as tape:  # inference mode: EfficientNet's stochastic-depth Dropouts would differ
            out = m(x, training=False)
            loss = tf.reduce_mean(out["mask"] ** 2) + tf.reduce_mean(out["image_class"][:, 0])
        return loss, tape.gradient(loss, m.trainable_weights)

    loss_fast, grads_fast = loss_and_grads(model)
    loss_plain, grads_plain = loss_and_grads(plain)
    np.testing.assert_allclose(float(loss_fast), float(loss_plain), rtol=1e-5)
    assert [w.path for w in model.trainable_weights] == [w.path for w in plain.trainable_weights]
    for w, a, b in zip(model.trainable_weights, grads_fast, grads_plain):
        scale = float(tf.reduce_max(tf.abs(b))) + 1e-12
        assert float(tf.reduce_max(tf.abs(a - b))) <= 1e-4 * scale + 1e-7, w.path
    np.testing.assert_allclose(model(x, training=False)["mask"], plain(x, training=False)["mask"], atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_upsampling_gradient_in_training_is_keras_gradient(dtype):
    """In training the upsampling's gradient is an average pool times the block area: Keras' gradient (the sum of
    each 2x3 block), within float32 round-off, and within bfloat16 rounding of the sum in bfloat16."""
    x = tf.cast(tf.random.stateless_normal((2, 5, 4, 3), (1, 2)), dtype)
    dy = tf.cast(tf.random.stateless_normal((2, 10, 12, 3), (3, 4)), dtype)

    def grad(layer, training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
        assert y.dtype == x.dtype
        return tf.cast(tape.gradient(y, x, output_gradients=dy), "float32").numpy()

    keras_grad = grad(keras.layers.UpSampling2D((2, 3), dtype=dtype), True)
    tol = 1e-6 if dtype == "float32" else 2e-2  # float32: the mean times 6 rounds differently from the sum
    np.testing.assert_allclose(grad(NearestUpSampling2D((2, 3), dtype=dtype), True), keras_grad, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad(NearestUpSampling2D((2, 3), dtype=dtype), False), keras_grad, rtol=tol, atol=tol)
    graph = tf.function(lambda t: NearestUpSampling2D()(t, training=True)).get_concrete_function(
        tf.TensorSpec((1, 4, 4, 2))).graph
    assert "IdentityN" in {op.type for op in graph.get_operations()}  # the custom gradient is in the training graph


def test_fallbacks_keep_the_parents_call():
    """Inputs a fast layer does not cover run the parent's call: dynamic sizes, maps larger than 1x1."""
    x = keras.Input((None, None, 3))
    y = NearestUpSampling2D()(x)
    z = WindowAveragePooling2D(keepdims=True)(y)
    conv = MatMulConv2D(2, 1)
    m = keras.Model(x, [conv(z), conv(y)])
    big = np.random.default_rng(0).normal(size=(1, 3, 5, 3)).astype("float32")
    on_map, on_big = m(big)
    ref_y = np.repeat(np.repeat(big, 2, 1), 2, 2)
    ref_z = ref_y.mean((1, 2), keepdims=True)
    kernel, bias = (np.asarray(v) for v in conv.weights)
    np.testing.assert_allclose(on_map, ref_z @ kernel[0, 0] + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on_big, ref_y @ kernel[0, 0] + bias, rtol=1e-5, atol=1e-6)
    assert faster_class(keras.layers.Conv2D(2, 1)).__name__ == "Conv2D"  # never called: no 1x1 input known


def test_saved_model_loads_with_the_fast_layers(model, pixels, tmp_path):
    path = tmp_path / "stage.keras"
    model.save(path)
    loaded = load_stage(path)
    assert _count(loaded.model) == _count(model)
    np.testing.assert_allclose(loaded.model(pixels, training=False)["mask"],
                               model(pixels, training=False)["mask"], atol=1e-6)
