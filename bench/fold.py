"""Inference-only BatchNorm folding: an equivalent copy of a stage model for faster CPU inference.

Every BatchNormalization whose input is the sole output use of a Conv2D / DepthwiseConv2D is folded into
that conv (inference BN is affine: y = gamma * (x - mean) / sqrt(var + eps) + beta):
    kernel' = kernel * s,  bias' = (bias - mean) * s + beta,   s = gamma / sqrt(var + eps)
(per output channel; for a depthwise kernel (kh, kw, C, mult), s is indexed by output channel c*mult + m),
and the BN layer is replaced by an identity layer (FoldedBatchNorm) of the same name. The rest of the model (layers, names,
dtype policies - including the float32 preprocessing and float32 sigmoid under mixed precision) is cloned
unchanged. Why it is faster on CPU: Keras' BN is 2 element-wise passes (and, under mixed precision, 2 more
casts bfloat16<->float32, since keras computes BN in float32), and a Conv2D + BiasAdd (+ ReLU / swish) is
fused by grappler's remapper into ONE oneDNN convolution with post-ops.

Numerics: fp32 results equal the original up to float32 round-off (the folded kernel is computed in float64
and stored as float32); under mixed_bfloat16 the folded kernel is rounded to bfloat16 once (instead of the
kernel, with BN applied in float32 afterwards), a difference of the same order as bf16 vs fp32 itself.
bench/infer.py measures both against the unfolded fp32 model. Training is unaffected (inference copy only).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


class FoldedBatchNorm(layers.Layer):
    """Identity standing in for a BatchNormalization folded into the preceding conv (same name)."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _producer(tensor):
    return tensor._keras_history[0]


def foldable_pairs(model: keras.Model) -> dict[str, str]:
    """{conv layer name: BN layer name} of the Conv -> BN pairs that can be folded."""
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, layers.BatchNormalization) or layer.axis not in (-1, [-1], [3], 3):
            continue
        prev = _producer(layer.input)
        if isinstance(prev, (layers.Conv2D, layers.DepthwiseConv2D)) and len(prev._outbound_nodes) == 1:
            pairs[prev.name] = layer.name
    return pairs


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """An inference copy of `model` with the Conv -> BN pairs folded (see the module docstring)."""
    pairs = foldable_pairs(model)
    bns = set(pairs.values())

    def clone(layer):
        cfg = layer.get_config()
        if layer.name in pairs:
            cfg["use_bias"] = True
            return layer.__class__.from_config(cfg)
        if layer.name in bns:
            return FoldedBatchNorm(name=layer.name, dtype=layer.dtype_policy)
        return layer.__class__.from_config(cfg)

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
        kernel, bias = w[0], (w[1] if len(w) > 1 else None)
        gamma = np.asarray(bn.gamma, np.float64) if bn.scale else 1.0
        beta = np.asarray(bn.beta, np.float64) if bn.center else 0.0
        mean = np.asarray(bn.moving_mean, np.float64)
        var = np.asarray(bn.moving_variance, np.float64)
        s = gamma / np.sqrt(var + bn.epsilon)
        if isinstance(layer, layers.DepthwiseConv2D):
            kh, kw, c, mult = kernel.shape
            new_kernel = kernel * s.reshape(c, mult)[None, None]
        else:
            new_kernel = kernel * s
        b0 = bias if bias is not None else 0.0
        new_bias = (b0 - mean) * s + beta
        target.set_weights([new_kernel.astype(np.float32), np.broadcast_to(new_bias, s.shape).astype(np.float32)])
    return folded


def compiled(fn, spec, freeze: bool = False, jit_compile: bool = False):
    """A graph-compiled inference callable of `fn` for ONE fixed input signature `spec`.

    freeze=True: the concrete function with its variables turned into constants
    (convert_variables_to_constants_v2), so grappler can constant-fold weight casts (bfloat16 copies of the
    float32 variables are made once, not at every call) and fuse conv + bias + activation. A frozen function
    does not see later weight updates: build it after the weights are final."""
    import tensorflow as tf

    f = tf.function(fn, input_signature=[spec], jit_compile=jit_compile)
    if not freeze:
        return f
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(f.get_concrete_function())
