"""BatchNormalization whose training step is TensorFlow's fused kernel, and a model-wide swap to it.

Keras' own BatchNormalization trains with separate ops: under a mixed-precision policy it casts the input to
float32, computes the moments with ``tf.nn.moments`` (several reductions), normalizes element-wise and casts the
output back, and its gradient is the autodiff of all of these. `FusedBatchNormalization` computes the same
training step with one ``FusedBatchNormV3`` op forward and one ``FusedBatchNormGradV3`` op backward, which
TensorFlow's CPU build runs through oneDNN, on the policy's own dtype (no casts of the activations).

Only the training step changes: inference (``training=False``), a frozen layer (``trainable=False``), masks and
every configuration the kernel cannot express (see `FusedBatchNormalization`) run Keras' own ``call``. The layer
is a subclass of ``keras.layers.BatchNormalization`` with the same weights, config and inference arithmetic, so
everything that recognises a BatchNorm (BN folding in covidseg_tf.optimize, bn_momentum, weight transfer by
layer name) treats it as one, and ``get_weights``/``set_weights`` move weights between models of either class.
A ``.weights.h5`` file (``save_weights``, a training backup) does not: Keras addresses each layer in it by its
class name, so it loads only into a model with the same BatchNorm class.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers, ops

from covidseg_tf import recompute
from covidseg_tf.fast_layers import with_layer_classes

#: Input dtypes the fused kernel takes (TF 2.21 CPU registers FusedBatchNormV3 and FusedBatchNormGradV3 for them
#: with float32 scale/offset/statistics, eagerly and in graphs); others (float64) run Keras' call.
FUSED_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: tf.compat.v1.nn.fused_batch_norm raises a smaller epsilon to this; such layers run Keras' call instead.
MIN_FUSED_EPSILON = 1.001e-5
#: oneDNN runs bfloat16 NHWC batch norm with its AVX-512 kernel only when the channels are a multiple of this; other
#: layers fall to its generic loop (``nspc_bnorm:any`` in ONEDNN_VERBOSE output), several times slower than the
#: float32 kernel, so `FusedBatchNormalization` hands such layers' bfloat16 input to the kernel as float32.
BF16_KERNEL_CHANNELS = 16


@keras.saving.register_keras_serializable(package="covidseg_tf")
class FusedBatchNormalization(layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training step is one fused op (``FusedBatchNormV3``).

    Fused when all hold: TensorFlow backend, ``training`` and ``trainable``, a 4-D input normalized over its last
    axis (NHWC), no mask, no renorm, not synchronized, epsilon >= `MIN_FUSED_EPSILON`, input dtype in
    `FUSED_DTYPES`. Otherwise (inference included) Keras' own ``call`` runs, so inference is Keras' arithmetic.

    Dtypes: the input goes to the kernel in the layer's compute dtype (float32, or bfloat16/float16 under a
    mixed-precision policy; the kernel accumulates in float32), gamma, beta and the statistics stay float32, the
    output is the compute dtype, as Keras' layer returns. A bfloat16 input whose channels are not a multiple of
    `BF16_KERNEL_CHANNELS` goes to the kernel as float32 (`kernel_dtype`): the same statistics, an output rounded
    once to bfloat16, and the speed of oneDNN's vectorised kernel instead of its generic loop.

    Variance: the output is normalized with the biased batch variance (divided by N = batch x height x width), as
    Keras does. In training the kernel's ``batch_variance`` output is the unbiased one (divided by N - 1), which
    TensorFlow's own moving average would use; this layer multiplies it by (N - 1) / N and updates the moving
    statistics itself the way Keras does (``moving = moving * momentum + batch * (1 - momentum)``), so the
    moving variance matches Keras' up to float32 round-off rather than differing by the factor N / (N - 1).

    Memory: the training output is marked with its recipe (`covidseg_tf.recompute`: the kernel's input and the
    batch statistics), so an `activations.xla_swish` after the layer recomputes the output in its gradient instead
    of holding it until the backward pass.
    """

    def fuses(self, inputs, training: bool | None = None, mask=None) -> bool:
        """Whether a call with these arguments runs the fused kernel (see the class docstring)."""
        return bool(
            training
            and self.trainable
            and mask is None
            and keras.backend.backend() == "tensorflow"
            and not self.renorm
            and not self.synchronized
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.epsilon >= MIN_FUSED_EPSILON
            and keras.backend.standardize_dtype(inputs.dtype) in FUSED_DTYPES
        )

    def kernel_dtype(self, inputs) -> str:
        """The dtype the fused kernel gets `inputs` in: theirs, but float32 for a bfloat16 input whose channels
        oneDNN's bfloat16 kernel does not vectorise (see `BF16_KERNEL_CHANNELS`).

        >>> FusedBatchNormalization(dtype="mixed_bfloat16").kernel_dtype(keras.ops.zeros((1, 4, 4, 24), "bfloat16"))
        'float32'
        """
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if dtype == "bfloat16" and inputs.shape[-1] % BF16_KERNEL_CHANNELS:
            return "float32"
        return dtype

    def call(self, inputs, training=None, mask=None):
        if not self.fuses(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        channels = self.moving_mean.shape[0]
        gamma = ops.cast(self.gamma, "float32") if self.scale else tf.ones((channels,), "float32")
        beta = ops.cast(self.beta, "float32") if self.center else tf.zeros((channels,), "float32")
        x = ops.cast(inputs, self.kernel_dtype(inputs))
        y, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True,
        )
        shape = tf.shape(inputs)
        n = tf.cast(tf.maximum(shape[0] * shape[1] * shape[2], 1), "float32")
        variance = unbiased_variance * ((n - 1.0) / n)  # the biased variance the output was normalized with
        moving_mean = ops.cast(self.moving_mean, "float32")
        moving_variance = ops.cast(self.moving_variance, "float32")
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(moving_variance * self.momentum + variance * (1.0 - self.momentum))
        # a swish taking the output recomputes it from x, which the kernel's gradient holds (recompute module)
        return recompute.mark(ops.cast(y, self.compute_dtype), (("batch_norm", float(self.epsilon)),), x, mean,
                              variance, gamma, beta)


