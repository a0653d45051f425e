"""Keras layers computing the same values as the stock ones our U-Nets use, with fewer or faster TensorFlow ops,
and the model-wide swap to them.

    model = with_layer_classes(model, faster_class)   # a clone, same names, configs and weights; `model` if
                                                      # nothing changes; plain_class maps back

- `NearestUpSampling2D`: a nearest-neighbour UpSampling2D as one ``ResizeNearestNeighbor`` (Keras repeats rows, then
  columns, two Tile passes); in training, its gradient one average pool.
- `WindowAveragePooling2D`: a GlobalAveragePooling2D as one average pool over the whole map, run by oneDNN in the
  input's dtype (Keras first casts a bfloat16 map to float32, then takes a Mean).
- `MatMulConv2D`: a 1x1 Conv2D applied to 1x1 maps (the squeeze-excitation convolutions of EfficientNet) as a
  matrix product with its bias and activation, not a convolution with its fixed cost per call.
- `UpsamplingConv2D`: a U-Net decoder stage's UpSampling2D, Concatenate and first Conv2D as one layer, whose
  training gradient builds the concatenation again instead of holding it through the forward pass (less memory
  at the step's peak). It changes the graph, not only a class: `models.build_unet` builds the decoder with it;
  models saved before it keep their three layers (and get `NearestUpSampling2D` by the swap).
- `RecomputingDepthwiseConv2D`, `RecomputingMultiply`, `RecomputingZeroPadding2D`: in training, the encoder's
  swish outputs are not held for the backward pass either: the depthwise convolution's kernel gradient and the
  squeeze-excitation product's gradient make them again from their recipe (`covidseg_tf.recompute`; the padding
  passes the recipe on), as UpsamplingConv2D does its skip.

Each is a registered subclass of the layer it stands for (``covidseg_tf>...`` in a saved model's config), takes the
same weights, and falls back to the parent's ``call`` for inputs it does not cover (dynamic sizes, other layouts).
`models.build_unet` builds its models with them (training and inference), in the clone that also sets the BatchNorm
class; `optimize.fold_batchnorm` gives them to models saved before they existed. `plain_class` maps back to Keras'
classes (TFLite conversion keeps those; `UpsamplingConv2D` has none and converts as its inference ops: a resize, a
concatenation and a convolution).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import keras
import tensorflow as tf
from keras import layers

from covidseg_tf import recompute

log = logging.getLogger(__name__)


def _resize_nearest(x: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """x (channels last) repeated `size` times along height and width, as one ``ResizeNearestNeighbor``."""
    h, w = x.shape[1], x.shape[2]
    new = (h * size[0], w * size[1]) if h is not None and w is not None else tf.shape(x)[1:3] * size
    return tf.image.resize(x, new, method="nearest")


def _upsampled_concat(x: tf.Tensor, skips: list[tf.Tensor], size: tuple[int, int]) -> tf.Tensor:
    """`_resize_nearest(x, size)` concatenated with `skips` along channels (alone without skips)."""
    up = _resize_nearest(x, size)
    return tf.concat([up, *skips], axis=-1) if skips else up


def _block_sums(dy: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """The gradient of `_resize_nearest`: the sum of each `size` block of `dy`, as one oneDNN average pool times the
    block's area (TensorFlow's own, ``ResizeNearestNeighborGrad``, is a slower generic loop)."""
    return tf.nn.avg_pool2d(dy, size, size, "VALID") * tf.cast(size[0] * size[1], dy.dtype)


def _upsample_nearest(x: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """`_resize_nearest` with `_block_sums` as its gradient."""

    @tf.custom_gradient
    def upsample(x):
        return _resize_nearest(x, size), lambda dy: _block_sums(dy, size)

    return upsample(x)


def _conv_of_upsampled(x: tf.Tensor, skips: list[tf.Tensor], kernel: tf.Tensor, size: tuple[int, int],
                       padding: str) -> tf.Tensor:
    """conv2d(concat([_resize_nearest(x, size), *skips]), kernel) (stride 1, channels last), whose gradient builds
    that concatenation again from x and the skips instead of keeping it from the forward pass (x and the skips are
    kept anyway: by the layers that made them; a skip with a recipe is made again, `covidseg_tf.recompute`)."""

    strides = [1, 1, 1, 1]

    @tf.custom_gradient
    def conv(x, *rest):
        *skips, kernel = rest

        def grad(dy):
            shape = tf.concat([tf.shape(x)[:1], tf.shape(x)[1:3] * size, [sum(t.shape[-1] for t in (x, *skips))]], 0)
            dinp = tf.raw_ops.Conv2DBackpropInput(input_sizes=shape, filter=kernel, out_backprop=dy, strides=strides,
                                                  padding=padding)
            parts = tf.split(dinp, [x.shape[-1], *(s.shape[-1] for s in skips)], axis=-1) if skips else [dinp]
            dinputs = [_block_sums(parts[0], size), *parts[1:]]
            # the input again, once the input gradients are made (their buffers freed first): new ops after the
            # forward pass, which grappler does not merge with the forward's; a skip with a recipe made again too
            with tf.control_dependencies(dinputs):
                inp = _upsampled_concat(tf.identity(x), [recompute.again(skip, dinputs) for skip in skips], size)
            dkernel = tf.raw_ops.Conv2DBackpropFilter(input=inp, filter_sizes=tf.shape(kernel), out_backprop=dy,
                                                      strides=strides, padding=padding)
            return (*dinputs, dkernel)

        return tf.nn.conv2d(_upsampled_concat(x, skips, size), kernel, strides, padding), grad

    return conv(x, *skips, kernel)


def _depthwise_conv_made_again(x: tf.Tensor, kernel: tf.Tensor, strides: list[int], padding: str) -> tf.Tensor:
    """depthwise_conv2d(x, kernel), whose gradient makes x again from its recipe (`recompute.again`, after x's own
    gradient) for the kernel's gradient instead of keeping it from the forward pass."""

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                                               strides=strides, padding=padding)
            dkernel = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=recompute.again(x, [dx]), filter_sizes=tf.shape(kernel), out_backprop=dy, strides=strides,
                padding=padding)
            return dx, dkernel

        return tf.nn.depthwise_conv2d(x, kernel, strides, padding), grad

    return conv(x, kernel)


