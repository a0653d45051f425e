"""Forward FLOPs of a Keras model from its layer shapes: `conv_flops_per_image(model)["total"]`.

Counts what dominates a U-Net's cost and what PyTorch's `torch.utils.flop_counter` counts, so two frameworks'
models can be compared: convolutions and dense layers, 2 FLOPs per multiply-accumulate. Element-wise work
(BatchNorm, activations, squeeze-and-excitation multiplies, upsampling) is not counted.
"""

from __future__ import annotations

from typing import Any


def conv_flops_per_image(model: Any) -> dict[str, int]:
    """{"conv", "depthwise", "dense", "total"}: forward FLOPs of one image through the built Keras `model`:
    Conv2D 2*kh*kw*(Cin/groups)*Cout*Ho*Wo, DepthwiseConv2D 2*kh*kw*Cin*mult*Ho*Wo, Dense 2*in*out.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same")])
    >>> conv_flops_per_image(m)["total"] == 2 * 3 * 3 * 3 * 4 * 8 * 8
    True
    """
    from keras import layers

    conv = dw = dense = 0
    for layer in model.layers:
        if isinstance(layer, layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            dw += 2 * kh * kw * h * w * c
        elif isinstance(layer, layers.Conv2D):
            _, h, w, cout = layer.output.shape
            kh, kw, cin_per_group, _ = layer.kernel.shape  # also for a conv of several inputs (UpsamplingConv2D)
            conv += 2 * kh * kw * cin_per_group * cout * h * w
        elif isinstance(layer, layers.Dense):
            dense += 2 * layer.input.shape[-1] * layer.units
    return {"conv": int(conv), "depthwise": int(dw), "dense": int(dense), "total": int(conv + dw + dense)}
