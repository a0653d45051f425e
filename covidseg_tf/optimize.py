"""Inference-only copies of a trained Keras stage model: BatchNorm folded, optional bfloat16, frozen; and TFLite.

    stage = frozen_stage(model, "bf16")      # an inference.stages.FrozenStage, what covidseg_tf.export serves
    content = tflite_model(model)            # float32 TFLite flatbuffer bytes (batch 1)

1. BatchNorm folding (`fold_batchnorm`). Inference BN is affine, y = gamma * (x - mean) / sqrt(var + eps) + beta,
   so every BatchNormalization fed only by a Conv2D / DepthwiseConv2D is folded into that conv:
       kernel' = kernel * s,   bias' = (bias - mean) * s + beta,   s = gamma / sqrt(var + eps)
   (per output channel; for a depthwise kernel (kh, kw, C, mult), s is indexed by output channel c * mult + m)
   and the BN layer becomes an identity of the same name. Computed in float64, stored as float32: the copy
   equals the original up to float32 round-off. On CPU this removes BN's element-wise passes and lets
   grappler's remapper fuse conv + bias + activation into one oneDNN convolution.
2. Precision. "fp32" keeps everything float32. "bf16" gives every layer the `bfloat16` policy (weights stored
   and computed in bfloat16) except the input preprocessing (Rescaling, Normalization) and the output sigmoid,
   which stay float32 - the same split as Keras' `mixed_bfloat16`, but the weights themselves are bfloat16, so
   they take half the bytes. Speed and tolerance: bench/RESULTS.md.
3. Swish. Every swish activation (Keras' "swish"/"silu", or the training models' `activations.xla_swish`) becomes
   `fusible_swish`, the same x * sigmoid(x) without the custom gradient those carry, which TensorFlow's oneDNN
   remapper then fuses into the convolution before it (a swish with a custom gradient runs as a separate pass).
4. Fewer, faster ops, each computing the same values (`covidseg_tf.fast_layers`, which `models.build_unet` uses
   for training too; this gives them to models saved before it did): a nearest-neighbour UpSampling2D becomes one
   resize, a GlobalAveragePooling2D one average pool over the whole map, a 1x1 Conv2D on 1x1 maps (the
   squeeze-excitation convolutions) a matrix product (`fast_layers.inference_class`: the layers that differ in
   training only get Keras' classes). TFLite conversion keeps Keras' classes (`plain_class`).
   A ZeroPadding2D whose only consumer is a "valid" convolution and whose padding is what TensorFlow's "same"
   padding adds for that input size (EfficientNet's pads before its stride-2 convolutions, at even sizes) becomes
   an identity and the convolution "same": oneDNN pads inside the convolution instead of a Pad op copying the map
   (`same_padding_pairs`).
5. Freezing. The traced forward function's variables become graph constants
   (`convert_variables_to_constants_v2`), so a SavedModel stores each weight once and grappler can fold
   constant casts at load time.

`tflite_model(model)` is the second export target: the same stage as a TensorFlow Lite flatbuffer (the converter
folds BatchNorm itself), run by `covidseg_tf.inference.stages.TFLiteStage`. Its "int8" mode (`export --tflite int8`)
quantizes weights (per output channel) and activations (per tensor, ranges calibrated on real pixels) but keeps
the encoder's input preprocessing (Rescaling, Normalization) in float32: there the 0/1 lung-mask channel of Stage 2
is 0 or 1/255 beside image channels spanning about [-2, 2.6], below half an int8 step of a shared per-tensor
range, so quantizing it erases the mask. Stage 2 calibrates on images with their Stage-1 masks
(`calibration_pixels`), the input it meets in the cascade. "dynamic" (int8 weights only) is for bench/.
Each function takes a keras.Model or a Keras `Stage` (`inference.stages.keras_model`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from covidseg_tf.activations import is_swish
from covidseg_tf.config import IMAGE_CLASS_OUTPUT, MASK_OUTPUT, split_outputs
from covidseg_tf.fast_layers import inference_class, plain_class, with_layer_classes
from covidseg_tf.inference.stages import FrozenStage, keras_model, model_input_size, quiet_absl

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
TFLITE_MODES = ("fp32", "dynamic", "int8")
_FLOAT32_LAYERS = (layers.InputLayer, layers.Rescaling, layers.Normalization)
# Layers (by name, or name suffix after "_") that a bf16 copy keeps float32: a stage's output sigmoid and softmax,
# and an ensemble's (covidseg_tf.ensemble) resizes, means and its members' renamed outputs ("m0_sigmoid").
_FLOAT32_NAMES = ("sigmoid", MASK_OUTPUT, IMAGE_CLASS_OUTPUT)
_FLOAT32_PARTS = ("resize_input", "resize_mask")


@keras.saving.register_keras_serializable(package="covidseg_tf")
def fusible_swish(x: Any) -> Any:
    """x * sigmoid(x) as two plain ops: swish without a custom gradient (inference copies only).

    A custom gradient's IdentityN (Keras' swish and `activations.xla_swish` carry one) keeps TensorFlow's oneDNN
    remapper from fusing the swish into the preceding convolution (it runs as a pass of its own, ``_MklSwish``);
    these two ops fuse into it (``_MklNativeFusedConv2D`` with the bias and the swish), the same arithmetic.

    >>> float(fusible_swish(keras.ops.convert_to_tensor(2.0)))  # 2 * sigmoid(2)
    1.7615941762924194
    """
    return x * keras.ops.sigmoid(x)


class FoldedBatchNorm(layers.Layer):
    """Identity standing in for a BatchNormalization folded into the preceding conv (same name)."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _producer(tensor: Any) -> layers.Layer:
    return tensor._keras_history[0]


