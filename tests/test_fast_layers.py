"""covidseg_tf.fast_layers: the U-Nets train and infer with the faster subclasses, which compute the same values and
gradients as Keras' layers, and survive a save and load."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize_batchnorms, stage2_pixels, training_gradients_and_peak

from covidseg_tf import recompute
from covidseg_tf.activations import xla_swish
from covidseg_tf.batchnorm import FusedBatchNormalization
from covidseg_tf.config import default_config
from covidseg_tf.fast_layers import (
    MatMulConv2D,
    NearestUpSampling2D,
    RecomputingDepthwiseConv2D,
    RecomputingMultiply,
    RecomputingZeroPadding2D,
    UpsamplingConv2D,
    WindowAveragePooling2D,
    faster_class,
    plain_class,
    with_layer_classes,
)
from covidseg_tf.inference.stages import load_stage
from covidseg_tf.models import build_stage_model

SIZE = 64
RECOMPUTING = (RecomputingDepthwiseConv2D, RecomputingMultiply, RecomputingZeroPadding2D)
FAST = (NearestUpSampling2D, WindowAveragePooling2D, MatMulConv2D, *RECOMPUTING)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    cfg = default_config("infection").replace(image_size=SIZE, encoder_weights="none", image_head_weight=0.2)
    keras.utils.set_random_seed(0)  # the same weights every run: the gradient comparison's tolerance is per weight
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
    decoder = [layer for layer in model.layers if isinstance(layer, UpsamplingConv2D)]
    assert [layer.name for layer in decoder] == [f"decoder_stage{i}a_conv" for i in range(5)]
    assert [len(layer._inbound_nodes[0].input_tensors) for layer in decoder] == [2, 2, 2, 2, 1]  # full size: no skip
    assert counts[NearestUpSampling2D] == 0  # in the decoder's UpsamplingConv2D layers
    assert counts[WindowAveragePooling2D] == len(se_convs) // 2 + 1  # every squeeze and the image head's pool
    assert counts[MatMulConv2D] == len(se_convs) > 20
    assert all(type(layer) is MatMulConv2D for layer in se_convs)
    assert type(model.get_layer("final_conv")) is keras.layers.Conv2D  # 3x3 on the full map: a convolution
    # every depthwise convolution, squeeze-excitation product and padding (before each stride-2 depthwise conv)
    blocks = {layer.name.split("_")[0] for layer in model.layers if layer.name.endswith("_dwconv")}
    assert counts[RecomputingDepthwiseConv2D] == counts[RecomputingMultiply] == len(blocks) > 10
    assert counts[RecomputingZeroPadding2D] == 5  # the stem's and one before each stride-2 depthwise convolution


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
    assert faster_class(keras.layers.UpSampling2D()) is NearestUpSampling2D  # models saved before UpsamplingConv2D


def test_saved_model_loads_with_the_fast_layers(model, pixels, tmp_path):
    path = tmp_path / "stage.keras"
    model.save(path)
    loaded = load_stage(path)
    assert _count(loaded.model) == _count(model)
    np.testing.assert_allclose(loaded.model(pixels, training=False)["mask"],
                               model(pixels, training=False)["mask"], atol=1e-6)


def _keras_twin(layer: UpsamplingConv2D, inputs: list[tf.Tensor]) -> keras.Model:
    """Keras' UpSampling2D (+ Concatenate) + Conv2D with `layer`'s weights, for inputs shaped as `inputs`: what
    UpsamplingConv2D stands for."""
    inputs = [keras.Input(tuple(t.shape[1:])) for t in inputs]
    up = keras.layers.UpSampling2D(layer.upsampling, dtype=layer.dtype_policy)(inputs[0])
    cat = keras.layers.Concatenate(dtype=layer.dtype_policy)([up, *inputs[1:]]) if len(inputs) > 1 else up
    conv = keras.layers.Conv2D.from_config({k: v for k, v in layer.get_config().items() if k != "upsampling"})
    twin = keras.Model(inputs, conv(cat))
    conv.set_weights(layer.get_weights())
    return twin


@pytest.mark.parametrize("dtype,n_inputs,padding", [("float32", 2, "same"), ("float32", 1, "valid"),
                                                    ("mixed_bfloat16", 2, "same")])
def test_upsampling_conv_is_upsampling_concat_and_conv(dtype, n_inputs, padding):
    """Same outputs and gradients (inputs, kernel, bias) as Keras' three layers, in training (the recomputing
    gradient) and inference, eager and in a tf.function."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 3, 4, 5)).astype("float32"))
    skip = tf.constant(rng.normal(size=(2, 6, 8, 3)).astype("float32"))
    inputs = [x, skip][:n_inputs]
    layer = UpsamplingConv2D(4, 3, padding=padding, use_bias=True, bias_initializer="glorot_uniform", dtype=dtype)
    symbolic = [keras.Input(t.shape[1:]) for t in inputs]
    keras.Model(symbolic, layer(symbolic))
    twin = _keras_twin(layer, inputs)
    tol = 1e-5 if dtype == "float32" else 3e-2

    def run(fn, training):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = tf.cast(fn(inputs, training=training), "float32")
            loss = tf.reduce_sum(y * tf.cos(y))
        variables = [v.value for v in (layer.trainable_weights if fn is layer else twin.trainable_weights)]
        return [y, *tape.gradient(loss, [*inputs, *variables])]

    for training in (True, False):
        want = run(twin, training)
        for got in (run(layer, training), tf.function(lambda t=training: run(layer, t))()):
            for a, b in zip(got, want):
                scale = float(tf.reduce_max(tf.abs(b))) + 1e-12
                assert float(tf.reduce_max(tf.abs(a - b))) <= tol * scale, (training, a.shape)
    graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(inputs).graph
    assert "IdentityN" in {op.type for op in graph.get_operations()}  # the custom gradient is in the training graph


