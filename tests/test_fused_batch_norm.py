"""FusedBatchNormalization (covidseg_tf.batchnorm) against keras.layers.BatchNormalization, and the U-Net built
with StageConfig.batch_norm = "fused".

Tolerances (float32): outputs and gradients within REL = 1e-5 of the largest magnitude of Keras' value
(`assert_close`); moving statistics within REL relative per channel. The moving variance matches Keras' (biased
batch variance) because the layer undoes the kernel's Bessel correction; `test_moving_statistics_match_keras` also
shows that the kernel's own unbiased update would be off by the factor N / (N - 1), far outside REL at the N used.
Mixed precision: bfloat16 outputs within 2 bfloat16 ulps (BF16_REL = 2**-7) of Keras' rounded output.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize_batchnorms

from covidseg_tf.batchnorm import (
    BF16_KERNEL_CHANNELS,
    MIN_FUSED_EPSILON,
    FusedBatchNormalization,
    with_batch_norm,
)
from covidseg_tf.config import default_config
from covidseg_tf.models import build_stage_model
from covidseg_tf.optimize import FoldedBatchNorm, fold_batchnorm, foldable_pairs, frozen_stage

REL = 1e-5
BF16_REL = 2.0**-7
SIZE = 64
SHAPE = (3, 4, 5, 6)  # N = 3 * 4 * 5 = 60 values per channel: N / (N - 1) = 1.017


def assert_close(got, ref, rel: float = REL, what: str = "") -> None:
    """max |got - ref| <= rel * max |ref| (scale-relative: BN outputs cross zero)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, what
    err, scale = np.max(np.abs(got - ref)), np.max(np.abs(ref))
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


def make_pair(momentum: float = 0.9, dtype: str = "float32", shape: tuple[int, ...] = SHAPE, **kwargs):
    """A Keras and a fused BN layer built on `shape` with the same non-trivial gamma/beta."""
    rng = np.random.default_rng(7)
    keras_bn = keras.layers.BatchNormalization(momentum=momentum, dtype=dtype, **kwargs)
    fused_bn = FusedBatchNormalization(momentum=momentum, dtype=dtype, **kwargs)
    gamma, beta = rng.uniform(0.5, 1.5, shape[-1]), rng.normal(0, 0.3, shape[-1])
    for layer in (keras_bn, fused_bn):
        layer.build(shape)
        if layer.scale:
            layer.gamma.assign(gamma.astype("float32"))
        if layer.center:
            layer.beta.assign(beta.astype("float32"))
    return keras_bn, fused_bn


def batch(seed: int, dtype: str = "float32", shape: tuple[int, ...] = SHAPE) -> tf.Tensor:
    """Channels with distinct offsets and scales (far from already normalized)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, shape) * rng.uniform(0.5, 4, shape[-1]) + rng.uniform(-3, 3, shape[-1])
    return tf.constant(x.astype(dtype))


def train_step(layer, x, upstream):
    """Output and gradients of sum(upstream * layer(x, training=True)) w.r.t. x, gamma, beta."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return y, tape.gradient(loss, [x, layer.gamma, layer.beta])


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_training_output_and_gradients_match_keras(graph):
    keras_bn, fused_bn = make_pair()
    x = batch(0)
    upstream = tf.constant(np.random.default_rng(1).normal(size=SHAPE).astype("float32"))
    keras_step, fused_step = (tf.function(train_step) if graph else train_step for _ in range(2))
    y_ref, grads_ref = keras_step(keras_bn, x, upstream)
    y, grads = fused_step(fused_bn, x, upstream)
    assert y.dtype == tf.float32
    assert_close(y, y_ref, what="output")
    assert np.abs(np.mean(y_ref.numpy(), axis=(0, 1, 2)) - fused_bn.beta.numpy()).max() < 1e-5  # really normalized
    for name, g, g_ref in zip(("d/dx", "d/dgamma", "d/dbeta"), grads, grads_ref):
        assert_close(g, g_ref, what=name)