def foldable_pairs(model: keras.Model) -> dict[str, str]:
    """{conv layer name: BN layer name} of the Conv -> BN pairs of `model` that can be folded."""
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, layers.BatchNormalization) or layer.axis not in (-1, [-1], [3], 3):
            continue
        prev = _producer(layer.input)
        if isinstance(prev, (layers.Conv2D, layers.DepthwiseConv2D)) and len(prev._outbound_nodes) == 1:
            pairs[prev.name] = layer.name
    return pairs


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """The zeros TensorFlow's "same" padding adds before and after a dimension of `size` (dilation 1).

    >>> _same_padding(64, 3, 2), _same_padding(64, 5, 2), _same_padding(65, 3, 2)
    ((0, 1), (1, 2), (1, 1))
    """
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_padding_pairs(model: keras.Model) -> dict[str, str]:
    """{ZeroPadding2D name: convolution name} of the pads `fold_batchnorm` drops (module docstring, item 4): the pad's
    only consumer is a "valid" Conv2D / DepthwiseConv2D (channels last, no dilation) and, for the pad's static input
    size, its padding is exactly what "same" would add."""
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, layers.ZeroPadding2D) or len(layer._outbound_nodes) != 1:
            continue
        conv = layer._outbound_nodes[0].operation
        if (not isinstance(conv, (layers.Conv2D, layers.DepthwiseConv2D)) or conv.padding != "valid"
                or tuple(conv.dilation_rate) != (1, 1) or conv.data_format != "channels_last"
                or layer.data_format != "channels_last"):
            continue
        size = layer.input.shape[1:3]
        if None in size:
            continue
        if all(tuple(pad) == _same_padding(n, k, s)
               for pad, n, k, s in zip(layer.padding, size, conv.kernel_size, conv.strides)):
            pairs[layer.name] = conv.name
    return pairs


def _keeps_float32(layer: layers.Layer) -> bool:
    """Layers that stay float32 in a bf16 copy: input preprocessing, the outputs (`_FLOAT32_NAMES`) and an
    ensemble's resizes."""
    if isinstance(layer, _FLOAT32_LAYERS):
        return True
    name = layer.name
    return (any(name == n or name.endswith("_" + n) for n in _FLOAT32_NAMES)
            or any(part in name for part in _FLOAT32_PARTS))