def test_upsampling_conv_config_round_trip_and_checks():
    layer = UpsamplingConv2D(4, 3, upsampling=(2, 3), padding="same", name="up")
    again = UpsamplingConv2D.from_config(layer.get_config())
    assert again.get_config() == layer.get_config() and again.upsampling == (2, 3)
    x = keras.Input((5, None, 2))
    assert again([x, keras.Input((10, None, 1))]).shape == (None, 10, None, 4)
    with pytest.raises(ValueError, match="strides 1"):
        UpsamplingConv2D(4, 3, strides=2, name="strided")


def _concat_readers(layer, inputs: list[tf.Tensor]) -> tuple[list[str], list[list[str]]]:
    """The op types that read the forward pass's concatenation, and those reading every other 4-D ConcatV2, in the
    graph of one training step through `layer` (gradients of the inputs and weights)."""

    @tf.function
    def step(*inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = layer(list(inputs), training=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [*inputs, *layer.trainable_weights])

    graph = step.get_concrete_function(*inputs).graph
    concats = [op for op in graph.get_operations() if op.type == "ConcatV2" and op.outputs[0].shape.rank == 4]
    readers = [sorted(c.type for c in op.outputs[0].consumers()) for op in concats]
    forward = [r for r in readers if "Conv2D" in r]
    assert len(forward) == 1
    return forward[0], [r for r in readers if "Conv2D" not in r]


def test_upsampling_conv_gradient_builds_the_concatenation_again():
    """The backward pass does not read the forward pass's concatenation (so it is freed after the convolution): it
    builds its own, after the input gradients, for the kernel's gradient. Keras' layers keep theirs for it."""
    x, skip = tf.zeros((1, 4, 4, 3)), tf.zeros((1, 8, 8, 2))
    layer = UpsamplingConv2D(4, 3, padding="same", use_bias=False)
    forward, others = _concat_readers(layer, [x, skip])
    assert forward == ["Conv2D"] and others == [["Conv2DBackpropFilter"]]

    forward, others = _concat_readers(_keras_twin(layer, [x, skip]), [x, skip])
    assert "Conv2DBackpropFilter" in forward and others == []


def _mbconv(dtype: str) -> keras.Model:
    """An EfficientNet block in miniature as `models.build_unet` builds it (fast classes, fused BatchNorm, XLA swish):
    expand conv, BN, swish, padding, stride-2 depthwise conv, BN, swish, squeeze-excitation, project conv, BN,
    then a decoder stage taking the first swish as its skip."""
    keras.utils.set_random_seed(0)
    x = keras.Input((32, 32, 8))
    skip = keras.layers.Activation(xla_swish, dtype=dtype)(FusedBatchNormalization(dtype=dtype)(
        keras.layers.Conv2D(16, 1, use_bias=False, dtype=dtype)(x)))
    h = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), dtype=dtype)(skip)
    h = keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False, dtype=dtype)(h)
    h = keras.layers.Activation(xla_swish, dtype=dtype)(FusedBatchNormalization(dtype=dtype)(h))
    se = keras.layers.GlobalAveragePooling2D(keepdims=True, dtype=dtype)(h)
    se = keras.layers.Conv2D(4, 1, activation=xla_swish, dtype=dtype)(se)
    se = keras.layers.Conv2D(16, 1, activation="sigmoid", dtype=dtype)(se)
    h = keras.layers.Multiply(dtype=dtype)([h, se])
    h = FusedBatchNormalization(dtype=dtype)(keras.layers.Conv2D(8, 1, use_bias=False, dtype=dtype)(h))
    out = UpsamplingConv2D(4, 3, padding="same", dtype=dtype)([h, skip])
    return with_layer_classes(keras.Model(x, out), faster_class)


