"""U-Net with a keras.applications EfficientNet encoder, for both stages of the cascade.

The decoder follows segmentation_models' ``Unet`` (qubvel, Keras): decoder stages of
UpSampling2D + concat + 2 x (Conv3x3 without bias, BatchNorm, ReLU) with 256/128/64/32/16 filters, a 3x3
``final_conv`` and a sigmoid (kept in float32 under a mixed-precision policy). Each stage's upsampling, concat and
first convolution are one layer, covidseg_tf.fast_layers.UpsamplingConv2D (the same values and weights; in training
it does not keep the concatenation for the backward pass). Layer names are segmentation_models'
(``decoder_stage0a_conv`` (that layer), ``decoder_stage0a_bn``, ``decoder_stage0a_relu``, ``decoder_stage0b_conv``,
..., ``final_conv``, ``sigmoid``); models saved before it have separate ``decoder_stage0_upsampling`` and
``decoder_stage0_concat`` layers and load as they were. Encoder layers keep their keras.applications names
(``stem_conv``, ``block1a_dwconv``, ..., ``top_activation``).

Where the decoder taps the encoder is the *layout* (``build_unet(layout=...)``, ``StageConfig.unet_layout``):

* ``"segmentation_models"`` (qubvel's Keras ``Unet``): skips from
  ``block6a/4a/3a/2a_expand_activation`` (the expanded input of the first block of strides 32, 16, 8, 4,
  i.e. features at strides 16, 8, 4, 2), bottleneck ``top_activation`` (after the encoder's 1x1 top conv:
  1280 channels for B0, 1536 for B3).
* ``"segmentation_models_pytorch"`` (smp's ``Unet``; the default of `StageConfig` and what the shipped models
  use): skips from the output of the last block at strides 16, 8 and 4 and from ``stem_activation`` (stride 2),
  bottleneck the output of the last block at stride 32; the 1x1 top conv is not used (the model does not contain
  it). Fewer channels reach the decoder, so it is cheaper.
  The tapped layers are found from the encoder's graph by stride (`block_outputs_by_stride`), for B0-B7. One
  difference from smp: for B0, smp 0.6.0 takes its stride-16 feature after ``block5a`` (its hard-coded
  index), here it is the last stride-16 block ``block5c`` (same shape, same cost; for B1-B7 smp also takes
  the last block of each stride).

A saved ``.keras`` model carries its layout in its graph: loading never needs the config.

BatchNorm (``build_unet(batch_norm=...)``, ``StageConfig.batch_norm``): ``"keras"`` builds every BN layer of
encoder and decoder as keras.layers.BatchNormalization; ``"fused"`` swaps them all
for covidseg_tf.batchnorm.FusedBatchNormalization, a subclass with the same names, configs and weights whose
training step is one fused op. The decoder's upsamplings and the encoder's squeeze-excitation layers are built as
covidseg_tf.fast_layers' subclasses (the same values in fewer ops). A ``.keras`` file records the class of each
layer.

Input contract: one float32 tensor (B, H, W, C) of RAW pixels 0..255 in the three RGB channels (grayscale
repeated 3x); channels beyond the third (Stage 2: the lung mask) hold 0/1 values. Preprocessing happens inside
the model, in the two layers keras.applications puts in front of every EfficientNet:
``Rescaling(1/255)`` followed by ``Normalization``. keras only gives that Normalization layer ImageNet
statistics when it is built with ``weights="imagenet"`` (and then through a buggy variance it patches with a
third Rescaling); with ``weights=None`` or a path it is the identity, so the encoder would see x/255. Here the
encoder is always built with ``weights=None`` and the Normalization statistics are then SET explicitly (after
any weight loading), for every choice of encoder weights:

* RGB channel c: mean = IMAGENET_MEAN[c]/255, variance = (IMAGENET_STD[c]/255)**2, so that
  ``Normalization(Rescaling(x)) == (x - IMAGENET_MEAN[c]) / IMAGENET_STD[c]`` (the seed's normalization);
* extra channel (lung mask): mean 0, variance (1/255)**2, so the 0/1 mask reaches the stem conv as 0/1
  (a design choice: the mask keeps its meaning "inside lung" = 1, with a scale comparable to the normalized RGB,
  and needs no dataset statistics).

Those statistics are the Normalization layer's non-trainable weights (mean (C,), variance (C,), count ()),
which is why a model here has 2*C + 1 more parameters than segmentation_models' Unet, whose qubvel
EfficientNet has no preprocessing layers (B3, 3 channels: 17,867,840 vs 17,867,833; see tests/test_models.py).

Under a mixed-precision policy these two layers are switched to float32 (`keep_preprocessing_float32`), so the
stem conv gets the normalized values rounded once to bfloat16/float16; the output sigmoid is float32 too.

Encoder weights: None / "none" (random init), "imagenet" (keras.applications' notop file, downloaded once to
~/.keras/models; offline it fails fast with the URL to fetch), a path to a local Keras weights file of a
3-channel keras.applications encoder (the ``efficientnetbN_notop.h5`` file keras downloads, or a
``.weights.h5`` saved from ``keras.applications.EfficientNetBN(include_top=False)``), or a trained stage model's
``.keras`` file (domain-matched pretraining, `transfer_stage_weights`: every layer whose name and shapes match).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from covidseg_tf.activations import training_swish, use_swish
from covidseg_tf.batchnorm import batch_norm_class
from covidseg_tf.config import (
    BATCH_NORMS,
    IMAGE_CLASS_OUTPUT,
    IMAGE_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MASK_OUTPUT,
    UNET_LAYOUTS,
    StageConfig,
)
from covidseg_tf.fast_layers import UpsamplingConv2D, faster_class, with_layer_classes

log = logging.getLogger(__name__)

ENCODERS: dict[str, Callable[..., keras.Model]] = {
    f"efficientnetb{i}": getattr(keras.applications, f"EfficientNetB{i}") for i in range(8)
}
#: Skip connections, deepest first (stride 16, 8, 4, 2), as in segmentation_models.
SKIP_LAYERS: tuple[str, ...] = (
    "block6a_expand_activation",
    "block4a_expand_activation",
    "block3a_expand_activation",
    "block2a_expand_activation",
)
BOTTLENECK_LAYER = "top_activation"
#: Where the decoder taps the encoder (see the module docstring); the first is the default of build_unet.
STEM_ACTIVATION = "stem_activation"
_BLOCK_NAME = re.compile(r"^(block\d+[a-z])_")  # keras.applications EfficientNet block layers: block6a_...
DECODER_FILTERS: tuple[int, ...] = (256, 128, 64, 32, 16)
STEM_LAYER = "stem_conv"
ENCODER_PREFIXES = ("stem_", "block", "top_")
"""Name prefixes of keras.applications EfficientNet layers (the encoder)."""
STEM_INITS: tuple[str, ...] = ("cycle", "zero")
#: keras.applications downloads encoder weights from here (file name: f"{encoder}_notop.h5").
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
SIZE_DIVISOR = 32
DOWNLOAD_TIMEOUT_S = 30.0  # socket timeout while fetching "imagenet" weights

_FROM_CONFIG: Any = object()  # sentinel: "use cfg.encoder_weights"


# ---------------------------------------------------------------------------------------------------------
# Encoder weights
# ---------------------------------------------------------------------------------------------------------


def weights_file_name(encoder: str) -> str:
    """The file name keras.applications uses for the ImageNet notop weights of `encoder`."""
    return f"{_check_encoder(encoder)}_notop.h5"


def weights_url(encoder: str) -> str:
    """The exact URL keras.applications downloads the ImageNet notop weights of `encoder` from."""
    return KERAS_WEIGHTS_URL + weights_file_name(encoder)


def resolve_encoder_weights(encoder: str, encoder_weights: str | os.PathLike | None) -> Path | None:
    """The local weights file for `encoder_weights` (None for random init: None, "none" or "random").

    "imagenet" is fetched with keras' own downloader (cached in ~/.keras/models, hash-checked); if that fails
    (offline cluster) a RuntimeError says which URL to fetch and how to pass the file instead.
    """
    if encoder_weights is None or str(encoder_weights).lower() in ("none", "random", ""):
        return None
    if str(encoder_weights).lower() == "imagenet":
        file_name = weights_file_name(encoder)
        try:
            from keras.src.applications.efficientnet import WEIGHTS_HASHES

            file_hash = WEIGHTS_HASHES[encoder.lower().removeprefix("efficientnet")][1]
        except (ImportError, KeyError):  # private module moved: skip the hash check
            file_hash = None
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewalled cluster must not hang in urlretrieve
        try:
            return Path(
                keras.utils.get_file(
                    file_name, weights_url(encoder), cache_subdir="models", file_hash=file_hash
                )
            )
        except Exception as e:  # noqa: BLE001  (keras raises bare Exception on URL failures)
            raise RuntimeError(
                f"could not download the ImageNet weights of {encoder} ({type(e).__name__}: {e}). "
                f"On an offline machine fetch {weights_url(encoder)} elsewhere (e.g. `wget "
                f"{weights_url(encoder)}`), copy it over and pass its path: --encoder-weights "
                f"/path/to/{file_name} (or put it in ~/.keras/models/)."
            ) from e
        finally:
            socket.setdefaulttimeout(previous_timeout)
    path = Path(encoder_weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder weights file not found: {path} (expected None, 'none', 'imagenet' or the path of a "
            f"Keras weights file such as {weights_file_name(encoder)} from {weights_url(encoder)})"
        )
    return path


def load_reference_encoder(encoder: str, weights_path: str | os.PathLike) -> keras.Model:
    """A 3-channel keras.applications encoder (include_top=False) holding the weights of `weights_path`."""
    ref = ENCODERS[_check_encoder(encoder)](include_top=False, weights=None, input_shape=(None, None, 3))
    try:
        ref.load_weights(str(weights_path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"cannot load encoder weights from {weights_path}: {type(e).__name__}: {str(e).rstrip('.')}. Expected a "
            f"Keras weights file of a 3-channel keras.applications {encoder} with include_top=False (e.g. "
            f"{weights_file_name(encoder)} or a .weights.h5 saved from one)."
        ) from e
    return ref


def widen_stem_kernel(kernel: np.ndarray, in_channels: int, stem_init: str = "cycle") -> np.ndarray:
    """Adapt a pretrained (kh, kw, 3, filters) stem kernel to `in_channels` >= 3 inputs.

    "cycle" (segmentation_models_pytorch's rule): new channel i takes the kernel of RGB channel i % 3 and the
    whole kernel is scaled by 3 / in_channels. "zero": RGB kernels unchanged, extra channels zero.
    """
    if stem_init not in STEM_INITS:
        raise ValueError(f"stem_init must be one of {STEM_INITS}, got {stem_init!r}")
    old_in = kernel.shape[2]
    if in_channels < old_in:
        raise ValueError(f"cannot widen a {old_in}-channel stem kernel to {in_channels} channels")
    if stem_init == "cycle":
        new = kernel[:, :, [i % old_in for i in range(in_channels)], :] * (old_in / in_channels)
    else:
        new = np.zeros(kernel.shape[:2] + (in_channels,) + kernel.shape[3:], dtype=kernel.dtype)
        new[:, :, :old_in, :] = kernel
    return new.astype(kernel.dtype)


def transfer_encoder_weights(
    model: keras.Model, reference: keras.Model, stem_init: str = "cycle", unused: Collection[str] = ()
) -> int:
    """Copy every weight of the 3-channel `reference` encoder into `model`'s layers of the same name.

    The stem conv is widened with `widen_stem_kernel` when `model` has more input channels; the preprocessing
    layers (Rescaling/Normalization) are skipped (their statistics are set by `set_input_normalization`), and
    so are the encoder layers named in `unused` (layers the U-Net leaves out, e.g. ``top_conv`` in the
    segmentation_models_pytorch layout). Returns the number of layers copied.
    """
    copied = 0
    for ref_layer in reference.layers:
        values = ref_layer.get_weights()
        if not values or ref_layer.name in unused:
            continue
        if isinstance(ref_layer, (layers.Normalization, layers.Rescaling)):
            continue
        try:
            target = model.get_layer(ref_layer.name)
        except ValueError:
            raise ValueError(
                f"encoder layer {ref_layer.name!r} of the weights file has no twin in the model"
            ) from None
        if ref_layer.name == STEM_LAYER:
            in_channels = target.get_weights()[0].shape[2]
            values = [widen_stem_kernel(values[0], in_channels, stem_init), *values[1:]]
        target.set_weights(values)
        copied += 1
    return copied


def transfer_stage_weights(model: keras.Model, source: keras.Model, stem_init: str = "cycle") -> int:
    """Initialise `model` from a trained stage model (domain-matched pretraining instead of ImageNet): every layer
    of `source` whose name and weight shapes match a layer of `model` is copied (the encoder, and the decoder and
    head too when their shapes match, e.g. a lung model starting the infection stage, or a 128 px model starting
    a 256 px run); the stem conv is widened with `widen_stem_kernel` when `model` takes more input channels. The
    preprocessing statistics are set by `set_input_normalization` afterwards. Returns the number of layers copied.

    Raises:
        ValueError: `source` has no matching encoder (e.g. another EfficientNet size) or more input channels.
    """
    copied: set[str] = set()
    for src in source.layers:
        values = src.get_weights()
        if not values or isinstance(src, (layers.Normalization, layers.Rescaling)):
            continue
        try:
            target = model.get_layer(src.name)
        except ValueError:
            continue
        shapes = [tuple(w.shape) for w in target.get_weights()]
        if src.name == STEM_LAYER and values[0].shape[2] != shapes[0][2]:
            if values[0].shape[2] > shapes[0][2]:
                raise ValueError(f"{source.name} takes {values[0].shape[2]} input channels, more than the model's "
                                 f"{shapes[0][2]}")
            values = [widen_stem_kernel(values[0], shapes[0][2], stem_init), *values[1:]]
        if [tuple(v.shape) for v in values] != shapes:
            continue
        target.set_weights(values)
        copied.add(src.name)
    encoder = {layer.name for layer in model.layers if layer.weights and layer.name.startswith(ENCODER_PREFIXES)
               and not isinstance(layer, layers.Normalization)}
    if not encoder <= copied:
        raise ValueError(f"no encoder layer match for {len(encoder - copied)} of {len(encoder)} encoder layers of "
                         f"{model.name} in {source.name} (another encoder size or layout?)")
    return len(copied)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing inside the model
# ---------------------------------------------------------------------------------------------------------


def input_normalization_stats(in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, variance) for keras' Normalization layer that follows Rescaling(1/255) in the encoder.

    RGB: ImageNet statistics (config.IMAGENET_MEAN/STD, on 0-255 pixels) rescaled to 0-1; extra channels:
    mean 0, variance 1/255**2, which undoes the 1/255 rescaling so a 0/1 mask stays 0/1.
    """
    if in_channels < 3:
        raise ValueError(f"in_channels must be >= 3 (RGB first), got {in_channels}")
    extra = in_channels - 3
    mean = np.array([m / 255.0 for m in IMAGENET_MEAN] + [0.0] * extra, dtype="float32")
    variance = np.array([(s / 255.0) ** 2 for s in IMAGENET_STD] + [(1 / 255.0) ** 2] * extra, dtype="float32")
    return mean, variance


def input_normalization_layer(model: keras.Model) -> layers.Normalization:
    """The encoder's Normalization layer (keras.applications puts exactly one in front of EfficientNet)."""
    found = [layer for layer in model.layers if isinstance(layer, layers.Normalization)]
    if len(found) != 1:
        raise ValueError(f"expected one Normalization layer in {model.name}, found {len(found)}")
    return found[0]


def keep_preprocessing_float32(model: keras.Model) -> None:
    """Run the encoder's Rescaling + Normalization in float32 under a mixed-precision policy.

    In bfloat16, x/255 - mean loses up to ~2 gray levels to cancellation and the 0/1 mask becomes 0/1.008; in
    float32 the stem conv receives the normalized values with a single rounding to the policy's dtype.
    """
    for layer in model.layers:
        if isinstance(layer, (layers.Rescaling, layers.Normalization)) and layer.compute_dtype != "float32":
            layer.dtype_policy = "float32"


#: Depthwise kernel sizes oneDNN trains fast in bfloat16: its bfloat16 depthwise weight-gradient kernel covers 3x3;
#: EfficientNet's 5x5 ones fall to its generic grouped-convolution kernel, several times slower than float32.
BF16_DEPTHWISE_KERNELS: tuple[tuple[int, int], ...] = ((3, 3),)


def keep_slow_bf16_depthwise_float32(model: keras.Model) -> None:
    """Under ``mixed_bfloat16``, run the depthwise convolutions oneDNN trains slowly in bfloat16 (kernel sizes not in
    `BF16_DEPTHWISE_KERNELS`) in float32: their input is cast up and their output back down by the next layer.

    Training only in effect: exports choose every layer's precision afresh (`optimize.fold_batchnorm`), and in
    inference oneDNN runs a 5x5 depthwise convolution fast in bfloat16.
    """
    for layer in model.layers:
        if (isinstance(layer, layers.DepthwiseConv2D) and layer.compute_dtype == "bfloat16"
                and tuple(layer.kernel_size) not in BF16_DEPTHWISE_KERNELS):
            layer.dtype_policy = "float32"


def set_input_normalization(model: keras.Model) -> None:
    """Give the encoder's Normalization layer the statistics of `input_normalization_stats`."""
    norm = input_normalization_layer(model)
    mean, variance = input_normalization_stats(int(model.inputs[0].shape[-1]))
    norm.adapt_mean.assign(mean)
    norm.adapt_variance.assign(variance)
    norm.finalize_state()  # the layer caches mean/variance tensors: refresh them


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------


def bn_relu(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    """BatchNorm -> ReLU, layers named f"{name}_bn/_relu"."""
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def conv3x3_bn_relu(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    """Conv3x3 (no bias, he_uniform) -> BatchNorm -> ReLU, layers named f"{name}_conv/_bn/_relu"."""
    x = layers.Conv2D(
        filters, 3, padding="same", use_bias=False, kernel_initializer="he_uniform", name=f"{name}_conv"
    )(x)
    return bn_relu(x, name)


def decoder_block(
    x: keras.KerasTensor, skip: keras.KerasTensor | None, filters: int, stage: int
) -> keras.KerasTensor:
    """One decoder stage: UpSampling2D x2, concat with the skip (if any) and the first conv3x3 as one
    `UpsamplingConv2D` (``decoder_stage{stage}a_conv``), its BatchNorm and ReLU, then a second conv3x3_bn_relu."""
    name = f"decoder_stage{stage}a"
    x = UpsamplingConv2D(filters, 3, upsampling=2, padding="same", use_bias=False, kernel_initializer="he_uniform",
                         name=f"{name}_conv")([x] if skip is None else [x, skip])
    return conv3x3_bn_relu(bn_relu(x, name), filters, name=f"decoder_stage{stage}b")


def segmentation_head(x: keras.KerasTensor, dropout: float = 0.0, classes: int = 1) -> keras.KerasTensor:
    """[Dropout] -> Conv3x3 `final_conv` -> sigmoid in float32 (even under a mixed-precision policy)."""
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Conv2D(
        classes, 3, padding="same", use_bias=True, kernel_initializer="glorot_uniform", name="final_conv"
    )(x)
    return layers.Activation("sigmoid", dtype="float32", name="sigmoid")(x)


def image_class_head(x: keras.KerasTensor, classes: int, dropout: float = 0.0) -> keras.KerasTensor:
    """The image-level classifier on the bottleneck `x`: GlobalAveragePooling -> [Dropout] -> Dense(`classes`)
    -> softmax in float32, layers named ``image_head_*``.

    >>> x = keras.Input((4, 4, 8))
    >>> tuple(image_class_head(x, 3).shape)
    (None, 3)
    """
    x = layers.GlobalAveragePooling2D(name="image_head_pool")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="image_head_dropout")(x)
    x = layers.Dense(classes, name="image_head_dense")(x)
    return layers.Activation("softmax", dtype="float32", name=IMAGE_CLASS_OUTPUT)(x)


def has_image_head(model: keras.Model) -> bool:
    """True when `model` (a stage's Keras model) has the image-level output."""
    return any(layer.name == IMAGE_CLASS_OUTPUT for layer in model.layers)


# ---------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------


def _check_encoder(encoder: str) -> str:
    key = encoder.lower()
    if key not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(ENCODERS)}")
    return key


def block_outputs_by_stride(encoder: keras.Model) -> dict[int, str]:
    """{output stride: name of the output layer of the LAST block at that stride} of a keras.applications
    EfficientNet, e.g. {2: "block1a_project_bn", 4: "block2b_add", ..., 32: "block7a_project_bn"} for B0.

    Walks the layers in graph order multiplying the strides of the convolutions; a block's output is its last
    layer (``blockNx_add`` with a residual, else ``blockNx_project_bn``). Works for B0-B7 and any input size.
    """
    stride = 1
    block_end: dict[str, tuple[str, int]] = {}  # block -> (its last layer so far, stride there)
    for layer in encoder.layers:
        strides = getattr(layer, "strides", None)
        if strides is not None:
            stride *= int(strides[0])
        match = _BLOCK_NAME.match(layer.name)
        if match:
            block_end[match.group(1)] = (layer.name, stride)
    by_stride: dict[int, str] = {}
    for layer_name, block_stride in block_end.values():  # blocks in graph order: later ones overwrite
        by_stride[block_stride] = layer_name
    return by_stride


def unet_feature_layers(encoder: keras.Model, layout: str = UNET_LAYOUTS[0]) -> tuple[tuple[str, ...], str]:
    """(skip layer names deepest first, bottleneck layer name) of `layout` in `encoder` (see the module
    docstring)."""
    if layout not in UNET_LAYOUTS:
        raise ValueError(f"unknown U-Net layout {layout!r}; expected one of {list(UNET_LAYOUTS)}")
    if layout == "segmentation_models":
        return SKIP_LAYERS, BOTTLENECK_LAYER
    by_stride = block_outputs_by_stride(encoder)
    missing = {4, 8, 16, 32} - set(by_stride)
    if missing:
        raise ValueError(f"{encoder.name} has no block at stride(s) {sorted(missing)}: {by_stride}")
    return (by_stride[16], by_stride[8], by_stride[4], STEM_ACTIVATION), by_stride[32]


def check_input_shape(input_shape: Sequence[int | None]) -> tuple[int | None, int | None, int]:
    """Validate (H, W, C): H and W multiples of 32 (or None), C >= 3; return it as a tuple."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)}")
    h, w, c = input_shape
    for side, size in (("height", h), ("width", w)):
        if size is not None and (int(size) <= 0 or int(size) % SIZE_DIVISOR):
            raise ValueError(
                f"input {side} {size} is not a positive multiple of {SIZE_DIVISOR} (the U-Net downsamples "
                f"5 times); use e.g. {max(SIZE_DIVISOR, round(int(size) / SIZE_DIVISOR) * SIZE_DIVISOR)}"
            )
    if c is None or int(c) < 3:
        raise ValueError(f"input channels must be >= 3 (RGB, then e.g. the lung mask), got {c}")
    return (None if h is None else int(h), None if w is None else int(w), int(c))


def build_unet(
    encoder: str = "efficientnetb3",
    input_shape: Sequence[int | None] = (448, 448, 3),
    encoder_weights: str | os.PathLike | None = None,
    dropout: float = 0.0,
    name: str | None = None,
    stem_init: str = "cycle",
    decoder_filters: Sequence[int] = DECODER_FILTERS,
    bn_momentum: float | None = None,
    layout: str = UNET_LAYOUTS[0],
    batch_norm: str = BATCH_NORMS[0],
    image_classes: int = 0,
) -> keras.Model:
    """A U-Net on a keras.applications EfficientNet B0-B7 (decoder as segmentation_models').

    Args:
        encoder: "efficientnetb0" ... "efficientnetb7".
        input_shape: (H, W, C); H, W multiples of 32; C = 3 (RGB) or more (extra channels are 0/1 masks).
            Input values: raw pixels 0..255 (RGB), 0/1 (extra channels); see the module docstring.
        encoder_weights: None / "none", "imagenet", or a path to a 3-channel encoder weights file.
        dropout: rate of a Dropout before the head (0 = none).
        name: model name (default f"unet_{encoder}").
        stem_init: how pretrained weights fill the stem kernel of extra input channels. "cycle" (default):
            segmentation_models_pytorch's rule for in_channels > 3 (channel i gets RGB kernel i % 3, the whole
            kernel scaled by 3/C), i.e. the starting point of an smp ``Unet(in_channels=4)`` like the seed's;
            the mask channel gets a pretrained-shaped kernel, so it influences the features (and receives input
            gradient) from the first step, and the 3/C scale keeps the stem's activation scale. "zero": RGB
            kernels unchanged, extra kernels zero, so the pretrained RGB features are exactly preserved at the
            start, but the mask is ignored (zero input gradient) until its kernel has moved. Ignored when
            encoder_weights is None (everything random).
        decoder_filters: filters of the decoder stages, deepest first (5 stages = back to full size).
        bn_momentum: momentum of every BatchNormalization layer's moving statistics (None keeps Keras' 0.99).
        layout: where the decoder taps the encoder, one of UNET_LAYOUTS: "segmentation_models" (default) or
            "segmentation_models_pytorch" (see the module docstring).
        batch_norm: the class of every BatchNorm layer, one of BATCH_NORMS: "keras" (default) or "fused"
            (covidseg_tf.batchnorm.FusedBatchNormalization; same weights and initial values as "keras").
        image_classes: with N > 0, an image-level classifier (`image_class_head`, N softmax classes) on the
            bottleneck, beside the mask, with the same dropout rate.

    Returns:
        keras.Model mapping (B, H, W, C) float32 to (B, H, W, 1) float32 sigmoid probabilities; with
        `image_classes`, to the dict {MASK_OUTPUT: those, IMAGE_CLASS_OUTPUT: (B, N) softmax probabilities}
        (`split_outputs` takes either apart).
    """
    key = _check_encoder(encoder)
    shape = check_input_shape(input_shape)
    if stem_init not in STEM_INITS:
        raise ValueError(f"stem_init must be one of {STEM_INITS}, got {stem_init!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if layout not in UNET_LAYOUTS:
        raise ValueError(f"unknown U-Net layout {layout!r}; expected one of {list(UNET_LAYOUTS)}")
    if batch_norm not in BATCH_NORMS:
        raise ValueError(f"unknown batch_norm {batch_norm!r}; expected one of {list(BATCH_NORMS)}")
    if image_classes < 0 or image_classes == 1:
        raise ValueError(f"image_classes must be 0 (no image head) or at least 2, got {image_classes}")
    if len(decoder_filters) != len(SKIP_LAYERS) + 1:
        raise ValueError(f"decoder_filters needs {len(SKIP_LAYERS) + 1} stages, got {list(decoder_filters)}")
    weights_path = resolve_encoder_weights(key, encoder_weights)  # fail fast, before building anything

    inputs = keras.Input(shape=shape, name="pixels")
    with warnings.catch_warnings():  # keras warns that EfficientNet "usually expects 1 or 3 input channels"
        warnings.filterwarnings("ignore", message=".*input channels", category=UserWarning)
        backbone = ENCODERS[key](include_top=False, weights=None, input_tensor=inputs, input_shape=shape)
    skip_layers, bottleneck_layer = unet_feature_layers(backbone, layout)
    skips = [backbone.get_layer(layer_name).output for layer_name in skip_layers]
    x = bottleneck = backbone.get_layer(bottleneck_layer).output
    for stage, filters in enumerate(decoder_filters):
        x = decoder_block(x, skips[stage] if stage < len(skips) else None, filters, stage)
    outputs = segmentation_head(x, dropout=dropout)
    if image_classes:
        outputs = {MASK_OUTPUT: outputs, IMAGE_CLASS_OUTPUT: image_class_head(bottleneck, image_classes, dropout)}
    model = keras.Model(inputs, outputs, name=name or f"unet_{key}")
    # one clone with the same initial weights: every BatchNorm as `batch_norm`'s class, the decoder's upsamplings and
    # the squeeze-excitation layers as covidseg_tf.fast_layers' (the same values in fewer ops)
    bn_class = batch_norm_class(batch_norm)
    model = with_layer_classes(model, lambda layer: bn_class(layer) if isinstance(layer, layers.BatchNormalization)
                               else faster_class(layer))
    keep_preprocessing_float32(model)
    keep_slow_bf16_depthwise_float32(model)
    use_swish(model, training_swish())  # the same swish, its gradient one XLA loop (covidseg_tf.activations)
    if bn_momentum is not None:
        if not 0.0 <= bn_momentum < 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum}")
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = bn_momentum

    if weights_path is not None and weights_path.suffix == ".keras":
        source = keras.models.load_model(weights_path, compile=False)  # batchnorm's custom layer is registered
        copied = transfer_stage_weights(model, source, stem_init=stem_init)
        log.info("initialised %d layers from the trained stage model %s (stem_init=%s)", copied, weights_path,
                 stem_init)
    elif weights_path is not None:
        reference = load_reference_encoder(key, weights_path)
        unused = {layer.name for layer in backbone.layers} - {layer.name for layer in model.layers}
        copied = transfer_encoder_weights(model, reference, stem_init=stem_init, unused=unused)
        log.info("loaded %d encoder layers from %s (stem_init=%s)", copied, weights_path, stem_init)
    set_input_normalization(model)
    return model


def build_stage_model(
    cfg: StageConfig,
    encoder_weights: str | os.PathLike | None = _FROM_CONFIG,
    stem_init: str = "cycle",
) -> keras.Model:
    """The U-Net of one cascade stage from its StageConfig (encoder, image_size, in_channels, dropout, BN momentum,
    unet_layout, batch_norm).

    `encoder_weights` overrides cfg.encoder_weights when given (None / "none" = random init); "auto" is
    resolved by `choose_encoder_weights`.
    """
    weights = cfg.encoder_weights if encoder_weights is _FROM_CONFIG else encoder_weights
    weights = choose_encoder_weights(cfg.encoder, weights)
    return build_unet(
        encoder=cfg.encoder,
        input_shape=(cfg.image_size, cfg.image_size, cfg.in_channels),
        encoder_weights=weights,
        dropout=cfg.dropout,
        name=f"{cfg.stage}_unet",
        stem_init=stem_init,
        bn_momentum=cfg.bn_momentum,
        layout=cfg.unet_layout,
        batch_norm=cfg.batch_norm,
        image_classes=len(IMAGE_CLASSES) if cfg.image_head_weight > 0 else 0,
    )


def choose_encoder_weights(encoder: str, value: str | os.PathLike | None) -> str | os.PathLike | None:
    """Resolve "auto": "imagenet" when the weights can be had (download or ~/.keras/models), else None (random
    init) with a warning. Other values are returned as they are."""
    if value is None or str(value).lower() != "auto":
        return value
    try:
        resolve_encoder_weights(encoder, "imagenet")
    except RuntimeError as e:
        log.warning("ImageNet weights unavailable, %s starts from random init: %s", encoder, e)
        return None
    return "imagenet"