def fold_batchnorm(model: Any, precision: str | None = None, fuse_swish: bool = True,
                   faster_layers: bool = True) -> keras.Model:
    """An inference copy of `model` with the Conv -> BN pairs folded, the swish activations made fusible and the
    layers of item 4 replaced (see the module docstring).

    precision: "fp32" or "bf16" sets every layer's dtype policy as described there; None keeps each layer's own.
    fuse_swish, faster_layers: False keeps each layer's own swish, or class and pads (bench/swish_fusion.py times both).
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = keras_model(model)
    pairs = foldable_pairs(model)
    bns = set(pairs.values())
    pads = same_padding_pairs(model) if faster_layers else {}
    same = set(pads.values())

    def dtype_of(layer: layers.Layer) -> Any:
        if precision is None:
            return layer.dtype_policy
        return "float32" if precision == "fp32" or _keeps_float32(layer) else "bfloat16"

    def clone(layer: layers.Layer) -> layers.Layer:
        if layer.name in bns:
            return FoldedBatchNorm(name=layer.name, dtype=dtype_of(layer))
        if layer.name in pads:
            return layers.Identity(name=layer.name, dtype=dtype_of(layer))
        cfg = layer.get_config()
        if layer.name in same:
            cfg["padding"] = "same"
        if precision is not None:
            cfg["dtype"] = dtype_of(layer)
        if layer.name in pairs:
            cfg["use_bias"] = True
        if fuse_swish and is_swish(getattr(layer, "activation", None)):
            cfg["activation"] = fusible_swish
        return (inference_class(layer) if faster_layers else plain_class(layer)).from_config(cfg)

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in bns:
            continue
        target = folded.get_layer(layer.name)
        if layer.name not in pairs:
            target.set_weights(layer.get_weights())
            if isinstance(target, layers.Normalization):
                target.finalize_state()  # it caches mean/variance tensors: refresh them
            continue
        bn = model.get_layer(pairs[layer.name])
        w = [np.asarray(v, dtype=np.float64) for v in layer.get_weights()]
        kernel, bias = w[0], (w[1] if len(w) > 1 else 0.0)
        gamma = np.asarray(bn.gamma, np.float64) if bn.scale else 1.0
        beta = np.asarray(bn.beta, np.float64) if bn.center else 0.0
        s = gamma / np.sqrt(np.asarray(bn.moving_variance, np.float64) + bn.epsilon)
        s = np.broadcast_to(s, np.shape(bn.moving_mean))
        if isinstance(layer, layers.DepthwiseConv2D):
            _, _, c, mult = kernel.shape
            new_kernel = kernel * s.reshape(c, mult)[None, None]
        else:
            new_kernel = kernel * s
        new_bias = (bias - np.asarray(bn.moving_mean, np.float64)) * s + beta
        target.set_weights([new_kernel.astype(np.float32), np.broadcast_to(new_bias, s.shape).astype(np.float32)])
    log.debug("folded %d BatchNorm layers of %s (precision %s), dropped %d pads", len(pairs), model.name,
              precision or "as built", len(pads))
    return folded


def frozen_stage(model: Any, precision: str = "fp32", image_size: int | None = None,
                 fuse_swish: bool = True, faster_layers: bool = True) -> FrozenStage:
    """`model` folded, in `precision` and frozen (see the module docstring), as a Stage of format "frozen";
    `fuse_swish` and `faster_layers` as `fold_batchnorm`'s."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = keras_model(model)
    size, channels = model_input_size(model, image_size)
    fast = fold_batchnorm(model, precision, fuse_swish, faster_layers)
    input_shape = (None, size, size, channels)

    def outputs(x):  # the mask, then the image class probabilities of a model with an image head
        mask, image_class = split_outputs(fast(x, training=False))
        return tuple(tf.cast(t, tf.float32) for t in (mask, image_class) if t is not None)

    fn = tf.function(outputs, input_signature=[tf.TensorSpec(input_shape, tf.float32, name="pixels")])
    return FrozenStage(convert_variables_to_constants_v2(fn.get_concrete_function()), model.name, input_shape,
                       precision)


def calibration_pixels(lung_model: Any, pixels: Any, decision: Any = 0.5, batch_size: int = 16) -> np.ndarray:
    """Calibration input of Stage 2 from (N, S, S, 3) model pixels: each image with its Stage-1 lung mask as the
    4th channel (`inference.predictor.run_stages` of `lung_model` and `decision`, a `Decision` or lung threshold),
    so int8 ranges are measured on what Stage 2 is fed in the cascade. Returns (N, S, S, 4) float32."""
    from covidseg_tf.inference.predictor import run_stages

    pixels = np.asarray(pixels, np.float32)[..., :3]
    masks = [run_stages(lung_model, None, tf.constant(pixels[i:i + batch_size]), decision)["lung_input"].numpy()
             for i in range(0, len(pixels), batch_size)]
    return np.concatenate([pixels, np.concatenate(masks) if masks else pixels[..., :0]], -1)


def float32_layers(model: Any, float_layers: Iterable[str] = ()) -> list[str]:
    """Names of the Keras layers of `model` that "int8" TFLite keeps in float32: its input preprocessing layers
    (Rescaling, Normalization), then those named in `float_layers` (what `export --tflite int8` records)."""
    model = keras_model(model)
    names = [layer.name for layer in model.layers if isinstance(layer, (layers.Rescaling, layers.Normalization))]
    return names + [n for n in float_layers if n not in names]


