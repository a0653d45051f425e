"""Training tensors the backward pass makes again instead of keeping them from the forward pass.

A training step's memory peaks at the end of the forward pass, where every tensor a gradient will read is still
held. Many of those are cheap functions of tensors that are held anyway: a BatchNorm's output (its gradient holds
its input), the swish of that output, the same zero-padded. A layer
that makes such a tensor in training marks it with its *recipe*: the steps from held tensors to the value; a layer
whose gradient needs its input and finds a recipe on it makes the input again (`again`, one XLA-compiled loop,
after the input's own gradient so the copy lives only briefly) instead of keeping it.

    y = mark(y, (("batch_norm", 1e-3),), x, mean, variance, gamma, beta)   # y = BatchNorm(x), x held anyway
    z = then(y, z, ("swish",))                                             # z = swish(y): a recipe from x
    z_again = again(z, after=[dz])                                         # in a gradient: z from x

Steps (each reads the value so far and the next arguments, in float32):
``("batch_norm", epsilon)`` from x, mean, variance, gamma, beta (per channel, the last axis): the value;
``("swish",)``: v * sigmoid(v); ``("pad", paddings)``: zero padding (``tf.pad``'s paddings, as nested tuples).

The mark is a Python attribute on the tensor: it lives while the same tensor object goes from layer to layer
(Keras' functional models pass outputs on as they are); any new tensor (a cast, an Identity) has none, and its
consumer keeps it as before. Marks are set only in training. Who marks and who reads: `batchnorm`
(FusedBatchNormalization), `activations.xla_swish`, and `fast_layers`' Recomputing* layers and UpsamplingConv2D.
Memory and speed: bench/RESULTS.md ("Issue 26, ninth run").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

_ATTRIBUTE = "_covidseg_recipe"

#: How many tensor arguments each step reads.
STEP_ARGUMENTS: dict[str, int] = {"batch_norm": 5, "swish": 0, "pad": 0}


class Recipe(NamedTuple):
    """How to make a tensor again: `steps` (hashable tuples, see the module docstring) applied to `args`."""

    steps: tuple[tuple, ...]
    args: tuple[tf.Tensor, ...]


def mark(t: Any, steps: Sequence[tuple], *args: tf.Tensor) -> Any:
    """Give `t` the recipe `steps` over `args` (tensors the backward pass holds anyway); return `t`.

    >>> y = mark(tf.ones((1, 2, 2, 3)), (("swish",),))  # a first step needs a value: batch_norm makes one
    Traceback (most recent call last):
    ...
    ValueError: a recipe starts with a batch_norm step, got (('swish',),)
    """
    steps = tuple(tuple(step) for step in steps)
    if not steps or steps[0][0] != "batch_norm":
        raise ValueError(f"a recipe starts with a batch_norm step, got {steps}")
    unknown = [step for step in steps if step[0] not in STEP_ARGUMENTS]
    if unknown:
        raise ValueError(f"unknown recipe steps {unknown}; known: {sorted(STEP_ARGUMENTS)}")
    needed = sum(STEP_ARGUMENTS[step[0]] for step in steps)
    if needed != len(args):
        raise ValueError(f"recipe {steps} reads {needed} tensors, got {len(args)}")
    setattr(t, _ATTRIBUTE, Recipe(steps, tuple(args)))
    return t


def recipe_of(t: Any) -> Recipe | None:
    """The recipe `mark` gave `t`, or None."""
    return getattr(t, _ATTRIBUTE, None)


def then(t: Any, out: Any, step: tuple) -> Any:
    """Mark `out` = `step`(`t`) (a step that reads no tensor) when `t` has a recipe (else leave it unmarked);
    return `out`."""
    recipe = recipe_of(t)
    if recipe is not None:
        mark(out, (*recipe.steps, tuple(step)), *recipe.args)
    return out


def value(steps: Iterable[tuple], args: Sequence[tf.Tensor]) -> tf.Tensor:
    """The float32 value of a recipe (the ops that `again` compiles; callable in any XLA function)."""
    args = list(args)
    v = None
    for step in steps:
        kind = step[0]
        taken, args = args[:STEP_ARGUMENTS[kind]], args[STEP_ARGUMENTS[kind]:]
        if kind == "batch_norm":
            x, mean, variance, gamma, beta = (tf.cast(a, tf.float32) for a in taken)
            scale = gamma * tf.math.rsqrt(variance + step[1])
            v = x * scale + (beta - mean * scale)
        elif kind == "swish":
            v = v * tf.sigmoid(v)
        else:  # pad
            v = tf.pad(v, step[1])
    return v


@tf.function(jit_compile=True, autograph=False)
def _again(steps: tuple, dtype: str, *args: tf.Tensor) -> tf.Tensor:
    return tf.cast(value(steps, args), dtype)


def again(t: tf.Tensor, after: Sequence[tf.Tensor]) -> tf.Tensor:
    """`t` made again from its recipe, once the tensors `after` exist (a control dependency: in a gradient, pass
    the gradients that do not need `t`, so the copy is made in the backward pass and freed soon); `t` itself (then
    held from the forward pass) when it has no recipe."""
    recipe = recipe_of(t)
    if recipe is None:
        return t
    with tf.control_dependencies(after):
        return _again(recipe.steps, t.dtype.name, *recipe.args)
