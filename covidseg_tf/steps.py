"""Keras' train and test steps, traced once, without keeping the graph they were traced in.

A `tf.function` keeps the graph it traced (TensorFlow's Python ops and their C++ graph) for as long as the function
lives. In a graph, every `tf.custom_gradient` call (the fused BatchNorm's, the swish's and the fast layers'
gradients) also registers its gradient in TensorFlow's process-wide gradient registry, which is never emptied and
whose entries hold the graph's tensors, so the graph outlives even the function (tensorflow/tensorflow#27492,
#97697). Running a traced step needs neither: TensorFlow runs the function it built from the graph.
`release_traced_steps(model)` gives a compiled model train and test functions that trace Keras' own `train_step` /
`test_step` on their first call, unregister the gradients that trace registered, drop the graph, and then run it;
`fit()`, `evaluate()`, `train_on_batch()` and `test_on_batch()` call them as they call Keras' functions. The graph's
memory is free again before the step's activations take theirs.

    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    release_traced_steps(model)  # after compile(), which resets the step functions
    model.fit(train_ds, validation_data=val_ds, epochs=15)

Models Keras would not run as one traced step per call (`run_eagerly`, `steps_per_execution` > 1, a distribution
strategy) keep Keras' functions. Reaching the traced function and the registry uses TensorFlow internals
(`ConcreteFunction._inference_function`, `AtomicFunction._cached_graph`, the gradient registry's dict):
tests/test_steps.py fails if a TensorFlow release moves them.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from tensorflow.python.eager.polymorphic_function import function_type_utils
from tensorflow.python.framework import ops

log = logging.getLogger(__name__)

_CUSTOM_GRADIENT = "CustomGradient-"  # the names tf.custom_gradient registers its gradients under in a graph


def _without_optionals(data):
    """Keras' `_autoconvert_optionals`: a tf.experimental.Optional in a batch (or its spec) stands for None."""
    return tf.nest.map_structure(
        lambda v: None if isinstance(v, (tf.experimental.Optional, tf.OptionalSpec)) else v, data)


class _TracedStep:
    """One trace of a step for one input signature: the function TensorFlow runs, without its graph."""

    def __init__(self, step: Callable, signature: Any, name: str, jit_compile: bool):
        registry = ops.gradient_registry._registry
        before = set(registry)
        t = time.perf_counter()
        # a tf.function of its own, dropped after the trace: its cache would hold the graph
        fn = tf.function(tf.autograph.experimental.do_not_convert(step), jit_compile=jit_compile)
        try:
            concrete = fn.get_concrete_function(signature)
        finally:  # also when the trace fails
            for key in [k for k in registry if k not in before and k.startswith(_CUSTOM_GRADIENT)]:
                del registry[key]
        self.function_type = concrete.function_type
        self._captures = list(concrete._captured_inputs)  # variable handles (or callables giving them)
        self._function = concrete._inference_function  # holds the function's registration in TensorFlow's runtime
        for atomic in _with_children(self._function):
            atomic._cached_graph = None
        del fn, concrete
        # the graph is a reference cycle (ops <-> graph): collected now, not during the step, which runs in C++ and
        # gives Python's collector no reason to run until its activations have taken the memory
        gc.collect()
        log.info("traced the %s in %.1f s; its graph released", name, time.perf_counter() - t)

    def inputs(self, data) -> list:
        """The function's flat inputs for `data`; TypeError or ValueError if `data` does not fit the trace."""
        bound = function_type_utils.canonicalize_function_inputs((data,), {}, self.function_type)
        return list(self.function_type.unpack_inputs(bound))

    def __call__(self, inputs: list) -> Any:
        """Runs the step on the flat inputs `inputs(data)` gave."""
        captures = [c() if callable(c) else c for c in self._captures]
        return self._function.call_preflattened(inputs + captures)


def _with_children(atomic) -> list:
    """An AtomicFunction and the functions it calls (the XLA swish loops, nested tf.functions)."""
    out, todo = [], [atomic]
    while todo:
        a = todo.pop()
        if all(a is not b for b in out):
            out.append(a)
            todo.extend(getattr(a, "children", ()) or ())
    return [a for a in out if hasattr(a, "_cached_graph")]


class ReleasedStep:
    """A model's train or test function (Keras' `step` as one tf.function), traced per input signature with the
    graph released after each trace.

    Called as Keras calls `model.train_function`: with a tf.data iterator (fit, evaluate: one batch per call,
    StopIteration once it is exhausted) or with a list holding one batch (train_on_batch). A batch that does not
    fit an earlier trace is traced again, with the shapes relaxed to what the traces share (as `reduce_retracing`).

        step = ReleasedStep(model.train_step, "train step")
        logs = step([(x, y, None)])     # {"loss": ..., "dice": ...}
    """

    def __init__(self, step: Callable, name: str, jit_compile: bool = False):
        self._step, self._name, self._jit_compile = step, name, jit_compile
        self._traces: list[tuple[Any, _TracedStep]] = []

    @property
    def traces(self) -> int:
        """How many signatures the step has been traced for."""
        return len(self._traces)

    def __call__(self, iterator_or_batches):
        if hasattr(iterator_or_batches, "get_next_as_optional"):  # tf.data / tf.distribute iterators
            optional = iterator_or_batches.get_next_as_optional()
            if not optional.has_value():
                raise StopIteration
            data, spec = optional.get_value(), iterator_or_batches.element_spec
        else:
            data = next(iter(iterator_or_batches))
            spec = tf.nest.map_structure(lambda v: None if v is None else tf.type_spec_from_value(v), data)
        data = _without_optionals(data)
        for _, traced in self._traces:
            try:
                inputs = traced.inputs(data)
            except (TypeError, ValueError):  # another signature
                continue
            return traced(inputs)
        spec = _without_optionals(spec)
        for earlier, _ in self._traces:  # relax to what this batch and the earlier traces of its structure share
            try:
                tf.nest.assert_same_structure(spec, earlier)
            except (TypeError, ValueError):
                continue
            spec = tf.nest.map_structure(
                lambda a, b: a if a is None else a.most_specific_common_supertype([b]) or a, spec, earlier)
        traced = _TracedStep(self._step, spec, self._name, self._jit_compile)
        self._traces.append((spec, traced))
        return traced(traced.inputs(data))


def release_traced_steps(model) -> bool:
    """Gives a compiled `model` train and test functions that release their traced graphs (module docstring).
    Returns False, leaving Keras' functions, where Keras would not run one traced step per call."""
    default_strategy = not tf.distribute.has_strategy() and model.distribute_strategy is tf.distribute.get_strategy()
    if model.run_eagerly or model.steps_per_execution != 1 or not default_strategy:
        log.info("keeping Keras' step functions (run_eagerly, steps_per_execution or a distribution strategy)")
        return False
    model.train_function = ReleasedStep(model.train_step, "train step", bool(model.jit_compile))
    model.test_function = ReleasedStep(model.test_step, "test step", bool(model.jit_compile))
    return True