def float_preprocessing_nodes(model: keras.Model, content: bytes, float_layers: Iterable[str] = ()) -> list[str]:
    """Tensor names in the float TFLite `content` of `model` that its `float32_layers` produce: what int8
    conversion keeps in float32."""
    from covidseg_tf.inference.stages import _tflite_interpreter

    names = float32_layers(model, float_layers)
    pattern = re.compile("|".join(rf"(^|/){re.escape(n)}(_\d+)?/" for n in names)) if names else None
    tensors = [d["name"] for d in _tflite_interpreter(content, 1).get_tensor_details()]
    return [t for t in tensors if pattern is not None and pattern.search(t)]


def tflite_model(model: Any, mode: str = "fp32", representative: Iterable[Any] | None = None,
                 image_size: int | None = None, float_layers: Iterable[str] = ()) -> bytes:
    """A stage model as TFLite flatbuffer bytes: input (1, S, S, C) float32 raw pixels, output (1, S, S, 1) float32
    probabilities (and, for a model with an image head, a second output: the (1, C) class probabilities).

    `mode`: "fp32" (what `covidseg_tf.export --tflite` writes); "int8" (`export --tflite int8`: int8 weights and
    activations, the input preprocessing in float32, float32 input/output; see the module docstring), calibrated
    on `representative`: an iterable of (S, S, C) float32 pixel arrays from real images (for Stage 2 with their
    Stage-1 masks: `calibration_pixels`); "dynamic" (int8 weights, activations quantized on the fly; bench/ only).
    `float_layers`: names of more Keras layers of `model` that "int8" keeps in float32.
    """
    model = with_layer_classes(keras_model(model), plain_class)  # the ops XNNPACK was measured with
    if mode not in TFLITE_MODES:
        raise ValueError(f"TFLite mode must be one of {TFLITE_MODES}, got {mode!r}")
    if mode == "int8" and representative is None:
        raise ValueError("TFLite mode 'int8' needs representative pixels to calibrate on")
    size, channels = model_input_size(model, image_size)
    inputs = keras.Input((size, size, channels), batch_size=1, name="pixels")
    mask, image_class = split_outputs(model(inputs))
    outputs = [layers.Activation("linear", dtype="float32", name="prob")(mask)]
    if image_class is not None:
        outputs.append(layers.Activation("linear", dtype="float32", name="image_class_prob")(image_class))
    wrapped = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0])
    converter = tf.lite.TFLiteConverter.from_keras_model(wrapped)
    printed = io.StringIO()  # Keras' export, which the converter calls, prints the traced endpoints
    try:  # quiet_absl: the converter logs every function it traces at WARNING
        with quiet_absl(), contextlib.redirect_stdout(printed):
            content = converter.convert()
            if mode == "dynamic":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                content = converter.convert()
            elif mode == "int8":
                content = _int8(converter, model, content, representative, channels, float_layers)
    finally:
        log.debug("TFLite converter: %s", printed.getvalue())
    log.debug("%s -> TFLite %s, %d bytes", model.name, mode, len(content))
    return content


def _int8(converter: Any, model: keras.Model, float_content: bytes, representative: Iterable[Any],
          channels: int, float_layers: Iterable[str] = ()) -> bytes:
    """`tflite_model`'s int8 conversion: calibrated on `representative`, the preprocessing nodes denylisted
    (TFLite's selective quantization, through `tf.lite.experimental.QuantizationDebugger`)."""
    samples = [np.asarray(x, np.float32)[None, ..., :channels] for x in representative]
    if not samples:
        raise ValueError("TFLite mode 'int8' needs representative pixels to calibrate on, got none")
    if samples[0].shape[-1] != channels:  # more are cut: a cascade's 4-channel pixels calibrate Stage 1 too
        raise ValueError(f"representative pixels have {samples[0].shape[-1]} channels; the model takes {channels}")
    dataset = lambda: ([x] for x in samples)  # noqa: E731
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    keep = float_preprocessing_nodes(model, float_content, float_layers)
    log.debug("int8 TFLite of %s: %d calibration images, float32 nodes %s", model.name, len(samples), keep)
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep)
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset,
                                                         debug_options=options)
    return debugger.get_nondebug_quantized_model()
