"""covidseg_tf.recompute: recipes check their steps, compute what their steps say, and `again` makes a marked tensor
from them (in its dtype, after the tensors it is told to wait for) or hands back an unmarked one as it is."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from covidseg_tf import recompute

EPS = 1e-3


def _stats(rng: np.random.Generator, c: int) -> list[tf.Tensor]:
    """mean, variance, gamma, beta for `c` channels."""
    return [tf.constant(v, tf.float32) for v in (rng.normal(0, 1, c), rng.uniform(0.5, 2, c), rng.normal(1, 0.3, c),
                                                  rng.normal(0, 0.3, c))]


def _numpy_recipe(x, mean, variance, gamma, beta, paddings) -> np.ndarray:
    y = (x - mean) / np.sqrt(variance + EPS) * gamma + beta
    return np.pad(y / (1 + np.exp(-y)), paddings)


def test_value_follows_the_steps():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(0, 2, (2, 4, 5, 3)), tf.float32)
    stats = _stats(rng, 3)
    paddings = ((0, 0), (0, 1), (1, 0), (0, 0))
    steps = (("batch_norm", EPS), ("swish",), ("pad", paddings))
    got = recompute.value(steps, [x, *stats]).numpy()
    want = _numpy_recipe(x.numpy(), *(t.numpy() for t in stats), paddings)
    assert got.shape == (2, 5, 6, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_then_and_again_make_a_marked_tensor_in_its_dtype():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(0, 2, (1, 3, 3, 2)), tf.float32)
    stats = _stats(rng, 2)
    y = recompute.mark(tf.identity(x), (("batch_norm", EPS),), x, *stats)
    z = recompute.then(y, tf.cast(y, tf.bfloat16), ("swish",))
    assert recompute.recipe_of(z).steps == (("batch_norm", EPS), ("swish",))
    z_again = recompute.again(z, after=[])
    assert z_again.dtype == tf.bfloat16
    want = _numpy_recipe(x.numpy(), *(t.numpy() for t in stats), ((0, 0),) * 4)
    np.testing.assert_allclose(z_again.numpy().astype(np.float32), want, rtol=2**-8, atol=1e-6)


def test_unmarked_tensors_pass_through():
    t = tf.ones((1, 2, 2, 1))
    assert recompute.recipe_of(t) is None
    assert recompute.again(t, after=[]) is t
    out = tf.zeros((1, 2, 2, 1))
    assert recompute.then(t, out, ("swish",)) is out and recompute.recipe_of(out) is None


@pytest.mark.parametrize("steps, n_args, message", [
    ((("swish",),), 0, "starts with a batch_norm"),
    ((("batch_norm", EPS), ("relu",)), 5, "unknown recipe steps"),
    ((("batch_norm", EPS), ("swish",)), 4, "reads 5 tensors, got 4"),
])
def test_bad_recipes_are_refused(steps, n_args, message):
    with pytest.raises(ValueError, match=message):
        recompute.mark(tf.ones((1,)), steps, *[tf.ones((1,))] * n_args)


def test_again_waits_for_the_tensors_it_is_told_to():
    """In a graph, the recomputation runs after `after` (a control input of the XLA call), not when its inputs
    are ready in the forward pass."""
    rng = np.random.default_rng(2)
    stats = _stats(rng, 2)

    @tf.function
    def f(x, w):
        y = recompute.mark(x * 2.0, (("batch_norm", EPS),), x, *stats)
        return recompute.again(y, after=[w])

    graph = f.get_concrete_function(tf.TensorSpec((1, 2, 2, 2)), tf.TensorSpec(())).graph
    calls = [op for op in graph.get_operations() if op.node_def.attr["_XlaMustCompile"].b]
    assert len(calls) == 1
    assert [op.name for op in calls[0].control_inputs] == [graph.inputs[1].op.name]