def test_training_step_is_one_fused_op():
    _, fused_bn = make_pair()
    upstream = tf.ones(SHAPE)
    graph = tf.function(train_step).get_concrete_function(fused_bn, batch(0), upstream).graph
    types = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in types and "FusedBatchNormGradV3" in types
    assert "Mean" not in types  # no tf.nn.moments: the statistics come from the kernel


def test_moving_statistics_match_keras():
    keras_bn, fused_bn = make_pair(momentum=0.9)
    n = SHAPE[0] * SHAPE[1] * SHAPE[2]
    mean_np, var_np = np.zeros(SHAPE[-1]), np.ones(SHAPE[-1])  # numpy reference of Keras' rule (biased variance)
    unbiased_np = np.ones(SHAPE[-1])  # what the kernel's own moving average (unbiased variance) would give
    for step in range(5):
        x = batch(10 + step)
        keras_bn(x, training=True)
        fused_bn(x, training=True)
        xs = x.numpy().astype(np.float64)
        mean_np = 0.9 * mean_np + 0.1 * xs.mean(axis=(0, 1, 2))
        var_np = 0.9 * var_np + 0.1 * xs.var(axis=(0, 1, 2))
        unbiased_np = 0.9 * unbiased_np + 0.1 * xs.var(axis=(0, 1, 2), ddof=1)
    for name in ("moving_mean", "moving_variance"):
        ref = getattr(keras_bn, name).numpy()
        got = getattr(fused_bn, name).numpy()
        np.testing.assert_allclose(got, ref, rtol=REL, atol=REL * np.abs(ref).max(), err_msg=name)
    np.testing.assert_allclose(fused_bn.moving_mean.numpy(), mean_np, rtol=REL, atol=1e-6)
    np.testing.assert_allclose(fused_bn.moving_variance.numpy(), var_np, rtol=REL)
    # the tolerance is tight enough to tell the biased from the unbiased update (here by up to ~1 / N)
    gap = np.max(np.abs(unbiased_np - var_np) / var_np)
    assert gap > 100 * REL, f"N = {n}: the unbiased update differs by only {gap:.2g}"


def test_inference_is_keras_arithmetic():
    keras_bn, fused_bn = make_pair()
    rng = np.random.default_rng(3)
    mean, variance = rng.normal(0, 1, SHAPE[-1]), rng.uniform(0.5, 2, SHAPE[-1])
    for layer in (keras_bn, fused_bn):
        layer.moving_mean.assign(mean.astype("float32"))
        layer.moving_variance.assign(variance.astype("float32"))
    x = batch(4)
    assert not fused_bn.fuses(x, training=False)
    np.testing.assert_array_equal(fused_bn(x, training=False).numpy(), keras_bn(x, training=False).numpy())
    fused_bn.trainable = keras_bn.trainable = False  # a frozen BN normalizes with its moving statistics
    assert not fused_bn.fuses(x, training=True)
    np.testing.assert_array_equal(fused_bn(x, training=True).numpy(), keras_bn(x, training=True).numpy())


def test_fuses_only_where_the_kernel_applies():
    x = batch(0)
    assert FusedBatchNormalization().fuses(x, training=True)
    assert not FusedBatchNormalization().fuses(x, training=False)
    assert not FusedBatchNormalization().fuses(x, training=None)
    assert not FusedBatchNormalization(axis=1).fuses(x, training=True)
    assert not FusedBatchNormalization(epsilon=MIN_FUSED_EPSILON / 2).fuses(x, training=True)
    assert not FusedBatchNormalization().fuses(x, training=True, mask=tf.ones(SHAPE[:3], bool))
    assert not FusedBatchNormalization().fuses(tf.zeros((4, 6)), training=True)
    assert not FusedBatchNormalization().fuses(tf.cast(x, tf.float64), training=True)


