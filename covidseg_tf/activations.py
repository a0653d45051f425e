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

A swish right after a training BatchNorm (EfficientNet's stem, expand and depthwise convolutions) also keeps less.
The BatchNorm's output would be held from the forward pass to the backward one only for this gradient, while the
BatchNorm's own gradient holds its input anyway. `batchnorm.FusedBatchNormalization` marks its training output with
its recipe (`covidseg_tf.recompute`: the kernel's input, the batch statistics, gamma, beta), and `xla_swish` on a
marked tensor makes it again inside its gradient loop (`_recipe_swish_grad`: one multiply-add more per element, the
same bytes read), so the BatchNorm's output is freed after the forward pass; the swish's output carries the recipe
on, for the layers after it (`fast_layers`' Recomputing* layers). Memory and speed: bench/RESULTS.md ("The
BatchNorm's output recomputed in the swish's gradient", "Issue 26, ninth run").
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import tensorflow as tf

from covidseg_tf import recompute

log = logging.getLogger(__name__)

#: Keras' own swish, as layers hold it (``activation="swish"`` and ``"silu"`` both resolve to it).
KERAS_SWISH = keras.activations.silu


def _swish_derivative_times(y: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """d(y * sigmoid(y))/dy * dy in float32 (y float32), the arithmetic both XLA gradients below trace."""
    s = tf.sigmoid(y)
    return tf.cast(dy, tf.float32) * s * (1.0 + y * (1.0 - s))


@tf.function(jit_compile=True, autograph=False)
def _swish_grad(x: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """d(x * sigmoid(x))/dx * dy in float32, as one XLA loop; returned in x's dtype."""
    return tf.cast(_swish_derivative_times(tf.cast(x, tf.float32), dy), x.dtype)


@tf.custom_gradient
def _swish(x: tf.Tensor) -> tuple[tf.Tensor, Any]:
    def grad(dy: tf.Tensor) -> tf.Tensor:
        return _swish_grad(x, dy)

    return x * tf.sigmoid(x), grad


@tf.function(jit_compile=True, autograph=False)
def _recipe_swish_grad(steps: tuple, dy: tf.Tensor, *args: tf.Tensor) -> tf.Tensor:
    """`_swish_grad` at y made again from its recipe (`recompute`) in the same XLA loop; returned in dy's dtype."""
    return tf.cast(_swish_derivative_times(recompute.value(steps, args), dy), dy.dtype)


def _recipe_swish(y: tf.Tensor, recipe: recompute.Recipe) -> tf.Tensor:
    @tf.custom_gradient
    def swish(y):
        def grad(dy: tf.Tensor) -> tf.Tensor:  # y is not referenced here: only the forward pass holds it
            return _recipe_swish_grad(recipe.steps, dy, *recipe.args)

        return y * tf.sigmoid(y), grad

    return recompute.then(y, swish(y), ("swish",))


@keras.saving.register_keras_serializable(package="covidseg_tf")
def xla_swish(x: Any) -> Any:
    """x * sigmoid(x), whose gradient runs as one XLA-compiled loop (see the module docstring).

    >>> float(xla_swish(tf.constant(2.0)))  # 2 * sigmoid(2), as keras.activations.silu
    1.7615941762924194
    """
    x = tf.convert_to_tensor(x)
    recipe = recompute.recipe_of(x)
    return _swish(x) if recipe is None else _recipe_swish(x, recipe)


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