@tf.function(jit_compile=True, autograph=False)
def _scale_grad(steps: tuple, dy: tf.Tensor, s: tf.Tensor, *args: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The gradients of z * s (s broadcast over height and width) with z made again from its recipe, in one XLA
    function: dy * s, and the sum of dy * z over height and width (float32 arithmetic, each rounded once)."""
    dy32 = tf.cast(dy, tf.float32)
    dz = tf.cast(dy32 * tf.cast(s, tf.float32), dy.dtype)
    ds = tf.reduce_sum(dy32 * recompute.value(steps, args), axis=(1, 2), keepdims=True)
    return dz, tf.cast(ds, s.dtype)


def _scaled(z: tf.Tensor, s: tf.Tensor, recipe: recompute.Recipe) -> tf.Tensor:
    """z * s whose gradient makes z again from `recipe` (`_scale_grad`) instead of keeping it."""

    @tf.custom_gradient
    def f(z, s):
        return z * s, lambda dy: _scale_grad(recipe.steps, dy, s, *recipe.args)

    return f(z, s)


def _bias_and_activation(layer: layers.Layer, y: tf.Tensor) -> tf.Tensor:
    """`layer`'s bias added to `y` and its activation applied, as a Keras convolution does after its kernel."""
    if layer.use_bias:
        y = tf.nn.bias_add(y, keras.ops.cast(layer.bias, y.dtype))
    return y if layer.activation is None else layer.activation(y)


@keras.saving.register_keras_serializable(package="covidseg_tf")
class NearestUpSampling2D(layers.UpSampling2D):
    """A nearest-neighbour UpSampling2D (channels last, static size) as one ``ResizeNearestNeighbor`` op: for an
    integer factor k it reads pixel (i // k, j // k), as Keras' two repeats do.

    >>> x = keras.ops.reshape(keras.ops.arange(4.0), (1, 2, 2, 1))
    >>> keras.ops.convert_to_numpy(NearestUpSampling2D()(x))[0, :, :, 0].tolist()[1]
    [0.0, 0.0, 1.0, 1.0]
    """

    def call(self, inputs, training=None):
        h, w = inputs.shape[1], inputs.shape[2]
        if self.interpolation != "nearest" or self.data_format != "channels_last" or h is None or w is None:
            return super().call(inputs)
        if training:  # the custom gradient's IdentityN would stay in an inference graph
            return _upsample_nearest(inputs, tuple(self.size))
        return tf.image.resize(inputs, (h * self.size[0], w * self.size[1]), method="nearest")


@keras.saving.register_keras_serializable(package="covidseg_tf")
class UpsamplingConv2D(layers.Conv2D):
    """A Conv2D (stride 1, channels last) applied to its first input upsampled `upsampling` times (nearest
    neighbour) and concatenated with the others along channels: a U-Net decoder stage's UpSampling2D, Concatenate
    and first convolution as one layer, called on ``[x, skip]`` or ``[x]``. Its weights are those of the Conv2D.
    In training its gradient builds the concatenation again (two copies: cheap) instead of keeping it from the
    forward pass to the backward pass, where it is the largest tensor of the stage.

    >>> conv = UpsamplingConv2D(1, 1, use_bias=False, kernel_initializer="ones")
    >>> x, skip = keras.ops.reshape(keras.ops.arange(2.0), (1, 1, 2, 1)), keras.ops.ones((1, 2, 4, 1))
    >>> keras.ops.convert_to_numpy(conv([x, skip]))[0, :, :, 0].tolist()
    [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    """

    def __init__(self, *args, upsampling: int | tuple[int, int] = 2, **kwargs):
        super().__init__(*args, **kwargs)
        if (tuple(self.strides) != (1, 1) or tuple(self.dilation_rate) != (1, 1) or self.groups != 1
                or self.data_format != "channels_last"):
            raise ValueError(f"{type(self).__name__} {self.name}: strides 1, dilation 1, groups 1 and channels "
                             f"last only")
        self.upsampling = (upsampling, upsampling) if isinstance(upsampling, int) else tuple(upsampling)
        self.input_spec = None  # a list of inputs

    def get_config(self) -> dict:
        return {**super().get_config(), "upsampling": list(self.upsampling)}

    def _conv_input_shape(self, input_shape) -> tuple:
        """The shape of the upsampled and concatenated input the convolution sees."""
        shapes = input_shape if isinstance(input_shape[0], (list, tuple)) else [input_shape]
        b, h, w, _ = shapes[0]
        return (b, None if h is None else h * self.upsampling[0], None if w is None else w * self.upsampling[1],
                sum(shape[-1] for shape in shapes))

    def build(self, input_shape):
        super().build(self._conv_input_shape(input_shape))
        self.input_spec = None

    def compute_output_shape(self, input_shape):
        return super().compute_output_shape(self._conv_input_shape(input_shape))

    def call(self, inputs, training=None):
        x, *skips = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if not training:
            return super().call(_upsampled_concat(x, skips, self.upsampling))
        kernel = keras.ops.cast(self.kernel, x.dtype)
        return _bias_and_activation(self, _conv_of_upsampled(x, skips, kernel, self.upsampling, self.padding.upper()))


@keras.saving.register_keras_serializable(package="covidseg_tf")
class WindowAveragePooling2D(layers.GlobalAveragePooling2D):
    """GlobalAveragePooling2D (channels last, static size) as one average pool over the whole map, run by oneDNN in
    the input's dtype.

    >>> x = keras.ops.reshape(keras.ops.arange(8.0), (1, 2, 2, 2))
    >>> keras.ops.convert_to_numpy(WindowAveragePooling2D()(x)).tolist()
    [[3.0, 4.0]]
    """

    def call(self, inputs):
        h, w = inputs.shape[1], inputs.shape[2]
        if self.data_format != "channels_last" or h is None or w is None:
            return super().call(inputs)
        pooled = tf.nn.avg_pool2d(inputs, (h, w), 1, "VALID")
        return pooled if self.keepdims else tf.reshape(pooled, (-1, inputs.shape[3]))


@keras.saving.register_keras_serializable(package="covidseg_tf")
class MatMulConv2D(layers.Conv2D):
    """A 1x1 Conv2D applied to 1x1 maps (squeeze-excitation) as a matrix product with its bias and activation (any
    other input runs Conv2D's call).

    >>> conv = MatMulConv2D(2, 1, kernel_initializer="ones", bias_initializer="ones")
    >>> keras.ops.convert_to_numpy(conv(keras.ops.ones((1, 1, 1, 3)))).tolist()
    [[[[4.0, 4.0]]]]
    """

    def call(self, inputs):
        if (tuple(inputs.shape[1:3]) != (1, 1) or tuple(self.kernel_size) != (1, 1) or self.groups != 1
                or self.data_format != "channels_last"):
            return super().call(inputs)
        kernel = keras.ops.cast(self.kernel[0, 0], inputs.dtype)
        y = _bias_and_activation(self, tf.matmul(tf.reshape(inputs, (-1, inputs.shape[3])), kernel))
        return tf.reshape(y, (-1, 1, 1, self.filters))


@keras.saving.register_keras_serializable(package="covidseg_tf")
class RecomputingDepthwiseConv2D(layers.DepthwiseConv2D):
    """A DepthwiseConv2D whose training gradient makes its input again from the input's recipe (in EfficientNet:
    the swish of the expand convolution's BatchNorm output, zero-padded before a stride 2) instead of keeping it;
    an input without a recipe runs DepthwiseConv2D's call.

    >>> conv = RecomputingDepthwiseConv2D(1, use_bias=False, depthwise_initializer="ones")
    >>> keras.ops.convert_to_numpy(conv(keras.ops.ones((1, 1, 1, 2)), training=True)).tolist()
    [[[[1.0, 1.0]]]]
    """

    def call(self, inputs, training=None):
        if not (training and recompute.recipe_of(inputs) is not None and self.data_format == "channels_last"
                and tuple(self.dilation_rate) == (1, 1)):
            return super().call(inputs)
        kernel = keras.ops.cast(self.kernel, inputs.dtype)
        y = _depthwise_conv_made_again(inputs, kernel, [1, *self.strides, 1], self.padding.upper())
        return _bias_and_activation(self, y)


@keras.saving.register_keras_serializable(package="covidseg_tf")
class RecomputingMultiply(layers.Multiply):
    """A Multiply of a tensor with a recipe by a per-channel scale of shape (N, 1, 1, C), as a squeeze-excitation
    applies its scale: in training its gradient makes the tensor again inside one XLA function (which also computes
    both gradients, faster than TensorFlow's bfloat16 element-wise ops) instead of keeping it. Other inputs run
    Multiply's call.

    >>> keras.ops.convert_to_numpy(RecomputingMultiply()([keras.ops.ones((1, 2, 2, 1)), keras.ops.ones((1, 1, 1, 1))
    ...                                                   * 3])).tolist()
    [[[[3.0], [3.0]], [[3.0], [3.0]]]]
    """

    def call(self, inputs, training=None):
        z, *scales = inputs
        recipe = recompute.recipe_of(z)
        if not (training and recipe is not None and len(scales) == 1 and len(z.shape) == 4
                and tuple(scales[0].shape[1:3]) == (1, 1) and scales[0].dtype == z.dtype):
            return super().call(inputs)
        return _scaled(z, scales[0], recipe)


@keras.saving.register_keras_serializable(package="covidseg_tf")
class RecomputingZeroPadding2D(layers.ZeroPadding2D):
    """A ZeroPadding2D whose training output carries its input's recipe on (padded), so that the convolution after
    it can make it again (EfficientNet pads before each stride-2 depthwise convolution).

    >>> keras.ops.convert_to_numpy(RecomputingZeroPadding2D(((0, 1), (0, 0)))(keras.ops.ones((1, 1, 1, 1)))).tolist()
    [[[[1.0]], [[0.0]]]]
    """

    def call(self, inputs, training=None):
        padded = super().call(inputs)
        if not training or self.data_format != "channels_last":
            return padded
        paddings = ((0, 0), *(tuple(int(p) for p in side) for side in self.padding), (0, 0))
        return recompute.then(inputs, padded, ("pad", paddings))


_RECOMPUTING = {layers.DepthwiseConv2D: RecomputingDepthwiseConv2D, layers.Multiply: RecomputingMultiply,
                layers.ZeroPadding2D: RecomputingZeroPadding2D}
_PLAIN = {NearestUpSampling2D: layers.UpSampling2D, WindowAveragePooling2D: layers.GlobalAveragePooling2D,
          MatMulConv2D: layers.Conv2D, **{recomputing: plain for plain, recomputing in _RECOMPUTING.items()}}


def faster_class(layer: layers.Layer) -> type[layers.Layer]:
    """The class a fast copy builds `layer` as (`with_layer_classes(model, faster_class)`): one of the subclasses
    above where it computes the same faster or with less memory, else the layer's own.

    >>> faster_class(layers.UpSampling2D()).__name__, faster_class(layers.ReLU()).__name__
    ('NearestUpSampling2D', 'ReLU')
    """
    kind = type(layer)
    if kind is layers.UpSampling2D:
        return NearestUpSampling2D
    if kind is layers.GlobalAveragePooling2D:
        return WindowAveragePooling2D
    if (kind is layers.Conv2D and len(layer._inbound_nodes) == 1
            and tuple(layer.input.shape[1:3]) == (1, 1)):
        return MatMulConv2D
    return _RECOMPUTING.get(kind, kind)


def inference_class(layer: layers.Layer) -> type[layers.Layer]:
    """The class an inference copy (`optimize.fold_batchnorm`) builds `layer` as: `faster_class`'s, but Keras' own
    for the Recomputing* layers, which differ from it in training only.

    >>> inference_class(RecomputingMultiply()).__name__, inference_class(layers.UpSampling2D()).__name__
    ('Multiply', 'NearestUpSampling2D')
    """
    cls = faster_class(layer)
    return _PLAIN[cls] if cls in _RECOMPUTING.values() else cls


def plain_class(layer: layers.Layer) -> type[layers.Layer]:
    """Keras' own class for a layer of this module, else the layer's own class.

    >>> plain_class(NearestUpSampling2D()).__name__
    'UpSampling2D'
    """
    return _PLAIN.get(type(layer), type(layer))


def with_layer_classes(model: keras.Model, class_of: Callable[[layers.Layer], type[layers.Layer]]) -> keras.Model:
    """A clone of `model` (``keras.models.clone_model``) in which each layer is built as ``class_of(layer)`` from its
    own config, with the same names and weights; `model` itself when `class_of` changes no layer's class."""
    swap = {layer.name: cls for layer in model.layers if (cls := class_of(layer)) is not type(layer)}
    if not swap:
        return model

    def clone(layer: layers.Layer) -> layers.Layer:
        return swap.get(layer.name, layer.__class__).from_config(layer.get_config())

    swapped = keras.models.clone_model(model, clone_function=clone)
    swapped.set_weights(model.get_weights())
    for layer in swapped.layers:
        if isinstance(layer, layers.Normalization):
            layer.finalize_state()  # it caches mean/variance tensors: refresh them
    log.debug("%s: %d layers swapped (%s)", model.name, len(swap),
              ", ".join(sorted({cls.__name__ for cls in swap.values()})))
    return swapped