@pytest.mark.parametrize("kwargs", [{"axis": 1}, {"center": False, "scale": False}], ids=["axis1", "no-affine"])
def test_other_configurations_match_keras(kwargs):
    """axis=1 falls back to Keras' call; no gamma/beta is fused with ones/zeros."""
    keras_bn = keras.layers.BatchNormalization(momentum=0.9, **kwargs)
    fused_bn = FusedBatchNormalization(momentum=0.9, **kwargs)
    x = batch(5)
    for _ in range(2):
        assert_close(fused_bn(x, training=True), keras_bn(x, training=True), what="output")
    assert_close(fused_bn.moving_variance, keras_bn.moving_variance, what="moving variance")


def test_2d_input_falls_back_to_keras():
    keras_bn, fused_bn = keras.layers.BatchNormalization(), FusedBatchNormalization()
    x = tf.constant(np.random.default_rng(2).normal(3, 2, (8, 5)).astype("float32"))
    np.testing.assert_array_equal(fused_bn(x, training=True).numpy(), keras_bn(x, training=True).numpy())


@pytest.mark.parametrize("channels", [6, 16])
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_matches_keras(policy, channels):
    """The kernel takes the half-precision input as it is, but a bfloat16 input with channels oneDNN's bfloat16
    kernel does not vectorise (6, not a multiple of BF16_KERNEL_CHANNELS) as float32; gamma/beta/statistics stay
    float32 and the layer returns the policy's dtype either way."""
    shape = (*SHAPE[:-1], channels)
    keras_bn, fused_bn = make_pair(dtype=policy, shape=shape)
    half = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float16
    x = tf.cast(batch(6, shape=shape), half)
    upstream = tf.constant(np.random.default_rng(1).normal(size=shape).astype("float32"))
    graph = tf.function(train_step).get_concrete_function(fused_bn, x, upstream).graph
    (kernel,) = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
    as_float32 = policy == "mixed_bfloat16" and channels % BF16_KERNEL_CHANNELS != 0
    assert kernel.get_attr("T") == (tf.float32 if as_float32 else half)
    y_ref, grads_ref = train_step(keras_bn, x, upstream)
    y, grads = train_step(fused_bn, x, upstream)
    assert y.dtype == half and y_ref.dtype == half
    assert fused_bn.gamma.dtype == "float32" and fused_bn.moving_variance.dtype == "float32"
    assert_close(y, y_ref, BF16_REL, "output")
    assert grads[0].dtype == half
    for name, g, g_ref in zip(("d/dx", "d/dgamma", "d/dbeta"), grads, grads_ref):
        assert_close(g, g_ref, BF16_REL, name)
    # the statistics are computed in float32 from the same half-precision values
    assert_close(fused_bn.moving_mean, keras_bn.moving_mean, 1e-4, "moving mean")
    assert_close(fused_bn.moving_variance, keras_bn.moving_variance, 1e-4, "moving variance")


def test_get_config_round_trips():
    layer = FusedBatchNormalization(momentum=0.9, epsilon=1e-3, center=False, name="bn")
    config = layer.get_config()
    again = FusedBatchNormalization.from_config(config)
    assert type(again) is FusedBatchNormalization and again.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "covidseg_tf>FusedBatchNormalization"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is FusedBatchNormalization and restored.get_config() == config
    assert isinstance(restored, keras.layers.BatchNormalization)


# --------------------------------------------------------------------------------------------- the U-Net
@pytest.fixture(scope="module")
def models() -> tuple[keras.Model, keras.Model]:
    """A small Stage-2 U-Net built with each batch_norm, same seed."""
    cfg = default_config("infection").replace(image_size=SIZE, encoder_weights="none")
    built = []
    for batch_norm in ("keras", "fused"):
        keras.utils.set_random_seed(3)
        built.append(build_stage_model(cfg.replace(batch_norm=batch_norm)))
    return built[0], built[1]


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    x = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 4)).astype("float32")
    x[..., 3] = x[..., 3] > 100
    return x


