"""The U-Net builder: architecture against segmentation_models, preprocessing, encoder weights, saving."""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from covidseg_tf import models
from covidseg_tf.config import IMAGENET_MEAN, IMAGENET_STD, INFECTION
from covidseg_tf.optimize import fold_batchnorm

pytestmark = pytest.mark.filterwarnings("ignore:This model usually expects:UserWarning")  # sm, 4 channels

SIZE = 64  # parameter counts do not depend on the input size; 64 px keeps the builds quick


def _pixels(n: int = 2, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = rng.uniform(0, 255, (n, SIZE, SIZE, 3))
    if channels == 3:
        return rgb.astype("float32")
    mask = rng.integers(0, 2, (n, SIZE, SIZE, channels - 3))
    return np.concatenate([rgb, mask], axis=-1).astype("float32")


def _weight_shapes(model: keras.Model) -> dict[str, list[tuple[int, ...]]]:
    return {layer.name: [tuple(w.shape) for w in layer.weights] for layer in model.layers if layer.weights}


@pytest.fixture(scope="module")
def sm():
    """segmentation_models (test oracle only). Its import registers qubvel's `swish`/`FixedDropout` as
    global Keras custom objects, which would shadow Keras' own `swish` when other tests load models: undo it."""
    os.environ["SM_FRAMEWORK"] = "tf.keras"
    custom = keras.saving.get_custom_objects()
    before = dict(custom)
    sm = pytest.importorskip("segmentation_models")
    custom.clear()
    custom.update(before)
    return sm


@pytest.mark.parametrize(
    "encoder,channels", [("efficientnetb0", 3), ("efficientnetb0", 4), ("efficientnetb3", 3), ("efficientnetb3", 4)]
)
def test_architecture_equals_segmentation_models_unet(sm, encoder, channels):
    ref = sm.Unet(encoder, input_shape=(SIZE, SIZE, channels), encoder_weights=None, classes=1)
    ours = models.build_unet(encoder, (SIZE, SIZE, channels), encoder_weights=None)

    ref_shapes, our_shapes = _weight_shapes(ref), _weight_shapes(ours)
    norm = models.input_normalization_layer(ours)
    # Layer for layer (same names: stem_conv ... top_bn, decoder_stage0a_conv ... final_conv) same weights,
    assert {k: v for k, v in our_shapes.items() if k != norm.name} == ref_shapes
    # except keras.applications' input Normalization: mean (C,), variance (C,), count () - non-trainable.
    assert our_shapes[norm.name] == [(channels,), (channels,), ()]
    stats = 2 * channels + 1
    assert ours.count_params() == ref.count_params() + stats
    assert ours.count_params() - norm.count_params() == ref.count_params()  # without the statistics: equal
    trainable = lambda m: sum(int(np.prod(w.shape)) for w in m.trainable_weights)  # noqa: E731
    assert trainable(ours) == trainable(ref)
    if (encoder, channels) == ("efficientnetb3", 3):
        assert (ref.count_params(), ours.count_params()) == (17_867_833, 17_867_840)


@pytest.mark.parametrize("channels", [3, 4])
def test_same_function_as_segmentation_models_unet(sm, channels):
    """With sm's weights copied in by layer name, our model on raw pixels computes what sm's Unet computes on
    ImageNet-normalized pixels (mask channel unchanged): the preprocessing is the only difference."""
    keras.utils.set_random_seed(1)
    ref = sm.Unet("efficientnetb0", input_shape=(SIZE, SIZE, channels), encoder_weights=None)
    ours = models.build_unet("efficientnetb0", (SIZE, SIZE, channels), encoder_weights=None)
    for layer in ref.layers:
        if layer.weights:
            ours.get_layer(layer.name).set_weights(layer.get_weights())
    x = _pixels(channels=channels)
    normalized = x.copy()
    normalized[..., :3] = (x[..., :3] - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    logits = lambda m: keras.Model(m.input, m.get_layer("final_conv").output)  # noqa: E731
    expected = logits(ref)(normalized, training=False).numpy()
    got = logits(ours)(x, training=False).numpy()
    assert expected.std() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.std())


def test_layer_names_say_where_they_are():
    model = models.build_unet("efficientnetb0", (SIZE, SIZE, 4), dropout=0.3)
    names = {layer.name for layer in model.layers}
    for stage in range(5):
        for suffix in ("a_conv", "a_bn", "a_relu", "b_conv", "b_bn", "b_relu"):
            assert f"decoder_stage{stage}{suffix}" in names
    # each stage's upsampling and concat are in its first conv (fast_layers.UpsamplingConv2D)
    assert not any(name.endswith(("_upsampling", "_concat")) for name in names)
    inputs = {s: len(model.get_layer(f"decoder_stage{s}a_conv")._inbound_nodes[0].input_tensors) for s in range(5)}
    assert inputs == {0: 2, 1: 2, 2: 2, 3: 2, 4: 1}  # the last stage has no skip (full resolution)
    assert {"pixels", "stem_conv", "top_activation", "head_dropout", "final_conv", "sigmoid"} <= names
    assert model.output.shape == (None, SIZE, SIZE, 1)
    assert model.get_layer("head_dropout").rate == pytest.approx(0.3)
    # stage i joins the upsampled features with skip SKIP_LAYERS[i]
    first = model.get_layer("decoder_stage0a_conv")
    assert first.input[1].shape[-1] == model.get_layer(models.SKIP_LAYERS[0]).output.shape[-1]


@pytest.fixture(scope="module")
def random_b0_weights(tmp_path_factory) -> dict:
    """A random-init 3-channel keras.applications EfficientNetB0 encoder saved in both Keras weight formats:
    `.weights.h5` (Keras 3) and the legacy `.h5` layout of keras.applications' efficientnetb0_notop.h5."""
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(7)
    encoder = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(None, None, 3))
    folder = tmp_path_factory.mktemp("weights")
    keras_path = folder / "encoder.weights.h5"
    encoder.save_weights(keras_path)
    legacy_path = folder / "efficientnetb0_notop.h5"
    with h5py.File(legacy_path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, encoder)
    return {"encoder": encoder, "keras": keras_path, "legacy": legacy_path}


