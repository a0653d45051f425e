"""Inference copies (covidseg_tf.optimize) and what export writes with them: same outputs, each weight once."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize_batchnorms, stage2_pixels

from covidseg_tf.config import default_config
from covidseg_tf.export import export_stage
from covidseg_tf.fast_layers import (
    MatMulConv2D,
    UpsamplingConv2D,
    WindowAveragePooling2D,
    plain_class,
    with_layer_classes,
)
from covidseg_tf.models import build_stage_model
from covidseg_tf.optimize import (
    FoldedBatchNorm,
    fold_batchnorm,
    foldable_pairs,
    frozen_stage,
    same_padding_pairs,
)

SIZE = 64


@pytest.fixture(scope="module")
def infection_model() -> keras.Model:
    """A small Stage-2 model whose BatchNorms are far from identity (as after training)."""
    keras.utils.set_random_seed(3)
    model = build_stage_model(default_config("infection").replace(image_size=SIZE), encoder_weights=None)
    randomize_batchnorms(model, seed=0)
    return model


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return stage2_pixels(2, SIZE, seed=1)


def test_every_conv_bn_pair_is_folded(infection_model):
    pairs = foldable_pairs(infection_model)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in infection_model.layers)
    assert len(pairs) == n_bn > 50  # EfficientNet-B0 + decoder: every BN follows a conv
    folded = fold_batchnorm(infection_model, "fp32")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert sum(isinstance(layer, FoldedBatchNorm) for layer in folded.layers) == n_bn


def test_fp32_copy_equals_the_model(infection_model, pixels):
    ref = infection_model(pixels, training=False).numpy()
    got = frozen_stage(infection_model, "fp32")(pixels).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_upsampling_squeeze_and_se_convs_become_single_ops(infection_model):
    """A model saved with Keras' classes (before fast_layers) gets them in its copy: every squeeze one AvgPool (no
    Mean, and in bf16 no cast of the map), every squeeze-excitation conv a MatMul; the other convs stay convs; the
    decoder's upsamplings, inside its UpsamplingConv2D layers (which keep their class and take their BatchNorm),
    are one ResizeNearestNeighbor each (no Tile). Their values: test_fp32_copy_equals_the_model (and the bf16
    tolerance below) hold with them. faster_layers=False builds Keras' classes."""
    plain = with_layer_classes(infection_model, plain_class)
    kinds = {WindowAveragePooling2D: [layer.name for layer in plain.layers
                                      if type(layer) is keras.layers.GlobalAveragePooling2D]}
    decoder = [layer.name for layer in plain.layers if type(layer) is UpsamplingConv2D]
    se_convs = [layer.name for layer in plain.layers if layer.name.endswith(("se_reduce", "se_expand"))]
    assert len(decoder) == 5 and len(kinds[WindowAveragePooling2D]) == len(se_convs) // 2 > 10
    folded = fold_batchnorm(plain, "bf16")
    for cls, names in kinds.items():
        assert all(type(folded.get_layer(name)) is cls for name in names)
    assert all(type(folded.get_layer(name)) is UpsamplingConv2D and folded.get_layer(name).use_bias
               for name in decoder)
    assert set(se_convs) == {layer.name for layer in folded.layers if type(layer) is MatMulConv2D}
    assert not any(type(layer) is MatMulConv2D for layer in fold_batchnorm(infection_model, "bf16",
                                                                          faster_layers=False).layers)
    types = [op.type for op in frozen_stage(plain, "bf16").function.graph.get_operations()]
    assert "Tile" not in types and "Mean" not in types
    assert types.count("ResizeNearestNeighbor") == 5 and types.count("AvgPool") == len(se_convs) // 2
    assert types.count("MatMul") == len(se_convs)