def _step_gradients(model: keras.Model, x: tf.Tensor, onward: bool, monkeypatch) -> tuple[list[np.ndarray], int]:
    """The weights' gradients of one training step and the allocator's peak bytes during it; `onward=False`: the
    BatchNorm still marks its output (the swish recomputes it), but no recipe goes further, so the layers after
    the swish keep their inputs as Keras' do."""
    with monkeypatch.context() as m:
        if not onward:
            m.setattr(recompute, "then", lambda t, out, step: out)
        return training_gradients_and_peak(model, x)


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-5), ("mixed_bfloat16", 2.0**-6)])
def test_recomputing_layers_give_keras_gradients_and_keep_less(dtype, rel, monkeypatch):
    """The swish outputs (one padded for the depthwise convolution, one the decoder's skip, one scaled by the
    squeeze-excitation) are made again in the backward pass: the same weight gradients (bfloat16: within a
    rounding of the recomputed values) with those tensors no longer held from the forward pass (float32: the peak
    drops by most of their size)."""
    model = _mbconv(dtype)
    assert sorted(type(layer).__name__ for layer in model.layers if type(layer) in RECOMPUTING) == [
        "RecomputingDepthwiseConv2D", "RecomputingMultiply", "RecomputingZeroPadding2D"]
    x = tf.constant(np.random.default_rng(0).normal(size=(16, 32, 32, 8)), tf.float32)
    ref, peak_ref = _step_gradients(model, x, False, monkeypatch)
    got, peak = _step_gradients(model, x, True, monkeypatch)
    for g, r in zip(got, ref):
        assert np.abs(r).max() > 0
        np.testing.assert_allclose(g, r, atol=rel * np.abs(r).max())
    if dtype == "float32":  # at least half the padded swish (16 x 33 x 33 x 16): in so small a model the skip is
        # held to the end of the forward pass by both, and the peak may fall in the backward pass
        padded = 16 * 33 * 33 * 16 * 4
        assert peak_ref - peak >= 0.5 * padded, (peak_ref, peak, padded)


def test_recomputing_layers_read_no_forward_tensor_in_the_backward_pass():
    """In the traced training step, the depthwise convolution's kernel gradient reads an input that an XLA call
    makes in the backward pass; the forward pass's padded swish and the swish the product reads feed no backward
    op."""
    model = _mbconv("float32")

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function(tf.TensorSpec((2, 32, 32, 8))).graph
    ops = graph.get_operations()
    [kernel_grad] = [op for op in ops if op.type == "DepthwiseConv2dNativeBackpropFilter"]
    assert kernel_grad.inputs[0].op.node_def.attr["_XlaMustCompile"].b, kernel_grad.inputs[0].op.type
    [depthwise] = [op for op in ops if op.type == "DepthwiseConv2dNative"]
    [product] = [op for op in ops if op.type == "Mul" and op.outputs[0].shape[1:] == (16, 16, 16)
                 and op.inputs[1].shape[1:3] == (1, 1)]
    # read by the forward op, the squeeze's pool and for shapes (IdentityN: custom_gradient's, reads nothing)
    for t, readers in ((depthwise.inputs[0], {"DepthwiseConv2dNative"}), (product.inputs[0], {"Mul", "AvgPool"})):
        assert {c.type for c in t.consumers()} <= readers | {"Shape", "IdentityN"}, t.consumers()