def _assert_encoder_transferred(model: keras.Model, encoder: keras.Model, channels: int, stem_init: str) -> None:
    checked = 0
    for layer in encoder.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization) or layer.name == "stem_conv":
            continue
        for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=layer.name)
        checked += 1
    assert checked > 100  # every BN/conv/SE layer of the encoder
    old = encoder.get_layer("stem_conv").get_weights()[0]  # (3, 3, 3, 32)
    new = model.get_layer("stem_conv").get_weights()[0]  # (3, 3, C, 32)
    assert new.shape == old.shape[:2] + (channels,) + old.shape[3:]
    if stem_init == "cycle":  # smp: channel i <- RGB kernel i % 3, everything scaled by 3 / C
        for i in range(channels):
            np.testing.assert_allclose(new[:, :, i], old[:, :, i % 3] * 3 / channels, rtol=1e-6)
    else:
        np.testing.assert_array_equal(new[:, :, :3], old)
        assert not new[:, :, 3:].any()


@pytest.mark.parametrize(
    "fmt,channels,stem_init", [("keras", 3, "cycle"), ("legacy", 4, "cycle"), ("keras", 4, "zero")]
)
def test_encoder_weights_from_file(random_b0_weights, fmt, channels, stem_init):
    model = models.build_unet(
        "efficientnetb0", (SIZE, SIZE, channels), encoder_weights=str(random_b0_weights[fmt]), stem_init=stem_init
    )
    _assert_encoder_transferred(model, random_b0_weights["encoder"], channels, stem_init)
    # loading weights never touches the in-model ImageNet normalization
    mean, variance = models.input_normalization_stats(channels)
    norm = models.input_normalization_layer(model)
    np.testing.assert_array_equal(norm.adapt_mean.numpy(), mean)
    np.testing.assert_array_equal(norm.adapt_variance.numpy(), variance)


