"""FusedAdamW (covidseg_tf.optimizers): Keras' AdamW arithmetic in one fused op per variable (issue 26)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidseg_tf.config import INFECTION, LUNG
from covidseg_tf.optimizers import FusedAdamW, make_optimizer


def _model() -> keras.Model:
    # no bias before the BatchNorm: its gradient is rounding noise, which Adam's 1/sqrt(v) would amplify
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
                             keras.layers.BatchNormalization(), keras.layers.Activation("swish"),
                             keras.layers.Conv2D(1, 1, activation="sigmoid")])


def _train(optimizer_class, steps: int = 4, **kw) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = _model()
    model.compile(optimizer=optimizer_class(learning_rate=1e-2, **kw), loss="binary_crossentropy")
    rng = np.random.default_rng(1)
    x = rng.random((4, 8, 8, 3)).astype("float32")
    y = (rng.random((4, 8, 8, 1)) > 0.5).astype("float32")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


@pytest.mark.parametrize("kw", [{"weight_decay": 1e-2}, {"weight_decay": 1e-3, "clipnorm": 0.1}])
def test_fused_adamw_trains_like_keras_adamw(kw):
    """The same weights and optimizer state as keras.optimizers.AdamW after a few steps (up to float rounding)."""
    want, got = _train(keras.optimizers.AdamW, **kw), _train(FusedAdamW, **kw)
    for a, b in zip(want.weights + want.optimizer.variables, got.weights + got.optimizer.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert int(got.optimizer.iterations) == 4


def test_fused_adamw_traces_a_few_ops_per_variable():
    """One ResourceApplyAdam and one weight decay op per variable, not Keras' ~50 ops: the train function's graph
    (and the memory it holds) is mostly the optimizer otherwise."""
    model = keras.Sequential([keras.Input((4,)), *[keras.layers.Dense(4) for _ in range(10)]])  # 20 variables
    counts = {}
    for cls in (keras.optimizers.AdamW, FusedAdamW):
        opt = cls(learning_rate=1e-3, weight_decay=1e-4)
        opt.build(model.trainable_variables)
        grads = [tf.zeros_like(v) for v in model.trainable_variables]
        graph = tf.function(lambda opt=opt, grads=grads: opt.apply(grads, model.trainable_variables)) \
            .get_concrete_function().graph
        ops = [op.type for op in graph.get_operations()]
        counts[cls.__name__] = len(ops)
        if cls is FusedAdamW:
            assert ops.count("ResourceApplyAdam") == ops.count("ResourceApplyGradientDescent") == 20
    assert counts["FusedAdamW"] < 12 * 20 < counts["AdamW"], counts


def test_fused_adamw_has_adamws_variables_and_config():
    """A run's backup saved with AdamW restores into FusedAdamW (same variables, same order and shapes)."""
    model = _model()
    a, b = keras.optimizers.AdamW(), FusedAdamW()
    a.build(model.trainable_variables)
    b.build(model.trainable_variables)
    assert [(v.name, v.shape) for v in a.variables] == [(v.name, v.shape) for v in b.variables]
    assert {k: v for k, v in b.get_config().items() if k != "name"} == \
        {k: v for k, v in a.get_config().items() if k != "name"}


def test_make_optimizer_is_the_stages_fused_adamw():
    for cfg in (LUNG, INFECTION):
        opt = make_optimizer(cfg)
        assert isinstance(opt, FusedAdamW)
        assert opt.weight_decay == pytest.approx(cfg.weight_decay) and opt.clipnorm == cfg.clipnorm
        assert float(opt.learning_rate) == pytest.approx(cfg.learning_rate)
