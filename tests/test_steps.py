"""covidseg_tf.steps: train and test steps that drop their traced graph (issue 26, training memory)."""

from __future__ import annotations

import gc
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import func_graph, ops

from covidseg_tf.activations import xla_swish
from covidseg_tf.batchnorm import FusedBatchNormalization
from covidseg_tf.optimizers import FusedAdamW
from covidseg_tf.steps import ReleasedStep, release_traced_steps


def _model(release: bool) -> keras.Model:
    """A small net with the custom gradients the U-Nets have (the fused BatchNorm linked to the XLA swish)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
                              FusedBatchNormalization(), keras.layers.Activation(xla_swish),
                              keras.layers.Conv2D(1, 1, activation="sigmoid")],
                             name="released" if release else "kerass")
    model.compile(optimizer=FusedAdamW(learning_rate=1e-2, weight_decay=1e-3), loss="binary_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy()])
    if release:
        assert release_traced_steps(model)
    return model


def _data(n: int = 5):
    rng = np.random.default_rng(1)
    x = rng.random((n, 8, 8, 3)).astype("float32")
    y = (rng.random((n, 8, 8, 1)) > 0.5).astype("float32")
    return x, y


def _graphs_of(model: keras.Model, collect: bool = True) -> list[str]:
    """The graphs holding ops of `model`'s layers (its traced steps), after a garbage collection or (collect=False)
    including garbage not yet collected."""
    if collect:
        gc.collect()
    scope = re.compile(rf"{model.name}(_\d+)?/")  # released/conv2d/..., released_1/... where a scope is reused
    return [g.name for g in gc.get_objects() if isinstance(g, func_graph.FuncGraph)
            and any(scope.match(op.name) for op in g.get_operations())]


def test_fit_and_evaluate_give_keras_results_and_keep_no_graph():
    """fit() with validation, train_on_batch and evaluate() give Keras' own losses and weights; afterwards no step
    graph is alive and the gradient registry is back to its size (Keras' functions keep both: the check is real)."""
    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)  # batches of 2, 2 and 1: one trace with batch None
    results = {}
    for release in (True, False):  # released first: Keras' graphs stay alive (the registry holds them)
        registered = len(ops.gradient_registry._registry)
        model = _model(release)
        history = model.fit(ds, validation_data=ds, epochs=2, verbose=0)
        on_batch = model.train_on_batch(x[:4], y[:4], return_dict=True)
        evaluated = model.evaluate(ds, verbose=0, return_dict=True)
        results[release] = (history.history, on_batch, evaluated, [w.numpy() for w in model.weights])
        if release:
            assert model.train_function.traces == 2 and model.test_function.traces == 1  # fit's, train_on_batch's
        kept = (len(ops.gradient_registry._registry) - registered, _graphs_of(model))
        assert (kept == (0, [])) if release else (kept[0] > 0 and kept[1]), kept
        del model, history
    (h0, b0, e0, w0), (h1, b1, e1, w1) = results[False], results[True]
    assert h1.keys() == h0.keys()
    for key in h0:
        np.testing.assert_allclose(h1[key], h0[key], rtol=1e-5, err_msg=key)
    for want, got in ((b0, b1), (e0, e1)):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5)
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_graph_is_collected_before_the_step_runs():
    """The released graph is a reference cycle: collected right after the trace, not whenever Python's collector
    next runs (during a long step it has no reason to)."""
    x, y = _data(4)
    gc.collect()
    gc.disable()
    try:
        model = _model(release=True)
        model.train_on_batch(x, y)
        assert _graphs_of(model, collect=False) == []
    finally:
        gc.enable()


def test_a_failed_trace_raises_and_leaves_no_gradient_registered():
    model = _model(release=True)
    x, y = _data(4)
    registered = len(ops.gradient_registry._registry)
    with pytest.raises(ValueError):  # targets of 2 channels for a 1-channel output: the loss fails in the trace
        model.train_on_batch(x, np.concatenate([y, y], -1))
    assert len(ops.gradient_registry._registry) == registered
    assert model.train_function.traces == 0
    assert np.isfinite(model.train_on_batch(x, y, return_dict=True)["loss"])


def test_a_batch_that_fits_no_trace_is_traced_again_with_relaxed_shapes():
    """train_on_batch traces for the batch's exact shape; another batch size traces once more, relaxed to the
    shapes both share, and every later size fits that trace."""
    model = _model(release=True)
    x, y = _data(4)
    for n in (4, 4, 3, 2, 1):
        logs = model.train_on_batch(x[:n], y[:n], return_dict=True)
        assert np.isfinite(logs["loss"])
    assert model.train_function.traces == 2


def test_an_exhausted_iterator_stops_the_epoch():
    model = _model(release=True)
    x, y = _data(2)
    iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(2))
    assert "loss" in model.train_function(iterator)
    with pytest.raises(StopIteration):
        model.train_function(iterator)


@pytest.mark.parametrize("compile_kw", [{"run_eagerly": True}, {"steps_per_execution": 2}])
def test_models_keras_runs_otherwise_keep_kerass_functions(compile_kw):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", **compile_kw)
    assert not release_traced_steps(model)
    assert model.train_function is None  # Keras makes its own at fit()
    assert not isinstance(model.make_train_function() or model.train_function, ReleasedStep)
