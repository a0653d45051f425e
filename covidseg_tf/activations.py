"""Swish with its gradient compiled by XLA into one loop (`xla_swish`), and the model-wide swap to it (`use_swish`).

TensorFlow's CPU kernels run Keras' swish forward as one pass (oneDNN's ``_MklSwish``), but its gradient as seven
element-wise ops (after grappler: a Sigmoid, a Sub, an AddV2 and four Muls), each a pass over the activations; in
bfloat16 each also converts every element to float32 and back (Eigen has no vectorised bfloat16 arithmetic).
EfficientNet has a swish after nearly every convolution, so these passes are a large part of a training step.
`xla_swish` is the same function, x * sigmoid(x), with a custom gradient whose arithmetic is one
``tf.function(jit_compile=True)``: XLA fuses it into a single loop that reads x and the incoming gradient once,
computes in float32 and rounds once.

    model = build_unet(...)           # build_unet already calls use_swish(model, training_swish())
    use_swish(model)                  # -> the number of layers changed; use_swish(model, KERAS_SWISH) undoes it

Only the training arithmetic changes: the forward values are Keras' (to the last bit in float32), the gradient
equals Keras' up to float32 round-off, and inference copies (`optimize.fold_batchnorm`) replace it by
`optimize.fusible_swish` as they do Keras' swish. Models saved with it name it "covidseg_tf>xla_swish" in their
config, so loading one needs this module imported (`covidseg_tf.inference.load_stage` and `covidseg_tf.models`
import it). Speed: bench/RESULTS.md ("Swish's gradient in one XLA loop").
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import tensorflow as tf

log = logging.getLogger(__name__)

#: Keras' own swish, as layers hold it (``activation="swish"`` and ``"silu"`` both resolve to it).
KERAS_SWISH = keras.activations.silu


@tf.function(jit_compile=True, autograph=False)
def _swish_grad(x: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """d(x * sigmoid(x))/dx * dy in float32, as one XLA loop; returned in x's dtype."""
    xf, dyf = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
    s = tf.sigmoid(xf)
    return tf.cast(dyf * s * (1.0 + xf * (1.0 - s)), x.dtype)


@tf.custom_gradient
def _swish(x: tf.Tensor) -> tuple[tf.Tensor, Any]:
    def grad(dy: tf.Tensor) -> tf.Tensor:
        return _swish_grad(x, dy)

    return x * tf.sigmoid(x), grad


@keras.saving.register_keras_serializable(package="covidseg_tf")
def xla_swish(x: Any) -> Any:
    """x * sigmoid(x), whose gradient runs as one XLA-compiled loop (see the module docstring).

    >>> float(xla_swish(tf.constant(2.0)))  # 2 * sigmoid(2), as keras.activations.silu
    1.7615941762924194
    """
    return _swish(tf.convert_to_tensor(x))


def is_swish(activation: Any) -> bool:
    """Whether a layer's `activation` is a swish: Keras' (`KERAS_SWISH`) or `xla_swish`."""
    return activation is KERAS_SWISH or activation is xla_swish


def training_swish() -> Any:
    """The swish `models.build_unet` gives its models: `xla_swish`, or Keras' own where TensorFlow was built without
    XLA (`tf.test.is_built_with_xla()`), which `xla_swish`'s gradient needs."""
    if tf.test.is_built_with_xla():
        return xla_swish
    log.warning("TensorFlow was built without XLA: training with Keras' swish (its gradient in seven ops)")
    return KERAS_SWISH


def use_swish(model: keras.Model, activation: Any = xla_swish) -> int:
    """Give every layer of `model` whose activation is a swish (`is_swish`) `activation` instead (in place: the
    weights stay); return how many layers changed.

    >>> x = keras.Input((8, 8, 3))
    >>> m = keras.Model(x, keras.layers.Conv2D(4, 3, activation="swish")(x))
    >>> use_swish(m), use_swish(m), use_swish(m, KERAS_SWISH)
    (1, 0, 1)
    """
    if not is_swish(activation):
        raise ValueError(f"activation must be KERAS_SWISH or xla_swish, got {activation!r}")
    changed = 0
    for layer in model.layers:
        if is_swish(getattr(layer, "activation", None)) and layer.activation is not activation:
            layer.activation = activation
            changed += 1
    log.debug("%s: %d swish activations -> %s", model.name, changed, activation.__name__)
    return changed