def copy_of(model: keras.Model) -> keras.Model:
    """A copy with the same layer classes and weights (training it leaves `model` alone)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()
    return copy


def test_fused_unet_has_only_fused_batchnorms_and_the_same_weights(models, pixels):
    keras_model, fused_model = models
    bns = [layer for layer in fused_model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) > 50 and all(type(layer) is FusedBatchNormalization for layer in bns)
    assert any(layer.name.startswith("decoder_") for layer in bns) and any(layer.name.startswith("block")
                                                                          for layer in bns)
    assert not any(type(layer) is FusedBatchNormalization for layer in keras_model.layers)

    def names(model):  # keras auto-names the preprocessing layers per session (rescaling, rescaling_1, ...)
        return [layer.name for layer in model.layers if not isinstance(layer, (keras.layers.Rescaling,
                                                                               keras.layers.Normalization))]

    assert names(fused_model) == names(keras_model)
    swapped = with_batch_norm(keras_model, "fused")
    assert [layer.name for layer in swapped.layers] == [layer.name for layer in keras_model.layers]
    assert fused_model.name == keras_model.name
    assert {layer.momentum for layer in bns} == {default_config("infection").bn_momentum}
    for w, w_ref in zip(fused_model.weights, keras_model.weights):
        assert w.path.split("/")[-1] == w_ref.path.split("/")[-1]
        np.testing.assert_array_equal(w.numpy(), w_ref.numpy(), err_msg=w.path)
    np.testing.assert_array_equal(fused_model(pixels, training=False).numpy(),
                                  keras_model(pixels, training=False).numpy())


def test_fused_unet_train_step_matches_keras(models, pixels):
    """One forward/backward in training mode of the whole U-Net.

    Through ~80 BatchNorms in training mode (N = 8 values per channel at stride 32 here) the gradients are
    chaotic in float32: Keras' own gradients move by about 1 % (relative to their global norm) when the input
    moves by one ulp, and some (the beta of a BN followed by another BN: zero in exact arithmetic) are pure
    round-off. So the fused model's gradients are held to that noise floor: their distance from Keras' must be
    below twice the distance the one-ulp perturbation causes.
    """
    keras_model, fused_model = (copy_of(m) for m in models)
    assert type(fused_model.get_layer("decoder_stage0a_bn")) is FusedBatchNormalization
    for layer in keras_model.layers + fused_model.layers:
        if isinstance(layer, keras.layers.Dropout):  # the head's dropout and EfficientNet's drop-connect
            layer.rate = 0.0
    y = (np.random.default_rng(2).random((2, SIZE, SIZE, 1)) > 0.7).astype("float32")
    start = [w.numpy() for w in keras_model.weights]

    def grads(model, x):
        for w, value in zip(model.weights, start):  # every pass from the same moving statistics
            w.assign(value)
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.binary_crossentropy(y, p))
        return p, tape.gradient(loss, model.trainable_weights)

    def gap(g, g_ref) -> float:
        """|g - g_ref| / |g_ref| over all trainable weights at once."""
        return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(g, g_ref))
                             / sum(np.sum(np.square(b)) for b in g_ref)))

    p_ref, g_ref = grads(keras_model, pixels)
    _, g_ulp = grads(keras_model, pixels * np.float32(1 + 2**-23))
    stats_ref = [w.numpy() for w in keras_model.non_trainable_weights if "moving" in w.path]
    p, g = grads(fused_model, pixels)
    stats = [w.numpy() for w in fused_model.non_trainable_weights if "moving" in w.path]
    assert_close(p, p_ref, 1e-4, "probabilities")
    noise = gap(g_ulp, g_ref)
    assert 0 < gap(g, g_ref) < 2 * noise, f"fused {gap(g, g_ref):.3g}, one-ulp noise floor {noise:.3g}"
    assert len(stats) == len(stats_ref) > 100
    for a, b in zip(stats, stats_ref):  # means of BN outputs are ~1e-8: round-off, hence atol
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg="moving statistics")


def test_fused_unet_saves_and_loads(models, pixels, tmp_path: Path):
    from covidseg_tf.inference import load_stage

    fused_model = models[1]
    path = tmp_path / "fused.keras"
    fused_model.save(path)
    loaded = load_stage(path)
    assert sum(type(layer) is FusedBatchNormalization for layer in loaded.layers) > 50
    np.testing.assert_array_equal(loaded(pixels, training=False).numpy(), fused_model(pixels, training=False).numpy())


def test_weights_move_between_keras_and_fused_but_not_through_weights_files(models, tmp_path: Path):
    """get/set_weights (with_batch_norm, stage transfer by layer name) work across the two classes; a .weights.h5
    file (a run's backup) addresses layers by class name and does not, which is why a run cannot change
    --batch-norm (test_rerun_cannot_change_batch_norm)."""
    keras_model, fused_model = models
    source = copy_of(keras_model)
    randomize_batchnorms(source, seed=5)
    swapped = with_batch_norm(source, "fused")
    assert sum(type(layer) is FusedBatchNormalization for layer in swapped.layers) > 50
    for w, w_ref in zip(swapped.weights, source.weights):
        np.testing.assert_array_equal(w.numpy(), w_ref.numpy(), err_msg=w.path)
    back = with_batch_norm(swapped, "keras")
    assert not any(type(layer) is FusedBatchNormalization for layer in back.layers)
    assert with_batch_norm(back, "keras") is back
    with pytest.raises(ValueError, match="unknown batch_norm"):
        with_batch_norm(back, "cudnn")
    path = tmp_path / "backup.weights.h5"
    source.save_weights(path)
    with pytest.raises(ValueError, match="could not be loaded"), pytest.warns(UserWarning):
        copy_of(fused_model).load_weights(path)


def test_rerun_cannot_change_batch_norm(tmp_path: Path):
    """--batch-norm is a model flag of a run; a run started before the flag existed counts as "keras"."""
    import json

    from covidseg_tf import train

    def check(started_config: dict, *flags: str):
        (tmp_path / train.CONFIG_FILE).write_text(json.dumps({"config": started_config, "args": {}}))
        args = train.build_parser().parse_args(["--stage", "lung", *flags])
        return train.check_rerun(tmp_path, train.config_from_args(args), args)

    started = default_config("lung").to_dict()
    assert "--batch-norm" not in check(started)
    older = {k: v for k, v in started.items() if k != "batch_norm"}  # config.json of a run before the flag
    assert "--batch-norm" not in check(older, "--batch-norm", "keras")
    with pytest.raises(train.UsageError) as e:
        check(older, "--batch-norm", "fused")
    assert "--batch-norm keras -> fused" in e.value.message
    with pytest.raises(train.UsageError) as e:
        check(started, "--batch-norm", "cudnn")
    assert e.value.message == "--batch-norm must be one of keras, fused, got cudnn"


def test_folding_a_fused_unet_gives_the_keras_output(models, pixels):
    keras_model, fused_model = models
    randomize_batchnorms(keras_model, seed=1)
    fused_model.set_weights(keras_model.get_weights())
    ref = keras_model(pixels, training=False).numpy()
    pairs = foldable_pairs(fused_model)
    assert len(pairs) == sum(isinstance(layer, FusedBatchNormalization) for layer in fused_model.layers)
    folded = fold_batchnorm(fused_model, "fp32")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert sum(isinstance(layer, FoldedBatchNorm) for layer in folded.layers) == len(pairs)
    np.testing.assert_allclose(folded(pixels, training=False).numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(frozen_stage(fused_model, "fp32")(pixels).numpy(), ref, atol=1e-5)


def test_unknown_batch_norm_is_refused():
    with pytest.raises(ValueError, match="unknown batch_norm"):
        build_stage_model(default_config("lung").replace(image_size=32, encoder="efficientnetb0",
                                                          encoder_weights="none", batch_norm="cudnn"))