def test_pads_equal_to_same_padding_move_into_the_convolution(infection_model, pixels):
    """EfficientNet's ZeroPadding2D before each stride-2 convolution adds what "same" padding would: the copy makes
    it an identity and the convolution "same" (no Pad op left in the graph), with the same values; a pad that
    differs from "same" stays, and faster_layers=False keeps every pad."""
    pads = same_padding_pairs(infection_model)
    assert sorted(pads) == ["block2a_dwconv_pad", "block3a_dwconv_pad", "block4a_dwconv_pad", "block6a_dwconv_pad",
                            "stem_conv_pad"]  # B0's stride-2 convolutions
    folded = fold_batchnorm(infection_model, "fp32")
    assert all(type(folded.get_layer(pad)) is keras.layers.Identity for pad in pads)
    assert all(folded.get_layer(conv).padding == "same" for conv in pads.values())
    kept = fold_batchnorm(infection_model, "fp32", faster_layers=False)
    assert all(type(kept.get_layer(pad)) is keras.layers.ZeroPadding2D for pad in pads)
    np.testing.assert_allclose(folded(pixels, training=False), kept(pixels, training=False), atol=1e-5)
    types = [op.type for op in frozen_stage(infection_model, "bf16").function.graph.get_operations()]
    assert not {"Pad", "PadV2", "MirrorPad"} & set(types)

    x = keras.Input((9, 9, 2), name="pixels")
    h = keras.layers.ZeroPadding2D(((0, 2), (1, 1)), name="uneven")(x)  # "same" would add (1, 1) rows
    model = keras.Model(x, keras.layers.Conv2D(1, 3, name="conv")(h))
    assert same_padding_pairs(model) == {}
    assert type(fold_batchnorm(model, "fp32").get_layer("uneven")) is keras.layers.ZeroPadding2D


def test_bf16_copy_is_within_tolerance_and_keeps_io_float32(infection_model, pixels):
    folded = fold_batchnorm(infection_model, "bf16")
    dtypes = {layer.name: layer.dtype_policy.name for layer in folded.layers}
    assert dtypes["final_conv"] == "bfloat16" and dtypes["sigmoid"] == "float32"
    assert all(dtypes[layer.name] == "float32" for layer in folded.layers
               if isinstance(layer, (keras.layers.Normalization, keras.layers.Rescaling)))
    ref = infection_model(pixels, training=False).numpy()
    got = frozen_stage(infection_model, "bf16")(pixels).numpy()
    assert got.dtype == np.float32
    assert 0 < np.abs(got - ref).max() <= 0.01  # bf16 really differs, and stays within the stated tolerance


def test_swish_becomes_the_fusible_form_with_the_same_output(infection_model, pixels):
    """Every swish of the copy is `fusible_swish` (the model's are `xla_swish`, with a custom gradient), and the
    frozen graph has no IdentityN left from that custom gradient, which kept grappler from fusing swish into the
    convolutions; the fp32 copy still equals the model (test_fp32_copy_equals_the_model)."""
    def swishes(model):
        return [layer for layer in model.layers if getattr(layer, "activation", None) is not None
                and getattr(layer.activation, "__name__", "") in ("silu", "xla_swish", "fusible_swish")]

    original, folded = swishes(infection_model), swishes(fold_batchnorm(infection_model, "fp32"))
    assert len(original) == len(folded) > 30  # EfficientNet-B0: activations and squeeze-excitation convs
    assert {layer.activation.__name__ for layer in original} == {"xla_swish"}
    assert {layer.activation.__name__ for layer in folded} == {"fusible_swish"}
    graph = frozen_stage(infection_model, "fp32").function.graph
    types = [op.type for op in graph.get_operations()]
    assert "IdentityN" not in types and types.count("Sigmoid") >= len(folded)
    sample = pixels[:1]
    np.testing.assert_allclose(fold_batchnorm(infection_model, "fp32")(sample, training=False).numpy(),
                               infection_model(sample, training=False).numpy(), atol=1e-5)


def test_precision_none_keeps_the_layers_policies(infection_model):
    folded = fold_batchnorm(infection_model)
    assert {layer.dtype_policy.name for layer in folded.layers} == {"float32"}
    with pytest.raises(ValueError, match="precision must be one of"):
        fold_batchnorm(infection_model, "int8")


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "assets.extra" not in p.parts)


def test_exported_savedmodel_stores_each_weight_once(infection_model, pixels, tmp_path):
    params = infection_model.count_params()
    fp32 = export_stage(infection_model, "infection", tmp_path / "fp32", warmup=False)
    bf16 = export_stage(infection_model, "infection", tmp_path / "bf16", warmup=False, precision="bf16")
    # weights as graph constants: ~4 bytes per parameter in fp32 (Keras' ExportArchive wrote 8), ~2 in bf16
    assert 4 * params < _bytes(fp32) < 4.5 * params
    assert 2 * params < _bytes(bf16) < 2.6 * params
    served = tf.saved_model.load(str(bf16)).signatures["predict_pixels"](pixels=tf.constant(pixels))
    ref = infection_model(pixels, training=False).numpy()
    assert np.abs(served["infection_prob"].numpy() - ref).max() <= 0.01