BATCH_NORM_CLASSES: dict[str, type[layers.BatchNormalization]] = {
    "keras": layers.BatchNormalization,
    "fused": FusedBatchNormalization,
}
"""The BatchNormalization class of each value of StageConfig.batch_norm (config.BATCH_NORMS)."""


def batch_norm_class(batch_norm: str) -> Callable[[layers.Layer], type[layers.Layer]]:
    """The class a layer takes under StageConfig.batch_norm value `batch_norm` (a `class_of` for
    `fast_layers.with_layer_classes`): `batch_norm`'s BatchNormalization class for a BatchNorm of either
    implementation, the layer's own class for any other layer.

    >>> fused = batch_norm_class("fused")
    >>> fused(layers.BatchNormalization()).__name__, fused(layers.ReLU()).__name__
    ('FusedBatchNormalization', 'ReLU')
    """
    try:
        target = BATCH_NORM_CLASSES[batch_norm]
    except KeyError:
        raise ValueError(f"unknown batch_norm {batch_norm!r}; expected one of {list(BATCH_NORM_CLASSES)}") from None
    kinds = tuple(BATCH_NORM_CLASSES.values())
    return lambda layer: target if type(layer) in kinds else type(layer)


def with_batch_norm(model: keras.Model, batch_norm: str) -> keras.Model:
    """`model` with every BatchNormalization of the other implementation replaced by `batch_norm`'s class.

    A clone (``keras.models.clone_model``) with the same layer names, configs and weights when some layer is
    swapped; `model` itself when none is (e.g. "keras" for a model built with Keras' layers).
    """
    return with_layer_classes(model, batch_norm_class(batch_norm))