def test_widen_stem_kernel_rule():
    kernel = np.arange(3 * 3 * 3 * 2, dtype="float32").reshape(3, 3, 3, 2)
    cycle = models.widen_stem_kernel(kernel, 4, "cycle")
    np.testing.assert_allclose(cycle[..., :3, :], kernel * 0.75)
    np.testing.assert_allclose(cycle[..., 3, :], kernel[..., 0, :] * 0.75)
    zero = models.widen_stem_kernel(kernel, 5, "zero")
    np.testing.assert_array_equal(zero[..., :3, :], kernel)
    assert not zero[..., 3:, :].any()
    np.testing.assert_array_equal(models.widen_stem_kernel(kernel, 3, "cycle"), kernel)
    with pytest.raises(ValueError, match="stem_init"):
        models.widen_stem_kernel(kernel, 4, "mean")


@pytest.mark.parametrize("channels", [3, 4])
def test_preprocessing_inside_model_is_imagenet_and_mask_passthrough(channels, random_b0_weights):
    """Raw 0..255 pixels in; the stem conv sees (x - IMAGENET_MEAN) / IMAGENET_STD and the mask as 0/1,
    whatever the encoder weights (None or a file)."""
    x = _pixels(channels=channels)
    expected = (x[..., :3] - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for weights in (None, str(random_b0_weights["keras"])):
        model = models.build_unet("efficientnetb0", (SIZE, SIZE, channels), encoder_weights=weights)
        stem_input = keras.Model(model.input, model.get_layer("stem_conv_pad").input)(x).numpy()
        np.testing.assert_allclose(stem_input[..., :3], expected, atol=1e-5)
        np.testing.assert_allclose(stem_input[..., 3:], x[..., 3:], atol=1e-6)


def test_imagenet_offline_fails_fast_with_url(monkeypatch):
    assert models.weights_url("efficientnetb3") == (
        "https://storage.googleapis.com/keras-applications/efficientnetb3_notop.h5"
    )

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(RuntimeError) as err:
        models.build_unet("efficientnetb3", (SIZE, SIZE, 3), encoder_weights="imagenet")
    message = str(err.value)
    assert "https://storage.googleapis.com/keras-applications/efficientnetb3_notop.h5" in message
    assert "--encoder-weights" in message


def test_bad_weights_files(tmp_path, random_b0_weights):
    with pytest.raises(FileNotFoundError, match="missing_notop.h5"):
        models.build_unet("efficientnetb0", (SIZE, SIZE, 3), encoder_weights=tmp_path / "missing_notop.h5")
    with pytest.raises(ValueError, match="efficientnetb0_notop.h5"):  # a B0 file for a B1 encoder
        models.load_reference_encoder("efficientnetb1", random_b0_weights["legacy"])


@pytest.mark.parametrize("shape,needle", [((100, 96, 3), "100"), ((96, 48, 3), "48"), ((64, 64, 1), "channels")])
def test_bad_input_shape(shape, needle):
    with pytest.raises(ValueError, match=needle):
        models.build_unet("efficientnetb0", shape)


def test_unknown_encoder():
    with pytest.raises(ValueError, match="efficientnetb9"):
        models.build_unet("efficientnetb9", (SIZE, SIZE, 3))


def test_keras_save_load_round_trip(tmp_path):
    model = models.build_unet("efficientnetb0", (SIZE, SIZE, 4), dropout=0.3)
    x = _pixels(channels=4)
    before = model(x, training=False).numpy()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = loaded(x, training=False).numpy()
    np.testing.assert_array_equal(before, after)
    assert after.shape == (2, SIZE, SIZE, 1) and after.dtype == np.float32
    assert 0.0 <= after.min() and after.max() <= 1.0
    np.testing.assert_array_equal(
        models.input_normalization_layer(loaded).adapt_variance.numpy(), models.input_normalization_stats(4)[1]
    )


def test_gradients_flow_through_all_input_channels():
    model = models.build_unet("efficientnetb0", (SIZE, SIZE, 4))
    x = tf.constant(_pixels(channels=4))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_mean(model(x, training=True))
    grad = tape.gradient(loss, x).numpy()
    per_channel = np.abs(grad).sum(axis=(0, 1, 2))
    assert per_channel.shape == (4,)
    assert np.all(per_channel > 0), per_channel


def test_mixed_precision_bf16_keeps_float32_output():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build_unet("efficientnetb0", (SIZE, SIZE, 4))
        assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
        assert model.get_layer("final_conv").compute_dtype == "bfloat16"
        x = _pixels(channels=4)
        out = model(x)
        assert model.output.dtype == "float32" and out.dtype == "float32"
        assert np.isfinite(out.numpy()).all()
        # the in-model preprocessing stays float32: ImageNet normalization and the 0/1 mask to float32 precision
        stem_input = keras.Model(model.input, model.get_layer("stem_conv_pad").input)(x)
        assert stem_input.dtype == "float32"
        expected = (x[..., :3] - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        np.testing.assert_allclose(stem_input.numpy()[..., :3], expected, atol=1e-5)
        np.testing.assert_allclose(stem_input.numpy()[..., 3], x[..., 3], atol=1e-6)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_mixed_bf16_trains_only_the_slow_depthwise_kernels_in_float32():
    """Under mixed_bfloat16 EfficientNet's 5x5 depthwise convolutions compute in float32 (oneDNN trains them slowly
    in bfloat16), its 3x3 ones in bfloat16; under float32 nothing changes, and a bf16 export computes all in bf16."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build_unet("efficientnetb0", (SIZE, SIZE, 3))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    depthwise = [layer for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]
    by_kernel = {(k, layer.compute_dtype) for layer in depthwise for k in [tuple(layer.kernel_size)]}
    assert by_kernel == {((3, 3), "bfloat16"), ((5, 5), "float32")}
    assert all(layer.variable_dtype == "float32" for layer in depthwise)
    out = model(_pixels(), training=True)
    assert out.dtype == "float32" and np.isfinite(out.numpy()).all()
    folded = fold_batchnorm(model, "bf16")
    assert {layer.compute_dtype for layer in folded.layers if isinstance(layer, keras.layers.DepthwiseConv2D)} == {
        "bfloat16"}
    plain = models.build_unet("efficientnetb0", (SIZE, SIZE, 3))
    assert {layer.compute_dtype for layer in plain.layers if isinstance(layer, keras.layers.DepthwiseConv2D)} == {
        "float32"}


def test_build_stage_model_reads_config(monkeypatch, caplog):
    cfg = INFECTION.replace(image_size=SIZE)
    model = models.build_stage_model(cfg, encoder_weights=None)
    assert model.name == "infection_unet"
    assert model.input.shape == (None, SIZE, SIZE, cfg.in_channels)
    assert model.get_layer("head_dropout").rate == pytest.approx(cfg.dropout)

    # without the override the weights come from the config ("imagenet" here; offline -> clear error)
    def offline(*args, **kwargs):
        raise Exception("offline")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(RuntimeError, match="efficientnetb0_notop.h5"):
        models.build_stage_model(cfg.replace(encoder_weights="imagenet"))
    assert models.build_stage_model(cfg.replace(encoder_weights="none")).count_params() == model.count_params()
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(layer.momentum == cfg.bn_momentum for layer in bns)
    # "auto" (the default): ImageNet when it can be had, else random init with a warning, never an error
    with caplog.at_level("WARNING", logger=models.__name__):
        assert models.choose_encoder_weights("efficientnetb0", "auto") is None
    assert "efficientnetb0 starts from random init" in caplog.text
    assert models.choose_encoder_weights("efficientnetb0", "none") == "none"


def test_dynamic_spatial_size():
    """input_shape (None, None, C) builds one model for every multiple of 32 (e.g. for serving)."""
    model = models.build_unet("efficientnetb0", (None, None, 3))
    out = model(np.zeros((1, 96, 64, 3), "float32"), training=False)
    assert out.shape == (1, 96, 64, 1)


# ---------------------------------------------------------------------------------------------------------
# The segmentation_models_pytorch layout (skips from the last block of each stride, no top conv)
# ---------------------------------------------------------------------------------------------------------

SMP = "segmentation_models_pytorch"

# The peer, smp 0.6.0 / torch 2.13.0+cpu, from `bash ../shared/bench/peer/setup_cpu_venv.sh /tmp/peer/venv` and
#   /tmp/peer/venv/bin/python ../shared/bench/peer/smp_bench.py --encoder efficientnet-b3 --in-channels 3 \
#       --size 448 --mode infer --batch 1 --steps 1 --warmup 0 --flops on       (and efficientnet-b0 / 4)
# -> "params", "fwd_flops_per_img" (conv/matmul FLOPs, 2 per MAC). HEAD and BN_STATS were counted on the same
# smp.Unet objects: HEAD = parameters of encoder._conv_head + encoder._bn1 (the 1x1 top conv smp builds but
# never calls), BN_STATS = numel of every running_mean/running_var buffer except encoder._bn1's (buffers are
# not torch parameters; Keras counts BN moving statistics as non-trainable weights).
PEER = {  # (our encoder, channels): (params, head params, BN statistics, forward FLOPs per 448 px image)
    ("efficientnetb3", 3): (13_159_033, 592_896, 86_208, 23_371_667_200),
    ("efficientnetb0", 4): (6_251_757, 412_160, 41_440, 18_142_976_768),
}
PEER_SIZE = 448
#: smp 0.6.0's EfficientNet encoder out_channels (stride 2, 4, 8, 16, 32), efficient_net_encoders[...]["params"].
SMP_CHANNELS = {
    0: (32, 24, 40, 112, 320), 1: (32, 24, 40, 112, 320), 2: (32, 24, 48, 120, 352), 3: (40, 32, 48, 136, 384),
    4: (48, 32, 56, 160, 448), 5: (48, 40, 64, 176, 512), 6: (56, 40, 72, 200, 576), 7: (64, 48, 80, 224, 640),
}


@pytest.mark.parametrize(
    "index", [0, 3, *(pytest.param(i, marks=pytest.mark.slow) for i in (1, 2, 4, 5, 6, 7))]
)
def test_smp_layout_taps_last_block_of_each_stride(index):
    """Stem activation + last block of strides 4, 8, 16, 32, with smp's channels, for every EfficientNet."""
    encoder = models.ENCODERS[f"efficientnetb{index}"](include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    skips, bottleneck = models.unet_feature_layers(encoder, SMP)
    taps = [*reversed(skips), bottleneck]  # stride 2, 4, 8, 16, 32
    assert taps[0] == "stem_activation"
    shapes = [tuple(encoder.get_layer(name).output.shape[1:]) for name in taps]
    assert shapes == [(SIZE // s, SIZE // s, c) for s, c in zip((2, 4, 8, 16, 32), SMP_CHANNELS[index])]
    block_ends: dict[str, str] = {}  # block -> its last layer (its output), blocks in graph order
    for layer in encoder.layers:
        if layer.name.startswith("block"):
            block_ends[layer.name.split("_")[0]] = layer.name
    ends = list(block_ends.values())
    for name, stride in zip(taps[1:], (4, 8, 16, 32)):  # a block output, and the next block is coarser
        i = ends.index(name)
        assert i == len(ends) - 1 or encoder.get_layer(ends[i + 1]).output.shape[1] < SIZE // stride
    if index == 0:  # block7a has no residual; smp 0.6.0 taps block5a at stride 16 for B0, we the last (5c)
        assert (skips, bottleneck) == (("block5c_add", "block3b_add", "block2b_add", "stem_activation"),
                                       "block7a_project_bn")
    if index == 3:
        assert (skips, bottleneck) == (("block5e_add", "block3c_add", "block2c_add", "stem_activation"),
                                       "block7b_add")


@pytest.mark.parametrize("encoder,channels", sorted(PEER))
def test_smp_layout_params_and_flops_equal_the_peer(encoder, channels):
    from covidseg_tf.flops import conv_flops_per_image

    peer_params, head, bn_stats, peer_flops = PEER[(encoder, channels)]
    model = models.build_unet(encoder, (PEER_SIZE, PEER_SIZE, channels), layout=SMP)
    assert "top_conv" not in {layer.name for layer in model.layers}
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == peer_params - head  # smp's unused _conv_head/_bn1 left out
    # non-trainable: BN moving statistics (torch buffers) + our Normalization's 2C+1 statistics
    assert model.count_params() == peer_params - head + bn_stats + 2 * channels + 1
    flops = conv_flops_per_image(model)["total"]
    assert abs(flops - peer_flops) <= 0.02 * peer_flops, (flops, peer_flops)
    # and the old layout costs more: its wider skips and 1x1 top conv
    old = models.build_unet(encoder, (PEER_SIZE, PEER_SIZE, channels))
    assert conv_flops_per_image(old)["total"] > 1.2 * flops


def test_smp_layout_keras_save_load_round_trip(tmp_path):
    model = models.build_unet("efficientnetb0", (SIZE, SIZE, 4), dropout=0.3, layout=SMP)
    x = _pixels(channels=4)
    before = model(x, training=False).numpy()
    path = tmp_path / "smp.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # nothing but the file: the layout is in the saved graph
    np.testing.assert_array_equal(before, loaded(x, training=False).numpy())
    assert loaded.count_params() == model.count_params()
    assert loaded.get_layer("decoder_stage0a_conv").input[1].shape[-1] == 112  # block5c_add, not block6a
    assert "top_conv" not in {layer.name for layer in loaded.layers}


def test_smp_layout_takes_encoder_weights_from_file(random_b0_weights):
    """The top conv of the weights file has no twin in this layout: skipped, everything else copied."""
    model = models.build_unet(
        "efficientnetb0", (SIZE, SIZE, 4), encoder_weights=str(random_b0_weights["keras"]), layout=SMP
    )
    encoder = random_b0_weights["encoder"]
    names = {layer.name for layer in model.layers}
    weighted = [
        layer for layer in encoder.layers if layer.weights and not isinstance(layer, keras.layers.Normalization)
    ]
    assert {layer.name for layer in weighted if layer.name not in names} == {"top_conv", "top_bn"}
    copied = [layer for layer in weighted if layer.name in names and layer.name != "stem_conv"]
    assert len(copied) > 100
    for layer in copied:
        for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=layer.name)


def test_build_stage_model_honours_unet_layout():
    cfg = INFECTION.replace(image_size=SIZE, encoder_weights="none")
    assert cfg.unet_layout == SMP  # the default, chosen by measurement (bench/RESULTS.md)
    old = models.build_stage_model(cfg.replace(unet_layout="segmentation_models"))
    new = models.build_stage_model(cfg)
    assert "top_conv" in {layer.name for layer in old.layers}
    assert "top_conv" not in {layer.name for layer in new.layers}
    assert new.count_params() < old.count_params()
    assert new.get_layer("decoder_stage3a_conv").input[1].shape[-1] == 32  # stem_activation
    with pytest.raises(ValueError, match="unknown U-Net layout 'smp'"):
        models.build_stage_model(cfg.replace(unet_layout="smp"))


def test_encoder_weights_from_a_trained_stage_model(tmp_path):
    """A lung model's .keras file starts an infection model: encoder and decoder copied, stem widened by the cycle
    rule, at another input size; another encoder size is refused."""
    keras.utils.set_random_seed(3)
    lung = models.build_unet("efficientnetb0", (SIZE, SIZE, 3), encoder_weights=None, name="lung")
    path = tmp_path / "lung.keras"
    lung.save(path)
    inf = models.build_unet("efficientnetb0", (2 * SIZE, 2 * SIZE, 4), encoder_weights=path, name="infection")
    for name in ("block3b_project_conv", "decoder_stage2a_conv", "final_conv"):
        for a, b in zip(lung.get_layer(name).get_weights(), inf.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    stem = lung.get_layer(models.STEM_LAYER).get_weights()[0]
    np.testing.assert_allclose(inf.get_layer(models.STEM_LAYER).get_weights()[0],
                               models.widen_stem_kernel(stem, 4, "cycle"))
    with pytest.raises(ValueError, match="no encoder layer"):
        models.build_unet("efficientnetb1", (SIZE, SIZE, 3), encoder_weights=path)
